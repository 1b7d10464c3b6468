"""Flow layers: structures (coupling, autoregressive), mixing layers and fixed data maps.

``__all__`` below is the one list of layers: the package root re-exports it, and
`LAYER_TYPES` (every exported `FlowModule` subclass) is what model files may hold
(`pyroflows.io`) and what `pyroflows.testing.LAYERS` must cover (a test checks it).
"""

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

#: Every layer type: the exported `FlowModule` subclasses, in the order of ``__all__``.
LAYER_TYPES: tuple[type[FlowModule], ...] = tuple(
    cls
    for cls in (globals()[name] for name in __all__)
    if isinstance(cls, type) and issubclass(cls, FlowModule) and cls is not FlowModule
)
