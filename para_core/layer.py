"""Trainable PaRa: a learned B (out x r) per targeted weight, and how it enters a forward pass.

For a weight W (out x K, K = in·kh·kw for a conv) PaRa uses W' = W - QQᵀW with Q = orth(B). The same
edit can be applied in two places, with identical results (tests/test_layer.py checks it in float64):

* **output space**: y' = (I - QQᵀ)(y - b) + b on the channel axis (last dim for a linear layer, dim 1
  for a conv). Costs about 4·r·out flops per output position, keeps no weight copy, and the frozen
  weight never needs a gradient.
* **weight space**: W' = W - Q(QᵀW), then the layer's own op with W'. Costs 4·r·out·K flops per call,
  keeps W' alive for backward, and - the dominant term - makes autograd compute the full weight
  gradient dL/dW' = g·xᵀ (2·out·K·N flops for N output positions), as full fine-tuning does.

Per call, by flop count output space is cheaper iff 6rN < 6rK + KN (`cheaper_mode`), i.e. always when
K >= 6r. Flops do not predict the clock, though: on CPU in bf16 the two rank-r ops of output space run
far below peak and weight space was measured faster (issue 9: 297 vs 337 ms/step). So ``mode="auto"``
*measures*: the first time a layer call's key (weight and input shape, dtypes incl. autocast, device, rank)
is met with gradients enabled, that call is timed in both spaces on a copy of its input (forward + backward,
best of 3; `ParaNetwork._measure`) and the faster is used for the key from then on, cached per process
(calls without gradients - previews - use the flop rule until the key is measured).
`ParaNetwork.describe_modes()` says what was chosen; benchmarks/bench_train.py shows it against forced
output and weight space. Within a process every run makes the same choices (same results bit for bit, also
on resume); across processes the timing may choose differently, and both spaces agree only up to rounding:
force ``output`` or ``weight`` where bit-identical results across processes matter.

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
The trainer calls ``network.step(check=False)``: no host synchronisation per step; rank/finiteness margins
stay on the device and `ParaNetwork.check()` validates them every N steps and before saving.
"""
from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from .basis import orthonormal_bases, orthonormal_bases_deferred, orthonormal_basis, raise_if_degenerate
from .errors import ParaShapeError
from .format import ParaModel
from .forward_patch import wrap_forwards

INITS = ("small_sv", "random", "top_sv")
MODES = ("auto", "output", "weight")
DEFAULT_INIT = "small_sv"


def init_basis(weight: torch.Tensor, rank: int, init: str = DEFAULT_INIT,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Initial B (out x rank, fp32, unit-norm columns) for a weight of shape (out, ...), on the weight's device.

    ``small_sv`` never takes a full SVD: it needs r of the out singular directions (see `smallest_left_singular`).
    ``top_sv`` (a study option) still does.
    """
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
    if not bool(torch.isfinite(w).all()):
        raise ParaShapeError(f"{init} init: the weight of shape {tuple(weight.shape)} contains NaN or Inf")
    k = w.shape[1]
    if init == "small_sv" and (k >= out or rank <= out - k):
        return smallest_left_singular(w, rank, generator)
    u, _s, _vh = torch.linalg.svd(w, full_matrices=False)  # u: out x k, singular values descending
    k = u.shape[1]
    if init == "top_sv":
        if rank <= k:
            return u[:, :rank].contiguous()
        return torch.cat([u, _complement(u, rank - k, generator)], 1)
    # small_sv with 0 < out - K < rank (rare, small layers): the null space plus the smallest nonzero directions
    n_null = out - k
    return torch.cat([_complement(u, n_null, generator), u[:, k - (rank - n_null):]], 1).contiguous()


def _complement(u: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """n orthonormal columns orthogonal to span(u) (u orthonormal), drawn at random."""
    r = torch.randn(u.shape[0], n, generator=generator, dtype=torch.float32).to(u.device)
    for _ in range(2):  # twice is enough in fp32 (Kahan-Parlett)
        r = r - u @ (u.T @ r)
    return torch.linalg.qr(r)[0]


def _shifted_cholesky(g: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of G + δI (G symmetric PSD, float64) for the smallest δ = 10^i·eps32·max diag(G) that works.

    The shift keeps the order of G's eigenvalues (1/(λ+δ) is decreasing); it only slows the separation of
    directions whose λ is below δ, which is about the rounding level of a Gram matrix computed in fp32
    (σ below ~1e-3·σ_max): fp32 arithmetic cannot tell those directions apart anyway.
    """
    scale = float(g.diagonal().abs().max()) or 1.0
    delta = torch.finfo(torch.float32).eps * scale
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    for _ in range(10):
        chol, info = torch.linalg.cholesky_ex(g + delta * eye)
        if int(info) == 0:
            return chol
        delta *= 10.0
    raise ParaShapeError(f"small_sv init: the Gram matrix of a {tuple(g.shape)} weight is not positive semi-definite "
                         "(NaN or Inf in the weight?)")


def smallest_left_singular(w: torch.Tensor, rank: int, generator: torch.Generator | None = None,
                           max_iter: int = 100, tol: float = 1e-9,
                           energy_tol: float = 1e-5) -> torch.Tensor:
    """The `rank` left singular vectors of w (out x K, fp32) with the smallest singular values, without an SVD.

    * out > K and rank <= out - K: random directions (from `generator`) orthogonal to range(w), i.e. in the
      left null space (singular value 0): Y - W (WᵀW)⁻¹ WᵀY, twice. Cost out·K² (the K x K Gram, fp32) + K³/3.
    * out <= K: block inverse (shift-and-invert) subspace iteration on G = W Wᵀ (out x out) with p = r + 8
      columns, Rayleigh-Ritz at the end: the r smallest eigenvectors of G are the r smallest left singular
      vectors of W. Cost out²·K (the Gram, one fp32 GEMM) + out³/3 (Cholesky) + 4·out²·p per iteration,
      against ~ 4·out²·K + 20·out³ for the full SVD: 3-10x less on SD1.5's layers (benchmarks/README.md).
      Stops when every wanted Ritz pair's residual |G q - θ q| is below tol·|G| (angle to the exact vector
      <= residual / eigen-gap: separated spectra converge to the SVD's vectors), or when the removed energy
      |QᵀW|² = Σθ is within energy_tol (relative) of its limit, extrapolated from its geometric decay: in a
      cluster of nearly equal small singular values (random weights) which vectors are taken does not
      matter, only that |QᵀW| is minimal (tests/test_layer.py: within 1e-4 of the optimum). Bounded by max_iter:
      in an adversarial cluster (190 singular values within 10 % of each other) 100 iterations leave the
      removed energy 0.2 % above the optimum.
    Deterministic in `generator` (the start block is drawn from it on the CPU). Returns out x rank fp32 with
    orthonormal columns, on w's device.
    """
    out, k = w.shape
    dev = w.device
    if out > k:
        chol = _shifted_cholesky((w.T @ w).to(torch.float64))
        y = torch.randn(out, rank, generator=generator, dtype=torch.float32).to(dev)
        for _ in range(2):  # the second pass removes what fp32 rounding left of range(W)
            y = y - w @ torch.cholesky_solve((w.T @ y).to(torch.float64), chol).to(torch.float32)
        return torch.linalg.qr(y)[0].contiguous()
    g = (w @ w.T).to(torch.float64)
    g = (g + g.T) * 0.5
    p = min(out, rank + 8)
    y = torch.linalg.qr(torch.randn(out, p, generator=generator, dtype=torch.float64).to(dev))[0]
    if p == out:  # the block is the whole space: one small eigen-decomposition
        return torch.linalg.eigh(g)[1][:, :rank].to(torch.float32).contiguous()
    chol = _shifted_cholesky(g)
    scale = float(g.diagonal().max()) or 1.0
    energy: list[float] = []
    for it in range(max_iter):
        y = torch.linalg.qr(torch.cholesky_solve(y, chol))[0]
        if it % 4 == 3 or it == max_iter - 1:
            gy = g @ y
            theta, v = torch.linalg.eigh(y.T @ gy)
            q = y @ v[:, :rank]
            resid = float((gy @ v[:, :rank] - q * theta[:rank]).norm(dim=0).max())
            e = float(theta[:rank].sum())
            if resid <= tol * scale:
                break
            if len(energy) >= 2:  # the excess energy decays geometrically: extrapolate what is left
                d0, d1 = energy[-2] - energy[-1], energy[-1] - e
                rate = min(d1 / d0, 0.999) if d0 > 0 else 0.0
                if d1 <= 0 or d1 * rate / (1 - rate) <= energy_tol * e:
                    break
            energy.append(e)
    return q.to(torch.float32).contiguous()


def cheaper_mode(rank: int, k: int, n: int) -> str:
    """'output' or 'weight': which costs fewer flops for one forward+backward.

    output: ~12·r·out·N; weight: ~12·r·out·K + 2·out·K·N (the weight-gradient GEMM). out cancels.
    """
    return "output" if 6 * rank * n <= 6 * rank * k + k * n else "weight"


# Low-precision outputs up to this many elements are projected in fp32 on a CPU: there a bf16/fp16 GEMM
# of rank r costs a fixed ~20-25 µs (oneDNN set-up) against ~3-5 µs in fp32, which the two casts do not
# undo below about this size; above it the bf16 GEMMs' halved memory traffic wins (benchmarks/README.md).
CPU_FP32_PROJECTION_MAX_ELEMENTS = 1 << 16

# Gradient checkpointing: a unit's last layer keeps its output (instead of recomputing the layer) only if the
# output has at most 1/this of the layer's weight elements (`ParaNetwork.set_checkpoint_units`).
KEEP_OUTPUT_WEIGHT_RATIO = 8


def projection_dtype(y: torch.Tensor) -> torch.dtype:
    """The dtype `project_output` computes in for output y: y's own, except for a small bf16/fp16 output on
    a CPU, which is projected in fp32 and rounded once to y's dtype (`CPU_FP32_PROJECTION_MAX_ELEMENTS`)."""
    if y.dtype in (torch.bfloat16, torch.float16) and y.device.type == "cpu" and y.numel() <= CPU_FP32_PROJECTION_MAX_ELEMENTS:
        return torch.float32
    return y.dtype


class _OutputProjection(torch.autograd.Function):
    """z = y - s·QQᵀ(y - b) on a matrix view of the output, with its backward written out.

    Two layouts, both the output as it lies in memory (no transpose): ``rows`` (N, C), channels last (a
    linear layer), and ``cols`` (B, C, L), channels at dim 1 (a conv). With c = Qᵀ(y - b) (r per position),
    z = y - s·Qc; for an upstream gradient g and a = Qᵀg:

        dL/dy = g - s·Qa                 (the projection is symmetric)
        dL/dQ = -s·(y aᵀ + g cᵀ - b (Σ a)ᵀ)   summed over positions ((y - b)aᵀ with the bias as a rank-1 term)

    Arguments: y, Q (on y's device), b (the bias as the layer added it, already in the compute dtype cd, or
    None), Qᵀb (`bias_coordinates`, given whenever b is; the trainer makes it once per step and layer), s,
    the layout, cd, keep_y. One autograd node and the fewest torch calls this takes: in a training step each
    call costs a fixed ~10-20 µs on a CPU whatever its size (measured in the trainer on tiny SDXL), which at
    small sizes is the whole cost. Q, b and c (r per position) stay on the node. y goes through save_for_backward, i.e.
    through gradient checkpointing's hooks (dropped and recomputed), unless keep_y: then the node holds y
    itself, so that checkpointing need not run the layer again in backward to get it back (see
    `ParaNetwork.set_checkpoint_units`). Autocast is switched off inside (cd is chosen by
    `projection_dtype`); Q's gradient comes back in Q's own dtype (fp32).
    """

    @staticmethod
    def forward(ctx, y, q, b, qtb, strength, cols, cd, keep_y):
        dev = y.device.type
        autocast = torch.is_autocast_enabled(dev)
        if autocast:  # not the context manager: its Python costs as much as the GEMMs here
            torch.set_autocast_enabled(dev, False)
        # z is written into a fresh tensor of y's shape and returned whole: a view returned from a custom Function
        # may not be modified in place later (HunyuanImage's blocks do), and a view of z would be one.
        z_full = torch.empty(y.shape, dtype=cd, device=y.device)
        try:
            qc = q if q.dtype == cd else q.to(cd)
            if cols:
                y3 = y.view(y.shape[0], y.shape[1], -1)
                if y.dtype != cd:
                    y3 = y3.to(cd)
                qt = qc.T
                if y.shape[0] == 1:
                    y2 = y3[0]
                    c = torch.mm(qt, y2) if b is None else torch.addmm(qtb.unsqueeze(1), qt, y2, beta=-1)
                    torch.addmm(y2, qc, c, alpha=-strength, out=z_full.view(y2.shape))
                else:
                    c = torch.matmul(qt, y3)
                    if b is not None:
                        c -= qtb.unsqueeze(1)
                    torch.baddbmm(y3, qc.expand(y.shape[0], -1, -1), c, alpha=-strength, out=z_full.view(y3.shape))
            else:
                y2 = y.reshape(-1, y.shape[-1])
                if y.dtype != cd:
                    y2 = y2.to(cd)
                c = torch.mm(y2, qc) if b is None else torch.addmm(qtb, y2, qc, beta=-1)
                torch.addmm(y2, c, qc.T, alpha=-strength, out=z_full.view(y2.shape))
        finally:
            if autocast:
                torch.set_autocast_enabled(dev, True)
        if keep_y:
            ctx.kept_y = y
        else:
            ctx.kept_y = None
            ctx.save_for_backward(y)
        ctx.qc, ctx.b, ctx.c, ctx.q_dtype, ctx.strength, ctx.cols = qc, b, c, q.dtype, strength, cols
        return z_full if y.dtype == cd else z_full.to(y.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        y = ctx.saved_tensors[0] if ctx.kept_y is None else ctx.kept_y
        qc, b, c, s = ctx.qc, ctx.b, ctx.c, ctx.strength
        cd = qc.dtype
        dev = y.device.type
        autocast = torch.is_autocast_enabled(dev)
        if autocast:
            torch.set_autocast_enabled(dev, False)
        gy = gq = None
        try:
            if ctx.cols:
                g3 = g.reshape(y.shape[0], y.shape[1], -1)
                y3 = y.view(y.shape[0], y.shape[1], -1)
                if g3.dtype != cd:
                    g3, y3 = g3.to(cd), y3.to(cd)
                if y.shape[0] == 1:  # (C, L) matrices
                    g2 = g3[0]
                    a = torch.mm(qc.T, g2)  # (r, L)
                    if ctx.needs_input_grad[0]:
                        gy = torch.addmm(g2, qc, a, alpha=-s)
                    if ctx.needs_input_grad[1]:
                        gq = torch.mm(y3[0], a.T).addmm_(g2, c.T)
                        a_sum = a.sum(1)
                else:
                    a = torch.matmul(qc.T, g3)  # (B, r, L)
                    if ctx.needs_input_grad[0]:
                        gy = torch.baddbmm(g3, qc.expand(y.shape[0], -1, -1), a, alpha=-s)
                    if ctx.needs_input_grad[1]:
                        gq = torch.bmm(y3, a.mT).add_(torch.bmm(g3, c.mT)).sum(0)
                        a_sum = a.sum((0, 2))
            else:
                g2 = g.reshape(-1, y.shape[-1])
                y2 = y.reshape(-1, y.shape[-1])
                if g2.dtype != cd:
                    g2, y2 = g2.to(cd), y2.to(cd)
                a = torch.mm(g2, qc)  # (N, r)
                if ctx.needs_input_grad[0]:
                    gy = torch.addmm(g2, a, qc.T, alpha=-s)
                if ctx.needs_input_grad[1]:
                    gq = torch.mm(y2.T, a).addmm_(g2.T, c)
                    a_sum = a.sum(0)
            if gq is not None:
                if b is not None:
                    gq.addr_(b, a_sum, alpha=-1)
                gq = gq.mul_(-s) if gq.dtype == ctx.q_dtype else gq.mul_(-s).to(ctx.q_dtype)
        finally:
            if autocast:
                torch.set_autocast_enabled(dev, True)
        if gy is not None:
            gy = (gy if gy.dtype == y.dtype else gy.to(y.dtype)).view(y.shape)
        return gy, gq, None, None, None, None, None, None


def projection_bias(bias: torch.Tensor | None, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """The bias a layer added to y - rounded to y's dtype, as the layer added it - in the compute dtype."""
    return None if bias is None else bias.detach().to(device=y.device, dtype=y.dtype).to(dtype)


def project_output(y: torch.Tensor, q: torch.Tensor, bias: torch.Tensor | None = None, channel_dim: int = -1,
                   strength: float = 1.0) -> torch.Tensor:
    """y' = y - s·Q Qᵀ (y - b) along channel_dim, in y's dtype. Equals the layer's output with W - s·QQᵀW:
    (W - s·QQᵀW)x + b = y - s·QQᵀ(y - b) for y = Wx + b. Training uses it (s = 1) and so does bypass mode.

    Two rank-r GEMMs on the output as it lies in memory (`_OutputProjection`): (N, C) for a linear layer,
    (C, L) per image for a conv's (B, C, ...) output, the second fused with the addition of y (addmm); Qᵀb
    is an r-vector, so the bias costs nothing per position. On a CPU this is 2-3x faster than the same
    product as two 1x1 convolutions (measured in bf16; benchmarks/README.md). b is taken in y's dtype (the
    bias the layer added); Q in any dtype (the trainer's fp32 Q gets its gradient in fp32).
    """
    cd = projection_dtype(y)
    return _project(y, q.to(y.device), projection_bias(bias, y, cd), channel_dim, strength, cd)


def bias_coordinates(q: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Qᵀb in `dtype` (no gradient): the bias's coordinates in the removed subspace, the r-vector that
    `_OutputProjection` subtracts from Qᵀy."""
    with torch.no_grad():
        return torch.mv(q.detach().to(dtype).T, b)


def _project(y: torch.Tensor, q: torch.Tensor, b: torch.Tensor | None, channel_dim: int, strength: float,
             cd: torch.dtype, qtb: torch.Tensor | None = None, keep_y: bool = False) -> torch.Tensor:
    """`project_output` with b already from `projection_bias` and Q on y's device: the layout dispatch.
    qtb: `bias_coordinates` if already made (made here otherwise)."""
    if b is not None and qtb is None:
        qtb = bias_coordinates(q, b, cd)
    if channel_dim == 1 and y.ndim >= 3 and y.is_contiguous():
        return _OutputProjection.apply(y, q, b, qtb, strength, True, cd, keep_y)
    if channel_dim not in (-1, y.ndim - 1):
        return _project(y.movedim(channel_dim, -1), q, b, -1, strength, cd, qtb, keep_y).movedim(-1, channel_dim)
    return _OutputProjection.apply(y, q, b, qtb, strength, False, cd, keep_y)


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
        self.layer_modes: dict[str, str] = {}  # the mode each layer used last: what `describe_modes` reports
        self.timings: dict[tuple, tuple[float, float]] = {}  # auto: key -> (output s, weight s) timed here
        self._probes: dict[str, Callable] = {}
        self._margins: torch.Tensor | None = None  # running minimum of the deferred rank margins
        # output space: each frozen bias per (layer, dtype, device), cast once per attach
        self._biases: dict[tuple, torch.Tensor | None] = {}
        self._qtb: dict[tuple, torch.Tensor] = {}  # Qᵀb per (layer, compute dtype), made once per `step`
        # gradient checkpointing (`set_checkpoint_units`): the unit of each layer, the layers called so far in
        # the first step (first calls, in order) and the last layer called in each unit
        self._attached: dict[str, nn.Module] = {}  # the modules of the current attach, by layer name
        self._unit_of: dict[str, int] = {}
        self._first_calls: dict[str, None] | None = None
        self._keep_outputs: frozenset[str] = frozenset()

    @classmethod
    def from_weights(cls, weights: Mapping[str, torch.Tensor], ranks: Mapping[str, int], init: str = DEFAULT_INIT,
                     seed: int = 0, mode: str = "auto") -> "ParaNetwork":
        """New layers with B initialised from each weight (`init_basis`), deterministic in `seed`."""
        g = torch.Generator().manual_seed(int(seed) % (2 ** 63))
        layers = {}
        for n in sorted(weights):
            try:
                layers[n] = ParaLayer(init_basis(weights[n], ranks[n], init, g))
            except ParaShapeError as e:
                raise ParaShapeError(f"{n}: {e}") from None
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
    def step(self, check: bool = True):
        """Compute every Q once for this forward/backward and let the wrappers use it.

        check=True validates each B now (one host synchronisation). check=False (the trainer's per-step path)
        never waits for the device: the rank margins are kept on the device as a running minimum and
        validated by `check()` - call it every N steps and before saving (`to_para_model` checks anyway).
        """
        if check or any(layer.b.dtype == torch.float64 for _, layer in self.items()):
            self._q = self.bases()
        else:
            qs, margins = orthonormal_bases_deferred([layer.b for _, layer in self.items()])
            self._q = dict(zip(self.names, qs))
            self._margins = margins.detach() if self._margins is None else torch.minimum(self._margins, margins.detach())
        try:
            yield self._q
        finally:
            self._q = None
            self._qtb.clear()
            if self._first_calls is not None:
                last = {self._unit_of[n]: n for n in self._first_calls if n in self._unit_of}
                self._keep_outputs, self._first_calls = frozenset(last.values()), None

    def _note_call(self, name: str) -> None:
        """Record a layer's first call in the first training step (`set_checkpoint_units`)."""
        if self._first_calls is not None and self._q is not None:
            self._first_calls.setdefault(name)

    def set_checkpoint_units(self, units: Iterable[nn.Module]) -> None:
        """Tell the network the modules gradient checkpointing recomputes as units (`train.enable_checkpointing`
        does), so that the *last* PaRa layer called inside each unit keeps its output y on its autograd node.
        Membership is by module identity among the modules of the current `attach` (or bypass hooks); an
        empty list turns it off.

        Why: output space needs y in backward (dL/dQ = -s(y aᵀ + ...)). Checkpointing recomputes a unit's
        forward in backward only as far as its last saved tensor, so a frozen unit stops before its last layer
        (nothing after it saves anything: a residual add), while a PaRa last layer that saves y through
        checkpointing's hooks makes it run that layer - a full conv or GEMM, and its weight cast - again, per
        unit and step. Keeping that one y instead costs y's memory; it is done only where y has at most
        1/`KEEP_OUTPUT_WEIGHT_RATIO` of the layer's weight elements, which bounds the memory kept by a fraction
        of the weights of one layer per unit (at 1024 px: SDXL's deep convs, not Flux's 4096-token outputs).
        Which layer is last is what the first training `step` calls last in each unit; from the second step on
        it keeps its y. Measured: tiny SDXL, `all`, bf16, 64 px - 12 fewer convs per step (benchmarks/README.md).
        """
        index = {id(m): n for n, m in self._attached.items()}
        self._unit_of = {index[id(m)]: i for i, unit in enumerate(units) for m in unit.modules() if id(m) in index}
        self._first_calls = {} if self._unit_of else None
        self._keep_outputs = frozenset()

    def check(self) -> None:
        """Raise ParaRankError naming the first layer whose B was rank deficient or not finite at any
        `step(check=False)` since the last check. One host synchronisation."""
        margins, self._margins = self._margins, None
        if margins is not None:
            raise_if_degenerate(margins, [f"PaRa B of {n}" for n in self.names], [tuple(l.b.shape) for _, l in self.items()])

    def _project_output(self, name: str, module: nn.Module, x: torch.Tensor, y: torch.Tensor, bias_of,
                        channel_dim: int) -> torch.Tensor:
        """`project_output` of one layer's output y with this step's Q (the layer's own basis outside `step`)
        and the layer's bias, prepared (`projection_bias`) once per attach: the layer is frozen, so its bias in
        a dtype is the same at every step."""
        cd = projection_dtype(y)
        bkey = (name, y.dtype, y.device, cd)
        b = self._biases.get(bkey, _MISSING)
        if b is _MISSING:
            b = self._biases[bkey] = projection_bias(bias_of(module, x), y, cd)
        if self._q is None:
            return _project(y, self.layer(name).basis(), b, channel_dim, 1.0, cd)
        q = self._q[name]
        qtb = None
        if b is not None:
            qtb = self._qtb.get(bkey)
            if qtb is None:
                qtb = self._qtb[bkey] = bias_coordinates(q, b, cd)
        keep = name in self._keep_outputs and y.numel() * KEEP_OUTPUT_WEIGHT_RATIO <= math.prod(module.weight.shape)
        return _project(y, q, b, channel_dim, 1.0, cd, qtb, keep)

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
        key = _probe_key(kind, module, x, rank)
        chosen = _MEASURED.get(key)
        if chosen is None:
            if not torch.is_grad_enabled():  # no backward to time (previews): the flop rule, nothing cached
                return cheaper_mode(rank, math.prod(module.weight.shape[1:]), _positions(kind, module, x))
            chosen = self._measure(key, name, x)
        return chosen

    def _measure(self, key: tuple, name: str, x: torch.Tensor, repeats: int = 3) -> str:
        """Time one forward+backward of this layer call in output and in weight space, now, on a copy of its
        input and Q (gradients to both, as in training; interleaved, best of `repeats` after a warm-up), and
        keep the faster for this key in this process (`_MEASURED`).

        Runs inside the model's forward the first time a key is met, so every step of every run in a process
        uses the same choice (runs and resumed runs stay bit-identical within a process). It is a separate
        small graph: its saved tensors bypass gradient checkpointing's hooks, torch.autograd.grad leaves every
        .grad untouched, and nothing draws from a random generator.
        """
        _kind, _w, _xs, _x_dtype, autocast_dtype, device, *_ = key
        probe = self._probes[name]
        q = self._basis(name).detach().clone().requires_grad_(True)
        xc = x.detach().clone().requires_grad_(True)
        times = {"output": [], "weight": []}
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), torch.enable_grad():
            for i in range(repeats + 1):
                for mode in ("output", "weight"):
                    t = _timed(lambda m=mode: probe(m, xc, q, autocast_dtype), device)
                    if i:
                        times[mode].append(t)
        best = {m: min(v) for m, v in times.items()}
        self.timings[key] = (best["output"], best["weight"])
        _MEASURED[key] = chosen = "output" if best["output"] <= best["weight"] else "weight"
        return chosen

    def describe_modes(self) -> str:
        """Which space each layer used (last call), e.g. for the Train PaRa node's text output."""
        out = sum(1 for m in self.layer_modes.values() if m == "output")
        weight = len(self.layer_modes) - out
        text = f"projection {self.mode}: output space on {out} layers, weight space on {weight}"
        if self.timings:
            t_out = sum(t[0] for t in self.timings.values())
            t_w = sum(t[1] for t in self.timings.values())
            text += (f" (timed {len(self.timings)} layer shapes: output {t_out * 1e3:.1f} ms, weight {t_w * 1e3:.1f} ms "
                     f"for one call of each)")
        return text

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
        names = {id(modules[n]): n for n in self.names}

        def forget_probes() -> None:
            for n in self.names:
                self._probes.pop(n, None)
            self._biases.clear()
        try:
            undo_forwards = wrap_forwards([modules[n] for n in self.names],
                                          lambda module, orig: self._forward(names[id(module)], module, orig, weight_of, bias_of))
        except BaseException:
            forget_probes()
            raise

        self._attached = {n: modules[n] for n in self.names}

        def detach() -> None:
            undo_forwards()
            forget_probes()
            self._attached = {}
        return detach

    def attach_output_hooks(self, modules: Mapping[str, nn.Module],
                            bias_of: Callable[[nn.Module, torch.Tensor], torch.Tensor | None] | None = None) -> Callable[[], None]:
        """Bypass mode: project each module's output through a torch forward hook, y' = y - QQᵀ(y - b)
        (`project_output`, the output space of `attach`), and leave the module itself alone - its forward,
        class, weight and flags stay what they are, so a layer whose weight cannot be used directly (quantized,
        fp8, offloaded) trains through whatever its own forward does. Returns the undo (removes the hooks).
        bias_of(module, x) -> the bias the layer added (default: its `bias` cast to y)."""
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise KeyError(f"{len(missing)} PaRa targets are not modules of this model (first: {missing[0]})")
        handles = []

        def make_hook(name: str, module: nn.Module):
            channel_dim = 1 if _layer_kind(module) == "conv" else -1
            if module.weight.shape[0] != self.layer(name).out_features:
                raise ParaShapeError(f"{name}: B has {self.layer(name).out_features} rows, weight is {tuple(module.weight.shape)}")

            def hook(mod, args, y):
                self._note_call(name)
                self.mode_counts["output"] += 1
                self.layer_modes[name] = "output"
                return self._project_output(name, mod, args[0], y, own_bias, channel_dim)
            return hook

        def own_bias(mod, x):
            return bias_of(mod, x) if bias_of is not None else getattr(mod, "bias", None)

        def detach() -> None:
            for h in reversed(handles):
                h.remove()
            handles.clear()
            self._biases.clear()
            self._attached = {}
        try:
            for n in self.names:
                handles.append(modules[n].register_forward_hook(make_hook(n, modules[n])))
        except BaseException:
            detach()
            raise
        self._attached = {n: modules[n] for n in self.names}
        return detach

    def _forward(self, name: str, module: nn.Module, orig, weight_of, bias_of):
        """The PaRa forward of one module (`orig` is the forward it replaces); registers its timing probe."""
        kind = _layer_kind(module)
        rank = self.layer(name).rank
        if module.weight.shape[0] != self.layer(name).out_features:
            raise ParaShapeError(f"{name}: B has {self.layer(name).out_features} rows, weight is {tuple(module.weight.shape)}")
        channel_dim = -1 if kind == "linear" else 1

        def apply(mode, x, q, args=(), kwargs=None):
            """q: Q, or None for this step's Q (output space then uses the step's prepared casts)."""
            kwargs = kwargs or {}
            if mode == "output":
                y = orig(x, *args, **kwargs)
                if q is None:
                    return self._project_output(name, module, x, y, bias_of, channel_dim)
                return project_output(y, q, bias_of(module, x), channel_dim)
            if q is None:
                q = self._basis(name)
            w, b = weight_of(module, x)
            w = project_weight(w, q)
            if kind == "linear":
                return torch.nn.functional.linear(x, w, b)
            if kind == "conv":
                return module._conv_forward(x, w, b)
            return _call_with_weight(module, orig, w, x, args, kwargs)

        chosen: dict[tuple, str] = {}  # this attach's final choices by input, so `_probe_key` is built once per input

        def forward(x, *args, **kwargs):
            self._note_call(name)
            dev = x.device.type
            key = (x.shape, x.dtype, x.device, torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None)
            mode = chosen.get(key)
            if mode is None:
                mode = self._choose(name, kind, module, x, rank)
                if self.mode != "auto" or torch.is_grad_enabled():  # a gradient-free auto choice is provisional
                    chosen[key] = mode
            self.mode_counts[mode] += 1
            self.layer_modes[name] = mode
            return apply(mode, x, None, args, kwargs)

        def probe(mode, x, q, autocast_dtype):
            with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                y = apply(mode, x, q)
            torch.autograd.grad(y, [x, q], torch.ones_like(y))

        self._probes[name] = probe
        return forward


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


_MISSING = object()
_MEASURED: dict[tuple, str] = {}  # projection "auto": (layer, input, dtype, device) -> faster mode, per process


def _positions(kind: str, module: nn.Module, x: torch.Tensor) -> int:
    """Output positions N of one call (tokens for a linear layer, pixels / stride for a conv)."""
    if kind == "linear":
        return x.numel() // max(1, x.shape[-1])
    stride = math.prod(getattr(module, "stride", (1,)))
    return x.shape[0] * math.prod(x.shape[2:]) // max(1, stride)


def _probe_key(kind: str, module: nn.Module, x: torch.Tensor, rank: int) -> tuple:
    """What the speed of one call depends on: op, weight and input shape, dtypes (autocast too), device, rank."""
    dev = x.device.type
    autocast_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    conv = tuple(getattr(module, a, None) for a in ("stride", "padding", "dilation", "groups")) if kind == "conv" else ()
    return (kind, tuple(module.weight.shape), tuple(x.shape), x.dtype, autocast_dtype, x.device, module.weight.dtype,
            rank, conv)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t
