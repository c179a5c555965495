"""Tests of the sd-scripts network module against sd-scripts itself (KOHYA_PATH: its source tree; this Python:
its requirements) and, for test_kohya_comfy.py, against ComfyUI too (COMFYUI_PATH, as tests/integration).

They live outside tests/integration so that a ComfyUI-only run (COMFYUI_PARA_REQUIRE_HOST=1, `.ci/run`) reports them
as skipped for want of sd-scripts instead of failing. `.ci/kohya` sets COMFYUI_PARA_REQUIRE_KOHYA=1: then any test
here that does not run is a failure.
"""
from __future__ import annotations

import os
import sys

import pytest

from kohya_env import HERE, REQUIRE


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """The integration suite's in-process ComfyUI (tests/integration/harness.py)."""
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integration"))
    try:
        from harness import ComfyHarness, check_importable, find_comfyui
    except ImportError as e:
        pytest.skip(f"needs ComfyUI: cannot import the harness: {e}")
    root, reason = find_comfyui()
    reason = reason or check_importable(root)
    if reason:
        pytest.skip(f"needs ComfyUI: {reason}")
    return ComfyHarness(root, str(tmp_path_factory.mktemp("comfy")))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under COMFYUI_PARA_REQUIRE_KOHYA=1 a skipped test here counts as failed, but for an opt-in one left out."""
    outcome = yield
    rep = outcome.get_result()
    opt_in = "opt-in:" in str(rep.longrepr)  # a test CI leaves out on purpose (test_kohya_sdxl.py)
    if REQUIRE and rep.skipped and str(item.fspath).startswith(HERE) and not opt_in:
        rep.outcome = "failed"
        rep.longrepr = f"COMFYUI_PARA_REQUIRE_KOHYA=1: this test did not run: {rep.longrepr}"
