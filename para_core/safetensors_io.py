"""Reading and writing .safetensors files, streamed and atomically.

Writing is our own (the format is 8 bytes of header length, a JSON header, raw little-endian data)
because (1) the safetensors library orders metadata by hash, so files would not round-trip
byte-exactly, and (2) bake must stream a multi-GB checkpoint tensor by tensor. Reading goes
through `safetensors.safe_open`, after our own header check so a pickle or truncated file gets
a clear message.
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from safetensors import safe_open

from .errors import ParaError, ParaFormatError

DTYPE_TO_ST = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        DTYPE_TO_ST[getattr(torch, _name)] = _code
ST_TO_DTYPE = {v: k for k, v in DTYPE_TO_ST.items()}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str) -> tuple[dict[str, str], list[TensorInfo]]:
    """Validate and parse a safetensors header. Returns (metadata, tensors in file order)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ParaFormatError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or n + 8 > size:
                if head[:2] == b"PK" or (head[0] == 0x80 and 2 <= head[1] <= 5):
                    raise ParaFormatError(f"{path}: this is a pickle/PyTorch checkpoint, not safetensors; "
                                          "only .safetensors files are read (pickle files can run code)")
                raise ParaFormatError(f"{path}: not a safetensors file (header length {n} does not fit a {size}-byte file)")
            raw = f.read(n)
            if not raw.startswith(b"{"):
                raise ParaFormatError(f"{path}: not a safetensors file (header does not start with '{{')")
    except FileNotFoundError:
        raise ParaError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ParaError(f"{path}: is a directory, expected a .safetensors file") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (UnicodeDecodeError, ValueError) as e:
        raise ParaFormatError(f"{path}: not a safetensors file (unreadable header: {e})") from None
    meta = header.pop("__metadata__", None) or {}
    infos = []
    data_len = size - 8 - n
    for name, v in header.items():
        try:
            start, end = (int(x) for x in v["data_offsets"])
            info = TensorInfo(name, str(v["dtype"]), tuple(int(s) for s in v["shape"]), start, end)
        except (KeyError, TypeError, ValueError):
            raise ParaFormatError(f"{path}: key '{name}': malformed header entry {v!r}") from None
        if end > data_len or start > end:
            raise ParaFormatError(f"{path}: key '{name}': data {start}..{end} lies beyond the file's {data_len} data bytes "
                                  "(truncated file?)")
        infos.append(info)
    infos.sort(key=lambda t: t.start)
    return {str(k): str(v) for k, v in meta.items()}, infos


@contextlib.contextmanager
def open_tensors(path: str) -> Iterator:
    """safe_open, with our header validation first and its errors turned into ParaFormatError."""
    read_header(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            yield f
    except ParaError:
        raise
    except Exception as e:  # safetensors raises SafetensorError / OSError with terse text
        raise ParaFormatError(f"{path}: cannot read safetensors data: {e}") from None


def load_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    meta, infos = read_header(path)
    with open_tensors(path) as f:
        return {t.name: f.get_tensor(t.name) for t in infos}, meta


@contextlib.contextmanager
def atomic_output(path: str, force: bool = False) -> Iterator:
    """Yield a binary file object on a temp file beside `path`; rename over `path` only on success.

    On any error the temp file is removed, so no half-written output is ever left behind.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ParaError(f"{path}: is a directory")
    if os.path.exists(path) and not force:
        raise ParaError(f"{path}: already exists (use --force to overwrite)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ParaError(f"{path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path) and not force:
            raise ParaError(f"{path}: appeared while writing (use --force to overwrite)")
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise ParaError(f"{path}: could not write: {e.strerror or e}") from None
        raise


def _header_bytes(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None) -> tuple[bytes, list[int]]:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(metadata[k]) for k in sorted(metadata)}
    offset = 0
    sizes = []
    for name, dtype, shape in entries:
        if dtype not in DTYPE_TO_ST:
            raise ParaError(f"tensor '{name}': dtype {dtype} cannot be stored in safetensors")
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPE_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        sizes.append(n)
        offset += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, sizes


def tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_stream(path: str, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 produce: Callable[[int], torch.Tensor], metadata: dict[str, str] | None = None,
                 force: bool = False, progress: Callable[[int], None] | None = None) -> None:
    """Write tensors one at a time: `produce(i)` returns tensor i, which must match entries[i].

    Only one tensor is held at a time, so a checkpoint never needs twice its size in memory.
    """
    header, sizes = _header_bytes(entries, metadata)
    with atomic_output(path, force=force) as f:
        f.write(header)
        for i, (name, dtype, shape) in enumerate(entries):
            t = produce(i)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ParaError(f"{path}: tensor '{name}' changed to {t.dtype} {tuple(t.shape)}, header says {dtype} {tuple(shape)}")
            f.write(tensor_bytes(t))
            if progress is not None:
                progress(sizes[i])


def save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None, force: bool = False) -> None:
    """Deterministic safetensors file: keys sorted, metadata sorted, so equal inputs give equal bytes."""
    names = sorted(tensors)
    entries = [(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in names]
    write_stream(path, entries, lambda i: tensors[names[i]], metadata, force=force)


def to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The exact bytes save_file would write (for tests and in-memory use)."""
    names = sorted(tensors)
    header, _ = _header_bytes([(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in names], metadata)
    return header + b"".join(bytes(tensor_bytes(tensors[n])) for n in names)
