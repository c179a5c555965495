"""Quality regression: a trained PaRa draws its subject (the smallest world of benchmarks/study, issue 16).

Every other test checks formulas against references; this one fails when learning breaks although every formula
still matches. The world (benchmarks/study/world.py, config CI): ComfyUI's SD1.5 model class with a small
v-prediction UNet (1.03M parameters, 8×8×4 latents, cross-attention at both resolutions) pretrained here on shapes ×
colours × positions (1000 steps), a frozen one-layer ComfyUI CLIP, a CNN judge (held-out accuracy asserted > 0.9 per
head). Per seed, one ComfyUI graph (run_study.subject_gain): Train PaRa (PaRaTrainer, ExCA without the output conv,
rank 4, lr 1e-2, 200 steps, batch 4) on 4 latents of a subject never seen in pretraining (an orange "ell", caption
"a sks"); KSampler (euler, 20 steps, cfg 4) draws 16 samples of "a sks" with the base model and with the PaRa, same
noise; the judge counts samples in the subject's colour, and samples that are the subject (shape and colour).

Measured (torch 2.14.1, 1 thread, 16 samples per seed; ComfyUI 0.33.0 seeds 0-4, 0.8.0 seeds 0-1 with its own
pretraining: identical numbers), base → PaRa:

    seed                 0      1      2      3      4
    subject colour    0→1.0  0→.69  0→.81  0→.94  0→1.0
    subject (both)    0→.25  0→.38  0→.19  0→.19  0→.50

The base model never draws the subject or its colour (it never saw either). So the test asserts, on seeds 0 and 1:
colour gain ≥ COLOUR_MARGIN (.5; min .69 measured) on each seed, and mean subject gain ≥ SUBJECT_MARGIN (.15, 5 of 32
samples; .31 measured). A trainer that stops learning leaves PaRa at the base's 0 and fails both.

Deterministic: fixed seeds, torch threads set to 1 for the test (restored after), PaRa `projection=output`. Time on
this 2-core machine: 55 s with the world cached under load (~/.cache/comfyui-para-study, kept between runs); 406 s when
it pretrains the world first, under load from three other jobs (ComfyUI 0.8.0, fresh cache).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from harness import REPO_ROOT

STUDY = os.path.join(REPO_ROOT, "benchmarks", "study")
if STUDY not in sys.path:
    sys.path.append(STUDY)

SEEDS = (0, 1)
COLOUR_MARGIN = 0.5
SUBJECT_MARGIN = 0.15


@pytest.fixture(scope="module")
def world(comfy):
    import run_study as R
    from benchmarks.study import world as W
    threads = torch.get_num_threads()
    _, judge, facts = R.setup(W.CI, harness=comfy)  # sets torch threads to the world's (1): deterministic sums
    yield R, W, judge, facts
    torch.set_num_threads(threads)


def test_para_draws_its_subject(comfy, world):
    R, W, judge, facts = world
    assert min(facts["judge_accuracy"].values()) > 0.9, facts
    results = {seed: R.subject_gain(comfy, judge, W.CI, seed) for seed in SEEDS}
    print(f"study quality, base -> PaRa per seed: {results}")  # shown by pytest -rP / -s
    colour_gains = [r["para_colour"] - r["base_colour"] for r in results.values()]
    subject_gain = sum(r["para"] - r["base"] for r in results.values()) / len(SEEDS)
    assert min(colour_gains) >= COLOUR_MARGIN and subject_gain >= SUBJECT_MARGIN, (
        f"per seed {results}: colour gains {colour_gains} (each must be >= {COLOUR_MARGIN}), mean subject gain "
        f"{subject_gain:.3f} (must be >= {SUBJECT_MARGIN})")
