"""Small models with real key layouts, built at run time from random weights.

Used by `para demo`, the tests and the benchmarks: no weights are downloaded or committed. The
layouts follow the real SD1.5 / SDXL checkpoints (key names, ranks of tensors, channel bookkeeping);
only the widths are scaled down.
"""
from __future__ import annotations

import torch

from .format import ParaModel, max_rank


def _linear(sd, name, out, inp, g, bias=True):
    sd[name + ".weight"] = torch.randn(out, inp, generator=g) / inp ** 0.5
    if bias:
        sd[name + ".bias"] = torch.randn(out, generator=g) * 0.01


def _conv(sd, name, out, inp, k, g):
    sd[name + ".weight"] = torch.randn(out, inp, k, k, generator=g) / (inp * k * k) ** 0.5
    sd[name + ".bias"] = torch.randn(out, generator=g) * 0.01


def _norm(sd, name, c):
    sd[name + ".weight"] = torch.ones(c)
    sd[name + ".bias"] = torch.zeros(c)


def _resblock(sd, p, cin, cout, emb, g):
    _norm(sd, p + ".in_layers.0", cin)
    _conv(sd, p + ".in_layers.2", cout, cin, 3, g)
    _linear(sd, p + ".emb_layers.1", cout, emb, g)
    _norm(sd, p + ".out_layers.0", cout)
    _conv(sd, p + ".out_layers.3", cout, cout, 3, g)
    if cin != cout:
        _conv(sd, p + ".skip_connection", cout, cin, 1, g)


def _transformer(sd, p, c, ctx, g):
    _norm(sd, p + ".norm", c)
    _conv(sd, p + ".proj_in", c, c, 1, g)
    b = p + ".transformer_blocks.0"
    for a, kv in (("attn1", c), ("attn2", ctx)):
        _linear(sd, f"{b}.{a}.to_q", c, c, g, bias=False)
        _linear(sd, f"{b}.{a}.to_k", c, kv, g, bias=False)
        _linear(sd, f"{b}.{a}.to_v", c, kv, g, bias=False)
        _linear(sd, f"{b}.{a}.to_out.0", c, c, g)
    for i in (1, 2, 3):
        _norm(sd, f"{b}.norm{i}", c)
    _linear(sd, f"{b}.ff.net.0.proj", 8 * c, c, g)
    _linear(sd, f"{b}.ff.net.2", c, 4 * c, g)
    _conv(sd, p + ".proj_out", c, c, 1, g)


def sd15_unet(ch: int = 32, ctx: int = 48, mult=(1, 2, 4, 4), res_blocks: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """SD1.5 UNet state dict (LDM names, no prefix) with model_channels=ch and context_dim=ctx."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    emb = 4 * ch
    _linear(sd, "time_embed.0", emb, ch, g)
    _linear(sd, "time_embed.2", emb, emb, g)
    _conv(sd, "input_blocks.0.0", ch, 4, 3, g)
    chans = [ch]
    cur, idx = ch, 1
    for level, m in enumerate(mult):
        for _ in range(res_blocks):
            _resblock(sd, f"input_blocks.{idx}.0", cur, m * ch, emb, g)
            cur = m * ch
            if level < len(mult) - 1:
                _transformer(sd, f"input_blocks.{idx}.1", cur, ctx, g)
            chans.append(cur)
            idx += 1
        if level < len(mult) - 1:
            _conv(sd, f"input_blocks.{idx}.0.op", cur, cur, 3, g)
            chans.append(cur)
            idx += 1
    _resblock(sd, "middle_block.0", cur, cur, emb, g)
    _transformer(sd, "middle_block.1", cur, ctx, g)
    _resblock(sd, "middle_block.2", cur, cur, emb, g)
    idx = 0
    for level, m in reversed(list(enumerate(mult))):
        for i in range(res_blocks + 1):
            skip = chans.pop()
            _resblock(sd, f"output_blocks.{idx}.0", cur + skip, m * ch, emb, g)
            cur = m * ch
            sub = 1
            if level < len(mult) - 1:
                _transformer(sd, f"output_blocks.{idx}.1", cur, ctx, g)
                sub = 2
            if level > 0 and i == res_blocks:
                _conv(sd, f"output_blocks.{idx}.{sub}.conv", cur, cur, 3, g)
            idx += 1
    _norm(sd, "out.0", cur)
    _conv(sd, "out.2", 4, cur, 3, g)
    return sd


def hf_clip(prefix: str, hidden: int = 48, layers: int = 2, vocab: int = 64, seed: int = 1) -> dict[str, torch.Tensor]:
    """A CLIP text model in transformers layout (SD1.5 `cond_stage_model.transformer.`, SDXL clip_l)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    t = prefix + "text_model."
    sd[t + "embeddings.token_embedding.weight"] = torch.randn(vocab, hidden, generator=g) * 0.02
    sd[t + "embeddings.position_embedding.weight"] = torch.randn(77, hidden, generator=g) * 0.01
    for n in range(layers):
        p = f"{t}encoder.layers.{n}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(sd, p + "self_attn." + proj, hidden, hidden, g)
        _norm(sd, p + "layer_norm1", hidden)
        _norm(sd, p + "layer_norm2", hidden)
        _linear(sd, p + "mlp.fc1", 4 * hidden, hidden, g)
        _linear(sd, p + "mlp.fc2", hidden, 4 * hidden, g)
    _norm(sd, t + "final_layer_norm", hidden)
    return sd


def open_clip(prefix: str, hidden: int = 64, layers: int = 2, seed: int = 2) -> dict[str, torch.Tensor]:
    """An open_clip text tower (SDXL `conditioner.embedders.1.model.`): fused in_proj q/k/v."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    sd[prefix + "token_embedding.weight"] = torch.randn(64, hidden, generator=g) * 0.02
    sd[prefix + "positional_embedding"] = torch.randn(77, hidden, generator=g) * 0.01
    for n in range(layers):
        p = f"{prefix}transformer.resblocks.{n}."
        sd[p + "attn.in_proj_weight"] = torch.randn(3 * hidden, hidden, generator=g) / hidden ** 0.5
        sd[p + "attn.in_proj_bias"] = torch.zeros(3 * hidden)
        _linear(sd, p + "attn.out_proj", hidden, hidden, g)
        _norm(sd, p + "ln_1", hidden)
        _norm(sd, p + "ln_2", hidden)
        _linear(sd, p + "mlp.c_fc", 4 * hidden, hidden, g)
        _linear(sd, p + "mlp.c_proj", hidden, 4 * hidden, g)
    _norm(sd, prefix + "ln_final", hidden)
    sd[prefix + "text_projection"] = torch.randn(hidden, hidden, generator=g) / hidden ** 0.5
    return sd


def _vae_stub(prefix: str, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    _conv(sd, prefix + "encoder.conv_in", 8, 3, 3, g)
    _conv(sd, prefix + "decoder.conv_out", 3, 8, 3, g)
    return sd


def sd15_checkpoint(ch: int = 32, ctx: int = 48, dtype: torch.dtype = torch.float16, seed: int = 0) -> dict[str, torch.Tensor]:
    """A full SD1.5-layout checkpoint: model.diffusion_model.*, cond_stage_model.transformer.*, first_stage_model.*."""
    sd = {"model.diffusion_model." + k: v for k, v in sd15_unet(ch, ctx, seed=seed).items()}
    sd.update(hf_clip("cond_stage_model.transformer.", hidden=ctx, seed=seed + 1))
    sd.update(_vae_stub("first_stage_model.", seed + 2))
    return {k: v.to(dtype) for k, v in sd.items()}


def sdxl_text_checkpoint(dtype: torch.dtype = torch.float16, seed: int = 0) -> dict[str, torch.Tensor]:
    """The SDXL text-encoder layout (clip_l in HF layout, clip_g in open_clip layout) plus a small UNet."""
    sd = {"model.diffusion_model." + k: v for k, v in sd15_unet(16, 32, mult=(1, 2), res_blocks=1, seed=seed).items()}
    sd.update(hf_clip("conditioner.embedders.0.transformer.", hidden=32, seed=seed + 1))
    sd.update(open_clip("conditioner.embedders.1.model.", hidden=64, seed=seed + 2))
    return {k: v.to(dtype) for k, v in sd.items()}


def random_para(shapes: dict[str, int], rank: int, seed: int = 0, dtype: torch.dtype = torch.float16,
                metadata: dict[str, str] | None = None) -> ParaModel:
    """A PaRa model with random subspaces for the given {module: out_dim}, rank capped at max_rank(out)."""
    g = torch.Generator().manual_seed(seed)
    bases = {m: [torch.linalg.qr(torch.randn(out, min(rank, max_rank(out)), generator=g))[0]] for m, out in shapes.items()}
    return ParaModel.from_bases(bases, metadata, dtype=dtype)
