"""Instance-level `forward` replacement with an exact undo: the one mechanism the trainer uses to change how
a module runs (PaRa's projection, gradient checkpointing, the training-compat copies) without touching its
class, its parameters or anyone else's view of it."""
from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn


def wrap_forwards(modules: Iterable[nn.Module],
                  make_forward: Callable[[nn.Module, Callable], Callable]) -> Callable[[], None]:
    """Give each module the instance attribute ``forward = make_forward(module, current_forward)``.

    Returns the undo, which restores exactly what was there before, in reverse order: an instance
    ``forward`` the module already had is put back, otherwise the attribute is removed again (so the
    class's forward shows through, as if nothing had happened). If make_forward raises, the modules
    wrapped so far are restored before the error propagates.
    """
    undo: list[tuple[nn.Module, bool, object]] = []

    def restore() -> None:
        for m, had_own, previous in reversed(undo):
            if had_own:
                m.forward = previous
            else:
                m.__dict__.pop("forward", None)
        undo.clear()

    try:
        for m in modules:
            had_own = "forward" in m.__dict__
            previous = m.__dict__.get("forward")
            new = make_forward(m, m.forward)
            undo.append((m, had_own, previous))
            m.forward = new
    except BaseException:
        restore()
        raise
    return restore
