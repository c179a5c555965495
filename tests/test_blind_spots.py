"""Areas the rest of the suite did not guard (issue 13, item 8), each with the exact behaviour a user expects:
what a failed save of a PaRa file and its ``.para_state`` sidecar leaves behind, a target file that appears
while a write is in progress, small_sv initialisation where the output size is close to the rank,
export-lora on the fused q/k/v projection of SDXL's open_clip text encoder, and merging files that name
different base models."""
from __future__ import annotations

import errno
import os

import pytest
import torch
from reference import random_orth64, ref_project

from para_core import ParaError, ParaModel, merge, safetensors_io
from para_core.basis import principal_angle_cosines
from para_core.checkpoint import module_map
from para_core.cli import main
from para_core.layer import ParaNetwork, init_basis
from para_core.synthetic import random_para, sdxl_text_checkpoint
from para_core.train import make_optimizer, save_with_state, state_path

D = torch.float64


# ---- a save that also writes a sidecar, and targets that appear meanwhile -----------------------------
def _trained_network():
    """A one-layer network after one AdamW step, so the sidecar carries real optimizer state."""
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    net = ParaNetwork.from_weights({"lin": w}, {"lin": 2}, "random", seed=1)
    opt = make_optimizer("AdamW", [net.layer("lin").b], 1e-2)
    loss = (net.layer("lin").basis().T @ w).square().sum()
    loss.backward()
    opt.step()
    return net, opt


def _at_fsync(monkeypatch, target: str, action):
    """Run `action()` when the temp file of `target` is fsynced: its data is written, the rename has not happened.
    That is where a full disk reports a delayed write error, and the last moment before the output appears."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to tell which file is fsynced")
    real = os.fsync
    prefix = f".{os.path.basename(target)}."

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(prefix):
            action()
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)


def _disk_full():
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("failing", ["para file", "sidecar"])
def test_failed_save_with_sidecar_leaves_nothing_behind(tmp_path, monkeypatch, failing):
    """A PaRa file whose write fails (disk full), or whose sidecar's write fails: neither file, no temp file, no
    orphan sidecar (a later file of the same name would pick it up as its training state)."""
    net, opt = _trained_network()
    path = str(tmp_path / "subject_10_steps_00001_.safetensors")
    target = path if failing == "para file" else state_path(path)
    _at_fsync(monkeypatch, target, _disk_full)
    with pytest.raises(ParaError) as e:
        save_with_state(net.to_para_model(), path, net, opt, [0.5, 0.25], 10, 0)
    assert str(e.value) == f"{target}: cannot write: {os.strerror(errno.ENOSPC)}"
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()  # the same save on a disk with room writes both files
    save_with_state(net.to_para_model(), path, net, opt, [0.5, 0.25], 10, 0)
    assert sorted(os.listdir(tmp_path)) == ["subject_10_steps_00001_.para_state", "subject_10_steps_00001_.safetensors"]


@pytest.mark.parametrize("existing", ["para file", "sidecar"])
def test_save_with_sidecar_never_touches_a_file_that_is_there(tmp_path, existing):
    """Either target already there (another run's file): refused, that file keeps its bytes, nothing else is left."""
    net, opt = _trained_network()
    path = str(tmp_path / "subject.safetensors")
    theirs = path if existing == "para file" else state_path(path)
    with open(theirs, "wb") as f:
        f.write(b"another run's file")
    with pytest.raises(ParaError, match="already exists"):
        save_with_state(net.to_para_model(), path, net, opt, [1.0], 1, 0)
    assert os.listdir(tmp_path) == [os.path.basename(theirs)]
    assert open(theirs, "rb").read() == b"another run's file"


def test_output_that_appears_while_writing_is_kept_and_the_write_refused(tmp_path):
    """write_stream: the target appears (another process) while the tensors are written: refused, their file
    keeps its bytes, our temp file is gone; with force the finished file replaces it."""
    path = tmp_path / "out.safetensors"
    t = torch.arange(6, dtype=torch.float32)

    def produce(i):
        path.write_bytes(b"written meanwhile")
        return t
    with pytest.raises(ParaError) as e:
        safetensors_io.write_stream(str(path), [("a", torch.float32, (6,))], produce)
    assert str(e.value) == f"{path}: appeared while writing (use --force to overwrite)"
    assert os.listdir(tmp_path) == ["out.safetensors"] and path.read_bytes() == b"written meanwhile"
    safetensors_io.write_stream(str(path), [("a", torch.float32, (6,))], produce, force=True)
    tensors, _ = safetensors_io.load_file(str(path))
    assert os.listdir(tmp_path) == ["out.safetensors"] and torch.equal(tensors["a"], t)


def test_output_that_appears_after_every_check_is_never_overwritten(tmp_path, monkeypatch):
    """The other file appears at the very last moment, when the finished output is being put in place (after
    any existence check): still refused, their bytes kept, no temp file left."""
    path = tmp_path / "out.safetensors"
    for name in ("link", "replace"):  # however the writer puts the file in place
        real = getattr(os, name)

        def appear_then(src, dst, *a, _real=real, **kw):
            if os.fspath(dst) == str(path):
                path.write_bytes(b"written at the last moment")
            return _real(src, dst, *a, **kw)
        monkeypatch.setattr(os, name, appear_then)
    with pytest.raises(ParaError) as e:
        safetensors_io.save_file({"a": torch.ones(3)}, str(path))
    assert str(e.value) == f"{path}: appeared while writing (use --force to overwrite)"
    assert os.listdir(tmp_path) == ["out.safetensors"] and path.read_bytes() == b"written at the last moment"


def test_writer_without_hard_links_still_writes_and_refuses(tmp_path, monkeypatch):
    """On a file system without hard links (FAT, some network shares) a new output is still written exactly and
    leaves no temp file, and a target that appeared during the write is still refused."""
    def no_links(src, dst, *a, **kw):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))
    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "out.safetensors"
    t = torch.arange(5, dtype=torch.float16)
    safetensors_io.save_file({"a": t}, str(path))
    assert os.listdir(tmp_path) == ["out.safetensors"] and path.read_bytes() == safetensors_io.to_bytes({"a": t})
    other = tmp_path / "other.safetensors"

    def produce(i):
        other.write_bytes(b"written meanwhile")
        return t
    with pytest.raises(ParaError, match="appeared while writing"):
        safetensors_io.write_stream(str(other), [("a", torch.float16, (5,))], produce)
    assert sorted(os.listdir(tmp_path)) == ["other.safetensors", "out.safetensors"] and other.read_bytes() == b"written meanwhile"


def test_para_file_that_appears_during_a_save_with_sidecar_is_kept(tmp_path, monkeypatch):
    """The trainer picked a free name, and another run writes a file of that name before ours is renamed into
    place: their file stays as it is, our sidecar (already written) is removed with our file."""
    net, opt = _trained_network()
    path = str(tmp_path / "subject_10_steps_00001_.safetensors")

    def another_run():
        with open(path, "wb") as f:
            f.write(b"another run's file")
    _at_fsync(monkeypatch, path, another_run)
    with pytest.raises(ParaError) as e:
        save_with_state(net.to_para_model(), path, net, opt, [1.0], 10, 0)
    assert str(e.value) == f"{path}: appeared while writing (use --force to overwrite)"
    assert os.listdir(tmp_path) == [os.path.basename(path)]
    assert open(path, "rb").read() == b"another run's file"


# ---- small_sv where out - rank is small -----------------------------------------------------------------
def _removed_energy_and_optimum(w: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(|BᵀW|_F, the least any rank-r orthonormal basis can remove: the r smallest σ of W, 0 for the left
    null space when out > K), float64."""
    w64 = w.to(D).reshape(w.shape[0], -1)
    out, k = w64.shape
    s = torch.linalg.svdvals(w64)
    s = torch.cat([s, torch.zeros(max(0, out - k), dtype=D)])  # σ = 0 for each left null direction
    r = b.shape[1]
    return float((b.to(D).T @ w64).norm()), float(s[-r:].square().sum().sqrt())


@pytest.mark.parametrize("shape", [(4, 32, 3, 3), (4, 320, 3, 3), (2, 64), (9, 40), (12, 30), (4, 3), (6, 4), (8, 2)])
def test_small_sv_when_the_output_size_is_close_to_the_rank(shape, gen):
    """Every rank 1 .. out-1 of small-output layers: SD's 4-channel conv_out (ExCA selects it, rank 1), layers
    where the search block r + 8 is the whole output space, and out > K with fewer null directions than r.
    B is orthonormal and removes the least energy a rank-r basis can remove (float64 SVD)."""
    w = torch.randn(shape, generator=gen)
    out = shape[0]
    for r in range(1, out):
        b = init_basis(w, r, "small_sv", torch.Generator().manual_seed(r))
        assert b.shape == (out, r) and b.dtype == torch.float32
        torch.testing.assert_close(b.T @ b, torch.eye(r), rtol=0, atol=1e-5)
        removed, optimum = _removed_energy_and_optimum(w, b)
        scale = float(torch.linalg.matrix_norm(w.to(D).reshape(out, -1), ord=2))
        assert abs(removed - optimum) <= 1e-4 * optimum + 1e-5 * scale, (shape, r, removed, optimum)


def test_small_sv_of_a_4_channel_conv_out_is_its_smallest_singular_direction(gen):
    """conv_out (4 x 320 x 3 x 3) at rank 1, through ParaNetwork.from_weights as the trainer builds it: B is the
    float64 SVD's last left singular vector (up to sign), not just any direction of small energy."""
    w = torch.randn(4, 320, 3, 3, generator=gen) * torch.tensor([1.0, 0.8, 0.6, 0.3]).reshape(4, 1, 1, 1)
    net = ParaNetwork.from_weights({"diffusion_model.out.2": w}, {"diffusion_model.out.2": 1}, "small_sv", seed=0)
    u = torch.linalg.svd(w.to(D).reshape(4, -1), full_matrices=False)[0]
    cos = principal_angle_cosines(net.layer("diffusion_model.out.2").b.detach(), u[:, -1:])
    assert float(cos.min()) > 1 - 1e-6  # angle < 1.5e-3 rad (the fp32 Gram's rounding); any other singular direction: cos 0


# ---- export-lora on SDXL's fused open_clip in_proj ---------------------------------------------------------
def test_export_lora_on_the_fused_qkv_projection_of_sdxl_clip_g(tmp_path, gen):
    """q_proj, k_proj and v_proj of clip_g are row blocks 0, 1, 2 of one attn.in_proj_weight (192 x 64): each
    exported LoRA is the PaRa edit of its own 64 rows (float64 reference), named for ComfyUI's clip_g module."""
    ckpt = tmp_path / "xl.safetensors"
    safetensors_io.save_file(sdxl_text_checkpoint(dtype=torch.float32), str(ckpt))
    layer = "text_encoders.clip_g.transformer.text_model.encoder.layers.1.self_attn."
    fused = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    _, infos = safetensors_io.read_header(str(ckpt))
    assert {p: module_map(infos)[layer + p].key for p in ("q_proj", "k_proj", "v_proj")} == dict.fromkeys(("q_proj", "k_proj", "v_proj"), fused)
    ranks = {"q_proj": 3, "k_proj": 2, "v_proj": 5}
    para = ParaModel.from_bases({layer + p: [random_orth64(64, r, gen)] for p, r in ranks.items()}, dtype=torch.float32)
    p = tmp_path / "p.safetensors"
    para.save(str(p))
    lora = tmp_path / "l.safetensors"
    assert main(["-q", "export-lora", str(ckpt), str(p), "-o", str(lora), "--strength", "0.7"]) == 0
    base, _ = safetensors_io.load_file(str(ckpt))
    lo, _ = safetensors_io.load_file(str(lora))
    assert sorted(lo) == sorted(f"{layer}{proj}.{k}" for proj in ranks for k in ("alpha", "lora_down.weight", "lora_up.weight"))
    q = ParaModel.load(str(p)).stages
    for i, (proj, r) in enumerate(ranks.items()):
        w0 = base[fused][64 * i:64 * (i + 1)]
        up, down = lo[f"{layer}{proj}.lora_up.weight"], lo[f"{layer}{proj}.lora_down.weight"]
        assert up.shape == (64, r) and down.shape == (r, 64) and float(lo[f"{layer}{proj}.alpha"]) == r
        ref = ref_project(w0, q[layer + proj][0], 0.7)
        err = float((w0.double() + up.double() @ down.double() - ref).abs().max())
        assert err < 1e-6 * float(ref.abs().max()), (proj, err)
# ---- merging files of different base models -------------------------------------------------------------
def _subject(name: str, base_model: str | None, seed: int) -> ParaModel:
    meta = {"name": name} if base_model is None else {"name": name, "base_model": base_model}
    p = random_para({"diffusion_model.out.0": 16, "diffusion_model.middle_block.1.proj_in": 32}, 2, seed=seed, metadata=meta)
    p.source = f"{name}.safetensors"
    return p


@pytest.mark.parametrize("mode", ["sequential", "union"])
def test_merge_refuses_files_of_different_base_models(mode):
    """The layers have the same shapes (SD1.5 and SD2 UNets share them), but the metadata says the files were
    trained on different models: one error naming both files and both base models, never a silent merge."""
    a, b = _subject("dog", "sd15", 1), _subject("cat", "sd20", 2)
    with pytest.raises(ParaError) as e:
        merge([a, b], mode)
    assert str(e.value) == ("dog.safetensors was trained on base model 'sd15', cat.safetensors on 'sd20': "
                            "a merge of PaRa files for different base models fits neither")


def test_merge_keeps_the_shared_base_model():
    """Same base model (also spelt differently, or a file that names none, e.g. from another tool): merged, and
    the result says which."""
    for other in ("sd15", " SD15", None):
        m = merge([_subject("dog", "sd15", 1), _subject("cat", other, 2)], "sequential")
        assert m.metadata["base_model"] == "sd15" and m.metadata["merged_from"] == "dog + cat"
    assert "base_model" not in merge([_subject("dog", None, 1), _subject("cat", None, 2)], "union").metadata


def test_cli_merge_of_different_base_models_is_one_line_and_writes_nothing(tmp_path, capsys):
    paths = []
    for name, base, seed in (("dog", "sdxl", 1), ("cat", "sd15", 2)):
        paths.append(tmp_path / f"{name}.safetensors")
        _subject(name, base, seed).save(str(paths[-1]))
    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(paths[0]), str(paths[1]), "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"para merge: error: {paths[0]} was trained on base model 'sdxl', {paths[1]} on 'sd15': "
                   "a merge of PaRa files for different base models fits neither"), err
    assert not out.exists()
