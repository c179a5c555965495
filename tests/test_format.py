"""The .safetensors PaRa format: round-trips, validation of every bad input, atomic writes."""
import json
import os
import pickle
import struct

import pytest
import torch
from reference import random_orth64

from para_core import ParaError, ParaFormatError, ParaModel, match_modules, merge
from para_core import safetensors_io
from para_core.format import parse_training_metadata, stage_key, training_metadata


def _model(gen, modules=("diffusion_model.a.to_q", "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"), r=3):
    return ParaModel.from_bases({m: [random_orth64(16, r, gen).float()] for m in modules}, {"base_model": "sd15"})


def test_keys_metadata_and_dtype(gen):
    p = _model(gen)
    assert sorted(p.tensors) == ["diffusion_model.a.to_q.para_q",
                                 "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.para_q"]
    assert all(t.dtype == torch.float16 and t.shape == (16, 3) for t in p.tensors.values())
    assert p.metadata["format"] == "para" and p.metadata["para_version"] == "1"
    assert p.metadata["rank"] == "3" and p.metadata["stages"] == "1" and p.metadata["base_model"] == "sd15"


def test_byte_exact_round_trip(tmp_path, gen):
    p = _model(gen)
    f1, f2 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    p.save(str(f1))
    q = ParaModel.load(str(f1))
    q.save(str(f2))
    assert f1.read_bytes() == f2.read_bytes() == p.to_bytes()
    # and the bases the loader derives are identical to the writer's
    for m in p.stages:
        assert torch.equal(p.stages[m][0], q.stages[m][0])


def test_file_is_readable_by_the_safetensors_library(tmp_path, gen):
    from safetensors.torch import load_file
    from safetensors import safe_open
    p = _model(gen)
    path = tmp_path / "x.safetensors"
    p.save(str(path))
    sd = load_file(str(path))
    assert all(torch.equal(sd[k], p.tensors[k]) for k in p.tensors)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["format"] == "para"


def test_sequential_merge_round_trips_as_stages(tmp_path, gen):
    a, b = _model(gen, r=2), _model(gen, r=3)
    m = merge([a, b], "sequential")
    path = tmp_path / "m.safetensors"
    m.save(str(path))
    back = ParaModel.load(str(path))
    assert set(back.tensors) == {stage_key(mod, s) for mod in a.stages for s in (0, 1)}
    assert back.metadata["stages"] == "2" and back.metadata["merge_mode"] == "sequential"
    for mod in m.stages:
        assert [q.shape[1] for q in back.stages[mod]] == [2, 3]
        assert all(torch.equal(x, y) for x, y in zip(back.stages[mod], m.stages[mod]))


def test_raw_b_is_orthonormalised(gen):
    b = torch.randn(20, 4, generator=gen)
    p = ParaModel({"diffusion_model.x.para_b": b})
    q = p.stages["diffusion_model.x"][0]
    assert torch.allclose(q.T @ q, torch.eye(4), atol=1e-5)
    assert torch.allclose(q @ (q.T @ b), b, atol=1e-5)


def _write_raw(path, tensors, metadata=None):
    safetensors_io.save_file(tensors, str(path), metadata)


@pytest.mark.parametrize("tensors, meta, pattern", [
    ({"m.para_q": torch.randn(4, 2, 1)}, None, r"key 'm.para_q': expected a 2-D"),
    ({"m.para_q": torch.randn(2, 3)}, None, r"key 'm.para_q': rank r=3 must be between 1 and 1 for out=2"),
    ({"m.para_q": torch.tensor([[1.0], [float("nan")]])}, None, r"key 'm.para_q': contains NaN"),
    ({"m.lora_up.weight": torch.randn(4, 2)}, None, r"key 'm.lora_up.weight': unknown suffix.*LoRA"),
    ({"m.para_x": torch.randn(4, 2)}, None, r"key 'm.para_x': unknown suffix"),
    ({"m.para_q": torch.zeros(4, 2)}, None, r"key 'm.para_q'.*rank deficient"),
    ({"m.para_q": torch.ones(4, 2, dtype=torch.int32)}, None, r"key 'm.para_q': dtype"),
    ({"m.para_q": torch.randn(4, 1), "m.para_q_2": torch.randn(4, 1)}, None, r"module 'm': stages \[0, 2\]"),
    ({"m.para_q": torch.randn(4, 1), "m.para_b": torch.randn(4, 1)}, None, r"both define stage 0"),
    ({"m.para_q": torch.randn(4, 1), "m.para_q_1": torch.randn(5, 1)}, None, r"key 'm.para_q_1': shape \(5, 1\)"),
    ({"m.para_q": torch.randn(4, 1)}, {"format": "lora"}, r"format 'lora'"),
    ({"m.para_q": torch.randn(4, 1)}, {"para_version": "7"}, r"newer comfyui-para"),
])
def test_bad_tensors_are_refused_with_file_and_key(tmp_path, tensors, meta, pattern):
    path = tmp_path / "bad.safetensors"
    _write_raw(path, tensors, meta)
    with pytest.raises(ParaFormatError, match=pattern) as e:
        ParaModel.load(str(path))
    assert str(path) in str(e.value)


def test_pickle_file_is_refused(tmp_path):
    path = tmp_path / "evil.safetensors"
    torch.save({"m.para_q": torch.randn(4, 1)}, str(path))  # zip-based torch pickle
    with pytest.raises(ParaFormatError, match="pickle"):
        ParaModel.load(str(path))
    raw = tmp_path / "raw.safetensors"
    raw.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ParaFormatError, match="pickle"):
        ParaModel.load(str(raw))


def test_truncated_and_garbage_files(tmp_path, gen):
    good = tmp_path / "g.safetensors"
    _model(gen).save(str(good))
    data = good.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-10])
    with pytest.raises(ParaFormatError, match="beyond the file"):
        ParaModel.load(str(tmp_path / "t.safetensors"))
    (tmp_path / "s.safetensors").write_bytes(b"abc")
    with pytest.raises(ParaFormatError, match="not a safetensors file"):
        ParaModel.load(str(tmp_path / "s.safetensors"))
    hdr = b"{not json"
    (tmp_path / "j.safetensors").write_bytes(struct.pack("<Q", len(hdr)) + hdr)
    with pytest.raises(ParaFormatError, match="unreadable header"):
        ParaModel.load(str(tmp_path / "j.safetensors"))
    with pytest.raises(ParaError, match="no such file"):
        ParaModel.load(str(tmp_path / "missing.safetensors"))
    empty = tmp_path / "e.safetensors"
    _write_raw(empty, {})
    with pytest.raises(ParaFormatError, match="no tensors"):
        ParaModel.load(str(empty))


def test_save_never_overwrites_without_force_and_leaves_no_temp(tmp_path, gen):
    p = _model(gen)
    path = tmp_path / "x.safetensors"
    p.save(str(path))
    before = path.read_bytes()
    with pytest.raises(ParaError, match="already exists"):
        _model(gen).save(str(path))
    assert path.read_bytes() == before
    _model(gen).save(str(path), force=True)
    assert path.read_bytes() != before
    assert os.listdir(tmp_path) == ["x.safetensors"]


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "out.safetensors"

    def boom(i):
        raise RuntimeError("producer failed")
    with pytest.raises(RuntimeError):
        safetensors_io.write_stream(str(path), [("a", torch.float32, (2,))], boom)
    assert os.listdir(tmp_path) == []


def test_header_is_deterministic_and_sorted(gen):
    p = _model(gen)
    raw = p.to_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    assert [k for k in header if k != "__metadata__"] == sorted(p.tensors)


def test_match_report_is_one_summary(gen):
    p = _model(gen, modules=[f"diffusion_model.l{i}" for i in range(6)])
    dims = {"diffusion_model.l0": 16, "diffusion_model.l1": 16, "diffusion_model.l2": 8, "diffusion_model.l3": 9}
    rep = match_modules(p, lambda m: (m, dims[m]) if m in dims else None)
    assert sorted(rep.matched) == ["diffusion_model.l0", "diffusion_model.l1"]
    assert rep.unmatched == ["diffusion_model.l4", "diffusion_model.l5"]
    assert [m for m, _, _ in rep.mismatched] == ["diffusion_model.l2", "diffusion_model.l3"]
    s = rep.summary()
    assert "2 matched" in s and "2 not in the model" in s and "2 shape mismatches" in s and "(16, 3) vs weight out-dim 8" in s
    with pytest.raises(ParaError, match="does not fit"):
        rep.raise_if_bad()


def _mixed_tensors(gen):
    """Every dtype the writer supports, with sizes that misalign any name-ordered layout."""
    ts = {
        "a_u8": torch.randint(0, 255, (3,), generator=gen, dtype=torch.uint8),
        "b_f64": torch.randn(5, generator=gen, dtype=torch.float64),
        "c_f16": torch.randn(3, generator=gen).half(),
        "d_f32": torch.randn(7, 1, generator=gen),
        "e_bool": torch.tensor([True, False, True]),
        "f_bf16": torch.randn(1, 5, generator=gen).bfloat16(),
        "g_i64": torch.randint(-9, 9, (3,), generator=gen),
        "h_i8": torch.randint(-9, 9, (1,), generator=gen, dtype=torch.int8),
        "i_i32": torch.randint(-9, 9, (2,), generator=gen, dtype=torch.int32),
        "j_fp8": torch.randn(3, generator=gen).to(torch.float8_e4m3fn),
        "k_i16": torch.randint(-9, 9, (3,), generator=gen, dtype=torch.int16),
        "l_empty": torch.zeros(0, 4),
        "m_scalar": torch.tensor(2.5, dtype=torch.float64),
    }
    return ts


def test_mixed_dtype_file_is_aligned_and_read_by_the_safetensors_library(tmp_path, gen):
    from safetensors import safe_open
    ts = _mixed_tensors(gen)
    path = tmp_path / "mixed.safetensors"
    safetensors_io.save_file(ts, str(path), {"b": "2", "a": "1"})
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert (8 + n) % 8 == 0
    header = json.loads(raw[8:8 + n])
    size = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1, "F8_E4M3": 1}
    offsets = {k: v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    for k, start in offsets.items():
        assert start % size[header[k]["dtype"]] == 0, (k, header[k])
    # data order: element size descending, then name (the safetensors library's order)
    order = sorted(offsets, key=lambda k: (offsets[k], header[k]["data_offsets"][1]))
    assert [k for k in order if ts[k].numel()] == sorted((k for k in ts if ts[k].numel()), key=lambda k: (-ts[k].element_size(), k))
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"a": "1", "b": "2"}
        for k, t in ts.items():
            got = f.get_tensor(k)
            assert got.dtype == t.dtype and got.shape == t.shape, k
            assert bytes(safetensors_io.tensor_bytes(got)) == bytes(safetensors_io.tensor_bytes(t)), k
    # byte-exact round trip through our reader and writer, and to_bytes is the file
    back, meta = safetensors_io.load_file(str(path))
    again = tmp_path / "again.safetensors"
    safetensors_io.save_file(back, str(again), meta)
    assert again.read_bytes() == raw == safetensors_io.to_bytes(ts, {"a": "1", "b": "2"})


def test_tensor_bytes_without_numpy_matches_the_values(gen):
    t = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float32)
    assert bytes(safetensors_io.tensor_bytes(t)) == struct.pack("<3f", 1.0, -2.0, 0.5)
    nc = torch.arange(12, dtype=torch.int16).reshape(3, 4).T  # non-contiguous view
    assert bytes(safetensors_io.tensor_bytes(nc)) == struct.pack("<12h", *nc.contiguous().reshape(-1).tolist())
    view = safetensors_io.tensor_bytes(torch.ones(4) * 3)  # the temporary must stay alive through the view
    assert bytes(view) == struct.pack("<4f", 3, 3, 3, 3)


def test_header_checks_name_file_and_key(tmp_path):
    """The checks the safetensors library makes (and one it does not) give our one-line message, not its."""
    key = "diffusion_model.x.para_q"

    def raw(name, header, data):
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        p = tmp_path / name
        p.write_bytes(struct.pack("<Q", len(h)) + h + data)
        return str(p)
    ent = {"dtype": "F32", "shape": [4, 1], "data_offsets": [0, 16]}
    for name, header, data, pattern in [
        ("overlap.safetensors", {key: ent, key + "_1": ent}, b"\0" * 16, f"key '{key}_1': data 0..16 overlaps key '{key}'"),
        ("gap.safetensors", {key: {**ent, "data_offsets": [4, 20]}}, b"\0" * 20, "a gap in the data"),
        ("size.safetensors", {key: {**ent, "shape": [4, 2]}}, b"\0" * 16, r"shape \(4, 2\) of F32 needs 32 bytes, the header gives 16"),
        ("meta.safetensors", {"__metadata__": [1], key: ent}, b"\0" * 16, "__metadata__ is a JSON list"),
        ("metaval.safetensors", {"__metadata__": {"rank": 4}, key: ent}, b"\0" * 16, "__metadata__ key 'rank': value is a JSON int"),
        ("dtype.safetensors", {key: {**ent, "dtype": "Q7"}}, b"\0" * 16, "unknown or unsupported dtype"),
    ]:
        p = raw(name, header, data)
        with pytest.raises(ParaFormatError, match=pattern) as e:
            ParaModel.load(p)
        assert str(e.value).startswith(p + ": ")


def test_fifo_and_directories_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "f.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(ParaError, match="is a FIFO"):
        safetensors_io.read_header(str(fifo))  # would block forever in open() without the regular-file check
    with pytest.raises(ParaError, match="is a directory"):
        ParaModel.load(str(tmp_path))
    loop = tmp_path / "loop.safetensors"
    os.symlink(loop.name, loop)
    with pytest.raises(ParaError, match="symbolic link loop"):
        ParaModel.load(str(loop))


def test_rank_equal_to_out_is_refused_everywhere(tmp_path, gen):
    """r = out would zero the layer: refused on load, on construction, and as the result of a union merge."""
    q = random_orth64(4, 4, gen).float()
    with pytest.raises(ParaFormatError, match=r"rank r=4 must be between 1 and 3 for out=4 .*every output direction"):
        ParaModel({"diffusion_model.x.para_q": q})
    a = ParaModel({"diffusion_model.x.para_q": q[:, :2].contiguous()}, source="a.safetensors")
    b = ParaModel({"diffusion_model.x.para_q": q[:, 2:].contiguous()}, source="b.safetensors")
    with pytest.raises(ParaError, match="union of a.safetensors \\+ b.safetensors has rank 4 for out=4"):
        merge([a, b], "union")
    assert merge([a, b], "sequential").ranks() == {"diffusion_model.x": [2, 2]}  # each stage is valid


def test_fp8_bases_are_upcast(tmp_path, gen):
    q = random_orth64(16, 3, gen).float()
    p = ParaModel({"diffusion_model.x.para_q": q.to(torch.float8_e4m3fn)})
    (got,) = p.stages["diffusion_model.x"]
    assert got.dtype == torch.float32 and float((got.T @ got - torch.eye(3)).abs().max()) < 1e-6
    # the fp8 rounding moves the span a little; the basis is the span of the stored values, not of q
    stored = q.to(torch.float8_e4m3fn).double()
    assert float((got.double() @ (got.double().T @ stored) - stored).abs().max()) < 1e-6
    path = tmp_path / "fp8.safetensors"
    p.save(str(path))
    assert path.read_bytes() == ParaModel.load(str(path)).to_bytes()
    assert p.orthonormality_errors()["diffusion_model.x.para_q"] > 1e-3  # what inspect reports for the stored tensor


def test_messages_are_one_line_for_odd_names(tmp_path):
    path = tmp_path / "a\nb\x1b.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ParaFormatError) as e:
        ParaModel.load(str(path))
    assert "\n" not in str(e.value) and "a\\nb\\x1b.safetensors" in str(e.value)


def test_training_metadata_round_trips_through_the_file(tmp_path, gen):
    """The trainer's header writer and its reader: the settings come back equal, the header is sorted JSON."""
    training = {"steps": 7, "learning_rate": 5e-4, "seed": 3, "targets": "ExCA", "loss_space": "eps"}
    meta = training_metadata(training, "ExCA", "my_subject", "sd15")
    assert meta == {"targets": "ExCA", "training": json.dumps(training, sort_keys=True), "name": "my_subject",
                    "base_model": "sd15"}
    assert "base_model" not in training_metadata(training, "ExCA", "x")
    path = str(tmp_path / "t.safetensors")
    ParaModel.from_bases({"diffusion_model.a": [random_orth64(16, 2, gen).float()]}, meta).save(path)
    assert parse_training_metadata(ParaModel.load(path)) == training
    bad = ParaModel.from_bases({"diffusion_model.a": [random_orth64(16, 2, gen).float()]}, {"training": "[1, 2]"})
    assert parse_training_metadata(bad) == {}
