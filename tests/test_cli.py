"""The `para` command line on SD1.5- and SDXL-layout checkpoints built at run time: bake, export-lora,
merge, overlap, inspect, and every failure a user can cause."""
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch
from reference import parallel64, project64

from para_core import ParaModel, merge, safetensors_io
from para_core.checkpoint import module_map
from para_core.cli import main
from para_core.synthetic import random_para, sd15_checkpoint, sdxl_text_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd15")
    ckpt = d / "ckpt.safetensors"
    safetensors_io.save_file(sd15_checkpoint(), str(ckpt))
    _, infos = safetensors_io.read_header(str(ckpt))
    mapping = module_map(infos)
    exca = {m: s.out_dim for m, s in mapping.items() if m.startswith("diffusion_model.") and ".attn2." not in m
            and "time_embed" not in m and "emb_layers" not in m and s.out_dim > 8}
    exca["text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"] = 48
    pa, pb = d / "a.safetensors", d / "b.safetensors"
    random_para(exca, 4, seed=1).save(str(pa))
    random_para({m: o for m, o in list(exca.items())[::2]}, 2, seed=2).save(str(pb))
    return d, ckpt, pa, pb, mapping


def _run(*args):
    return subprocess.run([sys.executable, "-m", "para_core", *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def test_bake_matches_float64_reference(sd15, tmp_path):
    d, ckpt, pa, pb, mapping = sd15
    out = tmp_path / "baked.safetensors"
    assert main(["-q", "bake", str(ckpt), str(pa), str(pb), "-o", str(out), "--strength", "0.8"]) == 0
    base, meta0 = safetensors_io.load_file(str(ckpt))
    got, meta = safetensors_io.load_file(str(out))
    a, b = ParaModel.load(str(pa)), ParaModel.load(str(pb))
    assert list(got) == list(base)
    changed = 0
    for key in base:
        module = next((m for m, s in mapping.items() if s.key == key), None)
        chain = (a.stages.get(module, []) + b.stages.get(module, [])) if module else []
        if not chain:
            assert torch.equal(got[key], base[key]), key  # untouched tensors copied unchanged
            continue
        changed += 1
        ref = project64(base[key], chain, 0.8)
        # exactly one fp16 rounding of the fp32 chain result
        assert (got[key].double() - ref).abs().max() <= ref.abs().max() * 2 ** -10, key
        assert got[key].dtype == torch.float16
    assert changed == len(a.stages)
    assert "para_baked" in meta


def test_export_lora_reproduces_bake(sd15, tmp_path):
    d, ckpt, pa, pb, mapping = sd15
    seq = tmp_path / "seq.safetensors"
    assert main(["merge", str(pa), str(pb), "-o", str(seq), "--mode", "sequential"]) == 0
    baked, lora = tmp_path / "b.safetensors", tmp_path / "l.safetensors"
    assert main(["-q", "bake", str(ckpt), str(seq), "-o", str(baked)]) == 0
    assert main(["-q", "export-lora", str(ckpt), str(seq), "-o", str(lora)]) == 0
    base, _ = safetensors_io.load_file(str(ckpt))
    out, _ = safetensors_io.load_file(str(baked))
    lo, _ = safetensors_io.load_file(str(lora))
    para = ParaModel.load(str(seq))
    for module, chain in para.stages.items():
        key = mapping[module].key
        up, down, alpha = lo[f"{module}.lora_up.weight"], lo[f"{module}.lora_down.weight"], lo[f"{module}.alpha"]
        r = sum(q.shape[1] for q in chain)
        assert up.shape[:2] == (base[key].shape[0], r) and down.shape == (r, *base[key].shape[1:]) and float(alpha) == r
        via_lora = base[key].double() + (up.double().flatten(1) @ down.double().flatten(1)).reshape(base[key].shape) * (float(alpha) / r)
        ref = project64(base[key], chain)
        scale = base[key].double().abs().max()
        assert (via_lora - ref).abs().max() < scale * 2e-3, module
        assert (via_lora - out[key].double()).abs().max() < scale * 3e-3, module


def test_export_lora_exact_on_fp32_checkpoint(tmp_path):
    ckpt = tmp_path / "c.safetensors"
    safetensors_io.save_file(sd15_checkpoint(ch=16, ctx=24, dtype=torch.float32), str(ckpt))
    _, infos = safetensors_io.read_header(str(ckpt))
    mapping = module_map(infos)
    shapes = {m: s.out_dim for m, s in mapping.items() if ".ff." in m}
    p = tmp_path / "p.safetensors"
    random_para(shapes, 3, dtype=torch.float32).save(str(p))
    lora = tmp_path / "l.safetensors"
    assert main(["-q", "export-lora", str(ckpt), str(p), "-o", str(lora), "--strength", "0.5"]) == 0
    base, _ = safetensors_io.load_file(str(ckpt))
    lo, _ = safetensors_io.load_file(str(lora))
    para = ParaModel.load(str(p))
    for m in shapes:
        w0 = base[mapping[m].key]
        via = w0.double() + lo[f"{m}.lora_up.weight"].double().flatten(1) @ lo[f"{m}.lora_down.weight"].double().flatten(1)
        assert (via - project64(w0, para.stages[m], 0.5)).abs().max() < 1e-5


def test_sdxl_text_encoders_including_fused_open_clip(tmp_path):
    ckpt = tmp_path / "xl.safetensors"
    safetensors_io.save_file(sdxl_text_checkpoint(), str(ckpt))
    _, infos = safetensors_io.read_header(str(ckpt))
    mapping = module_map(infos)
    g = "text_encoders.clip_g.transformer.text_model.encoder.layers.1."
    l = "text_encoders.clip_l.transformer.text_model.encoder.layers.0."
    assert mapping[g + "self_attn.k_proj"].key == "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    assert mapping[g + "self_attn.k_proj"].rows == (64, 64)
    assert mapping[g + "mlp.fc1"].key.endswith("resblocks.1.mlp.c_fc.weight")
    assert mapping[l + "self_attn.q_proj"].key == "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    targets = {g + "self_attn.q_proj": 64, g + "self_attn.v_proj": 64, g + "self_attn.out_proj": 64, l + "mlp.fc2": 32}
    p = tmp_path / "p.safetensors"
    random_para(targets, 3).save(str(p))
    out = tmp_path / "o.safetensors"
    assert main(["-q", "bake", str(ckpt), str(p), "-o", str(out)]) == 0
    base, _ = safetensors_io.load_file(str(ckpt))
    got, _ = safetensors_io.load_file(str(out))
    para = ParaModel.load(str(p))
    fused = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        rows = slice(64 * i, 64 * (i + 1))
        m = g + "self_attn." + proj
        if m in para.stages:
            ref = project64(base[fused][rows], para.stages[m])
            assert (got[fused][rows].double() - ref).abs().max() <= ref.abs().max() * 2 ** -10
        else:
            assert torch.equal(got[fused][rows], base[fused][rows])  # k rows untouched
    assert torch.equal(got["conditioner.embedders.1.model.text_projection"], base["conditioner.embedders.1.model.text_projection"])


def test_merge_and_overlap_commands(sd15, tmp_path, capsys):
    d, ckpt, pa, pb, _ = sd15
    u = tmp_path / "u.safetensors"
    assert main(["merge", str(pa), str(pb), "-o", str(u), "--mode", "union"]) == 0
    m = ParaModel.load(str(u))
    ref = merge([ParaModel.load(str(pa)), ParaModel.load(str(pb))], "union")
    assert m.to_bytes() == ref.to_bytes()  # the command writes exactly what the library computes
    assert m.max_stages() == 1 and m.metadata["merge_mode"] == "union"
    capsys.readouterr()
    assert main(["overlap", str(pa), str(pb)]) == 0
    out = capsys.readouterr().out
    assert "shared layers" in out and "mean cos²" in out
    assert main(["inspect", str(u)]) == 0
    out = capsys.readouterr().out
    assert "orthonormality error" in out and "merge_mode: union" in out and "rank:        4-6" in out


def test_cli_errors_are_one_line_without_traceback(sd15, tmp_path):
    d, ckpt, pa, pb, _ = sd15
    out = tmp_path / "o.safetensors"
    r = _run("bake", ckpt, tmp_path / "missing.safetensors", "-o", out)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "missing.safetensors: no such file" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 100)
    r = _run("inspect", corrupt)
    assert r.returncode == 1 and "corrupt.safetensors" in r.stderr and "Traceback" not in r.stderr
    # a PaRa that does not fit the checkpoint (wrong output dims)
    wrong = tmp_path / "wrong.safetensors"
    random_para({"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q": 40,
                 "diffusion_model.nonexistent.layer": 8}, 2).save(str(wrong))
    r = _run("bake", ckpt, wrong, "-o", out)
    assert r.returncode == 1 and "does not fit" in r.stderr and "1 shape mismatches" in r.stderr and "1 not in the model" in r.stderr
    assert not out.exists()
    # --debug shows the traceback
    r = _run("--debug", "inspect", corrupt)
    assert r.returncode != 0 and "Traceback" in r.stderr
    assert os.listdir(tmp_path) == sorted(os.listdir(tmp_path)) and not [f for f in os.listdir(tmp_path) if f.endswith(".partial")]


def test_existing_output_needs_force(sd15, tmp_path):
    d, ckpt, pa, pb, _ = sd15
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    r = _run("bake", ckpt, pa, "-o", out)
    assert r.returncode == 1 and "already exists" in r.stderr and out.read_bytes() == b"keep me"
    r = _run("-q", "bake", ckpt, pa, "-o", out, "--force")
    assert r.returncode == 0 and out.read_bytes() != b"keep me"


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_full_disk_leaves_no_partial_output(sd15, tmp_path):
    """A write that fails half way (file-size limit, as a full disk would) leaves no output and no temp file."""
    d, ckpt, pa, pb, _ = sd15
    out = tmp_path / "o.safetensors"
    r = subprocess.run([sys.executable, "-m", "para_core", "bake", str(ckpt), str(pa), "-o", str(out)],
                       capture_output=True, text=True, cwd=ROOT, preexec_fn=_limit_file_size)
    assert r.returncode == 1, r.stderr
    assert f"{out}: cannot write: File too large" in r.stderr and len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
    assert os.listdir(tmp_path) == []


def test_bake_streams_without_holding_the_checkpoint(tmp_path):
    """Peak memory of bake on a ~256 MB checkpoint stays well under twice its size."""
    ckpt = tmp_path / "big.safetensors"
    g = torch.Generator().manual_seed(0)
    big = {f"model.diffusion_model.input_blocks.{i}.1.proj_in.weight": torch.randn(2048, 2048, generator=g).half() for i in range(32)}
    safetensors_io.save_file(big, str(ckpt))
    size = os.path.getsize(ckpt)
    del big
    p = tmp_path / "p.safetensors"
    random_para({f"diffusion_model.input_blocks.{i}.1.proj_in": 2048 for i in range(32)}, 4).save(str(p))
    code = ("import resource,sys; from para_core.cli import main; import torch; "
            "b=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; rc=main(sys.argv[1:]); "
            "print(b, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    r = subprocess.run([sys.executable, "-c", code, "-q", "bake", str(ckpt), str(p), "-o", str(tmp_path / "o.safetensors")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    before, after = (int(x) * 1024 for x in r.stdout.split()[-2:])
    assert after - before < 0.5 * size, (after - before, size)


def test_demo_command_without_numpy(tmp_path):
    """The README's first command, with numpy made unimportable (the torch CPU wheel does not install it)."""
    code = ("import sys, runpy; sys.modules['numpy'] = None; sys.argv = ['para'] + sys.argv[1:]; "
            "runpy.run_module('para_core', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code, "demo", "--dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "demo OK" in r.stdout and r.stderr == "", r.stderr
    assert sorted(os.listdir(tmp_path)) == ["subject.para.safetensors", "subject_as_lora.safetensors",
                                            "tiny_sd15.safetensors", "tiny_sd15_para.safetensors"]


def _wide_range(sd: dict, dtype: torch.dtype) -> dict:
    """Values that a detour through fp16 would change: above fp16's max and far below its normal range."""
    sd = dict(sd)
    sd["model.diffusion_model.out.2.bias"] = torch.tensor([7.0e4, -1.5e5, 3.0e-9, -2.5e-7], dtype=dtype)
    k = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    sd[k] = (sd[k].float() * 1e-6).to(dtype)  # patched, tiny: fp16 would flush it to subnormals
    return sd


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bake_non_fp16_checkpoints(tmp_path, dtype):
    """Untouched tensors byte-identical (no cast through fp16 or anything else); patched ones vs float64
    within one rounding to the checkpoint's own dtype."""
    ckpt = tmp_path / "c.safetensors"
    base = _wide_range(sd15_checkpoint(ch=16, ctx=24, dtype=dtype), dtype)
    safetensors_io.save_file(base, str(ckpt))
    _, infos = safetensors_io.read_header(str(ckpt))
    mapping = module_map(infos)
    shapes = {m: s.out_dim for m, s in mapping.items() if ".attn1." in m or m.endswith("proj_in")}
    p = tmp_path / "p.safetensors"
    random_para(shapes, 3, dtype=torch.float32).save(str(p))
    out = tmp_path / "o.safetensors"
    assert main(["-q", "bake", str(ckpt), str(p), "-o", str(out), "--strength", "0.7"]) == 0
    got, _ = safetensors_io.load_file(str(out))
    para = ParaModel.load(str(p))
    patched = {mapping[m].key: m for m in para.stages}
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in patched
    for key, t in base.items():
        assert got[key].dtype == dtype, key
        if key not in patched:
            assert bytes(safetensors_io.tensor_bytes(got[key])) == bytes(safetensors_io.tensor_bytes(t)), key
            continue
        ref = project64(t, para.stages[patched[key]], 0.7)
        err = (got[key].double() - ref).abs()
        if dtype == torch.float32:
            assert float(err.max()) <= 1e-5 * float(ref.abs().max()), key
        else:  # one bf16 rounding (half an ulp, 2^-9 relative) plus the fp32 computation
            assert bool((err <= ref.abs() * 2 ** -8 + 1e-6 * float(ref.abs().max())).all()), key


def test_export_lora_of_a_chain_with_strength(tmp_path):
    """A 2-stage sequential PaRa exported at strength 0.6 on an fp32 checkpoint equals the float64 chain
    W_k = W_{k-1} - s·Q_kQ_kᵀW_{k-1}: the second stage acts on the first stage's result."""
    ckpt = tmp_path / "c.safetensors"
    safetensors_io.save_file(sd15_checkpoint(ch=16, ctx=24, dtype=torch.float32), str(ckpt))
    _, infos = safetensors_io.read_header(str(ckpt))
    mapping = module_map(infos)
    shapes = {m: s.out_dim for m, s in mapping.items() if ".attn1.to_" in m}
    a, b = random_para(shapes, 6, seed=3, dtype=torch.float32), random_para(shapes, 5, seed=4, dtype=torch.float32)
    seq = tmp_path / "seq.safetensors"
    merge([a, b], "sequential", dtype=torch.float32).save(str(seq))
    lora = tmp_path / "l.safetensors"
    assert main(["-q", "export-lora", str(ckpt), str(seq), "-o", str(lora), "--strength", "0.6"]) == 0
    base, _ = safetensors_io.load_file(str(ckpt))
    lo, _ = safetensors_io.load_file(str(lora))
    para = ParaModel.load(str(seq))
    for m, chain in para.stages.items():
        w0 = base[mapping[m].key]
        r = float(lo[f"{m}.alpha"])
        via = w0.double() + (float(r) / 11) * lo[f"{m}.lora_up.weight"].double().flatten(1) @ lo[f"{m}.lora_down.weight"].double().flatten(1)
        ref = project64(w0, chain, 0.6)
        assert r == 11 and float((via - ref).abs().max()) < 1e-5 * float(ref.abs().max()), m
        # the stages overlap (random 6- and 5-dim subspaces of a 16/32-dim space), so chaining matters
        wrong = parallel64(w0, chain, 0.6)
        assert float((wrong - ref).abs().max()) > 1e-3 * float(ref.abs().max()), m
