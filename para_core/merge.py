"""Combining two or more PaRa models (multi-subject).

* ``sequential`` — the paper's W_m = W1 - Q2Q2ᵀW1 with W1 = W0 - Q1Q1ᵀW0: an ordered chain. Stored as
  stages (``para_q``, ``para_q_1``, ...) and applied in order; the result depends on the order.
* ``union`` — one basis Q = orth([Q1 Q2]): W_m = W0 - QQᵀW0, the projection off both subspaces at
  once. Order does not matter; directions shared by both are removed once.

The two coincide when span(Q1) ⊥ span(Q2) (then (I-P2)(I-P1) = I-P1-P2 = I-P_union). When the
subspaces overlap, sequential removes less than union: the second projection acts on a weight
whose output already lost the first subspace, so W_seq = W0 - P1W0 - P2(I-P1)W0, whose column space
still contains components of span(Q2) rotated by (I-P1). `subspace_overlap` measures this.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .basis import principal_angle_cosines, span_union
from .errors import ParaError, ParaShapeError
from .format import ParaModel, max_rank

MERGE_MODES = ("sequential", "union")


def _check_base_models(models: list[ParaModel]) -> None:
    """Files whose metadata names different base models (the trainer writes ``base_model``) are refused: their
    layers may well have the same shapes (SD1.5 and SD2 UNets share most), but a merge fits neither model.
    Names are compared ignoring case and spaces; a file that names none (another tool's) merges with any."""
    first: tuple[str, ParaModel] | None = None
    for m in models:
        base = m.metadata.get("base_model")
        if not base:
            continue
        if first is None:
            first = (base, m)
        elif base.strip().lower() != first[0].strip().lower():
            raise ParaError(f"{first[1].source} was trained on base model '{first[0]}', {m.source} on '{base}': "
                            "a merge of PaRa files for different base models fits neither")


def _shared_metadata(models: list[ParaModel], mode: str) -> dict[str, str]:
    meta = {"merge_mode": mode, "merged_from": " + ".join(str(m.metadata.get("name", m.source)) for m in models)}
    bases = [m.metadata["base_model"] for m in models if m.metadata.get("base_model")]
    if bases:  # all the same (_check_base_models): the first file's spelling
        meta["base_model"] = bases[0]
    return meta


def _check_dims(models: list[ParaModel]) -> None:
    dims: dict[str, tuple[int, str]] = {}
    for m in models:
        for module, chain in m.stages.items():
            out = chain[0].shape[0]
            if module in dims and dims[module][0] != out:
                raise ParaShapeError(f"module '{module}': {dims[module][1]} has output dim {dims[module][0]}, "
                                     f"{m.source} has {out}: these PaRa models are for different base models")
            dims.setdefault(module, (out, m.source))


def _gather(models: list[ParaModel]) -> dict[str, list[torch.Tensor]]:
    """module -> every stage of models[0], then of models[1], ... (after checking the models agree on base model and dims)."""
    _check_base_models(models)
    _check_dims(models)
    chains: dict[str, list[torch.Tensor]] = {}
    for m in models:
        for module, chain in m.stages.items():
            chains.setdefault(module, []).extend(chain)
    return chains


def merge_sequential(models: list[ParaModel], dtype: torch.dtype = torch.float16) -> ParaModel:
    """Chain: every stage of models[0], then every stage of models[1], ... per module."""
    return ParaModel.from_bases(_gather(models), _shared_metadata(models, "sequential"), dtype=dtype)


def merge_union(models: list[ParaModel], dtype: torch.dtype = torch.float16) -> ParaModel:
    """One basis per module spanning every stage of every model (order-independent)."""
    gathered = _gather(models)
    union = {}
    for module, chain in gathered.items():
        q = span_union(chain)
        out = q.shape[0]
        if q.shape[1] > max_rank(out):
            raise ParaShapeError(f"module '{module}': the union of {' + '.join(m.source for m in models)} has rank {q.shape[1]} "
                                 f"for out={out}, which would remove every output direction; use mode 'sequential'")
        union[module] = [q]
    return ParaModel.from_bases(union, _shared_metadata(models, "union"), dtype=dtype)


def merge(models: list[ParaModel], mode: str = "sequential", dtype: torch.dtype = torch.float16) -> ParaModel:
    if mode == "sequential":
        return merge_sequential(models, dtype)
    if mode == "union":
        return merge_union(models, dtype)
    raise ValueError(f"unknown merge mode '{mode}' (expected one of {', '.join(MERGE_MODES)})")


@dataclass
class LayerOverlap:
    module: str
    rank_a: int
    rank_b: int
    cosines: list[float]  # principal angle cosines, descending

    @property
    def max_cos(self) -> float:
        return self.cosines[0] if self.cosines else 0.0

    @property
    def mean_cos2(self) -> float:
        """Mean squared cosine = ‖QaᵀQb‖²_F / min(ra, rb): 0 orthogonal, 1 one span contains the other."""
        return sum(c * c for c in self.cosines) / max(len(self.cosines), 1)


@dataclass
class OverlapReport:
    layers: list[LayerOverlap]
    only_a: int
    only_b: int

    def summary(self) -> str:
        if not self.layers:
            return f"no shared layers (only in A: {self.only_a}, only in B: {self.only_b})"
        mean = sum(layer.mean_cos2 for layer in self.layers) / len(self.layers)
        worst = max(self.layers, key=lambda layer: layer.max_cos)
        high = sum(1 for layer in self.layers if layer.max_cos > 0.9)
        return (f"{len(self.layers)} shared layers: mean cos² of principal angles {mean:.4f} "
                f"(0 = orthogonal, union and sequential agree; 1 = same subspace); "
                f"{high} layers with an angle under 25.8° (cos > 0.9); "
                f"largest cos {worst.max_cos:.4f} at {worst.module}; only in A: {self.only_a}, only in B: {self.only_b}")


def subspace_overlap(a: ParaModel, b: ParaModel) -> OverlapReport:
    """Principal angles per shared layer between the removed subspaces of a and b."""
    layers = []
    for module in sorted(set(a.stages) & set(b.stages)):
        qa, qb = span_union(a.stages[module]), span_union(b.stages[module])
        if qa.shape[0] != qb.shape[0]:
            raise ParaShapeError(f"module '{module}': output dims differ ({qa.shape[0]} vs {qb.shape[0]})")
        cos = principal_angle_cosines(qa, qb)
        layers.append(LayerOverlap(module, qa.shape[1], qb.shape[1], [float(c) for c in cos]))
    return OverlapReport(layers, len(set(a.stages) - set(b.stages)), len(set(b.stages) - set(a.stages)))
