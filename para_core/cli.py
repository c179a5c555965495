"""`para` — inspect, bake, export, merge and compare PaRa files without ComfyUI.

Every failure the user can cause (missing or corrupt file, a PaRa that does not fit, a full disk)
prints one line and exits 1; `--debug` shows the traceback. Outputs are written to a temp file
and renamed only when complete; SIGINT, SIGTERM and SIGHUP remove the temp file (exit 128 + signal).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import tempfile
import time

import torch

from . import __version__
from .checkpoint import bake, export_lora, match_checkpoint
from .errors import ParaError, one_line
from .format import STORAGE_DTYPES, ParaModel
from .merge import MERGE_MODES, merge, subspace_overlap
from .safetensors_io import check_output

log = logging.getLogger("para")


class _Progress:
    """A small stderr progress bar (no tqdm dependency); silent when stderr is not a terminal."""

    def __init__(self, label: str, enabled: bool):
        self.label, self.enabled, self.last = label, enabled, 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.1 and done < total):
            return
        self.last = now
        frac = done / total if total else 1.0
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {frac * 100:5.1f}%")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def cmd_inspect(a) -> int:
    para = ParaModel.load(a.file)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in para.tensors.values()})
    errs = para.orthonormality_errors()
    print(f"file:        {a.file}")
    print(f"layers:      {len(para.stages)}")
    print(f"rank:        {para.rank_summary()}")
    print(f"stages:      {para.max_stages()}")
    print(f"parameters:  {para.num_params():,}")
    print(f"size:        {_fmt_bytes(os.path.getsize(a.file))} on disk, {_fmt_bytes(para.num_bytes())} of tensors")
    print(f"dtype:       {', '.join(dtypes)}")
    print(f"orthonormality error (max |QᵀQ-I| of stored para_q): {max(errs.values()) if errs else float('nan'):.3e}")
    print("metadata:")
    for k in sorted(para.metadata):
        print(f"  {k}: {para.metadata[k]}")
    print("layers:")
    shown = para.modules if a.all else para.modules[:20]
    for m in shown:
        chain = para.stages[m]
        print(f"  {m}  out={chain[0].shape[0]} rank={'+'.join(str(q.shape[1]) for q in chain)}")
    if len(shown) < len(para.modules):
        print(f"  ... {len(para.modules) - len(shown)} more (--all lists every layer)")
    return 0


def _check_out(a) -> None:
    """Refuse a bad output path (a directory, an existing file without --force, a missing folder, a name
    too long) before reading anything."""
    check_output(a.output, a.force)


def cmd_bake(a) -> int:
    _check_out(a)
    paras = [ParaModel.load(p) for p in a.para]
    rep = bake(a.checkpoint, paras, a.output, strength=a.strength, force=a.force,
               progress=_Progress("bake", sys.stderr.isatty() and not a.quiet))
    log.info("baked %d PaRa file(s) into %s (%s)", len(paras), a.output, rep.summary())
    print(f"wrote {a.output}")
    return 0


def cmd_export_lora(a) -> int:
    _check_out(a)
    para = ParaModel.load(a.para)
    rep = export_lora(a.checkpoint, para, a.output, strength=a.strength, force=a.force,
                      progress=_Progress("export", sys.stderr.isatty() and not a.quiet))
    print(f"wrote {a.output} ({len(rep.matched)} layers)")
    return 0


def cmd_merge(a) -> int:
    _check_out(a)
    models = [ParaModel.load(p) for p in a.para]
    if len(models) < 2:
        raise ParaError("merge needs at least two PaRa files")
    merged = merge(models, a.mode, dtype=STORAGE_DTYPES[a.dtype])
    merged.save(a.output, force=a.force)
    print(f"wrote {a.output} ({a.mode}: {len(merged.stages)} layers, rank {merged.rank_summary()}, {merged.max_stages()} stage(s))")
    return 0


def cmd_overlap(a) -> int:
    rep = subspace_overlap(ParaModel.load(a.a), ParaModel.load(a.b))
    print(rep.summary())
    if a.layers:
        for layer in rep.layers:
            print(f"  {layer.module}  r={layer.rank_a}/{layer.rank_b}  max cos {layer.max_cos:.4f}  mean cos² {layer.mean_cos2:.4f}")
    return 0


def cmd_check(a) -> int:
    para = ParaModel.load(a.para)
    rep, _ = match_checkpoint(para, a.checkpoint)
    print(rep.summary())
    return 0 if rep.ok and not rep.unmatched else 1


def cmd_demo(a) -> int:
    """Build a small SD1.5-layout checkpoint and PaRa file, bake, export, and verify against float64."""
    from .demo import run_demo
    folder = a.dir or tempfile.mkdtemp(prefix="para-demo-")
    return run_demo(folder)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="para", description="PaRa (Parameter Rank Reduction) files: inspect, bake, export, merge.")
    p.add_argument("--version", action="version", version=f"comfyui-para {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="layers, ranks, size, dtype, metadata, orthonormality error")
    s.add_argument("file")
    s.add_argument("--all", action="store_true", help="list every layer")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("bake", help="write a checkpoint with PaRa models applied in order")
    s.add_argument("checkpoint")
    s.add_argument("para", nargs="+")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--strength", type=float, default=1.0)
    s.add_argument("--force", action="store_true", help="overwrite an existing output")
    s.set_defaults(func=cmd_bake)

    s = sub.add_parser("export-lora", help="write the PaRa edit of a checkpoint as an ordinary LoRA")
    s.add_argument("checkpoint")
    s.add_argument("para")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--strength", type=float, default=1.0)
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=cmd_export_lora)

    s = sub.add_parser("merge", help="merge PaRa models (multi-subject)")
    s.add_argument("para", nargs="+")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--mode", choices=MERGE_MODES, default="sequential")
    s.add_argument("--dtype", choices=sorted(STORAGE_DTYPES), default="fp16", help="storage dtype of the merged bases")
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("overlap", help="principal angles between two PaRa models' subspaces")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--layers", action="store_true", help="one line per shared layer")
    s.set_defaults(func=cmd_overlap)

    s = sub.add_parser("check", help="does a PaRa file fit a checkpoint?")
    s.add_argument("checkpoint")
    s.add_argument("para")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("demo", help="self-contained demo on a small generated SD1.5-layout checkpoint")
    s.add_argument("--dir", help="folder for the demo files (default: a new temp folder)")
    s.set_defaults(func=cmd_demo)
    return p


class _Terminated(BaseException):
    """SIGTERM / SIGHUP as an exception, so `finally` and atomic_output's cleanup run (like SIGINT's
    KeyboardInterrupt). A BaseException: no `except Exception` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_raise():
    """While the command runs, SIGTERM and SIGHUP raise _Terminated; the previous handlers come back after.

    After the first signal both are ignored until the cleanup is done. Only possible in the main thread
    (signal.signal's rule); elsewhere the handlers are left alone.
    """
    sigs = [getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]

    def handler(signum, _frame):
        for s in sigs:
            signal.signal(s, signal.SIG_IGN)
        raise _Terminated(signum)
    old = {}
    try:
        for s in sigs:
            old[s] = signal.signal(s, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _error_line(e: BaseException) -> str:
    if isinstance(e, ParaError):
        return str(e)
    return one_line(f"{getattr(e, 'filename', '') or ''}: {e.strerror or e}".lstrip(": "))


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with _signals_raise(), torch.no_grad():
            return a.func(a)
    except (ParaError, OSError) as e:
        if a.debug:
            raise
        print(f"para {a.command}: error: {_error_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"para {a.command}: interrupted, nothing written", file=sys.stderr)
        return 130
    except _Terminated as e:
        print(f"para {a.command}: terminated by {signal.Signals(e.signum).name}, nothing written", file=sys.stderr)
        return 128 + e.signum


if __name__ == "__main__":
    sys.exit(main())
