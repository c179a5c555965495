"""Time to apply PaRa to the attention and feed-forward weights of SD1.5- and SDXL-shaped UNets,
against a LoRA update W += B·A of the same rank measured the same way in the same run.

PaRa: P = QᵀW (reads W), W.addmm_(Q, P, alpha=-s) (reads and writes W): 3 passes over W.
LoRA: D = B·A (writes an out x in temporary), W += D (reads W and D, writes W): 4 passes.
Memory traffic is reported as a fraction of this machine's measured copy bandwidth.

    python benchmarks/bench_patch.py [--dtype fp32|fp16] [--reps 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from para_core import orthonormal_basis, project_out_  # noqa: E402


def transformer_shapes(widths_and_blocks: list[tuple[int, int]], ctx: int) -> dict[tuple[int, int], int]:
    """{(out, in): count} for attn1 q/k/v/out, attn2 q/out (k/v read the text context), GEGLU ff."""
    shapes: dict[tuple[int, int], int] = {}
    for c, blocks in widths_and_blocks:
        for shape, n in (((c, c), 4), ((c, c), 2), ((c, ctx), 2), ((8 * c, c), 1), ((c, 4 * c), 1)):
            shapes[shape] = shapes.get(shape, 0) + n * blocks
    return shapes


MODELS = {
    # SD1.5: 16 transformer blocks, widths 320/640/1280 (5/5/6 incl. middle), context 768
    "SD1.5": transformer_shapes([(320, 5), (640, 5), (1280, 6)], 768),
    # SDXL: 70 transformer blocks: 640 x (2+3)·2 = 10, 1280 x (2+3)·10 + 1·10 = 60, context 2048
    "SDXL": transformer_shapes([(640, 10), (1280, 60)], 2048),
}


def copy_bandwidth(nbytes: int = 256 << 20, reps: int = 5) -> float:
    a = torch.empty(nbytes // 4, dtype=torch.float32).normal_()
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best  # read + write


def best_time(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_shape(out: int, inp: int, r: int, dtype: torch.dtype, reps: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(out * 7 + inp)
    w = torch.randn(out, inp, generator=g).to(dtype)
    q = orthonormal_basis(torch.randn(out, r, generator=g))
    up = torch.randn(out, r, generator=g).to(dtype) * 0.01
    down = torch.randn(r, inp, generator=g).to(dtype) * 0.01
    w_para, w_lora = w.clone(), w.clone()
    t_para = best_time(lambda: project_out_(w_para, q, 1.0), reps)
    if dtype == torch.float32:
        t_lora = best_time(lambda: w_lora.add_(up @ down), reps)
    else:  # as ComfyUI does for half storage: fp32 delta, cast, add
        t_lora = best_time(lambda: w_lora.add_((up.float() @ down.float()).to(dtype)), reps)
    return t_para, t_lora


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 32])
    a = ap.parse_args()
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[a.dtype]
    bw = copy_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, weights {a.dtype}; copy bandwidth {bw / 1e9:.1f} GB/s")
    print(f"{'model':6} {'r':>3} {'PaRa s':>9} {'LoRA s':>9} {'PaRa/LoRA':>9} {'PaRa GB/s':>9} {'% of copy bw':>12} {'LoRA GB/s':>9}")
    for name, shapes in MODELS.items():
        for r in a.ranks:
            tp = tl = 0.0
            nbytes = 0
            for (out, inp), count in shapes.items():
                p, lo = bench_shape(out, inp, r, dtype, a.reps)
                tp += p * count
                tl += lo * count
                nbytes += out * inp * torch.empty((), dtype=dtype).element_size() * count
            para_traffic = 3 * nbytes if dtype == torch.float32 else 5 * nbytes  # half: + upcast copy and cast back
            lora_traffic = 4 * nbytes
            print(f"{name:6} {r:>3} {tp:>9.3f} {tl:>9.3f} {tp / tl:>9.2f} {para_traffic / tp / 1e9:>9.1f} "
                  f"{100 * para_traffic / tp / bw:>11.0f}% {lora_traffic / tl / 1e9:>9.1f}")


if __name__ == "__main__":
    main()
