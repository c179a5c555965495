"""A corpus of malformed and hostile .safetensors inputs, generated at test time (nothing committed).

`build(folder, module, out)` writes every case into `folder` and returns the list of `Case`s. The same
corpus goes through the command line (tests/test_corpus.py) and through Load PaRa in a real ComfyUI
(tests/integration/test_corpus_comfy.py). Files are written byte by byte (no safetensors writer, no
numpy), so each one is exactly the bad input it names.

Kinds:
* ``header``: broken as a safetensors file (any command that reads it, as PaRa or as checkpoint, refuses it);
* ``para``: a valid safetensors file that is not a valid PaRa file;
* ``ok``: a documented behaviour that loads (fp8 bases are upcast; out = 1 allows r = 1).
"""
from __future__ import annotations

import json
import os
import pickle
import struct
from dataclasses import dataclass

import torch

from para_core.safetensors_io import tensor_bytes

SENTINEL = "PWNED_BY_PICKLE"  # the hostile pickle would create this file in its folder if it were ever unpickled


@dataclass
class Case:
    name: str  # file name in the corpus folder
    kind: str  # header | para | ok
    expect: str  # substring of the one-line message (after the file name)
    key: str | None = None  # the tensor key the message must name

    def path(self, folder: str) -> str:
        return os.path.join(folder, self.name)


class _Evil:
    """Unpickling this runs a shell command (os.system): only the bytes are written, never loaded."""

    def __init__(self, folder):
        self.folder = folder

    def __reduce__(self):
        return (os.system, (f"touch {os.path.join(self.folder, SENTINEL)}",))


def _raw(path: str, header, data: bytes = b"", n: int | None = None, pad: bool = True) -> None:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h) if n is None else n) + h + data)


def _basis(out: int, r: int, seed: int = 0) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(out, r, generator=torch.Generator().manual_seed(seed)))[0].contiguous()


def _file(path: str, tensors: dict[str, torch.Tensor], metadata=None, entry_patch=None, extra: bytes = b"") -> None:
    """A safetensors file from tensors (file order = dict order), optionally with one header entry replaced."""
    header, data, off = {}, b"", 0
    if metadata is not None:
        header["__metadata__"] = metadata
    codes = {torch.float32: "F32", torch.float16: "F16", torch.int32: "I32", torch.bool: "BOOL",
             torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.float64: "F64"}
    for k, t in tensors.items():
        b = bytes(tensor_bytes(t))
        header[k] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        data += b
        off += len(b)
    if entry_patch:
        for k, v in entry_patch.items():
            header[k] = v
    _raw(path, header, data + extra)


def build(folder: str, module: str = "diffusion_model.m", out: int = 8) -> list[Case]:
    """Write the corpus into `folder` (created) and return its cases."""
    os.makedirs(folder, exist_ok=True)
    q = _basis(out, 2)
    key = f"{module}.para_q"
    qb = bytes(tensor_bytes(q))
    ent = {"dtype": "F32", "shape": [out, 2], "data_offsets": [0, len(qb)]}
    cases: list[Case] = []

    def add(name, kind, expect, make, key_=None):
        c = Case(name, kind, expect, key_)
        p = c.path(folder)
        if os.path.lexists(p):
            os.remove(p) if not os.path.isdir(p) or os.path.islink(p) else os.rmdir(p)
        make(p)
        cases.append(c)

    def header_case(name, expect, header, data=qb, n=None, key_=None, pad=True):
        add(name, "header", expect, lambda p: _raw(p, header, data, n, pad), key_)

    def para_case(name, expect, tensors, metadata=None, key_=None):
        add(name, "para", expect, lambda p: _file(p, tensors, metadata), key_)

    def write(data):
        def make(p):
            with open(p, "wb") as f:
                f.write(data)
        return make

    # ---- not safetensors at all ----
    add("empty.safetensors", "header", "not a safetensors file (empty)", write(b""))
    add("three_bytes.safetensors", "header", "only 3 bytes", write(b"abc"))
    add("text.safetensors", "header", "not a safetensors file (header length", write(b"this is a text file, not tensors\n"))
    header_case("header_len_0.safetensors", "header does not start with '{'", b"", data=b"", pad=False)
    header_case("header_len_2e63.safetensors", "header length 9223372036854775808 does not fit", {key: ent}, n=2 ** 63)
    header_case("header_len_u64max.safetensors", f"header length {2 ** 64 - 1} does not fit", {key: ent}, n=2 ** 64 - 1)
    header_case("header_len_past_end.safetensors", "does not fit a", {key: ent}, n=10_000)
    header_case("header_json_list.safetensors", "header does not start with '{'", b"[1, 2, 3]")
    header_case("header_json_string.safetensors", "header does not start with '{'", b'"para"')
    header_case("header_bom.safetensors", "header does not start with '{'", b"\xef\xbb\xbf" + json.dumps({key: ent}).encode())
    header_case("header_not_json.safetensors", "unreadable header", b"{not json at all}")
    header_case("header_bad_utf8.safetensors", "unreadable header", b'{"\xff\xfe": 1}')
    header_case("header_nested_deep.safetensors", "nested too deeply", b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}", data=b"")
    header_case("header_nul_padding.safetensors", "unreadable header", json.dumps({key: ent}).encode() + b"\0" * 7, pad=False)
    header_case("header_duplicate_key.safetensors", f"key '{key}' appears twice",
                b'{"%s": %s, "%s": %s}' % (key.encode(), json.dumps(ent).encode(), key.encode(), json.dumps(ent).encode()))
    # ---- __metadata__ ----
    header_case("metadata_list.safetensors", "__metadata__ is a JSON list", {"__metadata__": ["format", "para"], key: ent})
    header_case("metadata_int_value.safetensors", "__metadata__ key 'rank': value is a JSON int",
                {"__metadata__": {"format": "para", "rank": 2}, key: ent})
    header_case("metadata_nested.safetensors", "__metadata__ key 'training': value is a JSON dict",
                {"__metadata__": {"training": {"steps": 1}}, key: ent})
    header_case("metadata_string.safetensors", "__metadata__ is a JSON str", {"__metadata__": "para", key: ent})
    # ---- header entries ----
    header_case("entry_not_object.safetensors", "header entry is a JSON int", {key: 5}, key_=key)
    for field in ("dtype", "shape", "data_offsets"):
        header_case(f"entry_no_{field}.safetensors", f"header entry has no '{field}'",
                    {key: {k: v for k, v in ent.items() if k != field}}, key_=key)
    header_case("dtype_unknown.safetensors", 'unknown or unsupported dtype "F4X"', {key: {**ent, "dtype": "F4X"}}, key_=key)
    header_case("dtype_f4.safetensors", 'unknown or unsupported dtype "F4"', {key: {**ent, "dtype": "F4"}}, key_=key)
    header_case("dtype_number.safetensors", "unknown or unsupported dtype 32", {key: {**ent, "dtype": 32}}, key_=key)
    header_case("shape_negative.safetensors", "is not a list of non-negative integers", {key: {**ent, "shape": [-out, -2]}}, key_=key)
    header_case("shape_float.safetensors", "is not a list of non-negative integers", {key: {**ent, "shape": [out / 2, 4.0]}}, key_=key)
    header_case("shape_string.safetensors", "is not a list of non-negative integers", {key: {**ent, "shape": f"{out}x2"}}, key_=key)
    header_case("shape_1e12_elements.safetensors", "needs 4000000000000 bytes, the header gives",
                {key: {**ent, "shape": [10 ** 6, 10 ** 6]}}, key_=key)
    header_case("shape_1e12_claimed.safetensors", "lies beyond the file",
                {key: {**ent, "shape": [10 ** 6, 10 ** 6], "data_offsets": [0, 4 * 10 ** 12]}}, key_=key)
    header_case("shape_mismatch.safetensors", f"needs {len(qb)} bytes, the header gives {len(qb) - 4}",
                {key: {**ent, "data_offsets": [0, len(qb) - 4]}}, data=qb[:-4], key_=key)
    header_case("offsets_three.safetensors", "is not two non-negative integers", {key: {**ent, "data_offsets": [0, 8, len(qb)]}}, key_=key)
    header_case("offsets_negative.safetensors", "is not two non-negative integers", {key: {**ent, "data_offsets": [-8, len(qb) - 8]}}, key_=key)
    header_case("offsets_float.safetensors", "is not two non-negative integers", {key: {**ent, "data_offsets": [0.0, float(len(qb))]}}, key_=key)
    header_case("offsets_reversed.safetensors", "end before they start", {key: {**ent, "data_offsets": [len(qb), 0]}}, key_=key)
    header_case("offsets_beyond.safetensors", "lies beyond the file", {key: {**ent, "data_offsets": [8, len(qb) + 8]}}, key_=key)
    key2 = f"{module}.para_q_1"
    header_case("offsets_overlap.safetensors", "overlaps key", {key: ent, key2: ent}, key_=key2)
    header_case("offsets_gap.safetensors", "a gap in the data", {key: {**ent, "data_offsets": [8, len(qb) + 8]}}, data=b"\0" * 8 + qb, key_=key)
    header_case("trailing_bytes.safetensors", "trailing bytes", {key: ent}, data=qb + b"\0" * 16)
    # ---- truncations of a valid file ----
    good = os.path.join(folder, ".good.tmp")
    _file(good, {key: q}, {"format": "para"})
    with open(good, "rb") as f:
        full = f.read()
    os.remove(good)
    add("truncated_data.safetensors", "header", "lies beyond the file", write(full[:-10]), key)
    add("truncated_header.safetensors", "header", "does not fit a", write(full[:20]))
    add("truncated_length.safetensors", "header", "only 5 bytes", write(full[:5]))
    # ---- pickles (never unpickled) ----
    add("pickle_torch_zip.safetensors", "header", "pickle", lambda p: torch.save({key: q}, p))
    add("pickle_raw_proto2.safetensors", "header", "pickle", write(pickle.dumps({key: [1.0, 2.0]}, protocol=2)))
    add("pickle_raw_proto5.safetensors", "header", "pickle", write(pickle.dumps({key: [1.0, 2.0]}, protocol=5)))
    add("pickle_runs_code.safetensors", "header", "pickle", write(pickle.dumps(_Evil(folder), protocol=4)))
    # ---- not a regular file ----
    add("directory.safetensors", "header", "is a directory", os.mkdir)
    add("symlink_loop.safetensors", "header", "symbolic link loop", lambda p: os.symlink(os.path.basename(p), p))
    add("symlink_dangling.safetensors", "header", "broken symbolic link", lambda p: os.symlink("nowhere.safetensors", p))
    add("fifo.safetensors", "header", "is a FIFO (named pipe), not a regular file", os.mkfifo)
    add("devnull.safetensors", "header", "is a character device", lambda p: os.symlink("/dev/null", p))
    cases.append(Case("missing.safetensors", "header", "no such file"))
    # ---- odd names (the message stays one line) ----
    add("odd\nnewline.safetensors", "header", "not a safetensors file (empty)", write(b""))
    add("odd \x1b[31mescape.safetensors", "header", "not a safetensors file (empty)", write(b""))
    add("-odd dash ü ñ 名前.safetensors", "header", "not a safetensors file (empty)", write(b""))
    # ---- valid safetensors, invalid PaRa ----
    para_case("no_tensors.safetensors", "contains no tensors", {}, {"format": "para"})
    para_case("nan.safetensors", "contains NaN or Inf", {key: q.clone().index_fill_(0, torch.tensor([1]), float("nan"))}, key_=key)
    para_case("inf.safetensors", "contains NaN or Inf", {key: q.clone().index_fill_(0, torch.tensor([0]), float("inf"))}, key_=key)
    fp8_nan = q.to(torch.float8_e4m3fn).view(torch.uint8).clone()
    fp8_nan[0, 0] = 0x7F  # the NaN of e4m3fn (it has no Inf)
    para_case("fp8_nan.safetensors", "contains NaN or Inf", {key: fp8_nan.view(torch.float8_e4m3fn)}, key_=key)
    para_case("rank_deficient_zero.safetensors", "rank deficient", {key: torch.zeros(out, 2)}, key_=key)
    para_case("rank_deficient_repeat.safetensors", "rank deficient", {key: q[:, :1].repeat(1, 2).contiguous()}, key_=key)
    para_case("rank_above_out.safetensors", "rank r=3 must be between 1 and 1 for out=2", {key: _basis(2, 2).repeat(1, 2)[:, :3].contiguous()}, key_=key)
    para_case("rank_equal_out.safetensors", "r = out would remove every output direction", {key: _basis(out, out)}, key_=key)
    para_case("rank_zero.safetensors", "rank r=0", {key: torch.zeros(out, 0)}, key_=key)
    para_case("one_dim.safetensors", "expected a 2-D", {key: q[:, 0].contiguous()}, key_=key)
    para_case("three_dim.safetensors", "expected a 2-D", {key: q.reshape(out, 2, 1)}, key_=key)
    para_case("int_dtype.safetensors", "is not a floating-point type", {key: torch.ones(out, 2, dtype=torch.int32)}, key_=key)
    para_case("bool_dtype.safetensors", "is not a floating-point type", {key: torch.ones(out, 2, dtype=torch.bool)}, key_=key)
    para_case("unknown_suffix.safetensors", "unknown suffix", {f"{module}.para_x": q}, key_=f"{module}.para_x")
    para_case("lora_file.safetensors", "looks like a LoRA file", {f"{module}.lora_up.weight": q}, key_=f"{module}.lora_up.weight")
    para_case("odd_key_newline.safetensors", "unknown suffix", {f"{module}\n.para_q": q}, key_=f"{module}\\n.para_q")
    para_case("odd_key_escape.safetensors", "unknown suffix", {f"{module}\x1b[2J.para_x": q}, key_=f"{module}\\x1b[2J.para_x")
    para_case("format_lora.safetensors", "metadata says format 'lora'", {key: q}, {"format": "lora"})
    para_case("version_newer.safetensors", "newer comfyui-para (para_version 9)", {key: q}, {"para_version": "9"})
    para_case("version_not_number.safetensors", "para_version 'one' is not a number", {key: q}, {"para_version": "one"})
    para_case("stage_gap.safetensors", "stages [0, 2] are not 0..1", {key: q, f"{module}.para_q_2": q})
    para_case("stage_twice.safetensors", "both define stage 0", {key: q, f"{module}.para_b": q})
    para_case("stage_shape.safetensors", f"does not match stage 0's output dim {out}", {key: q, key2: _basis(out + 1, 1)}, key_=key2)
    # ---- documented behaviours that load ----
    add("ok_fp8_e4m3.safetensors", "ok", "", lambda p: _file(p, {key: q.to(torch.float8_e4m3fn)}))
    add("ok_fp8_e5m2_b.safetensors", "ok", "", lambda p: _file(p, {f"{module}.para_b": (q * 4).to(torch.float8_e5m2)}))
    return cases
