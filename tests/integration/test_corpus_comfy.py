"""The corpus of malformed and hostile files (tests/corpus.py) through Load PaRa in a real ComfyUI.

Each file must fail its prompt with one line that names the file (and the key where there is one),
nothing may hang (an alarm turns a hang into a failure), and ComfyUI must keep working: after the
whole corpus a normal prompt patches the model, and the documented fp8 cases load and patch.

Set PARA_CORPUS_OUTCOMES=<file.jsonl> to record every message (for the outcome table in the notes).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: corpus.py
import corpus  # noqa: E402

from reference import assert_rel_close, project64  # noqa: E402
from para_core.errors import one_line  # noqa: E402

LIN = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k"  # Linear 320 x 768
SUB = "corpus"
# ComfyUI lists only regular files it can stat (folder_paths.get_full_path checks os.path.isfile): these
# never reach the pack; the node says the file is not found, naming it, or validation refuses the name.
NOT_A_FILE = {"fifo.safetensors", "symlink_loop.safetensors", "symlink_dangling.safetensors", "devnull.safetensors",
              "directory.safetensors", "missing.safetensors"}


class _Hang(BaseException):
    pass


def _alarm(_sig, _frame):
    raise _Hang("Load PaRa did not finish in 30 s")


def _graph(comfy, ckpt, name):
    g = comfy.graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=ckpt)
    p = g.node("PaRaLoader", model=ck.out(0), para_name=name, strength_model=1.0, strength_clip=1.0)
    g.node("PreviewAny", source=p.out(0))
    return g.finalize(), p


def _run_guarded(fn, *args):
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, 30)
    try:
        return fn(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _record(case: str, msg: str) -> None:
    target = os.environ.get("PARA_CORPUS_OUTCOMES")
    if target:
        with open(target, "a", encoding="utf-8") as f:
            f.write(json.dumps({"source": "comfy", "case": case, "command": "Load PaRa", "rc": 1, "message": msg}) + "\n")


def test_corpus_through_load_para_and_comfy_keeps_serving(comfy, sd15):
    folder = os.path.join(comfy.dirs["para"], SUB)
    cases = corpus.build(folder, module=LIN, out=320)
    t0 = time.monotonic()
    failures = []
    for case in cases:
        if case.kind == "ok":
            continue
        name = f"{SUB}/{case.name}"
        prompt, node = _graph(comfy, sd15["ckpt"], name)
        msg = _run_guarded(comfy.run_failing, prompt)
        _record(case.name, msg)
        problems = []
        if "\n" in msg or "Traceback" in msg:
            problems.append("not one line")
        if one_line(case.name) not in msg:
            problems.append("does not name the file")
        if case.name in NOT_A_FILE:
            if not (f"PaRa file '{name}' not found" in msg or ("validation failed" in msg and name in msg)):
                problems.append("expected 'not found' or a validation error")
        else:
            if not msg.startswith(f"PaRaLoader (node {node.id}): ValueError: {one_line(comfy.path('para', name))}: "):
                problems.append("not a ValueError of Load PaRa naming the full path")
            if case.expect not in msg:
                problems.append(f"expected {case.expect!r}")
            if case.key is not None and one_line(case.key) not in msg:
                problems.append(f"does not name the key {case.key!r}")
        if problems:
            failures.append(f"{case.name!r}: {', '.join(problems)}: {msg}")
    elapsed = time.monotonic() - t0
    assert not failures, "\n".join(failures)
    assert not os.path.exists(os.path.join(folder, corpus.SENTINEL)), "a pickle was unpickled"
    # ComfyUI keeps serving: the documented fp8 cases and a normal file patch the model
    good = {LIN: [torch.randn(320, 3, generator=torch.Generator().manual_seed(5))]}
    comfy.write_para(f"{SUB}/after_corpus.safetensors", good)
    for name in ("after_corpus.safetensors", "ok_fp8_e4m3.safetensors", "ok_fp8_e5m2_b.safetensors"):
        prompt, node = _graph(comfy, sd15["ckpt"], f"{SUB}/{name}")
        ui = _run_guarded(comfy.run, prompt)
        assert ui[node.id]["text"] == ["model: 1 layer patched"], ui[node.id]
        _record(name, "runs: " + ui[node.id]["text"][0])
    got = comfy.patched_state_dict(comfy.output(node.id, 0), [LIN + ".weight"])[LIN + ".weight"]
    base = comfy.base_state_dict(sd15["model"], [LIN + ".weight"])[LIN + ".weight"]
    from para_core.format import ParaModel
    (q,) = ParaModel.load(comfy.path("para", f"{SUB}/ok_fp8_e5m2_b.safetensors")).stages[LIN]
    assert_rel_close(got, project64(base, [q.double()]), "fp8 e5m2 file after the corpus")
    print(f"corpus of {len(cases)} files through Load PaRa in {elapsed:.1f} s")


@pytest.fixture(autouse=True, scope="module")
def _clean_corpus_folder(comfy):
    yield
    folder = os.path.join(comfy.dirs["para"], SUB)
    if os.path.isdir(folder):
        for n in os.listdir(folder):
            p = os.path.join(folder, n)
            if os.path.isdir(p) and not os.path.islink(p):
                os.rmdir(p)
            else:
                os.remove(p)
