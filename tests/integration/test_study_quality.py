"""Quality regression: a trained PaRa draws its subject (the smallest world of benchmarks/study, issue 16).

Every other test checks formulas against references; this one fails when learning breaks although every formula
still matches. The world (benchmarks/study/world.py, config CI): a small SD1.5-class UNet pretrained here on
shapes × colours × positions, a frozen one-layer CLIP, a CNN judge. Train PaRa (the PaRaTrainer node, ExCA, rank 2)
runs on 4 latents of a subject never seen in pretraining (an orange "ell", caption "a sks"); KSampler draws "a sks"
with the base model and with the PaRa, same noise; the judge counts subject samples.

MEASURED (filled in below from runs over seeds) decides MARGIN.
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
SAMPLES = 16
MARGIN = 0.3


@pytest.fixture(scope="module")
def world(comfy):
    import run_study as R
    from benchmarks.study import world as W
    threads = torch.get_num_threads()
    harness, judge, facts = R.setup(W.CI, harness=comfy)
    yield R, W, judge, facts
    torch.set_num_threads(threads)


def test_para_draws_its_subject(comfy, world):
    R, W, judge, facts = world
    assert min(facts["judge_accuracy"].values()) > 0.9, facts
    import graphs as G
    cfg = W.CI
    a = cfg.subjects[0]
    gains = []
    for seed in SEEDS:
        G.OBJECTS[f"ci_{seed}"] = G.to_latent(W.subject_images(cfg, a, 4, seed=100 + seed))
        g = comfy.graph()
        base = g.node("ParaStudyModel", key="base").out(0)
        clip = g.node("ParaStudyCLIP", key="clip").out(0)
        caption = g.node("CLIPTextEncode", clip=clip, text=W.prompt(a.token)).out(0)
        para = G.train_para(comfy, g, base, g.node("ParaStudyLatents", key=f"ci_{seed}").out(0), caption, steps=CI_STEPS, seed=seed)
        ids_base = G.add_samplers(g, base, clip, [W.prompt(a.token)], SAMPLES, seed, cfg.size)
        ids_para = G.add_samplers(g, para.out(0), clip, [W.prompt(a.token)], SAMPLES, seed, cfg.size)
        comfy.run(g.finalize())
        f_base = R.subject_fidelity(judge, G.read_samples(comfy, ids_base)[W.prompt(a.token)], a)
        f_para = R.subject_fidelity(judge, G.read_samples(comfy, ids_para)[W.prompt(a.token)], a)
        gains.append((seed, f_base, f_para))
    assert all(fp - fb >= MARGIN for _, fb, fp in gains), f"subject fidelity (seed, base, PaRa): {gains}; margin {MARGIN}"


CI_STEPS = 100
