"""Flow layers: structures (coupling, autoregressive) and mixing layers."""

from .autoregressive import Autoregressive
from .base import FlowModule, FlowTransform, Inverse
from .coupling import Coupling
from .mixing import ActNorm, LULinear, Permute, Precondition, Reverse
from .preprocessing import Standardize, SupportMap

__all__ = [
    "FlowTransform",
    "FlowModule",
    "Inverse",
    "Coupling",
    "Autoregressive",
    "Permute",
    "Reverse",
    "LULinear",
    "ActNorm",
    "Precondition",
    "Standardize",
    "SupportMap",
]
