"""Reading and writing .safetensors files, streamed and atomically, without numpy.

Writing is our own (the format is 8 bytes of header length, a JSON header, raw little-endian data)
because (1) the safetensors library orders metadata by hash, so files would not round-trip
byte-exactly, (2) bake must stream a multi-GB checkpoint tensor by tensor, and (3) the library's
torch writer needs numpy, which the torch CPU wheels do not install. Tensor data is laid out like
the library does it (dtype size descending, then name), so every tensor starts at a multiple of its
element size and zero-copy readers can map it.

Reading goes through `safetensors.safe_open`, after our own checks of the file and its header,
so every bad input gets one line naming the file (and key) instead of a library error:
not a regular file (FIFO, device, directory: refused before opening, so nothing can block),
a pickle, a truncated file, a header that is not a JSON object, duplicate keys, unknown dtypes,
byte counts that do not match the shape, overlapping or gapped data, a `__metadata__` that is not
an object of strings.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import stat
import struct
import sys
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
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("float8_e8m0fnu", "F8_E8M0"),
                     ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        DTYPE_TO_ST[getattr(torch, _name)] = _code
ST_TO_DTYPE = {v: k for k, v in DTYPE_TO_ST.items()}
ST_ITEMSIZE = {code: torch.empty((), dtype=dt).element_size() for code, dt in ST_TO_DTYPE.items()}
MAX_HEADER = 100 * 1024 * 1024
_TEMP_NAME_MAX = 100  # characters of the output name kept in the temp file's name (NAME_MAX is 255 bytes)


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


# ---- reading -----------------------------------------------------------------------------------
def _open_regular(path: str):
    """Open `path` for reading only if it is a regular file; one-line ParaError otherwise.

    The stat check comes first, and the open itself is non-blocking, so a FIFO (or a FIFO swapped in
    after the check) can never block; the opened descriptor is checked again with fstat.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        kind = "broken symbolic link" if os.path.islink(path) else "no such file"
        raise ParaError(f"{path}: {kind}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ParaError(f"{path}: symbolic link loop") from None
        raise ParaError(f"{path}: cannot read: {e.strerror or e}") from None
    except ValueError as e:  # a NUL in the name
        raise ParaError(f"{path}: cannot read: {e}") from None
    _require_regular(path, st.st_mode)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ParaError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        _require_regular(path, st.st_mode)
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def _require_regular(path: str, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise ParaError(f"{path}: is a directory, expected a .safetensors file")
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")
    raise ParaError(f"{path}: is {kind}, not a regular file; expected a .safetensors file")


def _unique_object(pairs: list) -> dict:
    """json object_pairs_hook: a key given twice is an error (json.loads would silently keep the last)."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key '{k}' appears twice")
        out[k] = v
    return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_header(path: str) -> tuple[dict[str, str], list[TensorInfo]]:
    """Validate and parse a safetensors header. Returns (metadata, tensors in file order).

    Checks everything the safetensors library checks (and a few things it does not), so that
    `open_tensors` never meets a file it refuses with a terse message.
    """
    path = os.fspath(path)
    f, size = _open_regular(path)
    with f:
        try:
            head = f.read(8)
            if len(head) < 8:
                raise ParaFormatError(f"{path}: not a safetensors file ({'empty' if size == 0 else f'only {size} bytes'})")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or n + 8 > size:
                if head[:2] == b"PK" or (head[0] == 0x80 and 2 <= head[1] <= 5):
                    raise ParaFormatError(f"{path}: this is a pickle/PyTorch checkpoint, not safetensors; "
                                          "only .safetensors files are read (pickle files can run code)")
                raise ParaFormatError(f"{path}: not a safetensors file (header length {n} does not fit a {size}-byte file)")
            raw = f.read(n)
        except OSError as e:
            raise ParaError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(raw) < n:
        raise ParaFormatError(f"{path}: file shrank while reading the header (truncated?)")
    if not raw.startswith(b"{"):
        raise ParaFormatError(f"{path}: not a safetensors file (header does not start with '{{')")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_object)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else e
        raise ParaFormatError(f"{path}: not a safetensors file (unreadable header: {why})") from None
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise ParaFormatError(f"{path}: __metadata__ is a JSON {type(meta).__name__}, expected an object of strings")
    for k, v in meta.items():
        if not isinstance(v, str):
            raise ParaFormatError(f"{path}: __metadata__ key '{k}': value is a JSON {type(v).__name__}, expected a string")
    infos = []
    data_len = size - 8 - n
    for name, v in header.items():
        infos.append(_tensor_info(path, name, v, data_len))
    infos.sort(key=lambda t: (t.start, t.end))
    pos, prev = 0, None
    for t in infos:  # the library's rule: tensors tile the data buffer exactly, in offset order
        if t.nbytes == 0 and t.start == pos:
            continue
        if t.start < pos:
            raise ParaFormatError(f"{path}: key '{t.name}': data {t.start}..{t.end} overlaps key '{prev.name}' ({prev.start}..{prev.end})")
        if t.start > pos:
            raise ParaFormatError(f"{path}: key '{t.name}': data starts at {t.start}, expected {pos} (a gap in the data)")
        pos, prev = t.end, t
    if pos != data_len:
        raise ParaFormatError(f"{path}: the tensors cover {pos} of the file's {data_len} data bytes (trailing bytes)")
    return dict(meta), infos


def _tensor_info(path: str, name: str, v, data_len: int) -> TensorInfo:
    def bad(why: str) -> ParaFormatError:
        return ParaFormatError(f"{path}: key '{name}': {why}")
    if not isinstance(v, dict):
        raise bad(f"header entry is a JSON {type(v).__name__}, expected an object with dtype, shape, data_offsets")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in v:
            raise bad(f"header entry has no '{field}'")
    dtype, shape, offsets = v["dtype"], v["shape"], v["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ST_ITEMSIZE:
        raise bad(f"unknown or unsupported dtype {json.dumps(dtype)[:40]} (supported: {', '.join(sorted(ST_ITEMSIZE))})")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise bad(f"shape {json.dumps(shape)[:60]} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(x) and x >= 0 for x in offsets)):
        raise bad(f"data_offsets {json.dumps(offsets)[:60]} is not two non-negative integers")
    start, end = offsets
    if start > end:
        raise bad(f"data_offsets [{start}, {end}] end before they start")
    if end > data_len:
        raise bad(f"data {start}..{end} lies beyond the file's {data_len} data bytes (truncated file?)")
    numel = 1
    for s in shape:
        numel *= s
    if numel * ST_ITEMSIZE[dtype] != end - start:
        raise bad(f"shape {tuple(shape)} of {dtype} needs {numel * ST_ITEMSIZE[dtype]} bytes, the header gives {end - start}")
    return TensorInfo(name, dtype, tuple(shape), start, end)


class _TensorReader:
    """safe_open's handle, with its errors turned into one line naming the file and key."""

    def __init__(self, handle, path: str):
        self._f, self._path = handle, path

    def get_tensor(self, name: str) -> torch.Tensor:
        try:
            return self._f.get_tensor(name)
        except Exception as e:  # SafetensorError / OSError (an I/O error of the mapped file)
            raise ParaFormatError(f"{self._path}: key '{name}': cannot read tensor data: {e}") from None

    def keys(self) -> list[str]:
        return list(self._f.keys())


@contextlib.contextmanager
def open_tensors(path: str) -> Iterator[_TensorReader]:
    """safe_open, after our header validation. Only reading errors become ParaFormatError: an error in
    the caller's `with` body (a write error of an output, say) passes through unchanged."""
    read_header(path)
    try:
        cm = safe_open(path, framework="pt", device="cpu")
        handle = cm.__enter__()
    except Exception as e:  # safetensors raises SafetensorError / OSError with terse text
        raise ParaFormatError(f"{path}: cannot read safetensors data: {e}") from None
    try:
        yield _TensorReader(handle, path)
    finally:
        cm.__exit__(None, None, None)


def load_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    meta, infos = read_header(path)
    with open_tensors(path) as f:
        return {t.name: f.get_tensor(t.name) for t in infos}, meta


# ---- writing -----------------------------------------------------------------------------------
def _umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask sets it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output(path: str, force: bool = False) -> str:
    """Everything about an output path that can be checked before any work: one line naming it.

    Returns the folder the output goes to.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ParaError(f"{path}: is a directory, expected an output file name")
    if os.path.lexists(path):
        if not force:
            raise ParaError(f"{path}: already exists (use --force to overwrite)")
        if not os.path.isfile(path):
            raise ParaError(f"{path}: exists and is not a regular file; not overwriting it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        why = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise ParaError(f"{path}: cannot write: {folder} {why}")
    name = os.path.basename(path)
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if not name or len(os.fsencode(name)) > name_max:
        raise ParaError(f"{path}: cannot write: file name is {len(os.fsencode(name))} bytes, this file system allows {name_max}")
    return folder


@contextlib.contextmanager
def atomic_output(path: str, force: bool = False) -> Iterator:
    """Yield a binary file object on a temp file beside `path`; rename over `path` only on success.

    On any error (or a signal the CLI turns into an exception) the temp file is removed, so no
    half-written output is left behind. OSErrors are reported as write errors of `path`. The file gets
    the mode a plain `open` would give it (0o666 minus the umask), also when it replaces a file.
    """
    path = os.fspath(path)
    folder = check_output(path, force)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)[:_TEMP_NAME_MAX]}.", suffix=".partial", dir=folder)
    except OSError as e:
        raise ParaError(f"{path}: cannot write: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600
            yield f
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
        else:
            _publish_new(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise ParaError(f"{path}: cannot write: {e.strerror or e}") from None
        raise


def _publish_new(tmp: str, path: str) -> None:
    """Put the finished temp file at `path` only if nothing is there, atomically: a hard link fails if the name
    exists, however late the other file appeared (a check followed by a rename would overwrite a file that
    appears between the two). Where the file system has no hard links, the check and the rename."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise ParaError(f"{path}: appeared while writing (use --force to overwrite)") from None
    except OSError:  # no hard links on this file system (FAT, some network shares)
        if os.path.lexists(path):
            raise ParaError(f"{path}: appeared while writing (use --force to overwrite)") from None
        os.replace(tmp, path)
        return
    with contextlib.suppress(OSError):  # the output is complete; a temp name left behind is only clutter
        os.unlink(tmp)


def data_order(entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> list[int]:
    """Indices of `entries` in data order: element size descending, then name (the safetensors library's
    order). Every size is a multiple of every smaller power-of-two size, so each tensor starts at a
    multiple of its own element size (the data section itself starts at a multiple of 8)."""
    def itemsize(dtype):
        return torch.empty((), dtype=dtype).element_size()
    return sorted(range(len(entries)), key=lambda i: (-itemsize(entries[i][1]), entries[i][0]))


def _header_bytes(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None) -> tuple[bytes, list[int]]:
    """(header bytes, data order). Header keys are sorted by name; data is laid out in `data_order`."""
    for name, dtype, _ in entries:
        if dtype not in DTYPE_TO_ST:
            raise ParaError(f"tensor '{name}': dtype {dtype} cannot be stored in safetensors")
    names = [e[0] for e in entries]
    if len(set(names)) != len(names):
        raise ParaError(f"tensor names are not unique: {sorted({n for n in names if names.count(n) > 1})[:3]}")
    order = data_order(entries)
    offsets: dict[int, tuple[int, int]] = {}
    offset = 0
    for i in order:
        _name, dtype, shape = entries[i]
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        offsets[i] = (offset, offset + n)
        offset += n
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(metadata[k]) for k in sorted(metadata)}
    for i in sorted(range(len(entries)), key=lambda i: entries[i][0]):
        name, dtype, shape = entries[i]
        header[name] = {"dtype": DTYPE_TO_ST[dtype], "shape": list(shape), "data_offsets": list(offsets[i])}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, order


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without a copy and without numpy.

    A ctypes array over the tensor's memory; the array keeps a reference to the tensor so the memory
    lives as long as the view.
    """
    t = t.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    if sys.byteorder != "little":  # pragma: no cover
        raise ParaError("writing safetensors on a big-endian machine is not supported")
    buf = (ctypes.c_char * n).from_address(t.data_ptr())
    buf._tensor = t  # noqa: SLF001  (keeps the memory alive)
    return memoryview(buf).cast("B")


def write_stream(path: str, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 produce: Callable[[int], torch.Tensor], metadata: dict[str, str] | None = None,
                 force: bool = False, progress: Callable[[int], None] | None = None) -> None:
    """Write tensors one at a time: `produce(i)` returns tensor i, which must match entries[i].

    Tensors are requested in data order (see `data_order`), not list order. Only one tensor is held at a
    time, so a checkpoint never needs twice its size in memory.
    """
    header, order = _header_bytes(entries, metadata)
    with atomic_output(path, force=force) as f:
        f.write(header)
        for i in order:
            name, dtype, shape = entries[i]
            t = produce(i)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ParaError(f"{path}: tensor '{name}' changed to {t.dtype} {tuple(t.shape)}, header says {dtype} {tuple(shape)}")
            data = tensor_bytes(t)
            f.write(data)
            if progress is not None:
                progress(len(data))


def save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None, force: bool = False) -> None:
    """Deterministic safetensors file: header keys and metadata sorted, data aligned, so equal inputs give equal bytes."""
    names = sorted(tensors)
    entries = [(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in names]
    write_stream(path, entries, lambda i: tensors[names[i]], metadata, force=force)


def to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The exact bytes save_file would write (for tests and in-memory use)."""
    names = sorted(tensors)
    header, order = _header_bytes([(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in names], metadata)
    return header + b"".join(bytes(tensor_bytes(tensors[names[i]])) for i in order)
