"""The training loop: minibatch steps with an optimizer, a loss and a learning-rate schedule.

`train` runs epochs over `PreparedData` rows: each step sets the learning rate from the
schedule, clips the gradient norm and undoes steps whose loss or gradient is not finite
(checked in windows on an accelerator, so the host never waits inside a step: see
`steps_between_checks`); each epoch ends with the validation loss, the best weights so far and early
stopping. When a process group is initialised (see `process_group`), every process trains
on its own shard of each epoch's rows and `DistributedDataParallel` averages the gradients.

Example:
    >>> import functools, torch
    >>> from pyroflows import flows
    >>> from pyroflows.training import prepare_data, train
    >>> flow = flows.maf(2, num_layers=1, hidden_dims=(8,))
    >>> prepared = prepare_data(flow, torch.randn(200, 2))
    >>> prepared.attach_maps(flow)
    >>> history = train(
    ...     flow,
    ...     prepared,
    ...     epochs=3,
    ...     optimizer=functools.partial(torch.optim.SGD, lr=1e-2, momentum=0.9),
    ...     schedule="constant",
    ...     progress=False,
    ... )
    >>> history.epochs_run, history.learning_rate
    (3, [0.01, 0.01, 0.01])
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pyro
import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..checks import check_int, check_real
from ..distribution import Flow
from .data import PreparedData, _first_parameter
from .sizing import batch_size_for, epochs_for

__all__ = [
    "FitHistory",
    "train",
    "negative_log_likelihood",
    "cosine_schedule",
    "constant_schedule",
    "steps_between_checks",
    "Loss",
    "Schedule",
    "OptimizerFactory",
]

#: ``loss(flow, x, context) -> scalar``: the quantity each step minimises.
Loss = Callable[[Flow, Tensor, Tensor | None], Tensor]
#: ``schedule(step, total_steps) -> factor`` of each parameter group's peak learning rate.
Schedule = Callable[[int, int], float]
#: ``factory(parameters) -> optimizer``, e.g. ``functools.partial(torch.optim.SGD, lr=0.1)``.
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]

#: Training stops (keeping the best weights) after this many non-finite steps.
MAX_REJECTED_STEPS = 20
#: Steps between finiteness checks on an accelerator (see `steps_between_checks`).
ACCELERATOR_CHECK_EVERY = 16


@dataclass
class FitHistory:
    """What happened during `fit` (or `train`).

    Losses are per row, in nats, on the user's scale (log-determinant of any
    standardisation included): the training loss is the loss of `train` (by default the
    mean negative log-likelihood), the validation loss is always the mean negative
    log-likelihood.

    Attributes:
        train_loss: training loss of each epoch (mean over its accepted steps).
        val_loss: validation loss after each epoch (empty without a validation set).
        learning_rate: learning rate (of the first parameter group) at the end of each epoch.
        best_epoch: epoch (0-based) whose weights the flow holds at the end.
        best_val_loss: validation loss of that epoch (``nan`` without a validation set).
        epochs_run: number of epochs run.
        stopped_early: whether early stopping ended training.
        wall_time: seconds spent in `fit` (in `train` when called alone).
        rejected_steps: one entry per step whose loss or gradient was not finite:
            the step was undone (the best weights restored, the optimizer state cleared)
            and the learning rate halved. On an accelerator, where steps are checked in
            windows (`steps_between_checks`), the steps after it in its window are undone
            too and their rows are not counted.
        num_train: rows used for training (over all processes).
        num_val: rows used for validation.
        standardized: ``"fitted"``, ``"kept"`` (the flow already had data transforms) or
            ``"off"``.
        world_size: number of data-parallel processes.
        batch_size: rows per step (per process), given or chosen by `batch_size_for`.
        max_epochs: the epoch limit, given or chosen by `epochs_for`.
    """

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    learning_rate: list[float] = field(default_factory=list)
    best_epoch: int = -1
    best_val_loss: float = math.nan
    epochs_run: int = 0
    stopped_early: bool = False
    wall_time: float = 0.0
    rejected_steps: list[dict[str, Any]] = field(default_factory=list)
    num_train: int = 0
    num_val: int = 0
    standardized: str = "off"
    world_size: int = 1
    batch_size: int = 0
    max_epochs: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return asdict(self)


def negative_log_likelihood(flow: Flow, x: Tensor, context: Tensor | None) -> Tensor:
    """Mean negative log-likelihood of the rows ``x`` given ``context``: the default loss."""
    return -flow.condition(context).log_prob(x).mean()


def cosine_schedule(step: int, total: int) -> float:
    """Half a cosine from 1 at step 0 down to 0 at step ``total``."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def constant_schedule(step: int, total: int) -> float:
    """1 at every step."""
    return 1.0


_SCHEDULES: dict[str, Schedule] = {
    "cosine": cosine_schedule,
    "plateau": constant_schedule,  # and halved on stalls, by the loop
    "constant": constant_schedule,
}


def train(
    flow: Flow,
    data: PreparedData,
    *,
    epochs: int | None = None,
    batch_size: int | None = None,
    optimizer: torch.optim.Optimizer | OptimizerFactory | None = None,
    loss: Loss | None = None,
    schedule: str | Schedule = "cosine",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    clip_grad_norm: float | None = 5.0,
    patience: int | None = 20,
    seed: int = 0,
    compile: bool | str = False,
    progress: bool = True,
) -> FitHistory:
    """Train ``flow`` on prepared rows where it is; it ends with its best epoch's weights.

    The flow trains on the device of its parameters (rows that would take over a quarter of
    the free GPU memory stay on the host and stream through pinned buffers) and ends in the
    train/eval mode it started in, also when an exception stops training. Rows go through
    the flow's data maps, so attach them first (`PreparedData.attach_maps`). With an
    initialised process group every process calls `train` with the same rows.

    Args:
        flow: the flow to train, in place.
        data: rows from `prepare_data`.
        epochs: maximum number of passes over the training rows (default: `epochs_for`,
            a budget of 25,000 steps, at most 200 epochs).
        batch_size: rows per step, per process when distributed (default: `batch_size_for`
            the training rows, ``N / 64`` within ``[64, 512]``).
        optimizer: an optimizer over the flow's parameters, or a factory called with them;
            default ``torch.optim.Adam(lr=lr, weight_decay=weight_decay)``. The schedule
            scales each group's ``initial_lr`` (its ``lr`` at first use, as in torch's
            schedulers).
        loss: ``loss(flow, x, context) -> scalar`` (default `negative_log_likelihood`).
        schedule: ``"cosine"`` (decay to 0 over ``epochs``), ``"plateau"`` (halve the rate
            when validation stalls for ``patience // 2`` epochs), ``"constant"``, or a
            callable ``(step, total_steps) -> factor``.
        lr: peak learning rate of the default Adam.
        weight_decay: weight decay of the default Adam.
        clip_grad_norm: largest gradient norm (``None``: no clipping).
        patience: epochs without validation improvement before stopping (``None``: never).
        seed: seeds the shuffling (``seed + 1``, a private generator).
        compile: compile the loss, forward and backward with `torch.compile` (``True``:
            inductor, or a backend's name); evaluation stays eager.
        progress: show a progress bar (only on the main process).

    Returns:
        A `FitHistory`.
    """
    _check_settings(epochs, batch_size, lr, weight_decay, clip_grad_norm, schedule, patience)
    _check_parts(flow, optimizer, loss, seed, compile)
    start, was_training = time.perf_counter(), flow.training
    rank, world = _rank_and_world()
    device = _first_parameter(flow).device
    x_train, c_train, x_val, c_val = _place_rows(flow, data, device)
    per_rank = rows_per_rank(len(x_train), world)
    batch_size = batch_size_for(per_rank) if batch_size is None else batch_size
    epochs = epochs_for(per_rank, batch_size) if epochs is None else epochs
    steps = _Steps(
        flow,
        _loss_module(flow, loss or negative_log_likelihood, world, device, compile),
        _optimizer(flow, optimizer, lr, weight_decay),
        _SCHEDULES[schedule] if isinstance(schedule, str) else schedule,
        clip_grad_norm,
        epochs * math.ceil(per_rank / batch_size),
        device,
    )
    history = FitHistory(
        num_train=len(x_train),
        num_val=len(x_val),
        world_size=world,
        batch_size=batch_size,
        max_epochs=epochs,
    )
    history.standardized, best = data.standardized, _Best(flow)
    shuffle = torch.Generator().manual_seed(seed + 1)
    show = progress and rank == 0
    try:
        with tqdm(total=epochs, desc="fit", unit="epoch", disable=not show) as bar:
            for epoch in range(epochs):
                order = torch.randperm(len(x_train), generator=shuffle, device="cpu")
                mine = order[: per_rank * world][rank::world]
                flow.train()
                batches = _batches(x_train, c_train, mine, batch_size, device)
                history.train_loss.append(steps.epoch(epoch, batches, best, history))
                history.learning_rate.append(steps.optimizer.param_groups[0]["lr"])
                history.epochs_run = epoch + 1
                if len(x_val):
                    history.val_loss.append(_evaluate(flow, x_val, c_val, batch_size, device))
                if _end_of_epoch(history, best, steps, schedule == "plateau", patience, bar):
                    break
        flow.load_state_dict(best.state)
    finally:
        flow.train(was_training)
    history.best_epoch = best.epoch
    history.best_val_loss = best.loss if len(x_val) else math.nan
    history.wall_time = time.perf_counter() - start
    return history


def rows_per_rank(num_rows: int, world: int) -> int:
    """Training rows each of ``world`` processes gets per epoch (the rest are left out)."""
    if num_rows // world < 1:
        raise ValueError(f"{num_rows} training rows cannot be split over {world} processes")
    return num_rows // world


def _check_settings(
    epochs: Any,
    batch_size: Any,
    lr: Any,
    weight_decay: Any,
    clip_grad_norm: Any,
    schedule: Any,
    patience: Any,
) -> None:
    """A `ValueError` for the first invalid number or schedule of `train`."""
    check_int("epochs", epochs, optional=True)
    check_int("batch_size", batch_size, optional=True)
    check_real("lr", lr, positive=True)
    if check_real("weight_decay", weight_decay) < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    check_real("clip_grad_norm", clip_grad_norm, positive=True, optional=True)
    if not (callable(schedule) or schedule in _SCHEDULES):
        raise ValueError(
            f"schedule must be 'cosine', 'plateau', 'constant' or a callable, got {schedule!r}"
        )
    check_int("patience", patience, optional=True)


def _check_parts(flow: Flow, optimizer: Any, loss: Any, seed: Any, compile: Any) -> None:
    """A `TypeError` or `ValueError` for the first invalid part or option of `train`."""
    _first_parameter(flow)  # a Flow with parameters
    if isinstance(optimizer, torch.optim.Optimizer):
        own = {id(p) for p in flow.parameters()}
        if any(id(p) not in own for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("the optimizer holds parameters that are not the flow's")
    elif optimizer is not None and not callable(optimizer):
        raise TypeError(f"optimizer must be a torch optimizer or a factory, got {optimizer!r}")
    if loss is not None and not callable(loss):
        raise TypeError(f"loss must be callable as loss(flow, x, context), got {loss!r}")
    check_int("seed", seed, 0)
    if isinstance(compile, str) and compile not in torch.compiler.list_backends(exclude_tags=()):
        raise ValueError(
            f"compile={compile!r} is not a torch.compile backend; use True or one of "
            f"{', '.join(torch.compiler.list_backends())}"
        )


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 without a process group)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    return 0, 1


def _optimizer(
    flow: Flow,
    optimizer: torch.optim.Optimizer | OptimizerFactory | None,
    lr: float,
    weight_decay: float,
) -> torch.optim.Optimizer:
    """The optimizer given, the one its factory makes, or Adam."""
    if optimizer is None:
        return torch.optim.Adam(flow.parameters(), lr=lr, weight_decay=weight_decay)
    if not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer(list(flow.parameters()))
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"the optimizer factory returned {type(optimizer).__name__}")
    return optimizer


class _LossModule(nn.Module):
    """The loss as a module, so `DistributedDataParallel` can wrap it."""

    def __init__(self, flow: Flow, loss: Loss):
        super().__init__()
        self.flow = flow
        self.loss = loss

    def forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        return self.loss(self.flow, x, context)


def _loss_module(
    flow: Flow, loss: Loss, world: int, device: torch.device, compile: bool | str
) -> nn.Module:
    """The loss, wrapped in `DistributedDataParallel` when distributed, compiled if asked."""
    module: nn.Module = _LossModule(flow, loss)
    if world > 1:
        module = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None
        )
    if compile:
        module = torch.compile(module, backend=compile if isinstance(compile, str) else "inductor")
    return module


class _Best:
    """The best epoch so far: its weights, its loss and the epochs since it."""

    def __init__(self, flow: Flow):
        self.flow = flow
        self.state = copy.deepcopy(flow.state_dict())
        self.loss, self.epoch, self.stall = math.inf, -1, 0

    def update(self, epoch: int, loss: float, validated: bool) -> bool:
        """Record ``epoch`` if it improves (any finite loss counts without validation)."""
        improved = loss < self.loss if validated else math.isfinite(loss)
        if improved:
            self.loss = loss if validated else self.loss
            self.state = copy.deepcopy(self.flow.state_dict())
            self.epoch, self.stall = epoch, 0
        else:
            self.stall += 1
        return improved


class _Steps:
    """The optimizer side of the loop: learning rates, steps, and non-finite steps undone."""

    def __init__(
        self,
        flow: Flow,
        loss: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        clip_grad_norm: float | None,
        total: int,
        device: torch.device,
    ):
        self.flow, self.loss, self.optimizer = flow, loss, optimizer
        self.schedule, self.clip, self.total, self.device = schedule, clip_grad_norm, total, device
        self.peaks = [
            group.setdefault("initial_lr", group["lr"]) for group in optimizer.param_groups
        ]
        self.lr_scale, self.count = 1.0, 0
        self.check_every = steps_between_checks(device)

    def epoch(
        self,
        epoch: int,
        batches: Iterable[tuple[Tensor, Tensor | None]],
        best: _Best,
        history: FitHistory,
    ) -> float:
        """Step through ``batches``; the mean loss of the accepted steps (over processes).

        Steps are checked for finite losses and gradients every `steps_between_checks`
        steps, so that on a GPU the host queues steps without waiting for them.
        """
        total = torch.zeros((), dtype=torch.float64, device=self.device)  # read once
        count, window = 0, _Window(epoch)
        for b, (xb, cb) in enumerate(batches):
            window.add(b, len(xb), self._step(xb, cb))
            if len(window.stats) < self.check_every:
                continue
            count += window.settle(self, total, best, history)
            if len(history.rejected_steps) >= MAX_REJECTED_STEPS:
                break
        if window.stats:
            count += window.settle(self, total, best, history)
        return _reduce_mean(float(total), count, self.device)

    def _step(self, x: Tensor, c: Tensor | None) -> Tensor:
        """One step, applied without waiting for it; its loss and gradient norm (a tensor)."""
        factor = self.schedule(self.count, self.total)
        for group, peak in zip(self.optimizer.param_groups, self.peaks, strict=True):
            group["lr"] = peak * self.lr_scale * factor
        self.count += 1
        self.optimizer.zero_grad(set_to_none=True)
        # The rows were checked once for NaN/Inf; per-batch validation would only add a
        # host sync per step.
        with pyro.validation_enabled(False):
            loss = self.loss(x, c)
        loss.backward()
        norm = (
            nn.utils.clip_grad_norm_(self.flow.parameters(), self.clip)
            if self.clip is not None
            else _grad_norm(self.flow)
        )
        self.optimizer.step()
        return torch.stack([loss.detach(), norm.detach().to(loss.dtype)])

    def undo(self, best: _Best) -> None:
        """Back to the best weights with a fresh optimizer state and half the learning rate."""
        self.flow.load_state_dict(best.state)
        self.optimizer.state.clear()
        self.lr_scale *= 0.5


def steps_between_checks(device: torch.device) -> int:
    """How many training steps run between two checks that they were finite.

    Each check reads a value back from the device and so waits for every queued step. On
    the CPU that costs nothing and every step is checked; on an accelerator the host checks
    every `ACCELERATOR_CHECK_EVERY` steps (and at the end of each epoch).
    """
    return 1 if device.type in ("cpu", "meta") else ACCELERATOR_CHECK_EVERY


class _Window:
    """Steps applied since the last check: their batch numbers, row counts and statistics."""

    def __init__(self, epoch: int):
        self.epoch = epoch
        self.steps: list[tuple[int, int]] = []
        self.stats: list[Tensor] = []

    def add(self, step: int, rows: int, stats: Tensor) -> None:
        """Record an applied step's ``(loss, grad_norm)``."""
        self.steps.append((step, rows))
        self.stats.append(stats)

    def settle(self, steps: _Steps, total: Tensor, best: _Best, history: FitHistory) -> int:
        """Add the losses of the steps before the first non-finite one to ``total`` (in
        place) and return their rows; undo that step and the ones after it, if any."""
        bad = _non_finite(torch.stack(self.stats))
        first = bad.index(True) if True in bad else len(bad)
        for (_, rows), stats in zip(self.steps[:first], self.stats[:first], strict=True):
            total += stats[0].to(torch.float64) * rows
        accepted = sum(rows for _, rows in self.steps[:first])
        if first < len(bad):
            steps.undo(best)
            loss, grad_norm = self.stats[first].tolist()
            history.rejected_steps.append(
                {
                    "epoch": self.epoch,
                    "step": self.steps[first][0],
                    "loss": loss,
                    "grad_norm": grad_norm,
                    "new_lr_scale": steps.lr_scale,
                }
            )
        self.steps, self.stats = [], []
        return accepted


def _end_of_epoch(
    history: FitHistory,
    best: _Best,
    steps: _Steps,
    plateau: bool,
    patience: int | None,
    bar: Any,
) -> bool:
    """Track the best epoch, halve a stalled plateau rate, show progress; whether to stop."""
    validated = bool(history.val_loss)
    loss = history.val_loss[-1] if validated else history.train_loss[-1]
    improved = best.update(history.epochs_run - 1, loss, validated)
    if not improved and plateau and patience and best.stall % max(patience // 2, 1) == 0:
        steps.lr_scale *= 0.5
    bar.update(1)
    bar.set_postfix(
        train=f"{history.train_loss[-1]:.4f}",
        val=f"{history.val_loss[-1]:.4f}" if validated else "-",
    )
    if len(history.rejected_steps) >= MAX_REJECTED_STEPS:
        warnings.warn(
            f"fit: {MAX_REJECTED_STEPS} non-finite steps, stopping; the best weights are kept",
            RuntimeWarning,
            stacklevel=3,
        )
        return True
    history.stopped_early = patience is not None and validated and best.stall >= patience
    return history.stopped_early


def _place_rows(
    flow: Flow, data: PreparedData, device: torch.device
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """The training and validation rows and contexts, placed for the flow.

    Rows go through the flow's float64 data maps when it has them (so the learned layers
    see the float64-standardised values); otherwise they are cast to the flow's dtype. Each
    split moves to ``device`` with its contexts when it fits comfortably (a quarter of the
    free GPU memory); else both stay on the host and `_batches` streams them.
    """
    dtype = _first_parameter(flow).dtype
    x_dtype = torch.float64 if len(flow.data_transforms) else dtype
    c_dtype = torch.float64 if len(flow.context_transforms) else dtype
    placed = []
    for x, c in ((data.x_train, data.c_train), (data.x_val, data.c_val)):
        x, c = x.to(x_dtype), None if c is None else c.to(c_dtype)
        where = device if _fits(device, x, c) else torch.device("cpu")
        placed += [x.to(where), None if c is None else c.to(where)]
    return tuple(placed)  # type: ignore[return-value]


def _fits(device: torch.device, *tensors: Tensor | None) -> bool:
    """Whether ``tensors`` take under a quarter of the free memory of a CUDA ``device``
    (other devices: always)."""
    if device.type != "cuda":
        return True
    size = sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return size < 0.25 * torch.cuda.mem_get_info(device)[0]


def _batches(
    x: Tensor, c: Tensor | None, idx: Tensor, size: int, device: torch.device
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Rows ``x[idx]`` (and ``c[idx]``) in batches of ``size``, on ``device``.

    Rows already on ``device`` are gathered there (the indices move once, not batch by
    batch: each move would wait for the GPU); rows on the host are streamed (`_streamed`).
    """
    if x.device != device:
        yield from _streamed(x, c, idx, size, device)
        return
    idx_x = idx.to(x.device)
    idx_c = None if c is None else idx.to(c.device)
    for start in range(0, len(idx), size):
        rows = slice(start, start + size)
        yield x[idx_x[rows]], None if c is None else c[idx_c[rows]]


def _streamed(
    x: Tensor, c: Tensor | None, idx: Tensor, size: int, device: torch.device
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Host rows ``x[idx]`` (and ``c[idx]``) sent to ``device`` in batches of ``size``.

    Two host buffers (pinned where CUDA is available) take turns: the rows of a batch are
    gathered into one and copied to the device without waiting, while the device still
    works on the previous batch; a buffer is refilled only once its copy has finished.
    Each batch yielded is a view of a buffer unless ``device`` differs from the host, so it
    stays valid until the batch after next is requested.
    """
    buffers = [_Staging(x, c, min(size, len(idx)), device) for _ in range(2)]
    for k, start in enumerate(range(0, len(idx), size)):
        yield buffers[k % 2].send(x, c, idx[start : start + size])


class _Staging:
    """A host buffer for one batch of rows (and contexts) and the copy out of it."""

    def __init__(self, x: Tensor, c: Tensor | None, size: int, device: torch.device):
        pin = torch.cuda.is_available()
        self.x = torch.empty((size, *x.shape[1:]), dtype=x.dtype, pin_memory=pin)
        self.c = (
            None if c is None else torch.empty((size, *c.shape[1:]), dtype=c.dtype, pin_memory=pin)
        )
        self.device = device
        self.copied: Any = None  # a CUDA event: the last copy out of this buffer has finished

    def send(self, x: Tensor, c: Tensor | None, rows: Tensor) -> tuple[Tensor, Tensor | None]:
        """Gather ``rows`` into the buffer and start copying them to the device."""
        if self.copied is not None:
            self.copied.synchronize()
        n = len(rows)
        xb = torch.index_select(x, 0, rows, out=self.x[:n]).to(self.device, non_blocking=True)
        cb = None
        if c is not None:
            cb = torch.index_select(c, 0, rows, out=self.c[:n])
            cb = cb.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            self.copied = torch.cuda.Event()
            self.copied.record(torch.cuda.current_stream(self.device))
        return xb, cb


def _grad_norm(flow: Flow) -> Tensor:
    """The norm of all the flow's gradients (0 when none was computed)."""
    grads = [p.grad.detach().norm() for p in flow.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), device=_first_parameter(flow).device)
    return torch.stack(grads).norm()


def _non_finite(stats: Tensor) -> list[bool]:
    """For each row of ``stats``, whether it is not finite on some process (one host read)."""
    bad = (~torch.isfinite(stats)).any(1)
    if _rank_and_world()[1] > 1:
        bad = bad.to(torch.uint8)
        torch_dist.all_reduce(bad, op=torch_dist.ReduceOp.MAX)
    return [bool(flag) for flag in bad.tolist()]


def _reduce_mean(total: float, count: int, device: torch.device) -> float:
    """``total / count`` summed over all processes (``nan`` for no rows)."""
    if _rank_and_world()[1] > 1:
        t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        torch_dist.all_reduce(t)
        total, count = float(t[0]), int(t[1])
    return total / count if count else math.nan


@torch.no_grad()
def _evaluate(
    flow: Flow, x: Tensor, c: Tensor | None, batch_size: int, device: torch.device
) -> float:
    """Mean negative log-likelihood of the validation rows (``inf`` if not finite)."""
    flow.eval()
    rank, world = _rank_and_world()
    idx = torch.arange(rank, len(x), world)
    total = torch.zeros((), dtype=torch.float64, device=device)  # read once, at the end
    for xb, cb in _batches(x, c, idx, 4 * batch_size, device):
        with pyro.validation_enabled(False):  # the rows were checked once, up front
            total -= flow.condition(cb).log_prob(xb).sum().to(torch.float64)
    value = _reduce_mean(float(total), len(idx), device)
    return value if math.isfinite(value) else math.inf
