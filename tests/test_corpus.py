"""Every malformed or hostile input of tests/corpus.py through every `para` command that reads it.

Each must give exit code 1 and exactly one line on stderr that names the file (and the key where there is
one), no traceback, no output file, no temp file, and must not hang. Most runs are in-process
(`cli.main`, guarded by an alarm so a hang fails); a representative subset, and everything that could
block (FIFO, device), runs as `python -m para_core` in a subprocess with a timeout.
Output-side failures (unwritable path, name too long, a directory, SIGTERM/SIGHUP mid-bake) and the
umask of outputs are checked here too.

Set PARA_CORPUS_OUTCOMES=<file.jsonl> to record every message (for the outcome table in the notes).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import stat
import subprocess
import sys

import pytest
import torch

import corpus
from para_core import ParaModel, safetensors_io
from para_core.checkpoint import module_map
from para_core.cli import main
from para_core.errors import one_line
from para_core.synthetic import random_para, sd15_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 60
# the representative subset run as real processes: `inspect` for each, and `bake` with the FIFO as checkpoint
SUBPROCESS = {"fifo.safetensors", "devnull.safetensors", "pickle_runs_code.safetensors", "odd\nnewline.safetensors",
              "header_duplicate_key.safetensors", "rank_equal_out.safetensors"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    ckpt = str(d / "ckpt.safetensors")
    safetensors_io.save_file(sd15_checkpoint(ch=16, ctx=24), ckpt)
    _, infos = safetensors_io.read_header(ckpt)
    mods = {m: s.out_dim for m, s in module_map(infos).items() if ".attn1." in m}
    good = str(d / "good.safetensors")
    random_para(mods, 2).save(good)
    cases = corpus.build(str(d / "files"))
    out_dir = d / "out"
    out_dir.mkdir()
    return {"dir": d, "ckpt": ckpt, "good": good, "cases": {c.name: c for c in cases}, "files": str(d / "files"),
            "out_dir": str(out_dir), "out": str(out_dir / "o.safetensors")}


def _record(source: str, case: str, command: str, rc: int, line: str) -> None:
    target = os.environ.get("PARA_CORPUS_OUTCOMES")
    if target:
        with open(target, "a", encoding="utf-8") as f:
            f.write(json.dumps({"source": source, "case": case, "command": command, "rc": rc, "message": line}) + "\n")


class _Hang(Exception):
    pass


def _alarm(_sig, _frame):
    raise _Hang("the command did not finish in time")


def run_inprocess(args: list[str]) -> tuple[int, str, str]:
    """cli.main in this process; an interval timer turns a hang into a test failure."""
    out, err = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, TIMEOUT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return rc, out.getvalue(), err.getvalue()


def run_subprocess(args: list[str], **kw) -> tuple[int, str, str]:
    try:
        r = subprocess.run([sys.executable, "-m", "para_core", *args], capture_output=True, text=True, cwd=ROOT,
                           timeout=TIMEOUT, **kw)
    except subprocess.TimeoutExpired:
        pytest.fail(f"para {' '.join(args)} hung for {TIMEOUT} s")
    return r.returncode, r.stdout, r.stderr


def _commands(world, path: str, kind: str) -> list[list[str]]:
    ck, good, out = world["ckpt"], world["good"], world["out"]
    cmds = [["inspect", path], ["check", ck, path], ["bake", ck, path, "-o", out], ["merge", path, good, "-o", out],
            ["merge", good, path, "-o", out, "--mode", "union"], ["export-lora", ck, path, "-o", out], ["overlap", good, path]]
    if kind == "header":  # broken as a file: as a checkpoint too
        cmds += [["bake", path, good, "-o", out], ["check", path, good], ["export-lora", path, good, "-o", out]]
    return cmds


def assert_one_line_error(case, args, rc, stdout, stderr, path, out_dir):
    shown = one_line(path)
    what = f"para {' '.join(args)}"
    assert rc == 1, f"{what}: exit {rc}\n{stderr}"
    lines = stderr.splitlines()
    assert len(lines) == 1, f"{what}: expected one line on stderr, got {len(lines)}:\n{stderr}"
    line = lines[0]
    assert line.startswith(f"para {args[0]}: error: "), line
    assert "Traceback" not in stderr and not stdout.strip(), (stdout, stderr)
    assert shown in line, f"{what}: the message does not name the file: {line}"
    assert case.expect in line, f"{what}: expected {case.expect!r} in: {line}"
    if case.key is not None:
        assert one_line(case.key) in line, f"{what}: the message does not name the key {case.key!r}: {line}"
    assert os.listdir(out_dir) == [], f"{what}: left {os.listdir(out_dir)}"
    return line


def _cases():
    import tempfile
    with tempfile.TemporaryDirectory() as d:  # the names and kinds only; the files are built in the fixture
        return [c for c in corpus.build(d)]


CASES = _cases()


@pytest.mark.parametrize("case", [c for c in CASES if c.kind != "ok"], ids=lambda c: one_line(c.name))
def test_corpus_case_fails_with_one_line(world, case):
    case = world["cases"][case.name]
    path = case.path(world["files"])
    run = run_subprocess if case.name in SUBPROCESS else run_inprocess
    for args in _commands(world, path, case.kind):
        if run is run_subprocess and args[0] != "inspect" and not (case.name == "fifo.safetensors" and args[1] == path):
            continue
        rc, out, err = run(args)
        line = assert_one_line_error(case, args, rc, out, err, path, world["out_dir"])
        _record("cli" if run is run_inprocess else "cli (subprocess)", case.name, args[0], rc, line)
    assert not os.path.exists(os.path.join(world["files"], corpus.SENTINEL)), "a pickle was unpickled"
    assert not [f for f in os.listdir(world["files"]) if f.endswith(".partial")]


@pytest.mark.parametrize("case", [c for c in CASES if c.kind == "ok"], ids=lambda c: c.name)
def test_documented_behaviours_load(world, case):
    """fp8 bases (F8_E4M3 para_q, F8_E5M2 para_b) are upcast to float32 and orthonormalised."""
    path = world["cases"][case.name].path(world["files"])
    rc, out, err = run_inprocess(["inspect", path])
    assert rc == 0 and err == "", err
    assert "rank:        2" in out and "float8" in out, out
    para = ParaModel.load(path)
    (q,) = para.stages["diffusion_model.m"]
    assert q.dtype == torch.float32 and float((q.T @ q - torch.eye(2)).abs().max()) < 1e-6
    stored = next(iter(para.tensors.values())).to(torch.float64)
    assert float((q.double() @ (q.double().T @ stored) - stored).abs().max()) < 1e-6  # span(Q) = span(stored B)
    _record("cli", case.name, "inspect", rc, "loads: " + " ".join(out.split("\n")[2].split()))


def test_out_equal_one_allows_rank_one(tmp_path):
    """r = out is refused for out >= 2 (see format.max_rank); a 1-row weight can only take r = 1."""
    p = tmp_path / "one.safetensors"
    ParaModel({"diffusion_model.x.para_q": torch.ones(1, 1)}).save(str(p))
    assert ParaModel.load(str(p)).ranks() == {"diffusion_model.x": [1]}


# ---- outputs ----------------------------------------------------------------------------------------
def _output_cases(world, tmp):
    long_name = os.path.join(tmp, "x" * 290 + ".safetensors")
    a_file = os.path.join(tmp, "a_file")
    with open(a_file, "w") as f:
        f.write("x")
    existing = os.path.join(tmp, "existing.safetensors")
    with open(existing, "wb") as f:
        f.write(b"keep")
    os.makedirs(os.path.join(tmp, "is_dir.safetensors"), exist_ok=True)
    fifo = os.path.join(tmp, "fifo_out.safetensors")
    if not os.path.exists(fifo):
        os.mkfifo(fifo)
    return [  # (output path, extra args, expected text)
        ("/proc/x.safetensors", [], "cannot write"),
        ("/proc/self/x.safetensors", [], "cannot write"),
        (long_name, [], "cannot write: file name is 302 bytes"),
        (os.path.join(tmp, "is_dir.safetensors"), [], "is a directory"),
        (os.path.join(tmp, "is_dir.safetensors"), ["--force"], "is a directory"),
        (os.path.join(tmp, "no_such_folder", "o.safetensors"), [], "does not exist"),
        (os.path.join(a_file, "o.safetensors"), [], "is not a folder"),
        (existing, [], "already exists (use --force to overwrite)"),
        (fifo, ["--force"], "exists and is not a regular file"),
    ]


@pytest.mark.parametrize("command", ["bake", "merge", "export-lora"])
def test_output_errors_name_the_output_not_the_input(world, tmp_path, command):
    ck, good = world["ckpt"], world["good"]
    before = sorted(os.listdir(tmp_path))
    for out, extra, expect in _output_cases(world, str(tmp_path)):
        before = sorted(os.listdir(tmp_path))
        args = {"bake": ["bake", ck, good], "merge": ["merge", good, good], "export-lora": ["export-lora", ck, good]}[command]
        args = args + ["-o", out, *extra]
        run = run_subprocess if (command, out) == ("bake", "/proc/x.safetensors") else run_inprocess
        rc, stdout, err = run(args)
        assert rc == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, (args, err)
        line = err.strip()
        assert line.startswith(f"para {command}: error: {out}: ") and expect in line, line
        assert ck not in line.split(": error: ", 1)[1].replace(out, ""), f"blames the input: {line}"
        assert sorted(os.listdir(tmp_path)) == before, f"left files: {set(os.listdir(tmp_path)) - set(before)}"
        label = out if out.startswith("/proc") else os.path.relpath(out, tmp_path)
        label = label if len(label) < 60 else f"{label[:20]}...({len(label)} chars)"
        _record("cli", f"output {label}{' ' + ' '.join(extra) if extra else ''}", command, rc, line)
    with open(tmp_path / "existing.safetensors", "rb") as f:
        assert f.read() == b"keep"


def test_long_output_name_that_fits_is_written(world, tmp_path):
    """A 240-character name is legal; the temp file's name is shortened so it fits too."""
    out = tmp_path / ("y" * 228 + ".safetensors")
    rc, _, err = run_inprocess(["merge", world["good"], world["good"], "-o", str(out)])
    assert rc == 0, err
    assert os.listdir(tmp_path) == [out.name]


_KILLER = r"""
import glob, os, signal, sys
# Ctrl-C as in a terminal: a job started in the background by a non-interactive shell (as CI may start this
# suite) inherits SIGINT ignored, and then Python installs no KeyboardInterrupt handler
signal.signal(signal.SIGINT, signal.default_int_handler)
import para_core.checkpoint as ck
from para_core.cli import main
orig, calls = ck._apply_edits, [0]
def edit(*a, **k):
    calls[0] += 1
    if calls[0] == 3:
        partial = glob.glob(os.path.join(os.path.dirname(sys.argv[-1]), ".*.partial"))
        print("partial while baking:", len(partial), flush=True)
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    return orig(*a, **k)
ck._apply_edits = edit
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_signal_during_bake_leaves_nothing(world, tmp_path, sig):
    out = tmp_path / "baked.safetensors"
    r = subprocess.run([sys.executable, "-c", _KILLER, sig, "-q", "bake", world["ckpt"], world["good"], "-o", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT)
    assert "partial while baking: 1" in r.stdout, r.stdout + r.stderr  # the signal came while the temp file existed
    assert r.returncode == 128 + getattr(signal, sig), r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert "nothing written" in r.stderr
    assert os.listdir(tmp_path) == []
    _record("cli (subprocess)", f"{sig} during bake", "bake", r.returncode, r.stderr.strip())


def test_cli_restores_signal_handlers(world, tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    assert run_inprocess(["merge", world["good"], world["good"], "-o", str(tmp_path / "m.safetensors")])[0] == 0
    assert {s: signal.getsignal(s) for s in before} == before


@contextlib.contextmanager
def _umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002, 0o077])
def test_outputs_respect_the_umask(world, tmp_path, mask):
    ck, good = world["ckpt"], world["good"]
    outs = {c: tmp_path / f"{c}.safetensors" for c in ("bake", "merge", "export-lora", "save")}
    with _umask(mask):
        assert run_inprocess(["-q", "bake", ck, good, "-o", str(outs["bake"])])[0] == 0
        assert run_inprocess(["merge", good, good, "-o", str(outs["merge"])])[0] == 0
        assert run_inprocess(["-q", "export-lora", ck, good, "-o", str(outs["export-lora"])])[0] == 0
        ParaModel.load(good).save(str(outs["save"]))
    for c, p in outs.items():
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~mask, (c, oct(os.stat(p).st_mode))


def test_force_over_an_existing_file_gets_the_umask_mode(world, tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old")
    os.chmod(out, 0o600)
    with _umask(0o022):
        assert run_inprocess(["merge", world["good"], world["good"], "-o", str(out), "--force"])[0] == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644
    assert ParaModel.load(str(out)).max_stages() == 2
