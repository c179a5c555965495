"""The shipped example workflows are readable as they open: no node (a Note included) covers another.

LiteGraph draws a node's title bar above its `pos` (NODE_TITLE_HEIGHT, 30 px in both front ends) and its
body from `pos` to `pos + size`; collapsed nodes are not used in the examples. The browser test checks the
same on the sizes the front end computes after loading (widgets can make a node taller than the JSON says).
"""
from __future__ import annotations

import glob
import json
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKFLOWS = sorted(glob.glob(os.path.join(HERE, "..", "example_workflows", "*.json")))
TITLE = 30  # LiteGraph.NODE_TITLE_HEIGHT
GAP = 0  # touching edges are fine; any shared area is an overlap


def rect(node: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a node on the canvas, title bar included."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE, x + w, y + h


def overlaps(nodes: list[dict]) -> list[str]:
    """Every pair of nodes whose rectangles share area, as 'id type <-> id type'."""
    out = []
    rects = [(n, rect(n)) for n in nodes]
    for i, (a, ra) in enumerate(rects):
        for b, rb in rects[i + 1:]:
            if min(ra[2], rb[2]) - max(ra[0], rb[0]) > GAP and min(ra[3], rb[3]) - max(ra[1], rb[1]) > GAP:
                out.append(f"{a['id']} {a['type']} {ra} <-> {b['id']} {b['type']} {rb}")
    return out


def test_there_are_workflows():
    assert len(WORKFLOWS) >= 9


@pytest.mark.parametrize("path", WORKFLOWS, ids=[os.path.basename(p) for p in WORKFLOWS])
def test_no_two_nodes_overlap(path):
    with open(path, encoding="utf-8") as f:
        nodes = json.load(f)["nodes"]
    assert not overlaps(nodes), f"{os.path.basename(path)}: overlapping nodes:\n" + "\n".join(overlaps(nodes))


def test_overlap_rule_counts_the_title_bar():
    """A node placed 20 px below another's bottom edge still overlaps it: its title bar is drawn 30 px higher."""
    a = {"id": 1, "type": "A", "pos": [0, 0], "size": [100, 100]}
    assert overlaps([a, {"id": 2, "type": "B", "pos": [0, 120], "size": [100, 50]}])
    assert not overlaps([a, {"id": 2, "type": "B", "pos": [0, 130], "size": [100, 50]}])
    assert not overlaps([a, {"id": 2, "type": "B", "pos": [100, 0], "size": [100, 50]}])
