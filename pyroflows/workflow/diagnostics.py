"""Trust diagnostics: `diagnose`, its `Diagnosis`, and the k-hat thresholds.

This module owns the Pareto-smoothed importance sampling (PSIS) of a guide's draws against
the model: the smoothed weights and their k-hat (Yao et al. 2018), the effective sample
size, the importance-sampling estimate of ``log p(x)``, the verdict (combined with the
`MassCheck` of `pyroflows.workflow.mass_check` where it runs), and the PSIS-reweighted
posterior, resampled systematically.

Randomness: with a ``seed``, `diagnose` draws inside a fork of torch's generator
(`torch.random.fork_rng`), so the caller's generator is left as it was, and resamples with
a local ``torch.Generator``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pyro.infer.autoguide import AutoContinuous
from torch import Tensor

from ..checks import check_int, is_real
from .draws import _draw, _Draws
from .export import _export, import_arviz
from .mass_check import MassCheck, _log_mean_exp_and_ess, _mass_record, _widened_log_weights

if TYPE_CHECKING:
    from arviz import InferenceData

__all__ = ["Diagnosis", "diagnose", "psis_spread", "KHAT_GOOD", "KHAT_OK"]

KHAT_GOOD = 0.5
"""Below this Pareto k-hat the approximation is close to the posterior (Yao et al. 2018)."""
KHAT_OK = 0.7
"""Above this Pareto k-hat neither the guide nor importance sampling from it can be trusted."""


@dataclass
class Diagnosis:
    """Result of `diagnose`: PSIS statistics of a guide against its model.

    Attributes:
        log_weights: raw log importance weights ``log p(x, z) - log q(z)``, one per draw.
        smoothed_log_weights: Pareto-smoothed, normalised log weights (``logsumexp`` is 0).
        khat: Pareto shape estimate of the weights' right tail (Yao et al. 2018); ``-inf``
            when the largest weights are tied (e.g. constant weights of an exact guide).
        ess: effective sample size of the smoothed weights, ``1 / sum(w_i^2)``.
        khat_sd: Monte Carlo standard deviation of ``khat`` (bootstrap over the draws,
            `psis_spread`): about 0.1 at 4,000 draws for a k-hat near 0.5, so two runs
            reading 0.35 and 0.44 agree.
        ess_sd: the same for ``ess``.
        verdict: a sentence saying whether the approximation can be trusted.
        trustworthy: ``khat <= 0.7`` (and finite).
        elbo: Monte Carlo ELBO, the mean of the log weights.
        log_evidence: importance-sampling estimate of ``log p(x)`` (log-mean-exp of the raw
            weights); a lower bound in expectation, tight when k-hat is small.
        mass_check: the `MassCheck` (``None`` when it was not run: ``widen=None`` or a guide
            without a packed latent).
    """

    log_weights: Tensor
    smoothed_log_weights: Tensor
    khat: float
    ess: float
    khat_sd: float
    ess_sd: float
    verdict: str
    trustworthy: bool
    elbo: float
    log_evidence: float
    mass_check: MassCheck | None
    _draws: _Draws = field(repr=False)
    _resampled: _Draws = field(repr=False)

    @property
    def num_samples(self) -> int:
        """Number of guide draws the statistics come from."""
        return int(self.log_weights.shape[0])

    @property
    def samples(self) -> dict[str, Tensor]:
        """The guide's own draws (constrained scale), ``(num_samples, *site shape)``."""
        return self._draws.posterior

    @property
    def posterior(self) -> dict[str, Tensor]:
        """PSIS-reweighted posterior: draws resampled in proportion to the smoothed weights.

        Same size as `samples`; duplicates are expected (about ``num_samples / ess`` copies per
        distinct draw).
        """
        return self._resampled.posterior

    def to_inference_data(self, *, reweighted: bool = True, num_chains: int = 4) -> InferenceData:
        """ArviZ export of the PSIS-reweighted draws (or, ``reweighted=False``, the guide's).

        The groups are those of `to_inference_data`; ``sample_stats`` of the reweighted data
        holds the raw log weights of the drawn rows.
        """
        draws = self._resampled if reweighted else self._draws
        attrs = {
            "inference_library": "pyro + pyroflows",
            "psis_khat": self.khat,
            "psis_ess": self.ess,
            "reweighted": int(reweighted),
        }
        return _export(draws, num_chains, attrs)

    def __str__(self) -> str:
        return (
            f"PSIS diagnosis from {self.num_samples} guide draws\n"
            f"  k-hat        {self.khat:.3f} +- {self.khat_sd:.3f} (bootstrap sd)\n"
            f"  ESS          {self.ess:.1f} +- {self.ess_sd:.1f} "
            f"({100 * self.ess / self.num_samples:.1f}% of draws)\n"
            f"  ELBO         {self.elbo:.4f}\n"
            f"  log evidence {self.log_evidence:.4f} (importance-sampling estimate)\n"
            + (
                f"  widened x{self.mass_check.factor:g}  log evidence "
                f"{self.mass_check.log_evidence:.4f} (gap {self.mass_check.gap:+.3f} "
                f"+- {self.mass_check.standard_error:.3f} nats)\n"
                if self.mass_check is not None
                else ""
            )
            + f"  verdict      {self.verdict}"
        )


def diagnose(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    num_samples: int = 4000,
    parallel: bool = True,
    chunk_size: int = 1000,
    seed: int | None = None,
    widen: float | None = 2.0,
    posterior_predictive: bool = False,
    **kwargs: Any,
) -> Diagnosis:
    """Can the guide be trusted? Pareto-smoothed importance sampling of its draws.

    Draws ``num_samples`` samples ``z ~ q`` from ``guide``, computes the log importance
    weights ``log p(x, z) - log q(z)`` under ``model`` (with ``*args, **kwargs``) and smooths
    their right tail with ArviZ's PSIS. The Pareto shape k-hat of that tail measures how far
    the guide is from the posterior (Yao et al. 2018, "Yes, but did it work?"):

    * ``k-hat < 0.5``: good, the guide is close to the posterior;
    * ``0.5 <= k-hat <= 0.7``: usable; the PSIS-reweighted draws improve estimates;
    * ``k-hat > 0.7``: do not trust the approximation.

    k-hat is itself an estimate (``khat_sd``, by bootstrap); when it lies within two of
    those sds of 0.7, the verdict adds that it is borderline (the sd shrinks only as
    ``num_samples ** -0.25``).

    k-hat only sees where the guide puts draws: a guide that misses a whole region of the
    posterior (a funnel's mouth, a second mode) can have a small k-hat. For guides with a
    packed latent (`AutoFlow`, Pyro's ``AutoContinuous`` guides) a `MassCheck` therefore
    also estimates ``log p(x)`` with a defensive proposal that widens the guide ``widen``-fold;
    a clearly larger estimate means missing mass, and the verdict says so.

    The estimate of k-hat is itself noisy: use at least a few thousand draws. Works with any
    guide whose draws cover all latent sites of the model: `pyroflows.infer.AutoFlow`, every
    Pyro autoguide with a density (not ``AutoDelta``), hand-written guides.

    Args:
        model: the Pyro model.
        guide: the fitted guide.
        *args: positional arguments of the model.
        num_samples: number of guide draws (at least 2; a few thousand for a reliable
            k-hat).
        parallel: vectorised draws (see `to_inference_data`).
        chunk_size: draws per vectorised pass.
        seed: seeds the draws and the resampling (``None`` leaves the RNG as it is).
        widen: widening factor of the mass check's defensive proposal (``None``: no check;
            it costs another ``num_samples`` draws, scored by the guide's ``log_prob``, which
            for IAF-direction flows inverts them).
        posterior_predictive: also draw replicated data, for the export of the reweighted
            posterior (off by default: the diagnostics do not need it).
        **kwargs: keyword arguments of the model.

    Returns:
        a `Diagnosis`; ``print`` it for a summary, ``.to_inference_data()`` exports the
        PSIS-reweighted posterior.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> from pyroflows import diagnose
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("obs", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> y = torch.randn(25)
        >>> guide = AutoNormal(model, init_scale=0.01)  # unfitted and far too narrow
        >>> result = diagnose(model, guide, y, num_samples=2000, seed=0)
        >>> result.trustworthy
        False
    """
    with _seeded(seed):  # a forked RNG: the caller's generators are left as they were
        return _diagnose(
            model, guide, args, kwargs, num_samples, parallel, chunk_size, seed, widen,
            posterior_predictive,
        )  # fmt: skip


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed torch's RNG inside a fork of it (CPU and the current CUDA device); ``None``: as is."""
    if seed is None:
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _diagnose(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    num_samples: int,
    parallel: bool,
    chunk_size: int,
    seed: int | None,
    widen: float | None,
    posterior_predictive: bool,
) -> Diagnosis:
    """`diagnose` with its arguments gathered (see there)."""
    num_samples = check_int("num_samples", num_samples, low=2)
    if widen is not None and not (is_real(widen) and widen > 1):
        raise ValueError(f"widen must be a finite number above 1 (or None), got {widen!r}")
    az = import_arviz()
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    draws = _draw(
        model,
        guide,
        args,
        kwargs,
        num_samples,
        parallel=parallel,
        chunk_size=chunk_size,
        predictive=posterior_predictive,
    )
    log_w = draws.log_weights.to(torch.float64)
    smoothed_t, khat = _psis(az, log_w)
    ess = _ess(smoothed_t)
    khat_sd, ess_sd = psis_spread(log_w, seed=0 if seed is None else seed)
    log_evidence, raw_ess = _log_mean_exp_and_ess(log_w)
    verdict, trustworthy = _verdict(khat)
    verdict += _borderline(khat, khat_sd, num_samples)
    mass, wide_log_w = None, None
    if widen is not None and isinstance(guide, AutoContinuous):
        wide_log_w = _widened_log_weights(
            model, guide, args, kwargs, num_samples, widen, parallel, chunk_size
        )
    if wide_log_w is not None:
        mass = _mass_record(wide_log_w, widen, log_evidence, raw_ess)
        if mass.significant:
            verdict, trustworthy = _missed_mass_verdict(mass, verdict, trustworthy, khat)
    index = _systematic_resample(smoothed_t, num_samples, generator)
    return Diagnosis(
        log_weights=log_w,
        smoothed_log_weights=smoothed_t,
        khat=khat,
        ess=ess,
        khat_sd=khat_sd,
        ess_sd=ess_sd,
        verdict=verdict,
        trustworthy=trustworthy,
        elbo=float(log_w.mean()),
        log_evidence=log_evidence,
        mass_check=mass,
        _draws=draws,
        _resampled=draws.take(index),
    )


def psis_spread(log_weights: Tensor, *, num_rounds: int = 50, seed: int = 0) -> tuple[float, float]:
    """Monte Carlo standard deviations of PSIS k-hat and ESS, by bootstrap over the draws.

    Resamples the log importance weights with replacement ``num_rounds`` times (a private
    generator seeded with ``seed``) and returns the standard deviations of k-hat and of the
    effective sample size over the resamples. For Gaussian importance weights this matches
    the spread over independent sets of draws (see the tests). Rounds where k-hat is not
    finite (tied weights) are left out; with fewer than 2 left, k-hat's sd is ``nan``.

    Example:
        >>> import torch
        >>> z = torch.randn(4000, generator=torch.Generator().manual_seed(0))
        >>> log_w = 0.5 * z**2 * (1 - 1 / 1.3**2)  # N(0, 1.3^2) target, N(0, 1) proposal
        >>> khat_sd, ess_sd = psis_spread(log_w)
        >>> 0.03 < khat_sd < 0.3
        True
    """
    num_rounds = check_int("num_rounds", num_rounds, low=2)
    log_w = torch.as_tensor(log_weights, dtype=torch.float64).flatten()
    if len(log_w) < 2:
        raise ValueError(f"psis_spread needs at least 2 log weights, got {len(log_w)}")
    az = import_arviz()
    generator = torch.Generator().manual_seed(seed)
    khats, esss = [], []
    for _ in range(num_rounds):
        index = torch.randint(len(log_w), (len(log_w),), generator=generator)
        smoothed, khat = _psis(az, log_w[index])
        khats.append(khat)
        esss.append(_ess(smoothed))
    finite = [k for k in khats if math.isfinite(k)]
    khat_sd = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
    return khat_sd, float(np.std(esss, ddof=1))


def _ess(smoothed_log_weights: Tensor) -> float:
    """Effective sample size of normalised log weights, ``1 / sum(w_i^2)``."""
    return float(1.0 / torch.exp(2 * smoothed_log_weights).sum())


def _psis(az: ModuleType, log_w: Tensor) -> tuple[Tensor, float]:
    """Pareto-smoothed log weights and k-hat (``-inf`` for tied weights: no tail to fit)."""
    finite = torch.isfinite(log_w)
    if not bool(finite.any()):
        raise ValueError(
            "every log importance weight is -inf, +inf or NaN: the guide's draws have no "
            "support under the model (check constraints and that the guide matches the model)"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ArviZ warns on k-hat > 0.7 itself
        smoothed, khat = az.psislw(log_w.numpy().copy(), reff=1.0)
    khat = float(np.asarray(khat))
    smoothed_t = torch.as_tensor(np.asarray(smoothed), dtype=torch.float64)
    if not bool(finite.all()):
        khat = math.inf if bool((log_w == math.inf).any()) else khat
    elif khat == math.inf or float(log_w.max() - log_w.min()) < 1e-6:
        # ArviZ gives +inf when fewer than 5 weights exceed its tail cutoff: the largest
        # weights are tied (constant weights: the guide is the posterior, to rounding);
        # there is no heavy tail to fit
        khat = -math.inf
    return smoothed_t, khat


def _missed_mass_verdict(
    mass: MassCheck, verdict: str, trustworthy: bool, khat: float
) -> tuple[str, bool]:
    """The verdict once the mass check found posterior mass the guide's draws miss."""
    missed = (
        f"a proposal {mass.factor:g}x wider than the guide finds {mass.gap:.2f} nats more "
        f"evidence (+- {mass.standard_error:.2f}): the guide's draws miss about "
        f"{100 * mass.missing_mass:.0f}% of the posterior mass"
    )
    if trustworthy:
        return (
            f"do not trust the approximation: {missed} (k-hat {khat:.2f} looks fine "
            "only because it cannot see mass where the guide puts no draws). "
            "Reparameterise the model, start the guide wider (init_scale), fit longer, "
            "or use MCMC."
        ), False
    return f"{verdict} Also, {missed}.", False


def _systematic_resample(
    log_weights: Tensor, num: int, generator: torch.Generator | None
) -> Tensor:
    """Indices drawn with probability proportional to ``exp(log_weights)`` (systematic)."""
    probs = torch.softmax(log_weights.detach().to("cpu", torch.float64), 0)
    u = torch.rand((), generator=generator, dtype=torch.float64, device="cpu")
    u = (u + torch.arange(num, device="cpu")) / num
    cdf = probs.cumsum(0)
    cdf[-1] = 1.0
    return torch.searchsorted(cdf, u).clamp_(max=len(probs) - 1)


def _borderline(khat: float, khat_sd: float, num_samples: int) -> str:
    """A warning when k-hat is within two Monte Carlo sds of `KHAT_OK` (else ``""``).

    There the trust verdict could flip with another set of draws. PSIS fits the largest
    ``3 sqrt(num_samples)`` weights, so the sd shrinks as ``num_samples ** -0.25``: sixteen
    times the draws halve it.
    """
    if not (math.isfinite(khat) and math.isfinite(khat_sd)) or abs(khat - KHAT_OK) > 2 * khat_sd:
        return ""
    return (
        f" Borderline: k-hat is within two Monte Carlo sds ({khat_sd:.2f}) of {KHAT_OK}, so "
        f"the verdict may flip with other draws; num_samples={16 * num_samples} would halve "
        "that sd."
    )


def _verdict(khat: float) -> tuple[str, bool]:
    """The verdict on k-hat alone, and whether the guide can be trusted."""
    if math.isnan(khat) or khat == math.inf:
        return "k-hat could not be estimated: the log importance weights are not finite.", False
    if khat < KHAT_GOOD:
        return (
            f"good (k-hat {khat:.2f} < {KHAT_GOOD}): the guide is close to the posterior; its "
            "draws and importance-sampling estimates from them are reliable.",
            True,
        )
    if khat <= KHAT_OK:
        return (
            f"usable (k-hat {khat:.2f} in [{KHAT_GOOD}, {KHAT_OK}]): the guide is off in places; "
            "prefer the PSIS-reweighted draws and check the estimates you care about.",
            True,
        )
    return (
        f"do not trust the approximation (k-hat {khat:.2f} > {KHAT_OK}): the guide misses "
        "important parts of the posterior, and reweighting cannot fix it. Fit longer, use more "
        "particles or a more flexible guide, reparameterise the model, or use MCMC.",
        False,
    )
