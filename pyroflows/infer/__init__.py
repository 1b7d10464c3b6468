"""Variational inference with flows: automatic flow guides for Pyro models."""

from .autoflow import AutoFlow

__all__ = ["AutoFlow"]
