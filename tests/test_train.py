"""para_core.train without ComfyUI: a tiny conv + linear student learns to remove the subspaces a teacher
removes; the loop is deterministic, a run resumed from its .para_state equals the continuous run bit for
bit, a sidecar that belongs to another file is refused, and gradient accumulation equals one big batch."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from reference import project64, random_orth64
from torch import nn

from para_core.errors import ParaFormatError
from para_core.format import ParaModel
from para_core.layer import ParaNetwork
from para_core.train import (STATE_FORMAT, TrainConfig, TrainingLoop, checkpoint_units, draw_micro_batch,
                             enable_checkpointing, group_by_shape, loss_value, make_optimizer, prediction_residual,
                             prediction_scale, read_state, restore_optimizer, save_with_state, stages_b, state_path,
                             step_seed)

TARGETS = ("conv", "lin1")
RANKS = {"conv": 2, "lin1": 3}


class Tiny(nn.Module):
    """conv (8 out channels) -> GELU -> mean pool -> lin1 (16) -> GELU -> lin2 (4)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(nn.Linear(8, 16), nn.GELU())
        self.lin2 = nn.Linear(16, 4)
        for p in self.parameters():  # explicit init: the test does not depend on torch's default init
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim > 1 else 0.1))
        self.to(dtype)

    @property
    def lin1(self) -> nn.Linear:
        return self.blocks[0]

    def forward(self, x):
        h = F.gelu(self.conv(x)).mean((2, 3))
        return self.lin2(self.blocks(h))


def _teacher(dtype=torch.float32) -> Tiny:
    """The same model with fixed subspaces removed from conv and lin1: what the student must find."""
    t = Tiny(dtype)
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for name in TARGETS:
            m = getattr(t, name)
            q = random_orth64(m.weight.shape[0], RANKS[name], g)
            m.weight.copy_(project64(m.weight, [q]).to(dtype))
    return t


def _data(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)


class Run:
    """One training run of the student against the teacher, built the way a host builds it."""

    def __init__(self, seed=0, optimizer="AdamW", lr=0.05, batch_size=4, accumulate=1, b=None, dtype=torch.float32):
        self.model = Tiny(dtype).requires_grad_(False)
        self.teacher = _teacher(dtype).requires_grad_(False)
        self.x = _data(dtype)
        self.seed, self.batch_size = seed, batch_size
        modules = {n: getattr(self.model, n) for n in TARGETS}
        if b is None:
            self.network = ParaNetwork.from_weights({n: m.weight for n, m in modules.items()}, RANKS, "random", seed)
        else:
            from para_core.layer import ParaLayer
            self.network = ParaNetwork({n: ParaLayer(b[n]) for n in sorted(b)})
        self.network.to(dtype)
        self.detach = self.network.attach(modules)
        self.optimizer = make_optimizer(optimizer, [layer.b for _, layer in self.network.items()], lr)
        self.loop = TrainingLoop(self.optimizer, self.micro_loss, accumulate, step_context=self.network.step)

    def micro_loss(self, micro: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(step_seed(self.seed, micro))
        pick = torch.randperm(len(self.x), generator=gen)[:self.batch_size]
        x = self.x[pick] + 0.1 * torch.randn(self.x[pick].shape, generator=gen, dtype=self.x.dtype)
        with torch.no_grad():
            target = self.teacher(x)
        return loss_value("MSE", prediction_residual(self.model(x), target))

    def b(self) -> dict[str, torch.Tensor]:
        return {n: layer.b.detach().clone() for n, layer in self.network.items()}

    def para(self, steps: int) -> ParaModel:
        return self.network.to_para_model({"training": json.dumps({"steps": steps})})


# ---- learning and determinism ----------------------------------------------------------------------
def test_loss_falls_towards_the_teacher():
    r = Run()
    losses = r.loop.run(0, 60)
    assert len(losses) == 60 and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.3 * first, (first, last)


def test_same_seed_same_run_and_other_seed_another():
    a, b, c = Run(seed=3), Run(seed=3), Run(seed=4)
    la, lb, lc = a.loop.run(0, 8), b.loop.run(0, 8), c.loop.run(0, 8)
    assert la == lb and la != lc
    for n in TARGETS:
        assert torch.equal(a.b()[n], b.b()[n])


def test_losses_are_read_one_step_late_and_exact():
    """The history lags one step while running (no host sync per step) and equals eager reading at the end."""
    r = Run(seed=1, accumulate=3, batch_size=2)
    seen = []
    losses = r.loop.run(0, 5, after_step=lambda done: seen.append((done, len(r.loop.losses))))
    assert seen == [(1, 0), (2, 1), (3, 2), (4, 3), (5, 4)]
    ref = Run(seed=1, accumulate=3, batch_size=2)  # reference: every micro loss read at once, as before
    want = []
    for step in range(5):
        micro = []
        for j in range(3):
            with ref.network.step():
                loss = ref.micro_loss(step * 3 + j)
                (loss / 3).backward()
            micro.append(float(loss.detach()))
        ref.optimizer.step()
        ref.optimizer.zero_grad(set_to_none=True)
        want.append(sum(micro) / len(micro))
    assert losses == want


# ---- resume ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer,accumulate", [("AdamW", 1), ("RMSprop", 2), ("SGD", 1)])
def test_resume_from_para_state_equals_one_continuous_run(tmp_path, optimizer, accumulate):
    n, m = 4, 3
    full = Run(seed=7, optimizer=optimizer, accumulate=accumulate, lr=0.02)
    full_losses = full.loop.run(0, n + m)

    first = Run(seed=7, optimizer=optimizer, accumulate=accumulate, lr=0.02)
    first.loop.run(0, n)
    path = str(tmp_path / "part_4_steps_00001_.safetensors")
    save_with_state(first.para(n), path, first.network, first.optimizer, first.loop.losses, n, 7)
    assert os.path.exists(state_path(path)) and state_path(path).endswith(".para_state")

    para = ParaModel.load(path)
    state = read_state(para)
    assert state is not None and state.meta["format"] == STATE_FORMAT and state.meta["step"] == str(n)
    second = Run(seed=7, optimizer=optimizer, accumulate=accumulate, lr=0.02, b=stages_b(para, state))
    assert restore_optimizer(second.optimizer, second.network, state)
    second.loop.losses.extend(state.losses)
    resumed = second.loop.run(n, n + m)
    assert resumed == full_losses  # float equality: the same trajectory
    for k in TARGETS:
        assert torch.equal(second.b()[k], full.b()[k]), k


def test_resume_without_optimizer_state_differs(tmp_path):
    """The optimizer state matters (so the test above can fail): a fresh AdamW state gives another trajectory."""
    full = Run(seed=7)
    full.loop.run(0, 6)
    first = Run(seed=7)
    first.loop.run(0, 3)
    path = str(tmp_path / "a.safetensors")
    save_with_state(first.para(3), path, first.network, first.optimizer, first.loop.losses, 3, 7)
    state = read_state(ParaModel.load(path))
    second = Run(seed=7, b=state.b)
    second.loop.run(3, 6)
    assert not torch.equal(second.b()["lin1"], full.b()["lin1"])


def _two_saved_runs(tmp_path):
    paths = []
    for seed in (1, 2):
        r = Run(seed=seed)
        r.loop.run(0, 3)
        p = str(tmp_path / f"run{seed}.safetensors")
        save_with_state(r.para(3), p, r.network, r.optimizer, r.loop.losses, 3, seed)
        paths.append(p)
    return paths


def test_para_state_of_another_file_is_refused(tmp_path):
    a, b = _two_saved_runs(tmp_path)
    assert read_state(ParaModel.load(a)) is not None
    shutil.copyfile(state_path(b), state_path(a))  # run 2's state next to run 1's file
    with pytest.raises(ParaFormatError) as e:
        read_state(ParaModel.load(a))
    msg = str(e.value)
    assert "\n" not in msg and state_path(a) in msg and "b.conv" in msg and "not its training state" in msg


def test_para_state_of_another_step_or_other_layers_is_refused(tmp_path):
    a, _ = _two_saved_runs(tmp_path)
    r = Run(seed=1)
    r.loop.run(0, 3)
    later = str(tmp_path / "later.safetensors")
    save_with_state(r.para(5), later, r.network, r.optimizer, r.loop.losses, 3, 1)  # file says 5 steps, state 3
    with pytest.raises(ParaFormatError, match=r"step 3, but .*later\.safetensors was saved at step 5"):
        read_state(ParaModel.load(later))
    only_conv = ParaModel.load(a).select(lambda m: m == "conv")
    with pytest.raises(ParaFormatError, match=r"other layers .*b\.lin1"):
        read_state(only_conv, state_path(a))
    not_state = str(tmp_path / "x.para_state")
    shutil.copyfile(a, not_state)  # a PaRa file is not a training state
    with pytest.raises(ParaFormatError, match="not a PaRa training state"):
        read_state(ParaModel.load(a), not_state)
    assert read_state(ParaModel.load(str(tmp_path / "run2.safetensors")), str(tmp_path / "missing.para_state")) is None


def test_restore_optimizer_checks_class_and_shapes(tmp_path):
    a, _ = _two_saved_runs(tmp_path)
    state = read_state(ParaModel.load(a))
    sgd = Run(optimizer="SGD")
    assert restore_optimizer(sgd.optimizer, sgd.network, state) is False
    state.tensors["optim.lin1.exp_avg"] = torch.zeros(5, 3)
    adam = Run()
    with pytest.raises(ParaFormatError, match=r"optim\.lin1\.exp_avg has shape \(5, 3\), B is \(16, 3\)"):
        restore_optimizer(adam.optimizer, adam.network, state)


# ---- gradient accumulation -----------------------------------------------------------------------------
def test_grad_accumulation_equals_one_big_batch_float64():
    """2 micro-batches of 2 equal one batch of 4 (mean loss): same update with SGD lr 1 (B1 = B0 - grad)."""
    def run(accumulate: int, batch: int) -> tuple[dict, list[float]]:
        r = Run(optimizer="SGD", lr=1.0, accumulate=accumulate, batch_size=batch, dtype=torch.float64)

        def micro_loss(micro: int) -> torch.Tensor:
            idx = torch.arange(micro * batch, (micro + 1) * batch) % len(r.x)
            return loss_value("MSE", prediction_residual(r.model(r.x[idx]), r.teacher(r.x[idx])))

        r.loop.micro_loss = micro_loss
        b0 = r.b()
        losses = r.loop.run(0, 1)
        return {n: r.b()[n] - b0[n] for n in TARGETS}, losses

    step_acc, loss_acc = run(2, 2)
    step_big, loss_big = run(1, 4)
    for n in TARGETS:
        assert step_big[n].dtype == torch.float64 and step_big[n].abs().max() > 1e-3, n  # a real update
        torch.testing.assert_close(step_acc[n], step_big[n], rtol=1e-12, atol=1e-14, msg=n)
    assert abs(loss_acc[0] - loss_big[0]) <= 1e-14 * abs(loss_big[0])
    step_one, _ = run(1, 2)  # half the batch: another gradient (the comparison above can fail)
    assert (step_one["lin1"] - step_big["lin1"]).abs().max() > 1e-6


# ---- pieces ------------------------------------------------------------------------------------------------
def test_checkpointing_gives_the_same_gradients_and_is_undone():
    units = checkpoint_units(Tiny())
    assert [type(u).__name__ for u in units] == ["Conv2d", "Linear", "GELU", "Linear"]  # Sequential opened

    def grads(checkpointing: bool):
        r = Run(seed=2)
        undo = enable_checkpointing(checkpoint_units(r.model)) if checkpointing else None
        with r.network.step():
            loss = r.micro_loss(0)
            loss.backward()
        if undo:
            assert all("forward" in u.__dict__ for u in checkpoint_units(r.model))
            undo()
        r.detach()
        assert not [n for n, m in r.model.named_modules() if "forward" in m.__dict__]
        return float(loss.detach()), {n: layer.b.grad.clone() for n, layer in r.network.items()}

    (l0, g0), (l1, g1) = grads(False), grads(True)
    assert l0 == l1
    for n in TARGETS:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-6, atol=1e-8)


class _CountingLinear(nn.Linear):
    """Counts the outputs it computed: a call stopped inside F.linear (checkpointing stops its recomputation
    when the last saved tensor is packed, before the op that saves it runs) is not counted."""
    computed = 0

    def forward(self, x):
        y = super().forward(x)
        self.computed += 1
        return y


class _Unit(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.a, self.b = _CountingLinear(width, width), _CountingLinear(width, width)

    def forward(self, x):
        return x + self.b(F.gelu(self.a(x)))


class _Units(nn.Module):
    """Two residual units x + b(GELU(a(x))), each one gradient checkpointing unit (depth 2)."""

    def __init__(self, width=32):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.units = nn.ModuleList(_Unit(width) for _ in range(2))
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)

    def forward(self, x):
        for u in self.units:
            x = u(x)
        return x


@pytest.mark.parametrize("tokens, kept", [(2, True), (64, False)])
def test_checkpointing_keeps_the_last_output_of_each_unit(tokens, kept):
    """After the first step, each unit's last PaRa layer keeps y on its node: checkpointing no longer computes
    that layer again in backward (one output per step instead of two), and every gradient is bit-identical to
    the run that recomputes it. With 64 tokens y (64·32) is more than 1/8 of the weight (32·32): recomputed."""
    def run(units: bool):
        model = _Units().double().requires_grad_(False)
        names = [f"units.{i}.{k}" for i in range(2) for k in "ab"]
        modules = dict(model.named_modules())
        modules = {n: modules[n] for n in names}
        net = ParaNetwork.from_weights({n: m.weight for n, m in modules.items()}, {n: 2 for n in names}, "random", 0, mode="output").double()
        undo = [net.attach(modules), enable_checkpointing(checkpoint_units(model), net if units else None)]
        x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        grads, per_step = [], []
        for _ in range(2):
            for m in modules.values():
                m.computed = 0
            with net.step():
                model(x).square().sum().backward()
            grads.append({n: layer.b.grad.clone() for n, layer in net.items()})
            net.zero_grad()
            per_step.append({n: m.computed for n, m in modules.items()})
        kept = net._keep_outputs
        for u in reversed(undo):
            u()
        assert not net._keep_outputs and not net._unit_of  # undone with the checkpointing
        return grads, per_step, kept

    (g_keep, calls_keep, last), (g_plain, calls_plain, none) = run(True), run(False)
    assert last == {"units.0.b", "units.1.b"} and not none  # what step 1 called last in each unit
    everything_twice = dict.fromkeys(calls_plain[0], 2)  # forward + checkpointing's recomputation
    assert calls_plain == [everything_twice, everything_twice]
    assert calls_keep[0] == everything_twice  # step 1 only finds out which layer is last
    assert calls_keep[1] == ({"units.0.a": 2, "units.0.b": 1, "units.1.a": 2, "units.1.b": 1} if kept else everything_twice)
    for step in range(2):
        for n in g_plain[step]:
            assert torch.equal(g_keep[step][n], g_plain[step][n]), (step, n)


def test_foreach_optimizers_take_the_same_steps():
    """make_optimizer's foreach=True takes the same steps as torch's per-parameter loop (bit for bit)."""
    g = torch.Generator().manual_seed(6)
    for name, cls in (("AdamW", torch.optim.AdamW), ("Adam", torch.optim.Adam), ("SGD", torch.optim.SGD),
                      ("RMSprop", torch.optim.RMSprop)):
        init = [torch.randn(7, 3, generator=g), torch.randn(5, 2, generator=g)]
        grads = [[torch.randn(p.shape, generator=g) for p in init] for _ in range(3)]
        ps = [[nn.Parameter(p.clone()) for p in init] for _ in range(2)]
        opts = [make_optimizer(name, ps[0], 0.01), cls(ps[1], lr=0.01, foreach=False)]
        for step in grads:
            for params, opt in zip(ps, opts):
                for p, gr in zip(params, step):
                    p.grad = gr.clone()
                opt.step()
        assert all(torch.equal(a, b) for a, b in zip(*ps)), name
        assert not torch.equal(ps[0][0], init[0])


def test_checkpointing_undo_keeps_an_own_forward():
    m = nn.Linear(2, 2)
    own = m.forward
    m.forward = own
    undo = enable_checkpointing([m])
    assert m.forward is not own
    undo()
    assert m.__dict__["forward"] is own


def test_prediction_scale_and_residual():
    """ε-prediction x0 = x - σ·ε: c = -σ, so the residual is the ε error; |c| is floored near σ = 0."""
    sigma = torch.tensor([1e-6, 0.5, 3.0, 14.6])
    c = prediction_scale(lambda s, out, x: x - s.reshape(-1, 1, 1, 1) * out, sigma, 4)
    assert c.shape == (4, 1, 1, 1) and c.dtype == torch.float32
    assert torch.equal(c.flatten(), torch.tensor([-1e-4, -0.5, -3.0, -14.6]))
    assert prediction_scale(lambda s, out, x: x - s.reshape(-1, 1, 1, 1) * out, torch.zeros(1), 4).abs().item() == pytest.approx(1e-4)
    eps_true, eps_pred = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.randn(4, 2, 3, 3, dtype=torch.float64)
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    s = sigma.double().reshape(-1, 1, 1, 1)
    res = prediction_residual(x - s * eps_pred, x - s * eps_true, c.double())
    torch.testing.assert_close(res[1:], (eps_pred - eps_true)[1:], rtol=1e-6, atol=1e-6)
    assert res.dtype == torch.float64
    assert prediction_residual(torch.ones(2, dtype=torch.bfloat16), torch.zeros(2)).dtype == torch.float32


def test_losses_optimizers_config_and_seeds():
    r = torch.tensor([0.5, -2.0])
    assert float(loss_value("MSE", r)) == pytest.approx(2.125)
    assert float(loss_value("L1", r)) == pytest.approx(1.25)
    assert float(loss_value("Huber", r)) == pytest.approx((0.125 + 1.5) / 2)
    assert float(loss_value("SmoothL1", r)) == pytest.approx((0.125 + 1.5) / 2)
    with pytest.raises(ValueError, match="unknown loss function 'L3'"):
        loss_value("L3", r)
    p = [nn.Parameter(torch.zeros(2))]
    assert [type(make_optimizer(n, p, 0.1)).__name__ for n in ("AdamW", "Adam", "SGD", "RMSprop")] == ["AdamW", "Adam", "SGD", "RMSprop"]
    assert make_optimizer("SGD", p, 0.25).param_groups[0]["lr"] == 0.25
    with pytest.raises(ValueError, match="optimizer 'Lion'"):
        TrainConfig(optimizer="Lion")
    with pytest.raises(ValueError, match="grad_accumulation_steps must be at least 1"):
        TrainConfig(grad_accumulation_steps=0)
    assert TrainConfig().dtype == torch.bfloat16 and TrainConfig(training_dtype="fp32").dtype == torch.float32
    seeds = {step_seed(s, k) for s in range(4) for k in range(50)}
    assert len(seeds) == 200 and all(0 <= v < 2 ** 63 for v in seeds)
    assert step_seed(2 ** 64 - 1, 10 ** 9) == step_seed(2 ** 64 - 1, 10 ** 9)


# ---- forward replacement --------------------------------------------------------------------------------
def test_wrap_forwards_undo_restores_exactly_what_was_there():
    from para_core.forward_patch import wrap_forwards
    plain, own = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    own_forward = own.forward  # a bound method stored as an instance attribute, as another wrapper would leave it
    own.forward = own_forward
    x = torch.randn(2, 3)
    undo = wrap_forwards([plain, own], lambda m, inner: (lambda *a, **k: inner(*a, **k) * 2))
    assert torch.equal(plain(x), 2 * torch.nn.functional.linear(x, plain.weight, plain.bias))
    assert torch.equal(own(x), 2 * own_forward(x))
    undo()
    assert "forward" not in plain.__dict__ and own.__dict__["forward"] is own_forward

    def failing(m, inner):
        if m is own:
            raise RuntimeError("boom")
        return lambda *a, **k: inner(*a, **k)
    with pytest.raises(RuntimeError, match="boom"):
        wrap_forwards([plain, own], failing)
    assert "forward" not in plain.__dict__ and own.__dict__["forward"] is own_forward


def test_group_by_shape_keeps_input_order_per_shape():
    images = [torch.full((1, 4, 8, 8), float(i)) if i % 2 == 0 else torch.full((1, 4, 6, 10), float(i)) for i in range(5)]
    groups = group_by_shape(images)
    assert [g.index for g in groups] == [[0, 2, 4], [1, 3]]
    assert groups[0].latents.shape == (3, 4, 8, 8) and groups[1].latents.shape == (2, 4, 6, 10)
    assert groups[1].latents[:, 0, 0, 0].tolist() == [1.0, 3.0]


def test_micro_batch_draw_is_a_function_of_seed_and_micro_step():
    """The draw is exactly: group by size-weighted multinomial, randperm picks, noise, timesteps - from one
    generator seeded by step_seed(seed, micro); a one-group run draws no group."""
    sizes, shapes = [3, 5], [(4, 8, 8), (4, 6, 10)]
    d = draw_micro_batch(7, 11, sizes, shapes, 2)
    gen = torch.Generator().manual_seed(step_seed(7, 11))
    group = int(torch.multinomial(torch.tensor([3.0, 5.0]), 1, generator=gen))
    picks = torch.randperm(sizes[group], generator=gen)[:2].tolist()
    noise = torch.randn((2,) + shapes[group], generator=gen)
    timesteps = torch.rand(2, generator=gen).tolist()
    assert (d.group, d.picks, d.timesteps) == (group, picks, timesteps) and torch.equal(d.noise, noise)
    assert draw_micro_batch(7, 11, sizes, shapes, 2).picks == d.picks
    one = draw_micro_batch(7, 11, [5], [(4, 8, 8)], 8)  # batch larger than the group: every image once
    gen = torch.Generator().manual_seed(step_seed(7, 11))
    assert one.group == 0 and one.picks == torch.randperm(5, generator=gen).tolist() and one.noise.shape == (5, 4, 8, 8)
    # over many steps each image is equally likely whatever its group's size: groups drawn ~ 3:5
    counts = [0, 0]
    for micro in range(800):
        counts[draw_micro_batch(0, micro, sizes, shapes, 1).group] += 1
    assert 0.3 < counts[0] / 800 < 0.45


# ---- learning-rate schedule ------------------------------------------------------------------------
def test_learning_rate_schedule_values_are_exact():
    """Warm-up (k+1)/N·base, then constant / linear 1-p / cosine (1+cos πp)/2 with p over the remaining steps."""
    import math
    from para_core.train import learning_rate_at
    base = 0.01
    assert [learning_rate_at(k, 10, base, "constant", 4) for k in range(10)] == [base * (k + 1) / 4 for k in range(4)] + [base] * 6
    assert [learning_rate_at(k, 10, base, "linear", 0) for k in range(10)] == [base * (1.0 - k / 10) for k in range(10)]
    assert [learning_rate_at(k, 8, base, "linear", 3) for k in range(3, 8)] == [base * (1.0 - (k - 3) / 5) for k in range(3, 8)]
    want = [base * 0.5 * (1.0 + math.cos(math.pi * (k - 2) / 6)) for k in range(2, 8)]
    assert [learning_rate_at(k, 8, base, "cosine", 2) for k in range(2, 8)] == want
    assert learning_rate_at(2, 8, base, "cosine", 2) == base and learning_rate_at(0, 8, base, "cosine", 2) == base / 2
    assert learning_rate_at(5, 10, base) == base  # constant, no warm-up: the base rate
    with pytest.raises(ValueError, match="lr_schedule 'step' is not one of constant, cosine, linear"):
        learning_rate_at(0, 1, base, "step")


def test_training_loop_sets_the_scheduled_rate_before_each_step():
    """SGD's update is lr·grad: with a constant gradient the parameter moves by exactly the scheduled rates."""
    from para_core.train import learning_rate_at
    p = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = make_optimizer("SGD", [p], 1.0)
    loop = TrainingLoop(opt, lambda micro: p * 1.0, learning_rate=lambda s: learning_rate_at(s, 6, 0.5, "linear", 2))
    seen = []
    loop.run(0, 6, lambda done: seen.append((opt.param_groups[0]["lr"], float(p.detach()))))
    rates = [learning_rate_at(s, 6, 0.5, "linear", 2) for s in range(6)]
    assert [r for r, _ in seen] == rates
    assert [v for _, v in seen] == [-sum(rates[:k + 1]) for k in range(6)]


def test_config_accepts_the_new_settings_and_refuses_bad_ones():
    cfg = TrainConfig(training_dtype="none", lr_schedule="cosine", warmup_steps=4, validation_split=0.25, learning_rate=0.1)
    assert cfg.dtype is None and cfg.learning_rate == 0.1
    assert [cfg.lr_at(k, 10) for k in (0, 3, 4)] == [0.1 / 4, 0.1, 0.1]
    for bad, msg in ((dict(lr_schedule="exp"), "lr_schedule 'exp'"), (dict(checkpoint_depth=0), "checkpoint_depth must be"),
                     (dict(validation_split=1.0), "validation_split must be in"), (dict(training_dtype="fp8"), "training_dtype 'fp8'")):
        with pytest.raises(ValueError, match=msg):
            TrainConfig(**bad)


# ---- validation draw ---------------------------------------------------------------------------------
def test_validation_split_and_points_are_fixed():
    from para_core.train import VALIDATION_SEED, split_validation, validation_points
    train, held = split_validation(10, 0.2, seed=3)
    assert len(held) == 2 and sorted(train + held) == list(range(10)) and held == sorted(held)
    assert split_validation(10, 0.2, seed=3) == (train, held)
    assert split_validation(10, 0.0, 3) == (list(range(10)), [])
    assert len(split_validation(3, 0.01, 0)[1]) == 1  # any fraction > 0 holds out one image at least
    with pytest.raises(ValueError, match="holds out 2 of 2 images"):
        split_validation(2, 0.9, 0)
    pts = validation_points([(4, 8, 8), (4, 6, 10)], 4)
    assert [(p.image, p.timestep) for p in pts] == [(i, (k + 0.5) / 4) for i in range(2) for k in range(4)]
    gen = torch.Generator().manual_seed(VALIDATION_SEED)
    for p in pts:  # one generator with a fixed seed, in order: nothing depends on the step or the training seed
        assert torch.equal(p.noise, torch.randn((1,) + ((4, 8, 8) if p.image == 0 else (4, 6, 10)), generator=gen))


def test_group_by_bucket_and_one_shape_per_bucket():
    images = [torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 6, 6)]
    assert [g.index for g in group_by_shape(images, [0, 1, 2])] == [[0], [1], [2]]
    assert [g.index for g in group_by_shape(images, [1, 1, 0])] == [[0, 1], [2]]
    with pytest.raises(ValueError, match=r"bucket 0 holds images of 2 shapes"):
        group_by_shape(images, [0, 0, 0])


# ---- checkpoint depth and bypass hooks -----------------------------------------------------------------
def test_checkpoint_units_count_depth_as_core_does():
    """Depth 1 is the module itself; containers do not count; 2 is the default (the old behaviour)."""
    model = Tiny()
    assert checkpoint_units(model, 1) == [model]
    assert checkpoint_units(model) == checkpoint_units(model, 2) == [model.conv, model.blocks[0], model.blocks[1], model.lin2]
    assert checkpoint_units(model, 3) == []  # the leaves end at depth 2
    with pytest.raises(ValueError, match="at least 1"):
        checkpoint_units(model, 0)


def test_output_hooks_equal_the_output_space_forward_and_undo():
    """Bypass mode (forward hooks) computes exactly what attach's output space computes, gradients included,
    and leaves each module's forward and hooks as they were after the undo."""
    x = _data()[:4]
    results = {}
    for how in ("wrap", "hooks"):
        model = Tiny().requires_grad_(False)
        modules = {n: getattr(model, n) for n in TARGETS}
        net = ParaNetwork.from_weights({n: m.weight for n, m in modules.items()}, RANKS, "random", 0, "output")
        undo = net.attach(modules) if how == "wrap" else net.attach_output_hooks(modules)
        if how == "hooks":
            assert all("forward" not in m.__dict__ and len(m._forward_hooks) == 1 for m in modules.values())
        with net.step():
            y = model(x)
            y.square().sum().backward()
        results[how] = (y.detach(), {n: layer.b.grad.clone() for n, layer in net.items()})
        undo()
        assert all("forward" not in m.__dict__ and not m._forward_hooks for m in modules.values())
        assert torch.equal(model(x), Tiny()(x))
    assert torch.equal(results["wrap"][0], results["hooks"][0])
    assert all(torch.equal(results["wrap"][1][n], results["hooks"][1][n]) for n in TARGETS)
