"""Trainable PaRa: a learned B (out x r) per targeted weight, and how it enters a forward pass.

For a weight W (out x K, K = in·kh·kw for a conv) PaRa uses W' = W - QQᵀW with Q = orth(B). The same
edit can be applied in two places, with identical results (tests/test_layer.py checks it in float64):

* **output space**: y' = (I - QQᵀ)(y - b) + b on the channel axis (last dim for a linear layer, dim 1
  for a conv). Costs about 4·r·out flops per output position, keeps no weight copy, and the frozen
  weight never needs a gradient.
* **weight space**: W' = W - Q(QᵀW), then the layer's own op with W'. Costs 4·r·out·K flops per call,
  keeps W' alive for backward, and - the dominant term - makes autograd compute the full weight
  gradient dL/dW' = g·xᵀ (2·out·K·N flops for N output positions), as full fine-tuning does.

Per call, output space is cheaper iff 6rN < 6rK + KN, i.e. always when K >= 6r. With the rank boundary
(r <= out/40) that holds for every layer of SD1.5/SDXL/SD3/Flux except very wide-output layers at high
rank, so ``mode="auto"`` picks output space almost everywhere and falls back to weight space only where
the formula says so (`cheaper_mode`). benchmarks/bench_train.py measures both.

Initialisation of B (``init``), all with unit-norm columns so Adam's step size means the same thing:

* ``small_sv`` (default): the r left singular vectors of W0 with the *smallest* singular values (for a
  wide-output layer, out > K, directions of W0's left null space, whose removal changes nothing). The
  model at step 0 is as close to the base model as a rank-r PaRa can be.
* ``random``: Gaussian B, what the only public PaRa code does; removes r random directions at step 0.
* ``top_sv``: the r dominant left singular vectors; the largest possible step-0 change (for studies).

Measured (``benchmarks/bench_train.py --init-study``: tiny SD1.5, ExCA without the 4-channel output conv,
rank 4, lr 2e-3, 60 steps, 3 seeds; ε-space error on 16 fixed (image, σ, noise) triples): relative change
of the model's prediction at step 0 - small_sv 5.4 %, random 15.8 %, top_sv 34.1 %; evaluation loss
after training (base model 1.320) - small_sv 0.200, random 0.196, top_sv 0.188. All three train about
equally well (within 6 %); small_sv is the default because it starts from the base model (a third of
random's step-0 change), which is what PaRa is for - keeping the model's general ability - and what
short runs and one-shot edits need, for at most 2 % of final loss against random on this proxy.

Q is computed with `orthonormal_basis` (fp32, autocast disabled, sign-fixed, differentiable) - once per
training step for all layers (`ParaNetwork.bases`, one batched QR per B shape), not once per layer call.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .basis import orthonormal_bases, orthonormal_basis
from .errors import ParaShapeError
from .format import ParaModel

INITS = ("small_sv", "random", "top_sv")
MODES = ("auto", "output", "weight")
DEFAULT_INIT = "small_sv"


def init_basis(weight: torch.Tensor, rank: int, init: str = DEFAULT_INIT,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Initial B (out x rank, fp32, unit-norm columns) for a weight of shape (out, ...)."""
    if weight.ndim < 2:
        raise ParaShapeError(f"PaRa needs a weight with at least 2 dims, got shape {tuple(weight.shape)}")
    out = weight.shape[0]
    if not 1 <= rank <= out:
        raise ParaShapeError(f"rank {rank} must be between 1 and the output dim {out}")
    if init == "random":
        b = torch.randn(out, rank, generator=generator, dtype=torch.float32)
        return (b / b.norm(dim=0, keepdim=True)).to(weight.device)
    if init not in INITS:
        raise ValueError(f"unknown init '{init}', expected one of {INITS}")
    w = weight.detach().to(torch.float32).reshape(out, -1)
    u, _s, _vh = torch.linalg.svd(w, full_matrices=False)  # u: out x k, singular values descending
    k = u.shape[1]
    if init == "top_sv":
        if rank <= k:
            return u[:, :rank].contiguous()
        return torch.cat([u, _complement(u, rank - k, generator)], 1)
    n_null = min(rank, out - k)  # out > K: left null space of W, singular value 0
    cols = [_complement(u, n_null, generator)] if n_null else []
    if rank > n_null:
        cols.append(u[:, k - (rank - n_null):])
    return torch.cat(cols, 1).contiguous()


def _complement(u: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """n orthonormal columns orthogonal to span(u) (u orthonormal), drawn at random."""
    r = torch.randn(u.shape[0], n, generator=generator, dtype=torch.float32).to(u.device)
    for _ in range(2):  # twice is enough in fp32 (Kahan-Parlett)
        r = r - u @ (u.T @ r)
    return torch.linalg.qr(r)[0]


def cheaper_mode(rank: int, k: int, n: int) -> str:
    """'output' or 'weight': which costs fewer flops for one forward+backward.

    output: ~12·r·out·N; weight: ~12·r·out·K + 2·out·K·N (the weight-gradient GEMM). out cancels.
    """
    return "output" if 6 * rank * n <= 6 * rank * k + k * n else "weight"


def project_output(y: torch.Tensor, q: torch.Tensor, bias: torch.Tensor | None = None, channel_dim: int = -1) -> torch.Tensor:
    """y' = y - Q Qᵀ (y - b) along channel_dim, in y's dtype. Equals the layer's output with W - QQᵀW.

    Written as two tiny layers - a linear (or 1x1 conv, for a conv's (B, C, ...) output) to r channels with
    bias -Qᵀb, and one back - because those are the fastest kernels for this shape forward and backward
    (no transpose of the conv output; Qᵀb is an r-vector, so the bias costs nothing per position).
    """
    q = q.to(dtype=y.dtype, device=y.device)
    neg_qb = None if bias is None else -(bias.to(dtype=y.dtype, device=y.device) @ q)  # (r,)
    if channel_dim in (-1, y.ndim - 1):
        coef = F.linear(y, q.T, neg_qb)
        return y + F.linear(coef, -q)  # (+ with -Q: backward needs no negation of a full-size gradient)
    if channel_dim == 1 and 3 <= y.ndim <= 5:
        conv = (F.conv1d, F.conv2d, F.conv3d)[y.ndim - 3]
        k = (1,) * (y.ndim - 2)
        coef = conv(y, q.T.reshape(q.shape[1], q.shape[0], *k), neg_qb)
        return y + conv(coef, (-q).reshape(q.shape[0], q.shape[1], *k))
    return project_output(y.movedim(channel_dim, -1), q, bias, -1).movedim(-1, channel_dim)


def project_weight(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """W' = W - Q(QᵀW) (out x ... weight), in w's dtype, differentiable in Q."""
    q = q.to(dtype=w.dtype, device=w.device)
    w2 = w.reshape(w.shape[0], -1)
    return (w2 - q @ (q.T @ w2)).reshape(w.shape)


class ParaLayer(nn.Module):
    """The trainable part of PaRa for one weight: B (out x r, fp32)."""

    def __init__(self, b: torch.Tensor):
        super().__init__()
        if b.ndim != 2 or not 1 <= b.shape[1] <= b.shape[0]:
            raise ParaShapeError(f"B must be out x r with 1 <= r <= out, got shape {tuple(b.shape)}")
        self.b = nn.Parameter(b.detach().to(torch.float32).clone())

    @property
    def out_features(self) -> int:
        return self.b.shape[0]

    @property
    def rank(self) -> int:
        return self.b.shape[1]

    def basis(self) -> torch.Tensor:
        """Q = orth(B) in fp32 (float64 if B is float64, for reference checks), even under autocast; differentiable."""
        dtype = torch.float64 if self.b.dtype == torch.float64 else torch.float32
        return orthonormal_basis(self.b, dtype, what="PaRa B")

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """The projected weight (weight space)."""
        return project_weight(w, self.basis())

    def extra_repr(self) -> str:
        return f"out={self.out_features}, rank={self.rank}"


def _safe(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


def _layer_kind(module: nn.Module) -> str | None:
    """'linear', 'conv' (channel dim 1) or None (other ≥2-D weights: weight space only)."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    return None


class ParaNetwork(nn.Module):
    """All trainable PaRa layers of one model, keyed by module name, and their injection into forward.

    `attach` replaces each target module's ``forward`` (instance attribute, restored by the returned
    handle) with one that applies PaRa in output or weight space. Only the targeted modules are
    touched: frozen layers keep their own forward and get no wrapper and no weight copy.
    """

    def __init__(self, layers: Mapping[str, ParaLayer], mode: str = "auto"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown projection mode '{mode}', expected one of {MODES}")
        self.names = list(layers)
        self.layers = nn.ModuleDict({_safe(n): layers[n] for n in self.names})
        if len(self.layers) != len(self.names):
            raise ValueError("two module names map to the same parameter key")
        self.mode = mode
        self._q: dict[str, torch.Tensor] | None = None
        self.mode_counts = {"output": 0, "weight": 0}

    @classmethod
    def from_weights(cls, weights: Mapping[str, torch.Tensor], ranks: Mapping[str, int], init: str = DEFAULT_INIT,
                     seed: int = 0, mode: str = "auto") -> "ParaNetwork":
        """New layers with B initialised from each weight (`init_basis`), deterministic in `seed`."""
        g = torch.Generator().manual_seed(int(seed) % (2 ** 63))
        layers = {n: ParaLayer(init_basis(weights[n], ranks[n], init, g)) for n in sorted(weights)}
        return cls(layers, mode)

    def layer(self, name: str) -> ParaLayer:
        return self.layers[_safe(name)]

    def items(self) -> Iterator[tuple[str, ParaLayer]]:
        for n in self.names:
            yield n, self.layers[_safe(n)]

    def ranks(self) -> dict[str, int]:
        return {n: layer.rank for n, layer in self.items()}

    def bases(self) -> dict[str, torch.Tensor]:
        """Q for every layer (fp32, differentiable), computed now: one batched QR per B shape (a model has
        hundreds of layers but few distinct shapes), bit-identical to each layer's own `basis()`."""
        if any(layer.b.dtype == torch.float64 for _, layer in self.items()):
            return {n: layer.basis() for n, layer in self.items()}
        qs = orthonormal_bases([layer.b for _, layer in self.items()], [f"PaRa B of {n}" for n in self.names])
        return dict(zip(self.names, qs))

    @contextmanager
    def step(self):
        """Compute every Q once for this forward/backward and let the wrappers use it."""
        self._q = self.bases()
        try:
            yield self._q
        finally:
            self._q = None

    def _basis(self, name: str) -> torch.Tensor:
        if self._q is not None:
            return self._q[name]
        return self.layer(name).basis()

    def to_para_model(self, metadata: Mapping[str, str] | None = None, dtype: torch.dtype = torch.float16) -> ParaModel:
        """The PaRa file content of the current B (one stage per module)."""
        with torch.no_grad():
            stages = {n: [q.detach().cpu()] for n, q in self.bases().items()}
        return ParaModel.from_bases(stages, dict(metadata or {}), dtype=dtype)

    # ---- injection -----------------------------------------------------------------------------
    def _choose(self, name: str, kind: str | None, module: nn.Module, x: torch.Tensor, rank: int) -> str:
        if kind is None:
            return "weight"
        if self.mode != "auto":
            return self.mode
        w = module.weight
        k = math.prod(w.shape[1:])
        if kind == "linear":
            n = x.numel() // max(1, x.shape[-1])
        else:  # output positions ~ input positions / stride
            stride = math.prod(getattr(module, "stride", (1,)))
            n = x.shape[0] * math.prod(x.shape[2:]) // max(1, stride)
        return cheaper_mode(rank, k, n)

    def attach(self, modules: Mapping[str, nn.Module],
               weight_of: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]] | None = None,
               bias_of: Callable[[nn.Module, torch.Tensor], torch.Tensor | None] | None = None) -> Callable[[], None]:
        """Install the PaRa forward on each module named in this network; returns an undo function.

        weight_of(module, x) -> (weight, bias) as the layer would use them for input x (default: the
        parameters cast to x's dtype); bias_of(module, x) -> bias for output space (default: same).
        Modules that are not Linear/ConvNd use weight space through their own forward with a
        temporarily substituted weight.
        """
        weight_of = weight_of or _default_weight_of
        bias_of = bias_of or (lambda m, x: _default_weight_of(m, x)[1] if getattr(m, "bias", None) is not None else None)
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise KeyError(f"{len(missing)} PaRa targets are not modules of this model (first: {missing[0]})")
        undo: list[Callable[[], None]] = []
        try:
            for name in self.names:
                undo.append(self._install(name, modules[name], weight_of, bias_of))
        except BaseException:
            for u in reversed(undo):
                u()
            raise

        def detach() -> None:
            for u in reversed(undo):
                u()
        return detach

    def _install(self, name: str, module: nn.Module, weight_of, bias_of) -> Callable[[], None]:
        kind = _layer_kind(module)
        rank = self.layer(name).rank
        if module.weight.shape[0] != self.layer(name).out_features:
            raise ParaShapeError(f"{name}: B has {self.layer(name).out_features} rows, weight is {tuple(module.weight.shape)}")
        had_own = "forward" in module.__dict__
        previous = module.__dict__.get("forward")
        orig = module.forward
        channel_dim = -1 if kind == "linear" else 1

        def forward(x, *args, **kwargs):
            mode = self._choose(name, kind, module, x, rank)
            self.mode_counts[mode] += 1
            q = self._basis(name)
            if mode == "output":
                y = orig(x, *args, **kwargs)
                return project_output(y, q, bias_of(module, x), channel_dim)
            w, b = weight_of(module, x)
            w = project_weight(w, q)
            if kind == "linear":
                return torch.nn.functional.linear(x, w, b)
            if kind == "conv":
                return module._conv_forward(x, w, b)
            return _call_with_weight(module, orig, w, x, args, kwargs)

        module.forward = forward

        def undo() -> None:
            if had_own:
                module.forward = previous
            else:
                del module.forward
        return undo


def _default_weight_of(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    dtype = x.dtype if x.is_floating_point() else module.weight.dtype
    w = module.weight.to(device=x.device, dtype=dtype)
    b = module.bias.to(device=x.device, dtype=dtype) if getattr(module, "bias", None) is not None else None
    return w, b


def _call_with_weight(module: nn.Module, orig, w: torch.Tensor, x, args, kwargs):
    """Run a module's own forward with its weight replaced for this call only."""
    saved = module._parameters["weight"]
    del module._parameters["weight"]
    module.weight = w
    try:
        return orig(x, *args, **kwargs)
    finally:
        del module.weight
        module._parameters["weight"] = saved
