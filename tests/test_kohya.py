"""para_core.kohya (the sd-scripts network module) on toy models with sd-scripts' module layout, without sd-scripts.

The real trainer runs in tests/kohya (processes) and tests/integration/test_kohya_comfy.py (sd-scripts -> ComfyUI).
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from para_core import ParaModel, kohya
from para_core.errors import ParaShapeError


class CLIPAttention(nn.Module):  # the class names sd-scripts' networks.lora (and para_core.kohya) look for
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        return self.out_proj(self.q_proj(x) + self.k_proj(x) + self.v_proj(x))


class CLIPMLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class ToyTE(nn.Module):
    """text_model.encoder.layers.N.{self_attn,mlp}, as transformers' CLIPTextModel."""

    def __init__(self, d=16, n=2):
        super().__init__()
        self.text_model = nn.Module()
        self.text_model.encoder = nn.Module()
        self.text_model.encoder.layers = nn.ModuleList()
        for _ in range(n):
            layer = nn.Module()
            layer.self_attn, layer.mlp = CLIPAttention(d), CLIPMLP(d)
            self.text_model.encoder.layers.append(layer)
        self.text_model.final_proj = nn.Linear(d, d)  # outside attention/MLP: never a candidate

    def forward(self, x):
        for layer in self.text_model.encoder.layers:
            x = x + layer.mlp(layer.self_attn(x))
        return x


class ToyUNet(nn.Module):
    """diffusers names (sd-scripts' SD1.x UNet): time_embedding, resnets with time_emb_proj, attn1/attn2."""

    def __init__(self, c=16, ctx=16):
        super().__init__()
        self.time_embedding = nn.Module()
        self.time_embedding.linear_1 = nn.Linear(4, c)
        self.conv_in = nn.Conv2d(4, c, 3, padding=1)
        blk = nn.Module()
        res = nn.Module()
        res.conv1, res.time_emb_proj = nn.Conv2d(c, c, 3, padding=1), nn.Linear(c, c)
        blk.resnets = nn.ModuleList([res])
        att = nn.Module()
        tb = nn.Module()
        tb.attn1, tb.attn2 = nn.Module(), nn.Module()
        tb.attn1.to_q, tb.attn1.to_out = nn.Linear(c, c), nn.Linear(c, c)
        tb.attn2.to_q, tb.attn2.to_k = nn.Linear(c, c), nn.Linear(ctx, c)
        att.transformer_blocks = nn.ModuleList([tb])
        blk.attentions = nn.ModuleList([att])
        self.down_blocks = nn.ModuleList([blk])
        self.conv_out = nn.Conv2d(c, 4, 3, padding=1)

    def forward(self, x, t, ctx):
        blk = self.down_blocks[0]
        res, tb = blk.resnets[0], blk.attentions[0].transformer_blocks[0]
        h = self.conv_in(x) + res.time_emb_proj(self.time_embedding.linear_1(t))[:, :, None, None]
        h = res.conv1(h)
        seq = h.flatten(2).transpose(1, 2)
        seq = seq + tb.attn1.to_out(tb.attn1.to_q(seq)) + tb.attn2.to_q(seq) * tb.attn2.to_k(ctx).mean(1, keepdim=True)
        return self.conv_out(seq.transpose(1, 2).reshape(h.shape))


def toy(seed=0):
    torch.manual_seed(seed)
    return ToyTE(), ToyUNet()


def run(te, unet, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, t, tok = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, generator=g), torch.randn(2, 3, 16, generator=g)
    return unet(x, t, te(tok))


def net(te, unet, **kw):
    kw = {"rank_boundary": "0", "projection": "output", **kw}
    return kohya.create_network(1.0, 2, None, None, te, unet, **kw)


def test_names_and_exca_selection():
    te, unet = toy()
    n = net(te, unet)
    names = set(n.para.names)
    unet_names = {x for x in names if x.startswith("lora_unet_")}
    assert unet_names == {"lora_unet_conv_in", "lora_unet_down_blocks_0_resnets_0_conv1",
                          "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                          "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out",
                          "lora_unet_conv_out"}  # no attn2, time_embedding, time_emb_proj
    te_names = names - unet_names
    assert len(te_names) == 2 * 6 and "lora_te_text_model_encoder_layers_1_mlp_fc2" in te_names
    assert all(x.startswith("lora_te_text_model_encoder_layers_") for x in te_names)
    sa = net(te, unet, targets="self_attention")
    assert {x for x in sa.para.names if x.startswith("lora_unet")} == {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out"}
    assert len([x for x in sa.para.names if x.startswith("lora_te")]) == 2 * 4  # attention only
    two = kohya.create_network(1.0, 2, None, None, [ToyTE(), ToyTE()], unet, rank_boundary="0")
    assert {x.split("_text_model")[0] for x in two.para.names if x.startswith("lora_te")} == {"lora_te1", "lora_te2"}
    assert n.para.ranks()["lora_unet_conv_out"] == 2  # min(r, out - 1) with γ = 0
    gamma = net(te, unet, rank_boundary="0.1")  # floor(0.1 * out): 1 for out 4 and 16, 3 for fc1 (out 32) -> r = 2
    assert {k: v for k, v in gamma.para.ranks().items() if v != 1} == {
        "lora_te_text_model_encoder_layers_0_mlp_fc1": 2, "lora_te_text_model_encoder_layers_1_mlp_fc1": 2}


def test_forward_is_the_projected_weight_and_multiplier_0_is_the_base():
    te, unet = toy()
    base = run(te, unet).detach()
    n = net(te, unet, init="random")
    n.apply_to(te, unet, True, True)
    with torch.no_grad():
        for _name, layer in n.para.items():
            layer.b.normal_()
    got = run(te, unet).detach()
    ref_te, ref_unet = toy()  # the same weights, projected by hand in float64
    mods = kohya.module_map(ref_te, ref_unet)
    with torch.no_grad():
        for name, layer in n.para.items():
            w = mods[name].weight
            q = torch.linalg.qr(layer.b.double())[0]
            w64 = w.double().reshape(w.shape[0], -1)
            w.copy_((w64 - q @ (q.T @ w64)).reshape(w.shape))
    ref = run(ref_te, ref_unet).detach()
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    assert float((got - base).abs().max()) > 1e-2 * float(base.abs().max())
    n.set_multiplier(0.0)
    assert torch.equal(run(te, unet), base)
    n.set_multiplier(1.0)
    assert torch.equal(run(te, unet), got)
    with pytest.raises(ValueError, match="multiplier 0.5"):
        n.set_multiplier(0.5)


def test_save_merge_resume(tmp_path):
    te, unet = toy()
    n = net(te, unet)
    n.apply_to(te, unet, True, True)
    opt = torch.optim.SGD(n.parameters(), lr=0.5)
    for _ in range(2):
        run(te, unet).square().mean().backward()
        opt.step()
        opt.zero_grad()
    trained = run(te, unet).detach()
    f = str(tmp_path / "p.safetensors")
    n.save_weights(f, None, {"ss_network_module": "para_core.kohya", "ss_steps": "2"})
    para = ParaModel.load(f)
    assert set(para.stages) == set(n.para.names) and para.metadata["ss_steps"] == "2"
    assert all(k.endswith(".para_q") and v.dtype == torch.float16 for k, v in para.tensors.items())
    assert json.loads(para.metadata["training"])["init"] == "small_sv" and para.metadata["targets"] == "ExCA"

    # merge_to: the file's bases applied to fresh weights give the trained network's outputs (fp16-stored Q)
    te2, unet2 = toy()
    m, sd = kohya.create_network_from_weights(1.0, f, None, te2, unet2, for_inference=True)
    m.merge_to(te2, unet2, sd, torch.float32, "cpu")
    merged = run(te2, unet2).detach()
    assert float((merged - trained).abs().max()) <= 2e-3 * float(trained.abs().max())
    mods, base = kohya.module_map(te2, unet2), kohya.module_map(*toy())
    for name, chain in para.stages.items():
        w0 = base[name].weight.detach().double().reshape(chain[0].shape[0], -1)
        q = chain[0].double()
        want = (w0 - q @ (q.T @ w0)).reshape(base[name].weight.shape)
        assert float((mods[name].weight.detach().double() - want).abs().max()) <= 1e-6 * float(want.abs().max()), name

    # --network_weights: a new network continues from the file's bases
    te3, unet3 = toy()
    r = net(te3, unet3, init="random")
    r.apply_to(te3, unet3, True, True)
    assert "continue from p.safetensors" in r.load_weights(f)
    for name, chain in para.stages.items():
        assert torch.equal(r.para.layer(name).b, chain[0].float())
    f2 = str(tmp_path / "again.safetensors")
    r.save_weights(f2, torch.float16, {})
    again = ParaModel.load(f2)
    for k, v in para.tensors.items():
        assert float((again.tensors[k].float() - v.float()).abs().max()) <= 2 ** -11, k


def test_text_encoder_layers_only_where_sd_scripts_trains_them():
    te, unet = toy()
    n = net(te, unet)
    n.apply_to(te, unet, apply_text_encoder=False, apply_unet=True)
    assert all(x.startswith("lora_unet_") for x in n.para.names)
    groups, desc = n.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert desc == ["unet"] and groups[0]["lr"] == 1e-4
    n2 = net(*toy())
    n2.apply_to(te, unet, True, True)
    groups, desc = n2.prepare_optimizer_params(None, 1e-4, 1e-3)
    assert desc == ["textencoder", "unet"] and [g["lr"] for g in groups] == [1e-3, 1e-4]
    assert sum(len(g["params"]) for g in groups) == len(list(n2.parameters()))


def test_bad_input_is_one_line(tmp_path):
    te, unet = toy()
    with pytest.raises(ValueError, match=r"unknown network_args \['rnak'\]"):
        net(te, unet, rnak="4")
    with pytest.raises(ValueError, match="targets=cross is not one of"):
        net(te, unet, targets="cross")
    n = net(te, unet)
    n.apply_to(te, unet, True, True)
    f = str(tmp_path / "p.safetensors")
    n.save_weights(f, torch.float32, {})
    wide = kohya.create_network(1.0, 3, None, None, te, unet, rank_boundary="0")
    wide.apply_to(te, unet, True, True)
    with pytest.raises(ParaShapeError, match=r"p.safetensors: lora_\w+.para_q has shape \(\d+, 2\), this network's B is \(\d+, 3\)"):
        wide.load_weights(f)
    with pytest.raises(ValueError, match="safetensors only"):
        n.save_weights(str(tmp_path / "p.ckpt"), None, {})
