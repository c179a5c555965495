"""Per-block strength: a short spec such as ``input:1, middle:0.5, output:0`` turned into a strength
multiplier per module name. Pure (no ComfyUI); the nodes multiply their strength by it.

Spec: entries ``key:value`` separated by commas or new lines; the value is a float. Entries apply in order,
the last one that matches a module wins, and modules no entry matches keep 1. A key is

* ``*`` - every module (a default for the rest, e.g. ``*:0, output:1``);
* a block name of the model's layout (below), optionally with an index: ``input.4`` is ``input_blocks.4``;
* anything else is a regular expression searched in the module name (``diffusion_model.`` prefix removed),
  e.g. ``attn1:0.5`` or ``output_blocks\\.[0-2]\\.:0``. The value is after the last ``:``.

Every key must match at least one module of the model: a misspelt block (``midle:0``) is an error that
names it and lists the layout's blocks, rather than a silent no-op.

Block vocabularies: each family's ``blocks`` in ``para_core/families.py`` (e.g. unet ``input`` / ``middle`` /
``output``, flux ``double`` / ``single``, wan ``blocks``), plus ``other`` (every module no named block
covers); ``generic`` has no named blocks: ``*`` and regular expressions only. The layout is the family key
the caller found from the model's classes, else the one found from the names (``targets.detect_layout``).

Cost: one regex search per (entry, module), at node time.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable

from .errors import ParaError
from .families import FAMILIES
from .targets import detect_layout, strip_prefix

# family key -> {block name: module-name prefix (after strip_prefix)}; `other` is every module no named block covers.
BLOCKS: dict[str, dict[str, str]] = {key: fam.blocks for key, fam in FAMILIES.items()}
_INDEXED = re.compile(r"^([a-z_]+)\.(\d+)$")


def parse(spec: str) -> list[tuple[str, float]]:
    """[(key, value)] in order. Raises ParaError with one line naming the bad entry."""
    out = []
    for raw in re.split(r"[,\n]", spec or ""):
        entry = raw.strip()
        if not entry:
            continue
        key, sep, value = entry.rpartition(":")
        key = key.strip()
        try:
            v = float(value) if sep and key else math.nan
        except ValueError:
            v = math.nan
        if not math.isfinite(v):
            raise ParaError(f"block_strength entry '{entry}' is not 'block:number' (e.g. 'input:1, middle:0.5, output:0')")
        out.append((key, v))
    return out


def block_of(name: str, layout: str) -> str:
    """The named block of a module ('input', 'double', ...) or 'other'."""
    n = strip_prefix(name)
    for block, prefix in BLOCKS[layout].items():
        if n.startswith(prefix):
            return block
    return "other"


def _matcher(key: str, layout: str):
    """A predicate on the stripped module name for one key."""
    blocks = BLOCKS[layout]
    if key == "*":
        return lambda n: True
    if key == "other" and blocks:
        return lambda n: not any(n.startswith(p) for p in blocks.values())
    if key in blocks:
        prefix = blocks[key]
        return lambda n: n.startswith(prefix)
    m = _INDEXED.match(key)
    if m and m.group(1) in blocks:
        prefix = f"{blocks[m.group(1)]}{m.group(2)}."
        return lambda n: n.startswith(prefix)
    try:
        rx = re.compile(key)
    except re.error as e:
        raise ParaError(f"block_strength key '{key}' is neither a block of this {layout} model "
                        f"({_vocabulary(layout)}) nor a valid regular expression: {e}") from None
    return lambda n: rx.search(n) is not None


def _vocabulary(layout: str) -> str:
    names = list(BLOCKS[layout])
    return "blocks " + ", ".join(names + ["other", "*"]) if names else "no named blocks: use '*' or a regular expression"


def resolve(spec: str, names: Iterable[str], layout: str | None = None) -> dict[str, float]:
    """{module name: multiplier} for every name of the model (1.0 where no entry matches).

    `names` are all the model's module names (ComfyUI-native, ``diffusion_model.`` prefix optional), not
    only the patched ones, so that a key is checked against what the model has. Raises ParaError naming
    every key that matches no module.
    """
    names = list(names)
    layout = layout or detect_layout(names)
    stripped = [strip_prefix(n) for n in names]
    out = dict.fromkeys(names, 1.0)
    unknown = []
    for key, value in parse(spec):
        hit = _matcher(key, layout)
        matched = False
        for n, s in zip(names, stripped):
            if hit(s):
                out[n] = value
                matched = True
        if not matched:
            unknown.append(key)
    if unknown:
        raise ParaError(f"block_strength: {', '.join(repr(k) for k in unknown)} match{'es' if len(unknown) == 1 else ''} "
                        f"no layer of this {layout} model ({_vocabulary(layout)}, or a regular expression on layer names)")
    return out


def describe(multipliers: dict[str, float], layout: str | None = None) -> str:
    """Short text of the non-default multipliers per block, e.g. 'middle ×0.5, output ×0'."""
    layout = layout or detect_layout(multipliers)
    per_block: dict[str, set[float]] = {}
    for n, v in multipliers.items():
        per_block.setdefault(block_of(n, layout), set()).add(v)
    parts = []
    for block, values in per_block.items():
        if values != {1.0}:
            parts.append(f"{block} ×{'/'.join(f'{v:g}' for v in sorted(values))}")
    return ", ".join(parts)
