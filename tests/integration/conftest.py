"""Integration tests against a real ComfyUI (in-process; see harness.py). Skipped, with the reason, when
ComfyUI is not found (env COMFYUI_PATH, else ~/ComfyUI) or does not import in this Python.

Run: COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests -q -ra
With COMFYUI_PARA_REQUIRE_HOST=1 (CI) a missing ComfyUI is an error and any skipped integration test fails.

Fixture API (stable; the trainer tests use it too)
--------------------------------------------------
``comfy`` (session) -> harness.ComfyHarness, one ComfyUI per session with this pack loaded:

* ``comfy.dirs``: temp folders, keys ``checkpoints``, ``diffusion_models``, ``para``, ``loras`` (model
  folders ComfyUI lists), ``output``, ``input``, ``temp``, ``user``.
* ``comfy.run(prompt, fresh_cache=False) -> dict``: run an API-format prompt through ComfyUI's validation
  and PromptExecutor; returns the history outputs ``{node_id: ui dict}`` (e.g. ``{"text": [...]}``).
  Raises AssertionError with ComfyUI's message on failure. Nodes whose inputs are unchanged since an
  earlier prompt come from ComfyUI's cache (a large LRU, so the checkpoint stays loaded for the whole session) and report no ui;
  ``fresh_cache=True`` executes every node again on a new executor (the session cache is kept).
* ``comfy.run_failing(prompt) -> str``: the prompt must fail; returns
  ``"<class_type> (node <id>): <ExceptionType>: <message>"`` or ``"validation failed: ..."``.
* ``comfy.output(node_id, index=0)``: Python value of an output of the last run (ModelPatcher, CLIP,
  PARA, LATENT dict, IMAGE tensor ...), read from ComfyUI's output cache.
* ``comfy.graph(prefix=None)``: ComfyUI's GraphBuilder: ``n = g.node("Class", **inputs)``,
  ``n.out(i)``, ``n.id``, ``g.finalize()`` -> prompt. Every prompt needs an output node; ``PreviewAny``
  (input ``source``) is a cheap sink for a MODEL/CLIP.
* ``comfy.patched_state_dict(model_or_clip, keys=None)``: weights as ComfyUI bakes them
  (``load_models_gpu(force_patch_weights=True)``, as CheckpointSave does), copied; then unloads all
  models (restoring base weights). ``comfy.base_state_dict(model_or_clip, keys=None)``: unpatched weights.
* Tiny models, built once per session with explicit random init, returning file names for the loaders:
  ``comfy.sd15_checkpoint()`` (CheckpointLoaderSimple: UNet 320ch/1 level, TAESD VAE, full CLIP-L),
  ``comfy.sd15_unet()`` (same UNet, UNETLoader, fp16 file), ``comfy.sd3_unet()`` (UNETLoader, MMDiT depth 2);
  ``comfy.flux_model()`` returns a ModelPatcher clone of a tiny Flux (fused qkv; no file, no detection).
* Files: ``comfy.write_para(name, {module: [B, ...]}, dtype=torch.float32, metadata=None, folder="para")``
  (para_core.ParaModel.from_bases(...).save), ``comfy.write_safetensors(folder, name, tensors, metadata=None)``,
  ``comfy.path(folder, name)``.
* ``comfy.workflow_to_prompt(ui_json_or_path, values={old: new}, overrides={class_type: {input: v}})``:
  UI-format workflow -> API prompt (widgets mapped in schema order, Note nodes dropped).
* ``comfy.nodes``: ComfyUI's ``nodes`` module (``comfy.nodes.NODE_CLASS_MAPPINGS[...]``).

Float64 references: tests/reference.py (``from reference import ...``; harness.py puts tests/ on sys.path and
re-exports ``orth64, project64, union64, ulp``): ``orth64(B)`` (Q with diag(R) > 0, the basis the PaRa format
defines), ``project64(W, [B1, B2, ...], strength=1.0)`` (the sequential chain W_k = W_{k-1} - s·Q_kQ_kᵀW_{k-1}),
``parallel64``, ``union64([B1, B2])``, ``ulp(x, dtype)`` (spacing of dtype at |x|), ``assert_rel_close``.
harness.py has ``bits_equal`` and ``REPO_ROOT``.

``sd15`` (session) -> dict with ``ckpt`` (file name), ``model``/``clip``/``vae`` Python objects from a
CheckpointLoaderSimple run (shared by tests; clone before patching by hand) and ``loader_id``; it also hands its
CLIP and VAE to the test-only loaders ParaTestTinyCheckpoint / ParaTestTinyCLIP.

Test-only input nodes (input_nodes.py, registered by the harness when ComfyUI starts): ``ParaTestLatents``,
``ParaTestConditioning``, ``ParaTestFamilyModel`` / ``Latents`` / ``Conditioning`` and the workflow loaders
``ParaTestTinyCheckpoint``, ``ParaTestTinyUNet``, ``ParaTestTinyCLIP``, ``ParaTestTinyVAE16``.
"""
from __future__ import annotations

import gc
import os
import sys
from collections.abc import Iterator

import pytest

# CI sets this: there, an integration test that cannot run (no ComfyUI, no browser) is a failure, never a skip.
REQUIRE_HOST = os.environ.get("COMFYUI_PARA_REQUIRE_HOST") == "1"

try:
    from harness import ComfyHarness, check_importable, find_comfyui
    _root, _reason = find_comfyui()
    if _root is not None:
        _reason = check_importable(_root)
except ImportError as e:  # e.g. no torch in this Python
    _root, _reason = None, f"cannot import the harness in this Python: {e}"

if _reason:
    _reason = f"integration tests need ComfyUI: {_reason}"
    if REQUIRE_HOST:
        raise pytest.UsageError(f"COMFYUI_PARA_REQUIRE_HOST=1 but {_reason}")

    class _SkippedModule(pytest.Module):
        """Reports each test file as one module-level skip with the reason (visible with -ra), without importing it."""

        def collect(self):
            pytest.skip(_reason, allow_module_level=True)

    def pytest_pycollect_makemodule(module_path, parent):
        return _SkippedModule.from_parent(parent, path=module_path)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory) -> ComfyHarness:
    return ComfyHarness(_root, str(tmp_path_factory.mktemp("comfy")))


@pytest.fixture(scope="session", autouse=True)
def _free_comfy_models_at_session_end() -> Iterator[None]:
    """Free ComfyUI's models while its modules still exist. A ModelPatcher left for interpreter exit runs its
    __del__ after the module globals it reads are gone (ComfyUI 0.8.0 then prints an ignored AttributeError per
    patcher), which would bury a real error at exit among noise."""
    yield
    mm = sys.modules.get("comfy.model_management")
    if mm is None:
        return
    # the caches of built models: the test modules' and benchmarks/study's `graphs` (test_study_quality imports it)
    for name in ("input_nodes", "families", "graphs"):
        getattr(sys.modules.get(name), "clear_built", lambda: None)()
    gc.collect()  # the `comfy` fixture's harness (its executors' caches) is gone by now
    getattr(mm, "unload_all_models", lambda: None)()
    gc.collect()


@pytest.fixture(scope="session")
def sd15(comfy) -> dict:
    ckpt = comfy.sd15_checkpoint()
    g = comfy.graph("sd15")
    loader = g.node("CheckpointLoaderSimple", ckpt_name=ckpt)
    g.node("PreviewAny", source=loader.out(0))
    comfy.run(g.finalize())
    import input_nodes
    input_nodes.SD15.update(clip=comfy.output(loader.id, 1), vae=comfy.output(loader.id, 2))  # for ParaTestTinyCLIP ...
    return {"ckpt": ckpt, "model": comfy.output(loader.id, 0), "clip": comfy.output(loader.id, 1),
            "vae": comfy.output(loader.id, 2), "loader_id": loader.id}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under COMFYUI_PARA_REQUIRE_HOST=1 a skipped integration test (no browser, ...) counts as failed."""
    outcome = yield
    rep = outcome.get_result()
    if REQUIRE_HOST and rep.skipped and not hasattr(rep, "wasxfail"):
        rep.outcome = "failed"
        rep.longrepr = f"COMFYUI_PARA_REQUIRE_HOST=1: this integration test did not run: {rep.longrepr}"


@pytest.hookimpl(tryfirst=True)
def pytest_collectreport(report):
    """The same for a whole integration file skipped at import (for example the browser test without Chromium)."""
    if REQUIRE_HOST and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"COMFYUI_PARA_REQUIRE_HOST=1: {report.nodeid} did not run: {report.longrepr}"
