"""`train_guide`: fit any Pyro guide to a model with one call and a stopping rule.

The recipe: a vectorised multi-particle ELBO, Adam with gradient clipping, a learning rate
that decays whenever the ELBO stops improving, and a stop once it no longer improves at the
smallest learning rate. Optionally the model's likelihood is annealed in at the start.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from torch import Tensor
from tqdm.auto import tqdm

from ..checks import check_int, check_real, is_real

__all__ = ["train_guide", "GuideTraining"]

MAX_CONSECUTIVE_NONFINITE = 20
BETA_START = 0.01


@dataclass(frozen=True, repr=False)
class GuideTraining:
    """What happened in `train_guide`, one entry per step in each list.

    Attributes:
        losses: the loss (negative ELBO estimate) of each step; ``nan``/``inf`` for skipped
            steps. During annealing it is the loss of the tempered model.
        seconds: wall time since the start of training, at the end of each step.
        lrs: learning rate used by each step.
        num_steps: steps taken.
        stopped: ``"converged"`` (no improvement at the smallest learning rate) or
            ``"max_steps"``.
        nonfinite_steps: steps skipped because the loss or gradient was not finite.
        window: steps per window of the stopping rule.
        anneal_steps: the first steps, whose losses are those of the tempered model.
    """

    losses: list[float] = field(repr=False)
    seconds: list[float] = field(repr=False)
    lrs: list[float] = field(repr=False)
    num_steps: int
    stopped: str
    nonfinite_steps: int
    window: int
    anneal_steps: int = 0

    @property
    def elbo(self) -> np.ndarray:
        """The ELBO estimate of each step (the negated losses)."""
        return -np.asarray(self.losses, dtype=float)

    @property
    def final_loss(self) -> float:
        """Mean of the last ``window`` finite losses (``nan`` if there are none)."""
        finite = [x for x in self.losses if math.isfinite(x)][-self.window :]
        return sum(finite) / len(finite) if finite else math.nan

    def summary(self) -> str:
        """One line: why training stopped, after how many steps, and where."""
        seconds = self.seconds[-1] if self.seconds else 0.0
        lr = self.lrs[-1] if self.lrs else math.nan
        return (
            f"{self.stopped} after {self.num_steps} steps ({seconds:.1f} s): final loss "
            f"{self.final_loss:.4g}, lr {lr:.2g}, {self.nonfinite_steps} non-finite steps"
        )

    def __repr__(self) -> str:
        return f"GuideTraining({self.summary()})"


class _Temper(Messenger):
    """Multiply the scale of observed sample sites (``pyro.factor`` included) by ``beta``."""

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = beta

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and msg["is_observed"]:
            msg["scale"] = self.beta * msg["scale"]


def _plate_nesting(model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> int:
    """Plate dimensions used by the guide and by the model replayed on a guide draw."""
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    dims = [
        -frame.dim
        for trace in (guide_trace, model_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(dims, default=0)


def _default_loss(
    model: Callable, guide: Callable, num_particles: int, /, *args: Any, **kwargs: Any
) -> pyro.infer.ELBO:
    """Vectorised ``Trace_ELBO``, its ``max_plate_nesting`` found by tracing guide and model."""
    nesting = _plate_nesting(model, guide, *args, **kwargs)
    return pyro.infer.Trace_ELBO(
        num_particles=num_particles, vectorize_particles=True, max_plate_nesting=nesting
    )


def _beta(step: int, anneal_steps: int) -> float:
    """Annealing factor of the likelihood at ``step``: linear from `BETA_START` to 1."""
    return min(1.0, BETA_START + (1 - BETA_START) * step / max(anneal_steps, 1))


def _window_ends(step: int, anneal_steps: int, window: int) -> bool:
    """Whether ``step`` (0-based) closes a window of the stopping rule (annealing excluded)."""
    done = step + 1 - anneal_steps
    return done > 0 and done % window == 0


def _show(bar: tqdm, step: int, loss: float, lr: float) -> None:
    """Advance the progress bar by one step; every tenth step, show the loss and rate."""
    bar.update()
    if step % 10 == 0:
        bar.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.2g}", refresh=False)


def _window_stats(losses: list[float]) -> tuple[float, float]:
    """Mean and standard error (sd / sqrt(n)) of the finite losses of one window."""
    x = np.asarray([v for v in losses if math.isfinite(v)], dtype=float)
    if len(x) < 2:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x)))


class _Stepper:
    """One SVI step like `pyro.infer.SVI.step`, on a torch optimizer created on first use."""

    def __init__(
        self, loss: pyro.infer.ELBO, make_optimizer: Callable, clip_norm: float | None
    ) -> None:
        self.loss, self.make_optimizer, self.clip_norm = loss, make_optimizer, clip_norm
        self.optimizer: torch.optim.Optimizer | None = None
        self.known: set[int] = set()
        self.factor = 1.0  # learning-rate multiplier applied to every group's initial rate

    def _register(self, params: list[Tensor]) -> None:
        new = [p for p in params if id(p) not in self.known]
        if not new:
            return
        self.known.update(id(p) for p in new)
        if self.optimizer is None:
            self.optimizer = self.make_optimizer(new)
            groups = self.optimizer.param_groups
        else:
            self.optimizer.add_param_group({"params": new})
            groups = self.optimizer.param_groups[-1:]
        for group in groups:
            group["initial_lr"] = group["lr"]
            group["lr"] = group["initial_lr"] * self.factor

    def set_factor(self, factor: float) -> None:
        """Set every group's learning rate to its initial rate times ``factor``."""
        self.factor = factor
        for group in self.optimizer.param_groups if self.optimizer else ():
            group["lr"] = group["initial_lr"] * factor

    def __call__(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """Take one step; return the loss, or a non-finite one when the step was skipped."""
        with poutine.trace(param_only=True) as capture:
            loss = float(self.loss.loss_and_grads(model, guide, *args, **kwargs))
        params = list({id(p): p for p in _unconstrained(capture.trace)}.values())
        if not params:
            raise ValueError("train_guide: neither the guide nor the model has any parameters")
        self._register(params)
        grads = [p for p in params if p.grad is not None]
        max_norm = math.inf if self.clip_norm is None else self.clip_norm
        norm = torch.nn.utils.clip_grad_norm_(grads, max_norm) if grads else torch.zeros(())
        if math.isfinite(loss) and math.isfinite(norm):
            self.optimizer.step()
        elif math.isfinite(loss):
            loss = math.nan  # a finite loss with a non-finite gradient: skipped as well
        for p in params:
            p.grad = None
        return loss


def _unconstrained(trace: Trace) -> list[Tensor]:
    """The unconstrained tensors behind the param sites of ``trace``."""
    return [site["value"].unconstrained() for site in trace.nodes.values()]


class _Schedule:
    """The stopping rule: decay the learning rate after each window without improvement."""

    def __init__(self, lr: float, min_lr: float, decay: float) -> None:
        self.lr, self.min_lr, self.decay = lr, min_lr, decay
        self.best = math.inf

    def end_window(self, losses: list[float]) -> bool:
        """Update the learning rate from one window's losses; ``True`` means stop."""
        mean, se = _window_stats(losses)
        improved = mean < self.best - 2 * se  # False for nan (window of non-finite losses)
        self.best = min(self.best, mean) if math.isfinite(mean) else self.best
        if improved:
            return False
        if self.lr <= self.min_lr:
            return True
        self.lr = max(self.lr * self.decay, self.min_lr)
        return False


class _Record:
    """Per-step losses, times and learning rates; raises on a run of non-finite losses."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.seconds: list[float] = []
        self.lrs: list[float] = []
        self.nonfinite = self.streak = 0
        self.start = time.perf_counter()

    def add(self, step: int, loss: float, lr: float) -> None:
        """Record one step; raise after `MAX_CONSECUTIVE_NONFINITE` non-finite losses in a row."""
        self.losses.append(loss)
        self.seconds.append(time.perf_counter() - self.start)
        self.lrs.append(lr)
        self.streak = 0 if math.isfinite(loss) else self.streak + 1
        self.nonfinite += self.streak > 0
        if self.streak >= MAX_CONSECUTIVE_NONFINITE:
            raise RuntimeError(
                f"train_guide: {self.streak} consecutive steps had a non-finite loss or "
                f"gradient (steps {step + 1 - self.streak}-{step}, last loss {loss}); check the "
                "model's support and the guide's initialisation, or lower lr"
            )

    def result(self, stopped: str, window: int, anneal_steps: int) -> GuideTraining:
        """The record as a `GuideTraining`."""
        return GuideTraining(
            self.losses,
            self.seconds,
            self.lrs,
            len(self.losses),
            stopped,
            self.nonfinite,
            window,
            anneal_steps,
        )


def _check_options(
    *,
    num_particles: Any,
    lr: Any,
    min_lr: Any,
    max_steps: Any,
    window: Any,
    decay: Any,
    clip_norm: Any,
    loss: Any,
    optimizer: Any,
    anneal_steps: Any,
    callback: Any,
) -> None:
    """Raise a `ValueError` or `TypeError` naming the first invalid option of `train_guide`.

    Counts and rates go through `pyroflows.checks`; ``min_lr <= lr`` and ``0 < decay < 1``
    are rules of their own.
    """
    check_int("num_particles", num_particles)
    check_int("max_steps", max_steps)
    check_int("window", window, low=2)
    check_int("anneal_steps", anneal_steps, low=0)
    check_real("lr", lr, positive=True)
    check_real("min_lr", min_lr, positive=True)
    check_real("clip_norm", clip_norm, positive=True, optional=True)
    if min_lr > lr:
        raise ValueError(f"min_lr must be at most lr, got min_lr={min_lr!r} > lr={lr!r}")
    if not (is_real(decay) and 0 < decay < 1):
        raise ValueError(f"decay must be in (0, 1), got {decay!r}")
    if loss is not None and not callable(getattr(loss, "loss_and_grads", None)):
        raise TypeError(f"loss must be a Pyro ELBO (with loss_and_grads), got {loss!r}")
    for name, value in [("optimizer", optimizer), ("callback", callback)]:
        if value is not None and not callable(value):
            raise TypeError(f"{name} must be callable or None, got {value!r}")


def train_guide(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    num_particles: int = 16,
    lr: float = 1e-2,
    min_lr: float = 1e-4,
    max_steps: int = 10_000,
    window: int = 100,
    decay: float = 0.5,
    clip_norm: float | None = 10.0,
    loss: pyro.infer.ELBO | None = None,
    optimizer: Callable[[list[Tensor]], torch.optim.Optimizer] | None = None,
    anneal_steps: int = 0,
    progress: bool | None = None,
    callback: Callable[[int, float], None] | None = None,
    **kwargs: Any,
) -> GuideTraining:
    """Fit ``guide`` to ``model(*args, **kwargs)`` by SVI, stopping when the ELBO stops improving.

    Each step is `pyro.infer.SVI.step` on a torch optimizer: the gradient of ``loss`` for every
    parameter the model and guide touch (params first seen later join the optimizer then),
    clipped to total norm ``clip_norm``. A step whose loss or gradient is not finite is
    skipped and counted; ``MAX_CONSECUTIVE_NONFINITE`` (20) in a row raise a `RuntimeError`.
    Parameters live in Pyro's param store as usual (new ones are added, none is cleared), and
    the ELBO's draws come from the global torch RNG, as in ``SVI.step``: seed it beforehand
    for a reproducible run. Nothing global is reseeded, and no module's train/eval mode or
    thread count is changed.

    Stopping rule: the losses after annealing are grouped into windows of ``window`` steps.
    A window *improves* when its mean is below the best window mean so far by more than two
    standard errors (sd / sqrt(n)) of the new window: a clear improvement, not noise. After
    a window that does not improve, the learning rate is multiplied by ``decay`` (not below
    ``min_lr``). Training stops (``"converged"``) at a window that does not improve while the
    learning rate is already ``min_lr``, i.e. the ELBO stopped improving even at the smallest
    step size, or else after ``max_steps`` steps (``"max_steps"``).

    Args:
        model: a Pyro model.
        guide: a Pyro guide for it (an autoguide, `AutoFlow`, or a function).
        *args: positional arguments of model and guide.
        num_particles: ELBO particles per step, vectorised (ignored when ``loss`` is given).
        lr: initial learning rate.
        min_lr: smallest learning rate (see the stopping rule).
        max_steps: most steps to take.
        window: steps per window of the stopping rule (at least 2).
        decay: factor applied to the learning rate after a window without improvement.
        clip_norm: largest total gradient norm (``None``: no clipping).
        loss: the ELBO, used as is. Default ``Trace_ELBO(num_particles, vectorize_particles=
            True)`` with ``max_plate_nesting`` found by tracing the guide and model once.
        optimizer: a factory given the list of parameters (default
            ``torch.optim.Adam(params, lr=lr)``). The schedule scales the rate of each of its
            parameter groups by the same factor as ``lr``.
        anneal_steps: during these first steps the log-densities of the model's observed
            sites (``pyro.factor`` too) are scaled by ``beta`` rising linearly from 0.01 to 1,
            ``beta = min(1, 0.01 + 0.99 * step / anneal_steps)``. Latent sites keep their
            prior, so the tempered target runs from the prior to the posterior. These steps
            take no part in the stopping rule.
        progress: show a tqdm bar (``None``: only on a terminal).
        callback: called as ``callback(step, loss)`` after each step (0-based step).
        **kwargs: keyword arguments of model and guide.

    Returns:
        A `GuideTraining` with the loss, time and learning rate of each step.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyroflows.infer import AutoFlow, train_guide
        >>> def model(data):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     sigma = pyro.sample("sigma", dist.HalfNormal(5.0))
        ...     with pyro.plate("n", len(data)):
        ...         pyro.sample("x", dist.Normal(mu, sigma), obs=data)
        >>> data = torch.randn(50) + 3
        >>> guide = AutoFlow(model, model_args=(data,))
        >>> history = train_guide(model, guide, data, max_steps=200, progress=False)
        >>> history.stopped in ("converged", "max_steps"), history.num_steps <= 200
        (True, True)
    """
    _check_options(
        num_particles=num_particles,
        lr=lr,
        min_lr=min_lr,
        max_steps=max_steps,
        window=window,
        decay=decay,
        clip_norm=clip_norm,
        loss=loss,
        optimizer=optimizer,
        anneal_steps=anneal_steps,
        callback=callback,
    )
    if loss is None:
        loss = _default_loss(model, guide, num_particles, *args, **kwargs)
    stepper = _Stepper(loss, optimizer or (lambda p: torch.optim.Adam(p, lr=lr)), clip_norm)
    schedule, temper, record = _Schedule(lr, min_lr, decay), _Temper(), _Record()
    tempered, stopped = temper(model), "max_steps"
    with tqdm(total=max_steps, disable=None if progress is None else not progress) as bar:
        for step in range(max_steps):
            temper.beta = _beta(step, anneal_steps)
            value = stepper(tempered if step < anneal_steps else model, guide, *args, **kwargs)
            record.add(step, value, schedule.lr)
            if callback is not None:
                callback(step, value)
            _show(bar, step, value, schedule.lr)
            if _window_ends(step, anneal_steps, window):
                if schedule.end_window(record.losses[-window:]):
                    stopped = "converged"
                    break
                stepper.set_factor(schedule.lr / lr)
    return record.result(stopped, window, anneal_steps)
