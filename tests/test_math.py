"""para_core math against float64 references: basis, projection, merges, LoRA combination."""
import pytest
import torch
from reference import parallel64, project64, random_orth64

from para_core import (ParaError, ParaModel, ParaRankError, ParaShapeError, apply_stages_, combine_delta, merge,
                       orthonormal_basis, orthonormality_error, project_out, project_out_, projection_delta, subspace_overlap)


# ---- basis -----------------------------------------------------------------------------------
def test_basis_is_orthonormal_and_spans_b(gen):
    b = torch.randn(64, 5, generator=gen)
    q = orthonormal_basis(b)
    assert q.dtype == torch.float32 and q.shape == (64, 5)
    assert orthonormality_error(q) < 1e-5
    # span(Q) == span(B): projecting B onto Q reproduces B
    b64, q64 = b.double(), q.double()
    assert torch.allclose(q64 @ (q64.T @ b64), b64, atol=1e-5)


def test_basis_is_deterministic_and_sign_fixed(gen):
    b = torch.randn(40, 3, generator=gen)
    q1, q2 = orthonormal_basis(b), orthonormal_basis(b.clone())
    assert torch.equal(q1, q2)
    # diag(R) > 0 convention: Qᵀ B is upper triangular with a positive diagonal
    r = q1.T @ b
    assert (torch.diagonal(r) > 0).all()
    # flipping a column of B flips the same column of Q: signs follow B, not the QR library
    b2 = b.clone()
    b2[:, 1] *= -1
    assert torch.allclose(orthonormal_basis(b2)[:, 1], -q1[:, 1], atol=1e-6)


def test_basis_float64(gen):
    q = orthonormal_basis(torch.randn(30, 4, generator=gen), dtype=torch.float64)
    assert q.dtype == torch.float64 and orthonormality_error(q) < 1e-12


@pytest.mark.parametrize("bad, err", [
    (torch.zeros(8, 2), ParaRankError),
    (torch.cat([torch.ones(8, 1), torch.ones(8, 1)], 1), ParaRankError),
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0], [1.0, 2.0]]), ParaRankError),
    (torch.full((3, 1), float("inf")), ParaRankError),
    (torch.randn(3, 4), ParaShapeError),
    (torch.randn(3, 4, 1), ParaShapeError),
])
def test_basis_refuses_bad_input(bad, err):
    with pytest.raises(err):
        orthonormal_basis(bad)


def test_basis_under_autocast_stays_fp32(gen):
    b = torch.randn(32, 4, generator=gen, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = orthonormal_basis(b)
    assert q.dtype == torch.float32
    q.sum().backward()
    assert b.grad is not None and torch.isfinite(b.grad).all()


# ---- projection ------------------------------------------------------------------------------
def _full_rank(out, inp, g):
    return torch.randn(out, inp, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("r", [1, 4, 16])
def test_rank_drops_by_exactly_r(gen, r):
    w0 = _full_rank(48, 64, gen)  # rank 48
    q = random_orth64(48, r, gen)
    w = project_out(w0, q, compute_dtype=torch.float64)
    sv = torch.linalg.svdvals(w)
    tol = sv[0] * 1e-10
    assert int((sv > tol).sum()) == 48 - r
    assert int((torch.linalg.svdvals(w0) > tol).sum()) == 48
    # the removed directions are exactly span(Q): Qᵀ W = 0
    assert (q.T @ w).abs().max() < 1e-12


def test_matches_float64_reference_and_strength_is_linear(gen):
    w0 = torch.randn(32, 20, generator=gen)
    q = orthonormal_basis(torch.randn(32, 3, generator=gen))
    for s in (0.0, 0.5, 1.0, 1.7, -0.5):
        got = project_out(w0, q, s)
        assert torch.allclose(got.double(), project64(w0, [q], s), atol=2e-6), s
    d1 = projection_delta(w0, q, 1.0, compute_dtype=torch.float64)
    d05 = projection_delta(w0, q, 0.5, compute_dtype=torch.float64)
    assert torch.allclose(d05 * 2, d1, atol=1e-12)


def test_strength_zero_is_bit_exact_noop(gen):
    w0 = torch.randn(16, 8, generator=gen).half()
    w = w0.clone()
    project_out_(w, orthonormal_basis(torch.randn(16, 2, generator=gen)), 0.0)
    assert torch.equal(w, w0)


def test_idempotent_at_strength_one(gen):
    w0 = torch.randn(40, 30, generator=gen, dtype=torch.float64)
    q = random_orth64(40, 5, gen)
    once = project_out(w0, q, compute_dtype=torch.float64)
    twice = project_out(once, q, compute_dtype=torch.float64)
    assert torch.allclose(once, twice, atol=1e-13)


def test_conv_weight_is_flattened_over_all_but_output(gen):
    w0 = torch.randn(24, 8, 3, 3, generator=gen)
    q = orthonormal_basis(torch.randn(24, 4, generator=gen))
    got = project_out(w0, q)
    assert got.shape == w0.shape
    assert torch.allclose(got.double(), project64(w0, [q]), atol=2e-6)
    sv = torch.linalg.svdvals(got.double().reshape(24, -1))
    assert int((sv > sv[0] * 1e-5).sum()) == 20


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_storage_computed_in_fp32_and_cast_back(gen, dtype, atol):
    w0 = torch.randn(64, 32, generator=gen).to(dtype)
    q = orthonormal_basis(torch.randn(64, 4, generator=gen))
    ref = project64(w0, [q])
    w = w0.clone()
    out = project_out_(w, q)
    assert out is w and w.dtype == dtype
    # exactly the fp32 result rounded once to the storage dtype
    exact32 = w0.float() - q @ (q.T @ w0.float())
    assert torch.equal(w, exact32.to(dtype))
    assert (w.double() - ref).abs().max() < atol


def test_inplace_fp32_writes_the_same_memory(gen):
    w = torch.randn(20, 10, generator=gen)
    ptr = w.data_ptr()
    q = orthonormal_basis(torch.randn(20, 2, generator=gen))
    ref = project64(w, [q])
    project_out_(w, q)
    assert w.data_ptr() == ptr and torch.allclose(w.double(), ref, atol=2e-6)


def test_noncontiguous_weight(gen):
    base = torch.randn(10, 20, generator=gen)
    w = base.T  # 20 x 10, non-contiguous view
    q = orthonormal_basis(torch.randn(20, 3, generator=gen))
    ref = project64(w, [q])
    project_out_(w, q)
    assert torch.allclose(w.double(), ref, atol=2e-6)


def test_shape_mismatch_is_a_clear_error(gen):
    with pytest.raises(ParaShapeError, match=r"basis of shape \(10, 2\).*weight of shape \(12, 4\)"):
        project_out(torch.randn(12, 4), torch.randn(10, 2), what="layer x")


# ---- merges ----------------------------------------------------------------------------------
def _pm(bases):
    return ParaModel.from_bases({k: [q.float() for q in v] for k, v in bases.items()}, dtype=torch.float32)


def test_sequential_merge_is_the_paper_formula(gen):
    w0 = torch.randn(32, 16, generator=gen, dtype=torch.float64)
    a, b = _pm({"m": [random_orth64(32, 3, gen)]}), _pm({"m": [random_orth64(32, 2, gen)]})
    ref = project64(w0, [a.stages["m"][0], b.stages["m"][0]])  # W_m = W1 - Q2Q2ᵀW1, W1 = W0 - Q1Q1ᵀW0
    m = merge([a, b], "sequential", dtype=torch.float32)
    assert [q.shape[1] for q in m.stages["m"]] == [3, 2]
    got = apply_stages_(w0.clone(), m.stages["m"], compute_dtype=torch.float64)
    assert torch.allclose(got, ref, atol=1e-6)
    # order matters for overlapping subspaces
    other = apply_stages_(w0.clone(), merge([b, a], "sequential", dtype=torch.float32).stages["m"], compute_dtype=torch.float64)
    assert (other - got).abs().max() > 1e-3


def test_union_merge_is_projection_off_both_and_order_free(gen):
    w0 = torch.randn(32, 16, generator=gen, dtype=torch.float64)
    a, b = _pm({"m": [random_orth64(32, 3, gen)]}), _pm({"m": [random_orth64(32, 2, gen)]})
    cat = torch.cat([a.stages["m"][0], b.stages["m"][0]], 1).double()
    p = cat @ torch.linalg.pinv(cat)  # orthogonal projector onto span(Q1 ∪ Q2)
    ref = w0 - p @ w0
    u1, u2 = merge([a, b], "union", dtype=torch.float32), merge([b, a], "union", dtype=torch.float32)
    g1 = apply_stages_(w0.clone(), u1.stages["m"], compute_dtype=torch.float64)
    g2 = apply_stages_(w0.clone(), u2.stages["m"], compute_dtype=torch.float64)
    assert u1.stages["m"][0].shape[1] == 5
    assert torch.allclose(g1, ref, atol=1e-5) and torch.allclose(g2, ref, atol=1e-5)


def test_union_and_sequential_coincide_for_orthogonal_subspaces(gen):
    q = random_orth64(32, 5, gen)
    a, b = _pm({"m": [q[:, :3]]}), _pm({"m": [q[:, 3:]]})
    w0 = torch.randn(32, 8, generator=gen, dtype=torch.float64)
    s = apply_stages_(w0.clone(), merge([a, b], "sequential", dtype=torch.float32).stages["m"], compute_dtype=torch.float64)
    u = apply_stages_(w0.clone(), merge([a, b], "union", dtype=torch.float32).stages["m"], compute_dtype=torch.float64)
    assert torch.allclose(s, u, atol=1e-5)
    assert subspace_overlap(a, b).layers[0].max_cos < 1e-5


def test_union_counts_shared_directions_once(gen):
    q = random_orth64(32, 4, gen)
    a, b = _pm({"m": [q[:, :3]]}), _pm({"m": [q[:, 1:]]})  # share 2 directions
    assert merge([a, b], "union", dtype=torch.float32).stages["m"][0].shape[1] == 4


def test_merge_keeps_modules_present_in_one_model_only(gen):
    a = _pm({"x": [random_orth64(8, 1, gen)], "y": [random_orth64(8, 2, gen)]})
    b = _pm({"y": [random_orth64(8, 1, gen)], "z": [random_orth64(6, 1, gen)]})
    m = merge([a, b], "sequential", dtype=torch.float32)
    assert sorted(m.stages) == ["x", "y", "z"] and len(m.stages["y"]) == 2


def test_merge_refuses_different_base_models(gen):
    a, b = _pm({"m": [random_orth64(8, 1, gen)]}), _pm({"m": [random_orth64(10, 1, gen)]})
    with pytest.raises(ParaShapeError, match="different base models"):
        merge([a, b], "union")


def test_overlap_reports_principal_angles(gen):
    q = random_orth64(16, 3, gen)
    a = _pm({"m": [q]})
    same = subspace_overlap(a, a)
    assert abs(same.layers[0].mean_cos2 - 1) < 1e-5
    # a 45 degree rotation of one direction into an orthogonal one
    e = random_orth64(16, 4, gen)
    v = (e[:, 0] + e[:, 1]) / 2 ** 0.5
    cos = subspace_overlap(_pm({"m": [e[:, :1]]}), _pm({"m": [v[:, None]]})).layers[0].cosines
    assert abs(cos[0] - 2 ** -0.5) < 1e-5
    assert "shared layers" in same.summary()


# ---- PaRa + LoRA -----------------------------------------------------------------------------
def test_product_mode_is_the_seed_formula(gen):
    out, inp, r = 24, 12, 3
    w0 = torch.randn(out, inp, generator=gen, dtype=torch.float64)
    q = random_orth64(out, r, gen)
    b, a = torch.randn(out, r, generator=gen, dtype=torch.float64), torch.randn(r, inp, generator=gen, dtype=torch.float64)
    a1, a2 = 0.7, 1.3
    ref = (-a1 * q + a2 * b) @ (a1 * q.T @ w0 + a2 * a)
    got = combine_delta(q, w0, b, a, a1, a2, "product", compute_dtype=torch.float64)
    assert torch.allclose(got, ref, atol=1e-12)


def test_product_mode_refuses_unequal_ranks(gen):
    with pytest.raises(ParaError, match="equal ranks"):
        combine_delta(random_orth64(8, 2, gen), torch.randn(8, 4), torch.randn(8, 3), torch.randn(3, 4), mode="product")


def test_stacked_mode_is_block_form_and_para_then_lora(gen):
    out, inp = 24, 12
    w0 = torch.randn(out, inp, generator=gen, dtype=torch.float64)
    q = random_orth64(out, 2, gen)
    b, a = torch.randn(out, 5, generator=gen, dtype=torch.float64), torch.randn(5, inp, generator=gen, dtype=torch.float64)
    a1, a2 = 0.8, 1.1
    ref = -a1 ** 2 * q @ q.T @ w0 + a2 ** 2 * b @ a
    assert torch.allclose(combine_delta(q, w0, b, a, a1, a2, "stacked", compute_dtype=torch.float64), ref, atol=1e-12)
    # alphas = 1: exactly "PaRa first, then LoRA" ...
    para_then_lora = (w0 - q @ q.T @ w0) + b @ a
    assert torch.allclose(w0 + combine_delta(q, w0, b, a, compute_dtype=torch.float64), para_then_lora, atol=1e-12)
    # ... and not "LoRA first, then PaRa" (which also projects the LoRA update away)
    w_l = w0 + b @ a
    lora_then_para = w_l - q @ q.T @ w_l
    assert (para_then_lora - lora_then_para).abs().max() > 1e-2


def test_combine_conv_lora(gen):
    w0 = torch.randn(8, 4, 3, 3, generator=gen, dtype=torch.float64)
    q = random_orth64(8, 2, gen)
    up, down = torch.randn(8, 2, 1, 1, generator=gen, dtype=torch.float64), torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64)
    got = combine_delta(q, w0, up, down, mode="product", compute_dtype=torch.float64)
    ref = ((-q + up.flatten(1)) @ (q.T @ w0.flatten(1) + down.flatten(1))).reshape(w0.shape)
    assert torch.allclose(got, ref, atol=1e-12)


def test_batched_bases_equal_single_and_name_the_bad_key(gen):
    from para_core.basis import orthonormal_bases
    bs = [torch.randn(32, 4, generator=gen) for _ in range(5)] + [torch.randn(16, 2, generator=gen)]
    got = orthonormal_bases(bs, [f"k{i}" for i in range(6)])
    assert all(torch.equal(a, orthonormal_basis(b)) for a, b in zip(got, bs))
    bs[3] = torch.zeros(32, 4)
    with pytest.raises(ParaRankError, match="k3"):
        orthonormal_bases(bs, [f"k{i}" for i in range(6)])


def test_union_threshold_merges_only_near_identical_directions(gen):
    from para_core.basis import span_union
    e = random_orth64(16, 2, gen)
    for deg, rank in ((0.05, 1), (0.5, 1), (3.0, 2), (30.0, 2)):
        t = torch.tensor(deg * torch.pi / 180, dtype=torch.float64)
        v = torch.cos(t) * e[:, 0] + torch.sin(t) * e[:, 1]
        assert span_union([e[:, :1].float(), v[:, None].float()]).shape[1] == rank, deg


@pytest.mark.parametrize("with_lora", [True, False])
def test_chained_para_with_lora_and_alphas_against_float64(gen, with_lora):
    """A sequential merge (2 stages whose subspaces overlap) + a LoRA, α1 = 0.7, α2 = 1.3, conv weight:
    W2 = W1 - α1²·Q2Q2ᵀW1 with W1 = W0 - α1²·Q1Q1ᵀW0 (each stage acts on the running weight), plus α2²·BA.
    The same function serves the CLI's export-lora and the PaRa + LoRA node."""
    from para_core.lora import combine_factors
    out = 12
    w0 = torch.randn(out, 3, 2, 2, generator=gen, dtype=torch.float64)
    q1 = random_orth64(out, 4, gen)
    q2 = random_orth64(out, 3, gen)  # random: overlaps span(q1), so the order of the stages matters
    b, a = torch.randn(out, 2, 1, 1, generator=gen, dtype=torch.float64), torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64)
    a1, a2 = 0.7, 1.3
    w = w0.reshape(out, -1)
    w1 = project64(w, [q1], a1 ** 2)
    w2 = project64(w1, [q2], a1 ** 2)
    ref = w2 - w + (a2 ** 2 * b.flatten(1) @ a.flatten(1) if with_lora else 0)
    args = (b, a) if with_lora else (None, None)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        u, d = combine_factors([q1.to(dtype), q2.to(dtype)], w0.to(dtype), *(x.to(dtype) if x is not None else None for x in args),
                               a1, a2, "stacked", compute_dtype=dtype)
        assert u.shape == (out, 7 + (2 if with_lora else 0)) and d.shape == (u.shape[1], 12)
        assert float((u.double() @ d.double() - ref).abs().max()) < tol * float(ref.abs().max()), dtype
    # the factors are literally [-α1Q1 | -α1Q2 | α2B]·[α1Q1ᵀW0 ; α1Q2ᵀW1 ; α2A]
    u, d = combine_factors([q1, q2], w0, *args, a1, a2, "stacked", compute_dtype=torch.float64)
    assert torch.allclose(u[:, :4], -a1 * q1) and torch.allclose(d[4:7], a1 * q2.T @ w1)
    parallel = parallel64(w, [q1, q2], a1 ** 2)  # both stages from W0: wrong when they overlap
    assert float((parallel - w2).abs().max()) > 1e-3 * float(w.abs().max())


def test_combine_lora_only_and_product_needs_one_stage(gen):
    from para_core.lora import combine_factors
    b, a = torch.randn(8, 2, generator=gen), torch.randn(2, 5, generator=gen)
    for mode in ("stacked", "product"):  # a weight with a LoRA and no PaRa: α2²·BA, no weight needed
        u, d = combine_factors([], None, b, a, 0.5, 1.5, mode)
        assert torch.allclose(u @ d, 2.25 * b @ a, atol=1e-6)
    q = random_orth64(8, 2, gen).float()
    with pytest.raises(ParaError, match="mode 'product' needs a single PaRa basis.*2 stages"):
        combine_factors([q, q], torch.randn(8, 5), b, a, mode="product")
