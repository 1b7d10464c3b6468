"""Bayesian workflow for guides: ArviZ export and importance-sampling trust diagnostics.

`to_inference_data` turns any Pyro guide (an `AutoFlow`, any Pyro autoguide, or a hand-written
guide) into an ArviZ ``InferenceData``; `diagnose` scores the guide's draws against the model
with Pareto-smoothed importance sampling (PSIS, Vehtari et al. 2015; Yao et al. 2018) and says
whether the approximation can be trusted.

Both draw ``num_samples`` independent samples ``z ~ q`` from the guide, replay the model on
them, and record, per draw: the latent values on the constrained scale (and any
``pyro.deterministic`` sites), the log joint ``log p(x, z)``, the guide's ``log q(z)``, the
pointwise log-likelihood of every observed site and, optionally, a posterior-predictive draw.
By default the draws are taken in vectorised chunks under an outer particle plate (the model
must broadcast like it does for ``Trace_ELBO(vectorize_particles=True)``); pass
``parallel=False`` for models that do not.

Modules:

* `pyroflows.workflow.draws`: drawing from the guide and scoring the draws under the model
  (internal, shared by the two below);
* `pyroflows.workflow.export`: the ArviZ export, `to_inference_data` and `import_arviz`;
* `pyroflows.workflow.diagnostics`: `diagnose`, its `Diagnosis` and the k-hat thresholds;
* `pyroflows.workflow.mass_check`: the `MassCheck` of `diagnose` (a widened, defensive
  proposal that finds posterior mass the guide misses);
* `pyroflows.workflow.calibration`: `expected_coverage` and `sbc_ranks` of an amortised
  posterior ``q(theta | x)`` on simulated pairs, and `c2st` against reference draws.
"""

from .calibration import Coverage, c2st, expected_coverage, sbc_ranks
from .diagnostics import KHAT_GOOD, KHAT_OK, Diagnosis, diagnose, psis_spread
from .export import import_arviz, to_inference_data
from .mass_check import MassCheck

__all__ = [
    "Diagnosis",
    "MassCheck",
    "diagnose",
    "psis_spread",
    "to_inference_data",
    "import_arviz",
    "KHAT_GOOD",
    "KHAT_OK",
    "Coverage",
    "expected_coverage",
    "sbc_ranks",
    "c2st",
]
