"""Variational inference with flows: automatic flow guides for Pyro models."""

from .amortized import AmortizedFlow
from .autoflow import AutoFlow
from .npe import fit_posterior, posterior_flow, prior_bounds, simulate
from .train import GuideTraining, train_guide

__all__ = [
    "AutoFlow",
    "AmortizedFlow",
    "train_guide",
    "GuideTraining",
    "simulate",
    "fit_posterior",
    "posterior_flow",
    "prior_bounds",
]
