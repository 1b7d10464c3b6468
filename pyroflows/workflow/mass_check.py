"""The mass check of `diagnose`: does the guide miss posterior mass that k-hat cannot see?

This module owns the defensive proposal (half the guide, half the guide widened about its
mean; Hesterberg 1995) that is swapped in for the packed latent of an ``AutoContinuous``
guide, the importance weights of its draws, and the `MassCheck` record that compares its
estimate of ``log p(x)`` with the guide's own.

Its only randomness is the choice of half for each draw, from torch's generator as
`diagnose` leaves it (forked and seeded when ``seed`` is given).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from pyro.distributions import TorchDistribution, constraints
from pyro.infer.autoguide import AutoContinuous
from pyro.poutine.messenger import Messenger
from torch import Tensor
from torch.distributions import Distribution

from .draws import _draw

if TYPE_CHECKING:
    from pyro.poutine.runtime import Message

__all__ = ["MassCheck"]


@dataclass
class MassCheck:
    """Does the guide miss posterior mass? A wider proposal's evidence against the guide's.

    The guide's importance-sampling estimate of ``log p(x)`` sees only the posterior mass
    where the guide puts draws. A defensive proposal (half the guide, half the guide widened
    ``factor``-fold about its mean) sees more; if its estimate is clearly larger, the guide
    misses at least ``missing_mass`` of the posterior, whatever k-hat says. Available for
    guides with a packed latent (`AutoFlow`, Pyro's ``AutoContinuous`` guides).

    Attributes:
        factor: widening factor of the defensive half.
        log_evidence: the defensive proposal's estimate of ``log p(x)``.
        gap: ``log_evidence`` minus the guide's own estimate, in nats.
        standard_error: Monte Carlo standard error of ``gap``.
        missing_mass: ``1 - exp(-gap)`` (0 when ``gap`` is not significant): the share of
            posterior mass the guide's own draws do not reach.
        significant: ``gap`` exceeds both 3 standard errors and 0.05 nats.
    """

    factor: float
    log_evidence: float
    gap: float
    standard_error: float
    missing_mass: float
    significant: bool


class _Defensive(TorchDistribution):
    """Half the draws from ``q``, half from ``q`` widened ``factor``-fold about ``center``.

    A defensive importance-sampling proposal (Hesterberg 1995): where ``q`` is too narrow
    the widened half still puts draws, and its density never falls below half of ``q``'s.
    """

    arg_constraints: dict[str, constraints.Constraint] = {}
    support = constraints.real_vector

    def __init__(self, q: Distribution, center: Tensor, factor: float) -> None:
        self.q, self.center, self.factor = q, center, factor
        super().__init__(q.batch_shape, q.event_shape, validate_args=False)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        u = self.q.sample(torch.Size(sample_shape))
        widened = torch.rand(u.shape[:-1], device=u.device) < 0.5
        return torch.where(widened[..., None], self.center + self.factor * (u - self.center), u)

    def log_prob(self, value: Tensor) -> Tensor:
        shrunk = self.center + (value - self.center) / self.factor
        narrow = self.q.log_prob(value)
        wide = self.q.log_prob(shrunk) - value.shape[-1] * math.log(self.factor)
        return torch.logaddexp(narrow, wide) - math.log(2.0)


class _Replace(Messenger):
    """Replaces the distribution of one sample site (the guide's packed latent)."""

    def __init__(self, name: str, make: Callable[[Distribution], Distribution]) -> None:
        super().__init__()
        self.name, self.make = name, make

    def _pyro_sample(self, msg: Message) -> None:
        if msg["name"] == self.name:
            msg["fn"] = self.make(msg["fn"])


def _log_mean_exp_and_ess(log_w: Tensor) -> tuple[float, float]:
    """Log-mean-exp of log weights (an estimate of ``log p(x)``) and their ESS."""
    w = torch.softmax(log_w, 0)
    return float(torch.logsumexp(log_w, 0) - math.log(len(log_w))), float(1.0 / (w**2).sum())


def _mass_check(
    model: Callable[..., Any],
    guide: AutoContinuous,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    num_samples: int,
    factor: float,
    parallel: bool,
    chunk_size: int,
) -> Tensor:
    """Log importance weights of draws from the defensive proposal around ``guide``."""
    with torch.no_grad():
        center = guide.get_posterior(*args, **kwargs).sample((num_samples,)).mean(0)
    site = f"_{guide._pyro_name}_latent"

    def defensive(q: Distribution) -> Distribution:
        return _Defensive(q, center, factor)

    def widened_guide(*a: Any, **k: Any) -> Any:
        with _Replace(site, defensive):
            return guide(*a, **k)

    draws = _draw(
        model,
        widened_guide,
        args,
        kwargs,
        num_samples,
        parallel=parallel,
        chunk_size=chunk_size,
        predictive=False,
    )
    return draws.log_weights.to(torch.float64)


def _widened_log_weights(
    model: Callable[..., Any],
    guide: AutoContinuous,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    num_samples: int,
    widen: float,
    parallel: bool,
    chunk_size: int,
) -> Tensor | None:
    """`_mass_check`'s log weights, or ``None`` with a warning when the guide cannot score them.

    Called by `diagnose` through one private function: the warning names the caller's line.
    """
    try:
        return _mass_check(model, guide, args, kwargs, num_samples, widen, parallel, chunk_size)
    except (RuntimeError, ValueError, NotImplementedError) as error:
        warnings.warn(
            f"mass check skipped: scoring the widened proposal with the guide failed ({error})",
            stacklevel=4,
        )
        return None


def _mass_record(
    wide_log_w: Tensor, widen: float, log_evidence: float, raw_ess: float
) -> MassCheck:
    """The mass check's numbers: evidence found by the widened proposal against the guide's."""
    wide_evidence, wide_ess = _log_mean_exp_and_ess(wide_log_w)
    gap = wide_evidence - log_evidence
    se = math.sqrt(1.0 / max(raw_ess, 1.0) + 1.0 / max(wide_ess, 1.0))
    significant = gap > max(3 * se, 0.05)
    return MassCheck(
        factor=float(widen),
        log_evidence=wide_evidence,
        gap=gap,
        standard_error=se,
        missing_mass=1.0 - math.exp(-gap) if significant else 0.0,
        significant=significant,
    )
