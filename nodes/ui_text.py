"""The text a node reports, where a user sees it: on the node in the browser, and in the prompt's history.

ComfyUI keeps `ui.PreviewText` in `/api/history`, but front end 1.35.9 draws it only on nodes with their
own front-end code (core Preview Any). What it does draw on any node is the progress-text channel
(`PromptServer.send_progress_text`, as core Get Image Size uses): a read-only text widget at the bottom of
the node, not saved with the workflow, replaced by the next text for that node and kept until the page
reloads (seen in headless Chromium, tests/integration/test_browser.py). So every PaRa node sends both.
A node ComfyUI serves from its cache does not run and sends nothing: the node keeps the text of the run
that computed it, and after a page reload shows it again once a run executes the node.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

from comfy_api.latest import io, ui

from ..para_core.format import MatchReport

log = logging.getLogger(__name__)

NODE_ID = io.Hidden.unique_id
"""Add `hidden=[ui_text.NODE_ID]` to a node's schema so `report` knows which node to write on."""


def report(cls, text: str) -> ui.PreviewText:
    """Show `text` on the node `cls` is executing for and return the history entry (`ui=` of NodeOutput)."""
    hidden = getattr(cls, "hidden", None)
    node_id = getattr(hidden, "unique_id", None) if hidden is not None else None
    if node_id is not None:
        try:
            from server import PromptServer
            srv = PromptServer.instance
            srv.send_progress_text(text, node_id, getattr(srv, "client_id", None))
        except Exception as e:  # no server (scripts, the in-process tests): the history entry still carries it
            log.debug("PaRa: no progress text for node %s: %s", node_id, e)
    return ui.PreviewText(text)


def describe(report: MatchReport, patched: Mapping[str, int], note: str = "", first: int = 3) -> str:
    """The text a loader node shows: what was patched, what was skipped."""
    parts = [", ".join(f"{side}: {n} layer{'' if n == 1 else 's'} patched" for side, n in patched.items())]
    if report.unmatched:
        parts.append(f"skipped {len(report.unmatched)} not in this model (first: {', '.join(report.unmatched[:first])})")
    if note:
        parts.append(note)
    return "; ".join(parts)
