"""JSON descriptions of the pieces a layer is built from: activations and transformers.

A saved model stores, for every layer, the arguments that rebuild it (`FlowModule.get_config`).
Two of those arguments are not plain JSON: the activation (a ``torch.nn`` class, saved by
name from a fixed list) and the transformer (saved as its type and arguments). Decoding
accepts only these known names, so a model file can never name arbitrary code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .. import transformers as _transformers
from ..transformers import Transformer

__all__ = [
    "ACTIVATIONS",
    "TRANSFORMERS",
    "encode_activation",
    "decode_activation",
    "encode_transformer",
    "decode_transformer",
    "decode_network_args",
]

#: Activations a layer can be saved with, by name.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (
        nn.ReLU,
        nn.LeakyReLU,
        nn.ELU,
        nn.SELU,
        nn.CELU,
        nn.GELU,
        nn.SiLU,
        nn.Mish,
        nn.Tanh,
        nn.Sigmoid,
        nn.Softplus,
    )
}

#: Transformers a layer can be saved with, by name.
TRANSFORMERS: dict[str, type[Transformer]] = {
    name: getattr(_transformers, name)
    for name in _transformers.__all__
    if name != "Transformer" and issubclass(getattr(_transformers, name), Transformer)
}


def encode_activation(activation: Callable[[], nn.Module]) -> str:
    """The name of ``activation``; a `ValueError` unless it is one of `ACTIVATIONS`."""
    name = getattr(activation, "__name__", None)
    if ACTIVATIONS.get(name) is not activation:
        raise ValueError(
            f"only these activations can be saved: {', '.join(ACTIVATIONS)}; got {activation!r}"
        )
    return name


def decode_activation(name: Any) -> type[nn.Module]:
    """The activation class called ``name``; a `ValueError` for any other name."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r} (known: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def encode_transformer(transformer: Transformer) -> dict[str, Any]:
    """``{"type": name, "args": {...}}`` for a built-in transformer."""
    name = type(transformer).__name__
    if TRANSFORMERS.get(name) is not type(transformer):
        raise ValueError(f"only built-in transformers can be saved, got {name}")
    return {"type": name, "args": dict(vars(transformer))}


def decode_transformer(spec: Any) -> Transformer:
    """Inverse of `encode_transformer`; a `ValueError` for unknown types or bad arguments."""
    if not isinstance(spec, dict) or set(spec) != {"type", "args"}:
        raise ValueError(f"a transformer is {{'type': ..., 'args': {{...}}}}, got {spec!r}")
    cls = TRANSFORMERS.get(spec["type"]) if isinstance(spec["type"], str) else None
    if cls is None:
        raise ValueError(f"unknown transformer {spec['type']!r}")
    args = spec["args"]
    if not isinstance(args, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in args.values()
    ):
        raise ValueError(f"{spec['type']} arguments must be numbers, got {args!r}")
    try:
        return cls(**args)
    except TypeError as error:
        raise ValueError(f"bad arguments for {spec['type']}: {error}") from None


def decode_network_args(config: dict[str, Any]) -> dict[str, Any]:
    """A layer's saved arguments with its transformer and activation decoded (the layers
    with a conditioner network, `Coupling` and `Autoregressive`, save both)."""
    args = dict(config)
    args["transformer"] = decode_transformer(args["transformer"])
    args["activation"] = decode_activation(args["activation"])
    return args
