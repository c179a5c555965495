"""Training PaRa, host-independent parts: configuration, loss, optimizer, gradient checkpointing, the
``.para_state`` resume sidecar, the per-step random seeds and the optimizer-step loop.

The host (``nodes/nodes_train.py`` for ComfyUI, or a script) supplies the model forward as a callable
``micro_loss(micro_index) -> loss`` and everything host-specific around it (model loading, captions,
progress, previews, file names). Nothing here imports ComfyUI.

Why these choices:

* **Randomness is a function of (seed, micro-step) only** (`step_seed`): a run resumed at step k draws
  exactly what the continuous run drew from step k on, so resume equals one continuous run bit for bit
  (tests/test_train.py checks it with float equality).
* **Gradient accumulation**: each micro-batch loss is divided by the number of micro-batches before its
  backward, so the accumulated gradient is the gradient of the mean loss - for a mean loss over equal
  micro-batches, the gradient of one batch holding all of them.
* **No host synchronisation per step**: losses stay on the device and are read one optimizer step late
  (after the next step's work is queued), so a GPU is never idle waiting for the host to print a number.
  The history (`TrainingLoop.losses`) is exact: the same Python floats as reading every micro loss at once.
* **The sidecar** (``<file>.para_state``, safetensors) holds B in fp32 (the file keeps only fp16 Q), the
  optimizer state and the loss history. `read_state` refuses a sidecar that is not the one written with
  its file (other layers, shapes, step count or bases), naming the file and key.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from . import safetensors_io
from .errors import ParaError, ParaFormatError
from .forward_patch import wrap_forwards
from .format import ParaModel, parse_training_metadata
from .layer import DEFAULT_INIT, ParaNetwork
from .targets import DEFAULT_GAMMA, DEFAULT_PRESET

OPTIMIZERS = ("AdamW", "Adam", "SGD", "RMSprop")
LOSS_FUNCTIONS = ("MSE", "L1", "Huber", "SmoothL1")
LOSS_SPACES = ("prediction", "x0")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
STATE_SUFFIX = ".para_state"
STATE_FORMAT = "para_train_state"
STATE_VERSION = "1"
LR_SCHEDULES = ("constant", "cosine", "linear")
DEFAULT_CHECKPOINT_DEPTH = 2  # the diffusion model's blocks (core Train LoRA's default, 1, is the whole model)
VALIDATION_SEED = 0x5A11D  # the held-out draw's own seed: the same for every run, whatever its training seed
SPAN_TOLERANCE = 1e-2  # max |Q - B̂B̂ᵀQ| between the file's fp16 Q and the sidecar's B (fp16 noise ~1e-3)


@dataclass
class TrainConfig:
    """Everything that decides a training run (the Train PaRa node's inputs, minus model and data)."""
    steps: int = 200
    learning_rate: float = 5e-4
    rank: int = 4
    seed: int = 0
    batch_size: int = 1
    grad_accumulation_steps: int = 1
    optimizer: str = "AdamW"
    loss_function: str = "MSE"
    training_dtype: str = "bf16"
    gradient_checkpointing: bool = True
    targets: str = DEFAULT_PRESET
    include: str = ""
    exclude: str = ""
    rank_boundary: float = DEFAULT_GAMMA
    loss_space: str = "prediction"
    existing_para: str = ""
    save_every: int = 0
    preview_every: int = 0
    filename_prefix: str = "para/ComfyUI_para_train"
    init: str = DEFAULT_INIT
    projection: str = "auto"
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    checkpoint_depth: int = DEFAULT_CHECKPOINT_DEPTH
    bucket_mode: bool = False
    bypass_mode: bool = False
    offloading: bool = False
    quantized_backward: bool = False
    validation_split: float = 0.0
    validation_every: int = 0

    def __post_init__(self):
        for name, value, allowed in (("optimizer", self.optimizer, OPTIMIZERS), ("loss_function", self.loss_function, LOSS_FUNCTIONS),
                                     ("loss_space", self.loss_space, LOSS_SPACES), ("lr_schedule", self.lr_schedule, LR_SCHEDULES),
                                     ("training_dtype", self.training_dtype, tuple(DTYPES) + ("none",))):
            if value not in allowed:
                raise ValueError(f"{name} '{value}' is not one of {', '.join(allowed)}")
        for name in ("steps", "batch_size", "grad_accumulation_steps", "rank", "checkpoint_depth"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= float(self.validation_split) < 1.0:
            raise ValueError(f"validation_split must be in [0, 1), got {self.validation_split}")

    @property
    def dtype(self) -> torch.dtype | None:
        """The compute dtype, None for training_dtype 'none' (the model's own: the host decides)."""
        return DTYPES.get(self.training_dtype)

    def lr_at(self, step: int, total_steps: int) -> float:
        """This run's learning rate at optimizer step `step` (see `learning_rate_at`)."""
        return learning_rate_at(step, total_steps, self.learning_rate, self.lr_schedule, self.warmup_steps)


# ---- loss -------------------------------------------------------------------------------------------
def loss_value(name: str, residual: torch.Tensor) -> torch.Tensor:
    """The named loss of a residual against zero (mean over all elements)."""
    z = torch.zeros_like(residual)
    if name == "MSE":
        return F.mse_loss(residual, z)
    if name == "L1":
        return F.l1_loss(residual, z)
    if name == "Huber":
        return F.huber_loss(residual, z)
    if name == "SmoothL1":
        return F.smooth_l1_loss(residual, z)
    raise ValueError(f"unknown loss function '{name}', expected one of {', '.join(LOSS_FUNCTIONS)}")


def prediction_scale(denoise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                     sigma: torch.Tensor, ndim: int, floor: float = 1e-4) -> torch.Tensor:
    """c(σ) = ∂x0_pred/∂model_output, for a denoiser x0_pred = denoise(σ, model_output, x_t) that is affine
    in model_output (every diffusion parameterisation is): c = denoise(σ, 1, 0) - denoise(σ, 0, 0).

    (x0_pred - x0)/c is then the error in the model's own output space: ε for ε-prediction (c = -σ), v for
    v-prediction, the velocity for rectified flow (c = -σ). |c| is floored at `floor` (sign kept) so σ ≈ 0
    cannot divide by zero. Shape (batch, 1, ..., 1), float32.
    """
    shape = (sigma.shape[0],) + (1,) * (ndim - 1)
    one = torch.ones(shape, dtype=torch.float32, device=sigma.device)
    zero = torch.zeros_like(one)
    s = sigma.float()
    c = denoise(s, one, zero) - denoise(s, zero, zero)
    return torch.where(c.abs() < floor, torch.full_like(c, floor) * torch.sign(c + 1e-12), c)


def prediction_residual(x0_pred: torch.Tensor, x0: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The error the loss is taken of, in float32 (float64 if an input is): x0 space (scale None) or the
    model's prediction space ((x0_pred - x0)/c, see `prediction_scale`)."""
    dtype = torch.promote_types(torch.promote_types(x0_pred.dtype, x0.dtype), torch.float32)
    residual = x0_pred.to(dtype) - x0.to(dtype)
    return residual if scale is None else residual / scale


# ---- optimizer and randomness -----------------------------------------------------------------------
def make_optimizer(name: str, params: Iterable[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """One of OPTIMIZERS with torch's defaults except the learning rate, and foreach=True: one multi-tensor
    kernel per update op for all the layers' B, where torch's CPU default loops over them in Python (~10 ops per
    parameter: ~2-3 ms per step for the 85 layers of tiny SDXL's `all`). The same arithmetic per element, so
    the same B step for step (tests/test_train.py compares both)."""
    classes = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam, "SGD": torch.optim.SGD, "RMSprop": torch.optim.RMSprop}
    if name not in classes:
        raise ValueError(f"unknown optimizer '{name}', expected one of {', '.join(OPTIMIZERS)}")
    return classes[name](list(params), lr=lr, foreach=True)


def learning_rate_at(step: int, total_steps: int, base_lr: float, schedule: str = "constant", warmup_steps: int = 0) -> float:
    """The learning rate of optimizer step `step` (0-based, counted over the whole run, resumed steps included)
    of a run of `total_steps` steps.

    Warm-up (step < warmup_steps): lr = base·(step + 1)/warmup_steps, rising linearly so that the first step
    already moves (step 0 of a plain 0 → base ramp would be a wasted step) and the last warm-up step reaches
    base. After it, with p = (step - warmup_steps)/(total_steps - warmup_steps) ∈ [0, 1):
    constant: base; linear: base·(1 - p); cosine: base·(1 + cos πp)/2. Neither decay reaches 0 on a step that
    is taken (p < 1), and a resumed run with the same total gets the same value at every step.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule '{schedule}' is not one of {', '.join(LR_SCHEDULES)}")
    step, total, warmup = int(step), int(total_steps), max(0, int(warmup_steps))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return float(base_lr)
    p = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return base_lr * (1.0 - p)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * p))


def step_seed(seed: int, micro: int) -> int:
    """A generator seed for one micro-step, from (seed, micro-step index) only (SplitMix-style odd
    multipliers, so neighbouring seeds and steps do not give related streams): runs and resumed runs draw
    the same."""
    return (int(seed) * 0x9E3779B97F4A7C15 + int(micro) * 0xBF58476D1CE4E5B9 + 1) % (2 ** 63)


# ---- batching ----------------------------------------------------------------------------------------
@dataclass
class ShapeGroup:
    """Images of one shape (a resolution bucket): their latents (n, C, ...) stacked, and their indices in the
    input order (what pairs each with its caption)."""
    latents: torch.Tensor
    index: list[int]


def group_by_shape(images: list[torch.Tensor], buckets: list[int] | None = None) -> list[ShapeGroup]:
    """(1, C, ...) images -> one group per shape, in order of first appearance: a batch never mixes shapes.
    With `buckets` (bucket mode: the bucket of each image, e.g. which LATENT input it came from), one group
    per bucket instead, as given; a bucket must hold one shape."""
    keys = [tuple(t.shape[1:]) for t in images] if buckets is None else list(buckets)
    found: dict[object, list[int]] = {}
    for i, key in enumerate(keys):
        found.setdefault(key, []).append(i)
    for key, idx in found.items():
        shapes = {tuple(images[i].shape[1:]) for i in idx}
        if len(shapes) > 1:
            raise ValueError(f"bucket {key} holds images of {len(shapes)} shapes {sorted(shapes)}: a bucket must have one shape")
    return [ShapeGroup(torch.cat([images[i] for i in idx]), idx) for idx in found.values()]


@dataclass
class MicroBatch:
    """What one micro-step trains on, drawn from (seed, micro) only: the group, the positions of its images
    within the group, their noise (CPU, float32) and their timesteps as fractions of the schedule in [0, 1)."""
    group: int
    picks: list[int]
    noise: torch.Tensor
    timesteps: list[float]


def draw_micro_batch(seed: int, micro: int, group_sizes: list[int], sample_shapes: list[tuple], batch_size: int) -> MicroBatch:
    """The seeded draw of micro-step `micro`: a group with probability proportional to its size (each image
    is equally likely to be trained on, whatever its resolution), then up to batch_size distinct images of
    it, their noise and their timesteps - in this order from one generator seeded by `step_seed`."""
    gen = torch.Generator().manual_seed(step_seed(seed, micro))
    group = 0
    if len(group_sizes) > 1:
        group = int(torch.multinomial(torch.tensor([float(n) for n in group_sizes]), 1, generator=gen))
    picks = torch.randperm(group_sizes[group], generator=gen)[:batch_size].tolist()
    noise = torch.randn((len(picks),) + tuple(sample_shapes[group]), generator=gen)
    timesteps = torch.rand(len(picks), generator=gen).tolist()
    return MicroBatch(group, picks, noise, timesteps)


# ---- validation --------------------------------------------------------------------------------------
def split_validation(n_images: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) image indices, both ascending: round(fraction·n) images, at least 1 when fraction > 0,
    chosen by a permutation seeded with `seed`; at least one image stays for training."""
    if fraction <= 0:
        return list(range(n_images)), []
    k = max(1, round(fraction * n_images))
    if k >= n_images:
        raise ValueError(f"validation_split {fraction} holds out {k} of {n_images} images: none would be left to train on")
    held = sorted(torch.randperm(n_images, generator=torch.Generator().manual_seed(int(seed) % (2 ** 63)))[:k].tolist())
    return [i for i in range(n_images) if i not in set(held)], held


@dataclass
class ValidationPoint:
    """One fixed evaluation of a held-out image: its index, noise (CPU, float32) and timestep fraction."""
    image: int
    noise: torch.Tensor
    timestep: float


def validation_points(shapes: list[tuple], points_per_image: int = 4) -> list[ValidationPoint]:
    """The fixed draw of the validation loss: for each held-out image (shape (C, ...)), `points_per_image`
    timesteps at the centres of equal strata of the schedule, (k + 0.5)/K, each with its own noise from one
    generator seeded with VALIDATION_SEED. It depends on nothing else - not the step, not the training seed -
    so validation losses are comparable across the steps of a run and across runs on the same images."""
    gen = torch.Generator().manual_seed(VALIDATION_SEED)
    out = []
    for i, shape in enumerate(shapes):
        for k in range(points_per_image):
            out.append(ValidationPoint(i, torch.randn((1,) + tuple(shape), generator=gen), (k + 0.5) / points_per_image))
    return out


# ---- gradient checkpointing -------------------------------------------------------------------------
def checkpoint_units(module: torch.nn.Module, depth: int = DEFAULT_CHECKPOINT_DEPTH) -> list[torch.nn.Module]:
    """The modules at `depth` below `module`, counted as ComfyUI's Train LoRA counts its ``checkpoint_depth``
    (``find_modules_at_depth``): `module` itself is depth 1, each non-container module one level deeper, and
    containers (ModuleList, Sequential, ModuleDict) do not count. These are the units whose activations
    gradient checkpointing recomputes. Depth 2 (the default here) is the diffusion model's blocks; depth 1
    is the whole model as one unit, which saves nothing at the peak (its backward recomputes and holds every
    activation at once); deeper units save less memory and recompute less. A branch that ends above `depth`
    contributes nothing (as in core)."""
    if depth < 1:
        raise ValueError(f"checkpoint depth must be at least 1, got {depth}")
    if depth == 1:
        return [module]
    out = []
    for child in module.children():
        container = isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict))
        out.extend(checkpoint_units(child, depth if container else depth - 1))
    return out


def _same_attention_kernel(inner: Callable) -> Callable:
    """`inner` with scaled-dot-product attention kept off cuDNN's kernel, in the forward and in its
    recomputation alike. Measured on an H200 (torch 2.11, Flux at 1024 px): the forward ran cuDNN's attention
    (statistics saved as (B, H, S, 1)) and the recomputation in backward the memory-efficient kernel
    ((B, H, S) and a philox seed), which torch.utils.checkpoint refuses as different saved tensors. Without
    cuDNN the choice among flash / memory-efficient / math depends on the inputs only, which are the same.
    (The GPU could not be had again in that session: this fix is checked on the CPU only.)"""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

    def run(*args, **kwargs):
        with sdpa_kernel(backends):
            return inner(*args, **kwargs)
    return run


def enable_checkpointing(units: Iterable[torch.nn.Module], network: ParaNetwork | None = None) -> Callable[[], None]:
    """Recompute each unit's activations in backward instead of storing them (less memory, one more
    forward per unit). With the (attached) network, each unit's last PaRa layer keeps its output rather than
    being computed again (`ParaNetwork.set_checkpoint_units`). Returns the undo (see
    `forward_patch.wrap_forwards`)."""
    def make_forward(_m, inner):
        pinned = _same_attention_kernel(inner)

        def fwd(*args, **kwargs):
            return torch.utils.checkpoint.checkpoint(pinned, *args, use_reentrant=False, **kwargs)
        return fwd
    units = list(units)
    undo_forwards = wrap_forwards(units, make_forward)
    if network is None:
        return undo_forwards
    network.set_checkpoint_units(units)

    def undo() -> None:
        network.set_checkpoint_units([])
        undo_forwards()
    return undo


# ---- the optimizer-step loop ------------------------------------------------------------------------
class TrainingLoop:
    """Optimizer steps over accumulated micro-batches; losses kept on the device, read one step late.

    micro_loss(micro) returns the (0-d) loss of micro-batch `micro` = step·grad_accumulation_steps + j;
    it runs the model forward and must draw its randomness from `micro` only (see `step_seed`).
    step_context() is entered around each forward+backward (ParaNetwork.step: every Q once per micro-step).
    check() is called before every micro-step and before every optimizer step (interrupts).
    learning_rate(step), if given, sets every parameter group's lr before optimizer step `step` (a schedule,
    see `learning_rate_at`); without it the optimizer's own lr is used.

    `losses` is the exact history (mean of the micro losses of each step, as Python floats); `flush()` brings
    it up to date, `last_loss` is the newest value read (one step behind while running).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, micro_loss: Callable[[int], torch.Tensor],
                 grad_accumulation_steps: int = 1, losses: list[float] | None = None,
                 step_context: Callable[[], AbstractContextManager] | None = None,
                 check: Callable[[], None] | None = None, learning_rate: Callable[[int], float] | None = None):
        if grad_accumulation_steps < 1:
            raise ValueError(f"grad_accumulation_steps must be at least 1, got {grad_accumulation_steps}")
        self.optimizer = optimizer
        self.micro_loss = micro_loss
        self.accumulate = int(grad_accumulation_steps)
        self.losses: list[float] = losses if losses is not None else []
        self.step_context = step_context or nullcontext
        self.check = check or (lambda: None)
        self.learning_rate = learning_rate
        self._pending: list[torch.Tensor] = []  # per unread step: its micro losses (detached, on the device)

    def step(self, step: int) -> None:
        """One optimizer step (absolute index `step`): all micro-batches, backward of loss/accumulate each."""
        micro_losses = []
        for j in range(self.accumulate):
            self.check()
            with self.step_context():
                loss = self.micro_loss(step * self.accumulate + j)
                (loss / self.accumulate).backward()
            micro_losses.append(loss.detach().reshape(()))
        self.check()
        if self.learning_rate is not None:
            lr = self.learning_rate(step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._pending.append(torch.stack(micro_losses))
        if len(self._pending) > 1:  # read the previous step now: its work is done, this one's is queued
            self._read(len(self._pending) - 1)

    def _read(self, n: int) -> None:
        for t in self._pending[:n]:
            values = t.double().cpu().tolist()  # float32 losses are exact in float64
            self.losses.append(sum(values) / len(values))
        del self._pending[:n]

    def flush(self) -> list[float]:
        """Read every pending loss (one host synchronisation); returns the exact history."""
        self._read(len(self._pending))
        return self.losses

    @property
    def last_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    def run(self, start_step: int, total_steps: int, after_step: Callable[[int], None] | None = None) -> list[float]:
        """Steps start_step .. total_steps-1; after_step(done) after each (done = steps completed so far)."""
        for step in range(start_step, total_steps):
            self.step(step)
            if after_step is not None:
                after_step(step + 1)
        return self.flush()


# ---- the .para_state sidecar ------------------------------------------------------------------------
def state_path(para_path: str) -> str:
    """The training-state sidecar of a PaRa file: <stem>.para_state (safetensors; not listed as a PaRa)."""
    stem = para_path[:-len(".safetensors")] if para_path.endswith(".safetensors") else para_path
    return stem + STATE_SUFFIX


def state_tensors(network: ParaNetwork, optimizer: torch.optim.Optimizer, losses: list[float]) -> dict[str, torch.Tensor]:
    """b.<module> (fp32 B), optim.<module>.<key> (the optimizer's per-parameter state) and loss."""
    tensors = {f"b.{n}": layer.b.detach().to("cpu", torch.float32).contiguous() for n, layer in network.items()}
    state = optimizer.state_dict()["state"]
    for i, name in enumerate(network.names):
        for k, v in state.get(i, {}).items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"optim.{name}.{k}"] = t.detach().to("cpu").contiguous()
    tensors["loss"] = torch.tensor(losses, dtype=torch.float64) if losses else torch.zeros(0, dtype=torch.float64)
    return tensors


def state_metadata(optimizer: torch.optim.Optimizer, step: int, seed: int) -> dict[str, str]:
    groups = [{k: v for k, v in g.items() if k != "params" and isinstance(v, (int, float, str, bool, list, tuple, type(None)))}
              for g in optimizer.state_dict()["param_groups"]]
    return {"format": STATE_FORMAT, "version": STATE_VERSION, "step": str(int(step)), "optimizer": type(optimizer).__name__,
            "seed": str(int(seed)), "param_groups": json.dumps(groups, sort_keys=True)}


def save_with_state(para: ParaModel, path: str, network: ParaNetwork, optimizer: torch.optim.Optimizer,
                    losses: list[float], step: int, seed: int) -> None:
    """Write the PaRa file and its sidecar, each atomically, never overwriting; no sidecar survives a
    failed file write (a sidecar alone would be picked up by a later file of the same name)."""
    side = state_path(path)
    safetensors_io.save_file(state_tensors(network, optimizer, losses), side, state_metadata(optimizer, step, seed))
    try:
        para.save(path)
    except BaseException:
        try:
            os.unlink(side)
        except OSError:
            pass
        raise


@dataclass
class TrainState:
    """A validated sidecar: B per module (fp32), the raw tensors (optimizer state, loss) and metadata."""
    path: str
    b: dict[str, torch.Tensor]
    tensors: dict[str, torch.Tensor] = field(repr=False)
    meta: dict[str, str]

    @property
    def losses(self) -> list[float]:
        t = self.tensors.get("loss")
        return [] if t is None else [float(x) for x in t.double().tolist()]


def read_state(para: ParaModel, path: str | None = None) -> TrainState | None:
    """The sidecar of `para` (default: state_path(para.source)); None if there is none.

    Raises ParaFormatError (one line naming the sidecar, and the key where one is at fault) if it is not a
    PaRa training state or was not written together with this file: other modules, other shapes, another
    step count, or a B whose span is not the file's Q. The optimizer state is checked by `restore_optimizer`.
    """
    path = path or state_path(para.source)
    if not os.path.exists(path):
        return None
    try:
        tensors, meta = safetensors_io.load_file(path)
    except ParaError as e:
        raise ParaFormatError(f"{path}: unreadable training state: {e}") from None
    if meta.get("format") != STATE_FORMAT:
        raise ParaFormatError(f"{path}: not a PaRa training state (format={meta.get('format')!r})")
    bs = {k[2:]: v for k, v in tensors.items() if k.startswith("b.")}
    extra, missing = sorted(set(bs) - set(para.stages)), sorted(set(para.stages) - set(bs))
    if extra or missing:
        which = f"b.{extra[0]} is not in {para.source}" if extra else f"it has no b.{missing[0]}"
        raise ParaFormatError(f"{path}: training state of other layers than {para.source} ({which})")
    file_steps = parse_training_metadata(para).get("steps")
    if file_steps is not None and str(meta.get("step")) != str(file_steps):
        raise ParaFormatError(f"{path}: training state of step {meta.get('step')}, but {para.source} was saved at step {file_steps}")
    for m, b in bs.items():
        q = para.stages[m][0].to(torch.float64)
        if b.shape != q.shape:
            raise ParaFormatError(f"{path}: b.{m} has shape {tuple(b.shape)}, {para.source} has {tuple(q.shape)}")
        if not torch.isfinite(b).all():
            raise ParaFormatError(f"{path}: b.{m} is not finite")
        qb = torch.linalg.qr(b.to(torch.float64))[0]
        if float((q - qb @ (qb.T @ q)).abs().max()) > SPAN_TOLERANCE:
            raise ParaFormatError(f"{path}: b.{m} does not span the basis {m} of {para.source}: not its training state")
    return TrainState(path, {m: bs[m].to(torch.float32) for m in sorted(bs)}, tensors, meta)


def restore_optimizer(optimizer: torch.optim.Optimizer, network: ParaNetwork, state: TrainState) -> bool:
    """Load the sidecar's optimizer state into `optimizer` (built over the network's B in `names` order).
    False (nothing changed) if it was written by another optimizer class; ParaFormatError if a tensor has
    another shape than its parameter. Tensors are cloned: the optimizer updates them in place, and the
    loaded ones may be inference tensors."""
    if state.meta.get("optimizer") != type(optimizer).__name__:
        return False
    per_param = {}
    for i, name in enumerate(network.names):
        prefix = f"optim.{name}."
        entry = {k[len(prefix):]: v for k, v in state.tensors.items() if k.startswith(prefix)}
        b = network.layer(name).b
        for k, v in entry.items():
            if k != "step" and v.ndim and tuple(v.shape) != tuple(b.shape):
                raise ParaFormatError(f"{state.path}: optim.{name}.{k} has shape {tuple(v.shape)}, B is {tuple(b.shape)}")
        if entry:
            per_param[i] = {k: (v.to(b.device) if k != "step" else v).clone() for k, v in entry.items()}
    sd = optimizer.state_dict()
    sd["state"] = per_param
    optimizer.load_state_dict(sd)
    return True


def stages_b(para: ParaModel, state: TrainState | None) -> dict[str, torch.Tensor]:
    """The B to continue training from: the sidecar's exact fp32 B, else the file's stage-0 bases."""
    if state is not None:
        return dict(state.b)
    return {m: chain[0].to(torch.float32) for m, chain in sorted(para.stages.items())}


__all__ = [
    "TrainConfig", "TrainState", "TrainingLoop", "OPTIMIZERS", "LOSS_FUNCTIONS", "LOSS_SPACES", "DTYPES",
    "STATE_SUFFIX", "STATE_FORMAT", "loss_value", "prediction_scale", "prediction_residual", "make_optimizer",
    "LR_SCHEDULES", "learning_rate_at", "split_validation", "ValidationPoint", "validation_points", "VALIDATION_SEED",
    "step_seed", "ShapeGroup", "group_by_shape", "MicroBatch", "draw_micro_batch", "checkpoint_units", "enable_checkpointing", "state_path", "state_tensors", "state_metadata",
    "save_with_state", "read_state", "restore_optimizer", "stages_b",
]
