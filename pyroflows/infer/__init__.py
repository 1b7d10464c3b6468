"""Variational inference with flows: automatic flow guides for Pyro models."""

from .amortized import AmortizedFlow
from .autoflow import AutoFlow

__all__ = ["AutoFlow", "AmortizedFlow"]
