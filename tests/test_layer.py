"""The trainable PaRa layer: gradients, fp32 QR under autocast, output space == weight space, init."""
import pytest
import torch
import torch.utils.checkpoint
from reference import orth64, project64, random_orth64
from torch import nn

import para_core.layer as layer_mod
from para_core.basis import principal_angle_cosines
from para_core.errors import ParaRankError
from para_core.layer import (ParaLayer, ParaNetwork, cheaper_mode, init_basis, project_output, project_weight,
                             smallest_left_singular)

D = torch.float64


def _linear(g, out=24, inp=20, dtype=D):
    m = nn.Linear(inp, out).to(dtype)
    with torch.no_grad():
        m.weight.copy_(torch.randn(out, inp, generator=g, dtype=dtype))
        m.bias.copy_(torch.randn(out, generator=g, dtype=dtype))
    return m


def _conv(g, out=12, inp=5, dtype=D):
    m = nn.Conv2d(inp, out, 3, stride=2, padding=1).to(dtype)
    with torch.no_grad():
        m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=dtype))
        m.bias.copy_(torch.randn(out, generator=g, dtype=dtype))
    return m


def _net(module, rank, g, mode):
    b = torch.randn(module.weight.shape[0], rank, generator=g)
    net = ParaNetwork({"m": ParaLayer(b)}, mode=mode)
    net.double()  # float64 end to end for the exactness checks
    return net


@pytest.mark.parametrize("make,x_shape", [(_linear, (3, 7, 20)), (_conv, (2, 5, 9, 9))])
def test_output_space_equals_weight_space_float64(make, x_shape, gen):
    module = make(gen)
    x = torch.randn(x_shape, generator=gen, dtype=D)
    results, grads = {}, {}
    for mode in ("output", "weight"):
        g = torch.Generator().manual_seed(7)
        net = _net(module, 3, g, mode)
        undo = net.attach({"m": module})
        try:
            y = module(x)
            (y * torch.linspace(-1, 1, y.numel(), dtype=D).reshape(y.shape)).sum().backward()
        finally:
            undo()
        assert net.mode_counts[mode] == 1
        results[mode] = y.detach()
        grads[mode] = net.layer("m").b.grad.clone()
    # reference: the same layer with W - QQᵀW, QQᵀ built explicitly in float64
    q = net.layer("m").basis().detach().to(D)
    ref = module.__class__.forward(_swap(module, project64(module.weight.detach(), [q])), x)
    torch.testing.assert_close(results["output"], ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(results["weight"], ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(grads["output"], grads["weight"], rtol=1e-9, atol=1e-12)


def _swap(module, w):
    clone = module.__class__.__new__(module.__class__)
    clone.__dict__ = dict(module.__dict__)
    clone._parameters = dict(module._parameters, weight=nn.Parameter(w))
    return clone


@pytest.mark.parametrize("mode", ["output", "weight"])
def test_gradients_reach_b_and_only_b(mode, gen):
    module = _linear(gen, dtype=torch.float32)
    module.requires_grad_(False)
    net = ParaNetwork({"m": ParaLayer(torch.randn(24, 4, generator=gen))}, mode=mode)
    undo = net.attach({"m": module})
    x = torch.randn(5, 20, generator=gen)
    with net.step():
        loss = module(x).square().mean()
    loss.backward()
    undo()
    g = net.layer("m").b.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().max() > 1e-6
    assert module.weight.grad is None and module.bias.grad is None


def test_qr_runs_in_fp32_under_bf16_autocast(gen):
    b = torch.randn(64, 6, generator=gen)
    layer = ParaLayer(b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = layer.basis()
        y = project_output(torch.randn(3, 64, generator=gen).to(torch.bfloat16), q)
    assert q.dtype == torch.float32
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(q.to(D), orth64(b), rtol=0, atol=1e-5)  # fp32 accuracy, not bf16 (~1e-2)
    eye = torch.eye(6, dtype=D)
    assert (q.to(D).T @ q.to(D) - eye).abs().max() < 1e-5


def test_trained_module_under_autocast_keeps_b_fp32(gen):
    module = _linear(gen, dtype=torch.float32).requires_grad_(False)
    net = ParaNetwork({"m": ParaLayer(torch.randn(24, 2, generator=gen))}, mode="output")
    undo = net.attach({"m": module})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with net.step() as qs:
            assert qs["m"].dtype == torch.float32
            y = module(torch.randn(4, 20, generator=gen))
        assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    undo()
    assert net.layer("m").b.dtype == torch.float32 and net.layer("m").b.grad.dtype == torch.float32


def test_detach_restores_forward_bit_exactly(gen):
    module = _conv(gen, dtype=torch.float32)
    x = torch.randn(1, 5, 8, 8, generator=gen)
    before = module(x)
    net = ParaNetwork({"m": ParaLayer(torch.randn(12, 2, generator=gen))})
    undo = net.attach({"m": module})
    assert not torch.equal(module(x), before)
    undo()
    assert "forward" not in module.__dict__
    assert torch.equal(module(x), before)


def test_other_modules_use_weight_space_with_their_own_forward(gen):
    emb = nn.Embedding(10, 6)
    ids = torch.tensor([[1, 2, 9]])
    net = ParaNetwork({"e": ParaLayer(torch.randn(10, 2, generator=gen))}, mode="output")
    undo = net.attach({"e": emb})
    y = emb(ids)
    undo()
    q = net.layer("e").basis().detach()
    ref = torch.nn.functional.embedding(ids, project64(emb.weight.detach(), [q]).float())
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)
    assert isinstance(emb._parameters["weight"], nn.Parameter) and net.mode_counts["weight"] == 1


def test_attach_rejects_missing_and_mismatched_modules(gen):
    net = ParaNetwork({"a": ParaLayer(torch.randn(8, 2, generator=gen))})
    with pytest.raises(KeyError):
        net.attach({})
    with pytest.raises(Exception, match="rows"):
        net.attach({"a": nn.Linear(4, 9)})


def test_cheaper_mode_rule():
    # K >= 6r: output space wins at any token count
    for n in (1, 64, 4096, 10 ** 6):
        assert cheaper_mode(8, 320, n) == "output"
        assert cheaper_mode(8, 48, n) == "output"
    # K < 6r: weight space only past N* = 6rK / (6r - K)
    r, k = 64, 320
    n_star = 6 * r * k / (6 * r - k)
    assert cheaper_mode(r, k, int(n_star) - 1) == "output"
    assert cheaper_mode(r, k, int(n_star) + 2) == "weight"


def test_step_computes_each_basis_once(gen, monkeypatch):
    module = _linear(gen, dtype=torch.float32)
    net = ParaNetwork({"m": ParaLayer(torch.randn(24, 2, generator=gen))}, mode="output")
    calls = []
    import para_core.layer as layer_mod
    orig = layer_mod.orthonormal_bases  # one batched QR for all layers per step
    monkeypatch.setattr(layer_mod, "orthonormal_bases", lambda *a, **k: calls.append(1) or orig(*a, **k))
    monkeypatch.setattr(ParaLayer, "basis", lambda self: calls.append(2) or orig([self.b], ["b"])[0])
    undo = net.attach({"m": module})
    with net.step():
        for _ in range(3):
            module(torch.randn(2, 20, generator=gen))
    undo()
    assert calls == [1]


# ---- initialisation ------------------------------------------------------------------------------
def _sv(w):
    return torch.linalg.svdvals(w.to(D).reshape(w.shape[0], -1))


@pytest.mark.parametrize("shape", [(32, 48), (16, 8, 3, 3)])
def test_small_sv_init_removes_the_smallest_singular_directions(shape, gen):
    w = torch.randn(shape, generator=gen)
    r = 3
    b = init_basis(w, r, "small_sv", gen)
    assert b.shape == (shape[0], r) and b.dtype == torch.float32
    torch.testing.assert_close(b.norm(dim=0), torch.ones(r), rtol=0, atol=1e-5)
    change = (project_weight(w.to(D), b.to(D)) - w.to(D)).norm()
    s = _sv(w)
    torch.testing.assert_close(change, s[-r:].square().sum().sqrt(), rtol=1e-5, atol=1e-6)  # minimal possible
    top = init_basis(w, r, "top_sv", gen)
    torch.testing.assert_close((project_weight(w.to(D), top.to(D)) - w.to(D)).norm(),
                               s[:r].square().sum().sqrt(), rtol=1e-5, atol=1e-6)  # maximal possible
    rnd = init_basis(w, r, "random", gen)
    rnd_change = (project_weight(w.to(D), orth64(rnd)) - w.to(D)).norm()
    assert change < rnd_change


def test_small_sv_init_uses_the_null_space_of_wide_output_layers(gen):
    w = torch.randn(40, 8, generator=gen)  # out > in: 32-dim left null space
    b = init_basis(w, 5, "small_sv", gen)
    assert (b.to(D).T @ w.to(D)).abs().max() < 1e-5           # QᵀW = 0: no change at step 0
    torch.testing.assert_close(b.T @ b, torch.eye(5), rtol=0, atol=1e-5)
    # more directions requested than the null space has: the rest are the smallest nonzero ones
    b = init_basis(torch.randn(10, 8, generator=gen), 4, "small_sv", gen)
    assert torch.linalg.matrix_rank(b) == 4


def _with_spectrum(out, k, s, gen):
    """W = U diag(s) Vᵀ (out x k) with the given singular values, random orthonormal U, V (float64)."""
    u, v = random_orth64(out, len(s), gen), random_orth64(k, len(s), gen)
    return u @ torch.diag(torch.as_tensor(s, dtype=D)) @ v.T


@pytest.mark.parametrize("out,k,r", [(64, 200, 4), (24, 72, 3), (96, 96, 8), (200, 400, 2)])
def test_small_sv_matches_the_float64_svd_subspace(out, k, r, gen):
    """Separated spectrum (geometric, 30 % apart): the iteration converges to the SVD's r smallest directions."""
    # log-spaced spectrum 10 .. 0.5 (well above the fp32 Gram's rounding level, ~1e-3·σ_max): the r smallest
    # directions are each within 1.5 % of the next, so what is sharply defined is the energy removed
    s = 10.0 * 0.05 ** torch.linspace(0, 1, out, dtype=D)
    w = _with_spectrum(out, k, s, gen)
    b = init_basis(w.to(torch.float32), r, "small_sv", gen)
    change = (b.to(D).T @ w).norm()
    torch.testing.assert_close(change, torch.linalg.svdvals(w)[-r:].square().sum().sqrt(), rtol=1e-4, atol=0)
    torch.testing.assert_close(b.T @ b, torch.eye(r), rtol=0, atol=1e-5)
    # a clean gap: last r singular values 0.1..0.05, the rest >= 1
    s2 = torch.cat([torch.linspace(5.0, 1.0, out - r, dtype=D), torch.linspace(0.1, 0.05, r, dtype=D)])
    w2 = _with_spectrum(out, k, s2, gen)
    b2 = init_basis(w2.to(torch.float32), r, "small_sv", gen)
    u_ref = torch.linalg.svd(w2, full_matrices=False)[0][:, -r:]
    cos = principal_angle_cosines(b2, u_ref)
    assert float(cos.min()) > 1 - 1e-7  # all r principal angles < 4.5e-4 rad (fp32 Gram: ~1e-4 expected)


def test_small_sv_on_a_random_sd_size_layer_removes_the_least_energy(gen):
    """Random 320 x 2880 (an SD1.5 3x3 conv): clustered small σ, where only the energy |QᵀW| is defined."""
    w = torch.randn(320, 2880, generator=gen) / 2880 ** 0.5
    b = smallest_left_singular(w, 4, torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(w.to(D))
    change = (b.to(D).T @ w.to(D)).norm()
    optimum = s[-4:].square().sum().sqrt()
    assert optimum <= change <= optimum * (1 + 1e-4)
    again = smallest_left_singular(w, 4, torch.Generator().manual_seed(0))
    assert torch.equal(b, again)  # deterministic in the generator


def test_init_is_deterministic_in_the_seed():
    w = torch.randn(20, 12, generator=torch.Generator().manual_seed(0))
    nets = [ParaNetwork.from_weights({"a": w, "b": w[:10]}, {"a": 3, "b": 2}, init, seed=5)
            for init in ("random", "random", "small_sv", "small_sv")]
    for x, y in ((nets[0], nets[1]), (nets[2], nets[3])):
        for n in ("a", "b"):
            assert torch.equal(x.layer(n).b, y.layer(n).b)
    assert not torch.equal(nets[0].layer("a").b, nets[2].layer("a").b)
    with pytest.raises(ValueError, match="unknown init"):
        init_basis(w, 2, "zeros")


def test_to_para_model_round_trip(gen):
    w = torch.randn(20, 12, generator=gen)
    net = ParaNetwork.from_weights({"diffusion_model.x.attn1.to_q": w}, {"diffusion_model.x.attn1.to_q": 3}, "random", 1)
    para = net.to_para_model({"targets": "ExCA"}, dtype=torch.float32)
    q = net.layer("diffusion_model.x.attn1.to_q").basis().detach()
    assert para.ranks() == {"diffusion_model.x.attn1.to_q": [3]}
    assert para.metadata["targets"] == "ExCA" and para.metadata["format"] == "para"
    torch.testing.assert_close(para.stages["diffusion_model.x.attn1.to_q"][0], q, rtol=0, atol=1e-6)


# ---- deferred checks and measured projection ---------------------------------------------------------
def test_step_without_check_defers_the_rank_check_to_check(gen):
    module = _linear(gen, dtype=torch.float32).requires_grad_(False)
    net = ParaNetwork({"a": ParaLayer(torch.randn(24, 3, generator=gen)), "m": ParaLayer(torch.randn(24, 3, generator=gen))},
                      mode="output")
    undo = net.attach({"m": module, "a": nn.Linear(20, 24)})
    with net.step() as strict:
        strict = {k: v.detach().clone() for k, v in strict.items()}
    with net.step(check=False) as qs:
        assert all(torch.equal(qs[n], strict[n]) for n in net.names)  # same bases, bit for bit
        module(torch.randn(2, 20, generator=gen)).sum().backward()
    net.check()  # fine
    with torch.no_grad():
        net.layer("m").b[:, 2] = net.layer("m").b[:, 0]  # rank 2 of 3
    with net.step(check=False):
        pass  # no error, no host synchronisation
    with torch.no_grad():
        net.layer("m").b.copy_(torch.randn(24, 3, generator=gen))  # healthy again: the running minimum remembers
    with net.step(check=False):
        pass
    with pytest.raises(ParaRankError, match=r"^PaRa B of m: B of shape \(24, 3\) became rank deficient"):
        net.check()
    net.check()  # reset after reporting
    with pytest.raises(ParaRankError):
        with torch.no_grad():
            net.layer("a").b.fill_(float("nan"))
        with net.step():  # the strict path raises at once
            pass
    undo()


def _fake_timer(faster: str):
    """A stand-in for layer._timed that makes `faster` win every comparison, whatever the machine: each call
    returns the next tick of a clock that advances 1 for the faster space's probe and 2 for the other. The
    probes alternate output, weight, output, weight... (see ParaNetwork._measure), and the probe itself still
    runs, so the measurement path is exercised; only the verdict is fixed."""
    calls = []

    def timed(fn, device):
        fn()
        mode = ("output", "weight")[len(calls) % 2]
        calls.append(mode)
        return 1.0 if mode == faster else 2.0
    return timed, calls


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("faster", ["output", "weight"])
def test_auto_projection_times_each_key_once_and_uses_the_faster(gen, monkeypatch, checkpointing, faster):
    """auto uses, per key, the space its timing found faster (forced here both ways, so the verdict does not
    depend on this machine's speed), times each key once per process, draws no random numbers, and trains
    exactly as a run forced into that space does."""
    monkeypatch.setattr(layer_mod, "_MEASURED", {})
    timed, calls = _fake_timer(faster)
    monkeypatch.setattr(layer_mod, "_timed", timed)
    lin = _linear(gen, out=48, inp=40, dtype=torch.float32).requires_grad_(False)
    conv = _conv(gen, out=16, inp=5, dtype=torch.float32).requires_grad_(False)
    b = {"l": torch.randn(48, 2, generator=gen), "c": torch.randn(16, 2, generator=gen)}
    x_l, x_c = torch.randn(3, 7, 40, generator=gen), torch.randn(2, 5, 9, 9, generator=gen)

    def model(xl, xc):
        return lin(xl).square().sum() + conv(xc).square().sum()

    grads, outs, rng = {}, {}, {}
    for mode in (faster, "auto", "auto again"):
        net = ParaNetwork({n: ParaLayer(v) for n, v in b.items()}, mode=mode.split()[0])
        undo = net.attach({"l": lin, "c": conv})
        torch.manual_seed(0)
        for _ in range(2):
            net.zero_grad(set_to_none=True)
            with net.step(check=False):
                if checkpointing:
                    y = torch.utils.checkpoint.checkpoint(model, x_l.requires_grad_(), x_c, use_reentrant=False)
                else:
                    y = model(x_l, x_c)
                y.backward()
        rng[mode] = torch.rand(1)  # the timing drew nothing from the global generator
        outs[mode] = y.detach().clone()
        grads[mode] = {n: net.layer(n).b.grad.clone() for n in b}
        undo()
        if mode == "auto":
            assert len(net.timings) == 2 and len(layer_mod._MEASURED) == 2  # each key timed once
            assert len(calls) == 2 * 2 * 4  # 2 keys x 2 spaces x (warm-up + 3 repeats)
            for key, (t_out, t_w) in net.timings.items():
                assert layer_mod._MEASURED[key] == faster
                assert (t_out < t_w) == (faster == "output")
            assert net.layer_modes == {"l": faster, "c": faster}
            n_out = 2 if faster == "output" else 0
            assert net.describe_modes().startswith(f"projection auto: output space on {n_out} layers, weight space on {2 - n_out}")
            assert "timed 2 layer shapes" in net.describe_modes()
        if mode == "auto again":
            assert net.timings == {} and len(layer_mod._MEASURED) == 2  # cached per process
    assert len(calls) == 16  # the second auto run timed nothing
    assert torch.equal(rng[faster], rng["auto"])
    # the timing added nothing: auto is bit-identical to the run forced into the space it chose, and again
    assert torch.equal(outs["auto"], outs[faster]) and torch.equal(outs["auto again"], outs["auto"])
    for n in b:
        assert torch.equal(grads["auto"][n], grads[faster][n])
        assert torch.equal(grads["auto again"][n], grads["auto"][n])


def test_output_and_weight_space_gradients_agree_with_float64(gen):
    """Both spaces compute the same gradient of B: in float64 to 1e-10, and each float32 run within float32
    rounding of the float64 value (relative to the gradient's size, which is what the spaces' different
    summation orders perturb)."""
    lin64 = _linear(gen, out=48, inp=40).requires_grad_(False)
    conv64 = _conv(gen, out=16, inp=5).requires_grad_(False)
    b = {"l": torch.randn(48, 2, generator=gen, dtype=D), "c": torch.randn(16, 2, generator=gen, dtype=D)}
    x_l, x_c = torch.randn(3, 7, 40, generator=gen, dtype=D), torch.randn(2, 5, 9, 9, generator=gen, dtype=D)
    grads = {}
    for dtype in (D, torch.float32):
        lin, conv = lin64.to(dtype), conv64.to(dtype)
        for mode in ("output", "weight"):
            net = ParaNetwork({n: ParaLayer(v).to(dtype) for n, v in b.items()}, mode=mode)
            undo = net.attach({"l": lin, "c": conv})
            with net.step(check=False):
                (lin(x_l.to(dtype)).square().sum() + conv(x_c.to(dtype)).square().sum()).backward()
            grads[dtype, mode] = {n: net.layer(n).b.grad.to(D) for n in b}
            undo()
    for n in b:
        ref = grads[D, "output"][n]
        torch.testing.assert_close(grads[D, "weight"][n], ref, rtol=1e-10, atol=1e-10 * ref.abs().max().item())
        for mode in ("output", "weight"):
            err = (grads[torch.float32, mode][n] - ref).abs().max().item()
            assert err <= 1e-4 * ref.abs().max().item(), (n, mode, err)


def test_small_sv_init_names_the_layer_of_a_non_finite_weight():
    w = torch.randn(8, 20)
    w[3, 4] = float("inf")
    with pytest.raises(Exception, match=r"^diffusion_model.x: small_sv init: the weight of shape \(8, 20\) contains NaN or Inf$"):
        ParaNetwork.from_weights({"diffusion_model.x": w}, {"diffusion_model.x": 2})


@pytest.mark.parametrize("shape,dim", [((3, 7, 12), -1), ((1, 12, 4, 5), 1), ((2, 12, 4, 5), 1), ((2, 12, 3), 1)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_output_projection_backward_is_the_exact_gradient(shape, dim, with_bias, gen):
    """The hand-written backward of the output projection (rows, one conv image, a conv batch, a strided
    channel axis) against finite differences in float64, with a bias and a strength s != 1, and its
    forward against y - s·QQᵀ(y - b)."""
    y = torch.randn(shape, generator=gen, dtype=D, requires_grad=True)
    c = shape[dim]
    q = orth64(torch.randn(c, 3, generator=gen)).requires_grad_(True)
    b = torch.randn(c, generator=gen, dtype=D) if with_bias else None
    assert torch.autograd.gradcheck(lambda y, q: project_output(y, q, b, dim, 0.7), (y, q))
    ym = y.detach().movedim(dim, -1)
    ref = ym - 0.7 * ((ym - (0 if b is None else b)) @ q.detach()) @ q.detach().T
    torch.testing.assert_close(project_output(y, q, b, dim, 0.7).detach(), ref.movedim(-1, dim), rtol=0, atol=1e-13)


@pytest.mark.parametrize("shape,dim", [((1, 16, 64), -1), ((2, 64, 4, 4), 1), ((1, 128, 1024), -1)])
def test_bf16_output_projection_under_autocast_is_as_close_as_bf16_allows(shape, dim, gen):
    """Under bf16 autocast on a CPU (small outputs are projected in fp32, large ones in bf16): the output and
    y's gradient within bf16 rounding of the float64 values, Q's gradient returned in fp32, autocast left on."""
    c = shape[dim]
    y = torch.randn(shape, generator=gen).to(torch.bfloat16).requires_grad_(True)
    q = orth64(torch.randn(c, 4, generator=gen)).float().requires_grad_(True)
    b = (torch.randn(c, generator=gen) * 0.1).to(torch.bfloat16)
    w = torch.randn(shape, generator=gen, dtype=D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = project_output(y, q, b, dim)
        assert torch.is_autocast_enabled("cpu")
    (z.to(D) * w).sum().backward()
    y64, q64 = y.detach().to(D).requires_grad_(True), q.detach().to(D).requires_grad_(True)
    ym = y64.movedim(dim, -1)
    ref = (ym - ((ym - b.to(D)) @ q64) @ q64.T).movedim(-1, dim)
    (ref * w).sum().backward()
    assert z.dtype == torch.bfloat16 and q.grad.dtype == torch.float32
    for got, want in ((z.detach(), ref.detach()), (y.grad, y64.grad), (q.grad, q64.grad)):
        assert float((got.to(D) - want).abs().max() / want.abs().max()) < 2e-2


@pytest.mark.parametrize("shape, channel_dim", [((2, 5, 8), -1), ((1, 8, 3, 4), 1), ((2, 8, 3, 4), 1)])
def test_output_projection_result_can_be_modified_in_place(shape, channel_dim):
    """Some models modify a layer's output in place through a view (HunyuanImage's blocks: transpose, then an
    in-place op). torch forbids that on a view made inside a custom autograd Function, so the projection must return
    a tensor of its own; the gradient through the in-place op must still be the reference's (float64)."""
    gen = torch.Generator().manual_seed(0)
    y0 = torch.randn(shape, dtype=torch.float64, generator=gen)
    q = random_orth64(8, 2, gen)
    bias = torch.randn(8, dtype=torch.float64, generator=gen)
    weight = torch.randn(shape, dtype=torch.float64, generator=gen).transpose(0, 1)

    def loss(project):
        y = y0.clone().requires_grad_(True)
        z = project(y)
        w = z.transpose(0, 1)
        w.mul_(weight)
        w.sum().backward()
        return z, y.grad

    z, grad = loss(lambda y: project_output(y, q, bias, channel_dim))
    assert z._base is None
    yc = lambda y: y.movedim(channel_dim, -1)  # noqa: E731
    ref_z, ref_grad = loss(lambda y: (yc(y) - (yc(y) - bias) @ q @ q.T).movedim(-1, channel_dim).contiguous())
    torch.testing.assert_close(z, ref_z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
