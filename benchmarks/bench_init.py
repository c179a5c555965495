"""Time the ``small_sv`` initialisation of B over a UNet's target layers: now (`init_basis`) against the
full SVD it replaced, with the removed energy |QᵀW| of both (they must agree).

Weights are random (N(0, 1/K)) at each layer's real shape; each distinct (shape, rank) is timed once and
counted as often as it occurs (time depends on the shape only). Layouts from para_core.synthetic:
``tiny`` = the benchmark/test UNet (model_channels 320, one level, context 768), ``sd15`` = full-size SD1.5.

    OMP_NUM_THREADS=1 python benchmarks/bench_init.py [--model tiny|sd15] [--targets ExCA|all] [--rank 4]
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from para_core import synthetic, targets  # noqa: E402
from para_core.layer import init_basis  # noqa: E402

LAYOUTS = {"tiny": dict(ch=320, ctx=768, mult=(1,), res_blocks=1), "sd15": dict(ch=320, ctx=768)}


def layer_shapes(model: str) -> dict[str, tuple[int, ...]]:
    """Target-candidate weight shapes of a synthetic layout, built on the meta device (no memory, no time)."""
    real_randn = torch.randn
    with mock.patch.object(torch, "randn", lambda *s, generator=None, **k: real_randn(*s, device="meta", **k)):
        sd = synthetic.sd15_unet(**LAYOUTS[model])
    return {"diffusion_model." + k[:-len(".weight")]: tuple(v.shape) for k, v in sd.items()
            if k.endswith(".weight") and v.ndim >= 2}


def full_svd_small_sv(w: torch.Tensor, rank: int) -> torch.Tensor:
    """The replaced method: full SVD, last r left singular vectors (or a null-space basis, out > K)."""
    w2 = w.reshape(w.shape[0], -1)
    u = torch.linalg.svd(w2, full_matrices=False)[0]
    if w2.shape[0] > w2.shape[1]:
        r = torch.randn(w2.shape[0], rank)
        for _ in range(2):
            r = r - u @ (u.T @ r)
        return torch.linalg.qr(r)[0]
    return u[:, -rank:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", choices=list(LAYOUTS))
    ap.add_argument("--targets", default="ExCA")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-svd", action="store_true", help="time only the new method")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    shapes = layer_shapes(a.model)
    p = targets.plan({n: s[0] for n, s in shapes.items()}, a.targets, a.rank, 0.025)
    count = collections.Counter((shapes[n], p.ranks[n]) for n in p.ranks)
    g = torch.Generator().manual_seed(0)
    total = {"new": 0.0, "svd": 0.0}
    worst = 0.0
    print(f"{a.model} UNet, {a.targets}: {len(p.ranks)} layers, {len(count)} distinct (shape, rank); rank {a.rank}, "
          f"{a.threads} thread(s), fp32 weights on CPU")
    for (shape, r), c in sorted(count.items(), key=lambda kv: -kv[0][0][0] * (kv[0][0][1] if len(kv[0][0]) > 1 else 1)):
        w = torch.randn(shape, generator=g) / (torch.tensor(shape[1:]).prod().item() ** 0.5)
        t = time.perf_counter()
        b = init_basis(w, r, "small_sv", g)
        t_new = time.perf_counter() - t
        total["new"] += t_new * c
        e_new = float((b.double().T @ w.double().reshape(shape[0], -1)).norm())
        line = f"  {str(shape):22s} r={r} x{c:<3d} now {t_new * 1e3:8.1f} ms"
        if not a.skip_svd:
            t = time.perf_counter()
            b_old = full_svd_small_sv(w, r)
            t_svd = time.perf_counter() - t
            total["svd"] += t_svd * c
            e_old = float((b_old.double().T @ w.double().reshape(shape[0], -1)).norm())
            worst = max(worst, (e_new - e_old) / max(e_old, 1e-12) if e_old > 1e-6 else e_new)
            line += f"  full SVD {t_svd * 1e3:9.1f} ms   |QᵀW| {e_new:.6f} vs {e_old:.6f}"
        print(line, flush=True)
    print(f"total over {len(p.ranks)} layers: now {total['new']:.2f} s", end="")
    if not a.skip_svd:
        print(f", full SVD {total['svd']:.2f} s ({total['svd'] / max(total['new'], 1e-9):.1f}x); largest relative "
              f"excess of |QᵀW| over the SVD's: {worst:.1e}")
    else:
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
