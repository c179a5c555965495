"""Several processes, one result: PaRa trained through sd-scripts' accelerate path in 2 processes (CPU, gloo).

`ddp_driver.py` trains a tiny UNet + CLIP text encoder as sd-scripts' train_network.py does (see its docstring for
what is sd-scripts' own and what is simplified), once as 1 process with batch 2 and once under torchrun as 2
processes with batch 1 each (the same global batch, the same samples). Checked:

* both ranks hold bit-identical B and saw bit-identical gradients (sd-scripts' all_reduce_network synchronised them);
* without that all-reduce (``--no-sync``, a control) the ranks drift apart, so the first check can fail;
* 1 process x batch 2 and 2 processes x batch 1 agree: step-1 gradients to fp32 rounding of the gradient scale,
  B after 4 SGD steps to 1e-4 of how far B moved, losses to 1e-5.

The only change to the GPU path is accelerate's handling of frozen models on CPU (tests/kohya/cpu_ddp_shim.py:
a model without trainable parameters is not wrapped in DDP, as accelerate already does on GPUs).

Needs KOHYA_PATH (sd-scripts' source) and sd-scripts' requirements in this Python; skipped with the reason
otherwise; COMFYUI_PARA_REQUIRE_KOHYA=1 (CI, `.ci/kohya`) turns the skip into a failure.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kohya_env import HERE, KOHYA, REPO, needs_kohya

pytestmark = needs_kohya()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEVICE = os.environ.get("PARA_KOHYA_DEVICE", "cpu")  # gpu_check.sh: cuda (a GPU per process, or both on one)


def _drive(out: str, procs: int, batch: int, *extra: str) -> list[dict[str, torch.Tensor]]:
    from safetensors.torch import load_file
    driver = os.path.join(HERE, "ddp_driver.py")
    launch = [sys.executable, driver] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", str(_free_port()), driver]
    env = {**os.environ, "KOHYA_PATH": KOHYA, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    r = subprocess.run([*launch, out, "--batch", str(batch), "--device", DEVICE, *extra], env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"driver failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return [load_file(os.path.join(out, f"rank{i}.safetensors")) for i in range(procs)]


def _max_diff(a: dict, b: dict, prefix: str) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if k.startswith(prefix))


def _max_abs(a: dict, prefix: str) -> float:
    return max(float(a[k].double().abs().max()) for k in a if k.startswith(prefix))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    one = _drive(str(d / "one"), 1, 2)
    two = _drive(str(d / "two"), 2, 1)
    return one[0], two, str(d)


def test_ranks_hold_identical_bases(runs):
    _one, (r0, r1), _d = runs
    keys = [k for k in r0 if k.startswith(("b.", "grad."))]
    assert len(keys) == 2 * 69 and set(keys) == {k for k in r1 if k.startswith(("b.", "grad."))}
    assert all(torch.equal(r0[k], r1[k]) for k in keys), "ranks differ after the synchronised steps"
    assert _max_diff(r0, {k.replace("b0.", "b."): v for k, v in r0.items() if k.startswith("b0.")}, "b.") > 1e-2, \
        "B did not move: the test would prove nothing"


def test_without_the_all_reduce_ranks_drift(runs):
    _one, _two, d = runs
    r0, r1 = _drive(os.path.join(d, "nosync"), 2, 1, "--no-sync")
    assert _max_diff(r0, r1, "b.") > 1e-3, "ranks agree even without sd-scripts' gradient all-reduce"


def test_two_processes_batch_1_match_one_process_batch_2(runs):
    one, (r0, _r1), _d = runs
    g_scale = _max_abs(one, "grad.")
    g_err = _max_diff(one, r0, "grad.")
    moved = _max_diff(one, {k.replace("b0.", "b."): v for k, v in one.items() if k.startswith("b0.")}, "b.")
    b_err = _max_diff(one, r0, "b.")
    print(f"\n1 process x batch 2 vs 2 processes x batch 1: step-1 gradient max |diff| {g_err:.2e} "
          f"(scale {g_scale:.2e}); B after 4 steps max |diff| {b_err:.2e} (B moved {moved:.2e}); "
          f"losses {one['losses'].tolist()} vs {r0['losses'].tolist()}")
    assert g_err <= 1e-5 * g_scale
    assert b_err <= 1e-4 * moved
    assert torch.allclose(one["losses"], r0["losses"], rtol=1e-5, atol=0)


def test_rank0_wrote_a_para_file(runs):
    from para_core import ParaModel, orthonormality_error
    _one, (r0, _r1), d = runs
    para = ParaModel.load(os.path.join(d, "two", "para.safetensors"))
    assert len(para.stages) == 69 and para.metadata["ss_network_module"] == "para_core.kohya"
    q = para.stages["lora_te_text_model_encoder_layers_0_self_attn_q_proj"][0]
    b = r0["b.lora_te_text_model_encoder_layers_0_self_attn_q_proj"].double()
    q64 = torch.linalg.qr(b)[0]
    q64 = q64 * torch.sign(torch.diagonal(torch.linalg.qr(b)[1]))
    assert float((q.double() - q64).abs().max()) < 1e-6 and orthonormality_error(q) < 1e-6
