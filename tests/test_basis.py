"""Deferred (no host synchronisation) basis checks against the strict path."""
import pytest
import torch

from para_core.basis import (orthonormal_bases, orthonormal_bases_deferred, orthonormal_basis, raise_if_degenerate,
                             rank_margins)
from para_core.errors import ParaRankError


def _bs(gen):
    return [torch.randn(24, 3, generator=gen), torch.randn(24, 3, generator=gen), torch.randn(40, 2, generator=gen)]


def test_deferred_bases_are_bit_identical_to_strict(gen):
    bs = _bs(gen)
    qs, margins = orthonormal_bases_deferred(bs)
    strict = orthonormal_bases(bs, ["a", "b", "c"])
    for q, s, b in zip(qs, strict, bs):
        assert torch.equal(q, s)
        assert torch.equal(q, orthonormal_basis(b))
    assert margins.shape == (3,) and bool((margins > 1).all())


def test_degenerate_b_gives_margin_below_one_and_a_named_error_later(gen):
    bs = _bs(gen)
    bs[1] = torch.cat([bs[1][:, :2], bs[1][:, :1] * 2.0], 1)  # third column = 2 x first: rank 2 of 3
    bs[2] = bs[2].clone()
    bs[2][5, 1] = float("nan")
    qs, margins = orthonormal_bases_deferred(bs)  # no error here
    m = margins.tolist()
    assert m[0] > 1 and m[1] <= 1 and m[2] == 0.0
    with pytest.raises(ParaRankError, match=r"^b: B of shape \(24, 3\) became rank deficient.*2 matrices"):
        raise_if_degenerate(margins, ["a", "b", "c"], [tuple(b.shape) for b in bs])
    with pytest.raises(ParaRankError, match="^b: B of shape"):
        orthonormal_bases(bs[:2], ["a", "b"])
    raise_if_degenerate(margins[:1], ["a"], [(24, 3)])  # a good one passes


def test_rank_margin_values():
    tol = 24 * torch.finfo(torch.float32).eps * 10.0
    d = torch.tensor([[2.0, 1.0, 0.5], [1.0, 0.0, 1.0], [float("inf"), 1.0, 1.0]])
    m = rank_margins(d, (24, 3), torch.float32)
    torch.testing.assert_close(m[0], torch.tensor(0.5 / (tol * 2.0)))
    assert m[1] == 0 and m[2] == 0
