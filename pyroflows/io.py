"""Saving and loading flows: one file with a JSON configuration, the weights and a digest.

A model file is untrusted input. It is read with ``torch.load(weights_only=True)`` (strings
and tensors only, so loading never executes code), and before anything is built:

* the configuration is checked against a versioned schema (known layer types, activations
  and transformers only; integers in range);
* the memory the configuration implies is computed and refused beyond `MAX_PARAMETERS`
  (raise it with ``load(..., max_parameters=...)`` for a file you trust);
* the SHA-256 digest stored at save time is recomputed, so damaged files are reported as
  corrupted.

After building, the weights must match the layers exactly (names, shapes, floating dtypes,
finite values, the fixed masks and permutations the configuration implies) and the fixed
maps must be valid (positive scales, ordered bounds). Every failure is a `ModelFileError`
(a `ValueError`) with a one-line message. Saving is atomic (`pyroflows.files.atomic_write`):
an interrupted or failed save leaves any previous file intact.

The configuration is derived from the flow's modules when it is saved (each layer's
`FlowModule.get_config`), so a flow extended after it was built, or assembled by hand from
pyroflows layers, saves and loads. Files of format 1 (which stored the builder's arguments)
and format 2 (whose conditioners' output layers were ordered feature-major) still load. See
the "Files and safety" page of the documentation.

Example:
    >>> import tempfile, torch
    >>> from pyroflows import flows, load, save
    >>> flow = flows.nsf(2, num_layers=2)
    >>> path = tempfile.mkdtemp() + "/model.pt"
    >>> save(flow, path)
    >>> x = torch.randn(4, 2)
    >>> bool(torch.equal(load(path)().log_prob(x), flow().log_prob(x)))
    True
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from . import flows as _flows
from .distribution import DiagNormal, Flow
from .files import atomic_write
from .transforms import LAYER_TYPES as LAYER_TYPE_LIST
from .transforms import (
    FlowModule,
    Inverse,
    Precondition,
    Standardize,
    SupportMap,
)
from .transforms.base import Structure
from .transforms.config import decode_activation, decode_transformer

__all__ = [
    "save",
    "load",
    "describe",
    "ModelDescription",
    "ModelFileError",
    "FORMAT",
    "FORMAT_VERSION",
    "LAYER_TYPES",
    "MAX_PARAMETERS",
    "MAX_LAYERS",
    "builder_size",
]

#: Marker stored in every model file.
FORMAT = "pyroflows-model"
#: Version of the file layout written by `save` (1: builder arguments; 2: one entry per layer;
#: 3: parameter-major conditioner rows; 4: `SupportMap` scales).
FORMAT_VERSION = 4
#: Default limit on the values (parameters and buffers) a loaded configuration may allocate.
MAX_PARAMETERS = 20_000_000
#: Most layers (and data/context transforms) a model file may describe.
MAX_LAYERS = 1_000
#: Largest feature, context or hidden width a model file may declare.
MAX_WIDTH = 1 << 20
_MAX_JSON_CHARS = 1 << 24
_FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_FLOAT_DTYPES |= {"float32": torch.float32, "float64": torch.float64}

#: Every layer type a model file may contain, by name.
LAYER_TYPES: dict[str, type[FlowModule]] = {cls.__name__: cls for cls in LAYER_TYPE_LIST}
_FIXED = {"Standardize": Standardize, "SupportMap": SupportMap}
_BUILDERS = {name: getattr(_flows, name) for name in _flows.__all__}


class ModelFileError(ValueError):
    """A model file that cannot be used: not a model, corrupted, forged, or too large."""


# --------------------------------------------------------------------------- saving


def save(flow: Flow, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> None:
    """Write ``flow`` (layers, weights, ``flow.metadata``) to ``path``, atomically.

    Args:
        flow: a `Flow` of pyroflows layers (from a builder or assembled by hand) with the
            default `DiagNormal` base.
        path: file to write (replaced only once the new file is complete on disk).
        metadata: JSON-serialisable information to store; defaults to ``flow.metadata``.

    Raises:
        TypeError: ``flow`` is not a `Flow`, or holds a layer that cannot be described.
        ValueError: metadata that is not JSON, or a non-default base distribution.
        OSError: the file cannot be written (the message names ``path``).
    """
    buffer = io.BytesIO()  # serialise first: a write error is then a plain OSError
    torch.save(_payload(flow, flow.metadata if metadata is None else metadata), buffer)
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getbuffer())


def _payload(flow: Flow, metadata: Any) -> dict[str, Any]:
    if not isinstance(flow, Flow):
        raise TypeError(f"expected a pyroflows.Flow, got {type(flow).__name__}")
    if type(flow.base) is not DiagNormal:
        raise ValueError(f"only flows with a DiagNormal base can be saved, not {flow.base!r}")
    state = {k: v.detach().cpu().contiguous().clone() for k, v in flow.state_dict().items()}
    config = {
        "input_dim": flow.input_dim,
        "context_dim": flow.context_dim,
        "dtype": _dtype_name(flow),
        "layers": [_layer_config(m) for m in flow.layers],
        "data_transforms": [_layer_config(m) for m in flow.data_transforms],
        "context_transforms": [_layer_config(m) for m in flow.context_transforms],
        "num_parameters": sum(p.numel() for p in flow.parameters()),
        "builder": flow.config,
    }
    try:
        config_json, meta_json = json.dumps(config), json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"configuration or metadata is not JSON-serialisable: {error}") from None
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config_json,
        "metadata": meta_json,
        "state_dict": state,
        "digest": _digest(config_json, meta_json, state),
    }


def _layer_config(module: FlowModule) -> dict[str, Any]:
    name = type(module).__name__
    if LAYER_TYPES.get(name) is not type(module):
        raise TypeError(f"cannot save a {name} layer: only pyroflows' own layer types")
    return {"type": name, **module.get_config()}


def _dtype_name(flow: Flow) -> str:
    dtypes = {p.dtype for p in flow.parameters()} or {torch.float32}
    if len(dtypes) != 1:
        raise ValueError(f"the flow's parameters mix dtypes {sorted(map(str, dtypes))}")
    return str(dtypes.pop()).removeprefix("torch.")


def _digest(config_json: str, meta_json: str, state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of the configuration, the metadata and every tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    for text in (config_json, meta_json):
        h.update(text.encode("utf-8") + b"\0")
    for key in sorted(state):
        t = state[key]
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


# --------------------------------------------------------------------------- reading


def _fail(path: Any, message: str) -> ModelFileError:
    return ModelFileError(f"{os.fspath(path)}: {message}")


def _read(path: str | os.PathLike, max_parameters: int) -> dict[str, Any]:
    """The file's payload, after the checks that need no building (structure, digest)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {os.fspath(path)}")
    if os.path.isdir(path):
        raise _fail(path, "is a directory, not a model file")
    if os.path.getsize(path) > 16 * max_parameters + (1 << 26):
        raise _fail(path, f"is too large for a model within max_parameters={max_parameters:,}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # pickle, zip or unsafe-type errors all mean "not ours"
        raise _fail(path, "is not a pyroflows model file (or is damaged)") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise _fail(path, "is not a pyroflows model file")
    version = payload.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _fail(path, f"has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise _fail(path, f"was written by a newer pyroflows (format {version}); upgrade")
    _check_payload_types(path, payload, version)
    payload["format_version"] = version
    if version >= 2 and payload["digest"] != _digest(
        payload["config"], payload["metadata"], payload["state_dict"]
    ):
        raise _fail(path, "is corrupted: its contents do not match the digest saved with it")
    return payload


def _check_payload_types(path: Any, payload: dict[str, Any], version: int) -> None:
    needed = {"config": str, "metadata": str, "state_dict": dict} | (
        {"digest": str} if version >= 2 else {}
    )
    for key, kind in needed.items():
        if not isinstance(payload.get(key), kind):
            raise _fail(path, f"has no valid {key!r} entry")
        if kind is str and len(payload[key]) > _MAX_JSON_CHARS:
            raise _fail(path, f"has an oversized {key!r} entry")
    for key, value in payload["state_dict"].items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise _fail(path, "has a state_dict that is not names -> tensors")


def _json(path: Any, text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise _fail(path, f"its {what} is not valid JSON") from None


# --------------------------------------------------------------------------- schema


def _int(value: Any, name: str, low: int = 1, high: int = MAX_WIDTH) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def _widths(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not 1 <= len(value) <= 64:
        raise ValueError(f"{name} must be a list of 1 to 64 widths, got {value!r}")
    return [_int(v, name) for v in value]


def _permutation(value: Any, name: str, size: int | None = None) -> list[int]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_WIDTH:
        raise ValueError(f"{name} must be a non-empty list of indices")
    if sorted(v if isinstance(v, int) and not isinstance(v, bool) else -1 for v in value) != list(
        range(len(value))
    ) or (size is not None and len(value) != size):
        raise ValueError(f"{name} is not a permutation of range({size or len(value)})")
    return value


def _mask(value: Any, name: str, size: int) -> list[bool]:
    if (
        not isinstance(value, list)
        or len(value) != size
        or not all(isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"{name} must be {size} booleans")
    return value


def _network_fields(cfg: dict[str, Any], structural: str) -> None:
    d = _int(cfg["input_dim"], "input_dim")
    _int(cfg["context_dim"], "context_dim", 0)
    decode_transformer(cfg["transformer"])
    _widths(cfg["hidden_dims"], "hidden_dims")
    decode_activation(cfg["activation"])
    if structural == "order":
        _permutation(cfg["order"], "order", d)
        _bool(cfg["invert"], "invert")
        _bool(cfg["residual"], "residual")
    else:
        _mask(cfg["mask"], "mask", d)


_SCHEMA: dict[str, tuple[set[str], Callable[[dict[str, Any]], Any]]] = {
    "Autoregressive": (
        {"input_dim", "context_dim", "transformer", "hidden_dims", "order", "invert"}
        | {"residual", "activation"},
        lambda c: _network_fields(c, "order"),
    ),
    "Coupling": (
        {"input_dim", "context_dim", "transformer", "hidden_dims", "mask", "activation"},
        lambda c: _network_fields(c, "mask"),
    ),
    "ActNorm": ({"input_dim"}, lambda c: _int(c["input_dim"], "input_dim")),
    "Reverse": ({"input_dim"}, lambda c: _int(c["input_dim"], "input_dim")),
    "Standardize": ({"input_dim"}, lambda c: _int(c["input_dim"], "input_dim")),
    "SupportMap": ({"input_dim"}, lambda c: _int(c["input_dim"], "input_dim")),
    "Permute": ({"permutation"}, lambda c: _permutation(c["permutation"], "permutation")),
    "LULinear": (
        {"input_dim", "permutation"},
        lambda c: _permutation(c["permutation"], "permutation", _int(c["input_dim"], "input_dim")),
    ),
    "Precondition": (
        {"input_dim", "diagonal"},
        lambda c: (_int(c["input_dim"], "input_dim"), _bool(c["diagonal"], "diagonal")),
    ),
    "Inverse": ({"layer"}, lambda c: _check_layer(c["layer"], nested=True)),
}


def _check_layer(cfg: Any, nested: bool = False) -> None:
    """Raise a `ValueError` unless ``cfg`` is a valid layer description."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("type"), str):
        raise ValueError(f"a layer must be an object with a 'type', got {cfg!r:.80}")
    name = cfg["type"]
    if name not in _SCHEMA or (nested and name == "Inverse"):
        raise ValueError(f"unknown layer type {name!r}")
    fields, check = _SCHEMA[name]
    given = set(cfg) - {"type"}
    if given != fields:
        wrong = sorted(given ^ fields)
        raise ValueError(f"{name} layer: missing or unknown field(s) {wrong}")
    check(cfg)


def _layer_dims(cfg: dict[str, Any]) -> tuple[int, int]:
    if cfg["type"] == "Inverse":
        return _layer_dims(cfg["layer"])
    dim = cfg["input_dim"] if "input_dim" in cfg else len(cfg["permutation"])
    return dim, cfg.get("context_dim", 0)


def _check_config_v2(config: Any) -> dict[str, Any]:
    """The format-2 configuration, validated; a `ValueError` naming the first problem."""
    keys = {"input_dim", "context_dim", "dtype", "layers", "data_transforms"}
    keys |= {"context_transforms", "num_parameters", "builder"}
    if not isinstance(config, dict) or set(config) != keys:
        raise ValueError(f"the configuration must have exactly the fields {sorted(keys)}")
    dim, ctx = _int(config["input_dim"], "input_dim"), _int(config["context_dim"], "context_dim", 0)
    if config["dtype"] not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_FLOAT_DTYPES)}, got {config['dtype']!r}")
    _int(config["num_parameters"], "num_parameters", 0, 1 << 50)
    for group, size, context_ok in (
        ("layers", dim, True),
        ("data_transforms", dim, False),
        ("context_transforms", ctx, False),
    ):
        items = config[group]
        if not isinstance(items, list) or len(items) > MAX_LAYERS:
            raise ValueError(f"{group} must be a list of at most {MAX_LAYERS} layers")
        for i, cfg in enumerate(items):
            _check_layer(cfg)
            d, c = _layer_dims(cfg)
            if d != size or c not in ((0, ctx) if context_ok else (0,)):
                raise ValueError(f"{group}[{i}] has dims ({d}, {c}), the flow ({size}, {ctx})")
            if not context_ok and cfg["type"] not in _FIXED:
                raise ValueError(f"{group}[{i}] must be Standardize or SupportMap")
    if config["context_transforms"] and not ctx:
        raise ValueError("context_transforms in an unconditional flow")
    return config


# --------------------------------------------------------------------------- size


def _network_size(d_in: int, hidden: list[int], d_out: int, residual: bool, masked: bool) -> int:
    """Upper bound on the values of an MLP/MADE: weights, biases and (MADE) masks."""
    widths = [d_in, *hidden, d_out]
    size = sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:], strict=True))
    if residual:
        size += sum(2 * (h + 1) * h for h in hidden)
    return size * (2 if masked else 1) + d_in


def _layer_size(cfg: dict[str, Any]) -> int:
    """Upper bound on the values (parameters and buffers) of the layer ``cfg`` describes."""
    name = cfg["type"]
    if name == "Inverse":
        return _layer_size(cfg["layer"])
    d, c = _layer_dims(cfg)
    if name in ("Autoregressive", "Coupling"):
        p = decode_transformer(cfg["transformer"]).num_params
        residual = bool(cfg.get("residual", False))
        return 3 * d + _network_size(d + c, cfg["hidden_dims"], d * p, residual, name != "Coupling")
    if name == "LULinear":
        return 3 * d * d + 6 * d
    if name == "Precondition":
        return 4 * d + (0 if cfg["diagonal"] else d * d)
    return 4 * d


def _v2_size(config: dict[str, Any]) -> int:
    groups = config["layers"] + config["data_transforms"] + config["context_transforms"]
    return 2 * config["input_dim"] + sum(_layer_size(cfg) for cfg in groups)


def _check_size(path: Any, size: int, held: int, max_parameters: int) -> None:
    """Refuse a configuration beyond the limit, or far larger than the weights in the file."""
    if size > max_parameters:
        raise _fail(
            path,
            f"its configuration implies up to {size:,} values, above max_parameters="
            f"{max_parameters:,}; pass a larger max_parameters to load it if you trust the file",
        )
    if size > 4 * held + 100_000:
        raise _fail(
            path,
            f"is corrupted or forged: its configuration implies up to {size:,} values but "
            f"the file holds {held:,}",
        )


# --------------------------------------------------------------------------- format 1


_V1_INTS = {"input_dim": (1, MAX_WIDTH), "context_dim": (0, MAX_WIDTH)}
_V1_INTS |= {"num_layers": (1, MAX_LAYERS), "count_bins": (1, 1 << 12), "seed": (0, 1 << 62)}
_V1_BOOLS = {"coupling", "invert", "residual"}
_V1_FLOATS = {"bound", "log_scale_bound"}


def _v1_kwargs(spec: Any) -> tuple[Callable[..., Flow], dict[str, Any]]:
    """The builder and decoded, validated arguments of a format-1 configuration."""
    if not isinstance(spec, dict) or not isinstance(spec.get("kwargs"), dict):
        raise ValueError("the configuration has no builder arguments")
    builder = _BUILDERS.get(spec.get("builder")) if isinstance(spec.get("builder"), str) else None
    if builder is None:
        raise ValueError(f"unknown builder {spec.get('builder')!r}")
    known = set(inspect.signature(builder).parameters)
    kwargs = {}
    for key, value in spec["kwargs"].items():
        if key not in known:
            raise ValueError(f"{builder.__name__} has no argument {key!r}")
        kwargs[key] = _v1_value(key, value)
    return builder, kwargs


def _v1_value(key: str, value: Any) -> Any:
    if key in _V1_INTS:
        return _int(value, key, *_V1_INTS[key])
    if key in _V1_BOOLS:
        return _bool(value, key)
    if key in _V1_FLOATS:
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"{key} must be a positive number, got {value!r}")
        return float(value)
    if key == "hidden_dims":
        return tuple(_widths(value, key))
    if key == "activation":
        if not isinstance(value, dict) or set(value) != {"activation"}:
            raise ValueError(f"bad activation {value!r}")
        return decode_activation(value["activation"])
    if key == "transformer":
        if not isinstance(value, dict) or set(value) != {"transformer", "args"}:
            raise ValueError(f"bad transformer {value!r}")
        return decode_transformer({"type": value["transformer"], "args": value["args"]})
    raise ValueError(f"unexpected argument {key!r}")


def builder_size(builder: Callable[..., Flow], kwargs: dict[str, Any]) -> int:
    """Upper bound on the values (parameters and buffers) ``builder(**kwargs)`` allocates.

    Computed from the arguments alone, so a caller can refuse a flow before building it
    (`load` refuses files beyond `MAX_PARAMETERS`; the command line refuses to fit them).

    Example:
        >>> from pyroflows import flows
        >>> from pyroflows.io import builder_size
        >>> flow = flows.maf(4, num_layers=2, hidden_dims=(16,))
        >>> actual = sum(t.numel() for t in flow.state_dict().values())
        >>> arguments = {"input_dim": 4, "num_layers": 2, "hidden_dims": (16,)}
        >>> actual <= builder_size(flows.maf, arguments)
        True
    """
    defaults = {
        k: p.default
        for k, p in inspect.signature(builder).parameters.items()
        if p.default is not p.empty
    }
    a = defaults | kwargs
    if "transformer" in a:
        params = a["transformer"].num_params
    elif builder.__name__ == "nsf":
        params = 3 * a["count_bins"] + 1
    else:
        params = 2
    d, c = a["input_dim"], a.get("context_dim", 0)
    net = _network_size(d + c, list(a["hidden_dims"]), d * params, a.get("residual", False), True)
    return a["num_layers"] * (net + 3 * d) + 6 * d


# --------------------------------------------------------------------------- building


def _build_v2(config: dict[str, Any]) -> Flow:
    def build(cfg: dict[str, Any]) -> FlowModule:
        args = {k: v for k, v in cfg.items() if k != "type"}
        if cfg["type"] == "Inverse":
            return Inverse(build(args["layer"]))
        return LAYER_TYPES[cfg["type"]].from_config(args)

    return Flow(
        [build(cfg) for cfg in config["layers"]],
        config["input_dim"],
        config["context_dim"],
        data_transforms=[build(cfg) for cfg in config["data_transforms"]],
        context_transforms=[build(cfg) for cfg in config["context_transforms"]],
    )


# --------------------------------------------------------------------------- weights


def _migrate(flow: Flow, state: dict[str, torch.Tensor], version: int) -> dict[str, torch.Tensor]:
    """Old weights in today's names and layout: the retired coupling ``merge_index`` is
    dropped, before format 3 the conditioners' output rows become parameter-major, and
    before format 4 a `SupportMap`'s one-sided maps were logarithms (``scale = inf``)."""
    state = {k: v for k, v in state.items() if not k.endswith(".merge_index")}
    for name, module in flow.named_modules():
        if version < 3 and isinstance(module, Structure):
            module.load_feature_major(state, f"{name}.")
        if version < 4 and isinstance(module, SupportMap):
            module.upgrade_state(state, f"{name}.")
    return state


def _check_weights(flow: Flow, state: dict[str, torch.Tensor]) -> None:
    """Raise a `ValueError` unless ``state`` fits ``flow`` exactly (see the module docs)."""
    expected = flow.state_dict()
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(
            f"weights do not match the layers (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    may_be_infinite = {
        f"{name}.{b}"
        for name, m in flow.named_modules()
        if isinstance(m, SupportMap)
        for b in ("lower", "upper", "scale")
    }
    for key, want in expected.items():
        got = state[key]
        if got.shape != want.shape:
            raise ValueError(f"{key} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        if want.is_floating_point() and got.dtype not in _FLOAT_DTYPES.values():
            raise ValueError(f"{key} has dtype {got.dtype}, expected a float dtype")
        if not want.is_floating_point() or key.endswith("mask"):
            if got.dtype != want.dtype or not torch.equal(got, want):
                raise ValueError(f"{key} does not match the structure the configuration implies")
        elif key in may_be_infinite:
            if bool(torch.isnan(got).any()):
                raise ValueError(f"{key} holds NaN")
        elif not bool(torch.isfinite(got).all()):
            raise ValueError(f"{key} holds NaN or infinite values")


def _check_fixed_values(flow: Flow) -> None:
    """Re-run the checks of the fixed maps' constructors on the loaded values."""
    for module in flow.modules():
        if isinstance(module, Standardize):
            Standardize(module.loc, module.scale)
        elif isinstance(module, SupportMap):
            SupportMap(module.lower, module.upper, module.scale)
        elif isinstance(module, Precondition):
            Precondition(module.loc, module.scale)
        elif isinstance(module, DiagNormal) and not bool((module.scale > 0).all()):
            raise ValueError("the base distribution's scale must be positive")


def _load_weights(
    flow: Flow, state: dict[str, torch.Tensor], dtype: torch.dtype, version: int
) -> Flow:
    flow = flow.to(dtype)
    state = _migrate(flow, state, version)
    _check_weights(flow, state)
    flow.load_state_dict(state)
    _check_fixed_values(flow)
    return flow


# --------------------------------------------------------------------------- loading


def _device(map_location: Any) -> torch.device:
    try:
        device = torch.device("cpu" if map_location is None else map_location)
    except (RuntimeError, TypeError):
        raise ValueError(f"map_location {map_location!r} is not a device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"map_location={map_location!r}, but CUDA is not available")
    return device


def _metadata(path: Any, payload: dict[str, Any]) -> dict[str, Any]:
    meta = _json(path, payload["metadata"], "metadata")
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise _fail(path, "its metadata is not a JSON object")
    return meta


def load(
    path: str | os.PathLike,
    map_location: str | torch.device | None = "cpu",
    *,
    max_parameters: int = MAX_PARAMETERS,
) -> Flow:
    """Read a flow written by `save`; ``flow.metadata`` holds the saved metadata.

    Args:
        path: the model file.
        map_location: device to put the flow on (checked before reading).
        max_parameters: refuse files whose configuration implies more values (parameters and
            buffers) than this, before allocating them.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ModelFileError: the file is not a valid pyroflows model (the message says why).
        ValueError: ``map_location`` is not an available device.
    """
    device = _device(map_location)
    payload = _read(path, max_parameters)
    config = _json(path, payload["config"], "configuration")
    try:
        if payload["format_version"] >= 2:
            flow = _flow_v2(
                path, config, payload["state_dict"], max_parameters, payload["format_version"]
            )
        else:
            flow = _flow_v1(path, config, payload["state_dict"], max_parameters)
    except ModelFileError:
        raise
    except (ValueError, TypeError, KeyError, RuntimeError) as error:
        raise _fail(path, f"invalid model: {' '.join(str(error).split())}") from None
    flow.metadata = _metadata(path, payload)
    return flow.to(device)


def _held(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in state.values())


def _flow_v2(path: Any, config: Any, state: dict, max_parameters: int, version: int) -> Flow:
    """A flow from a file of format 2 or 3 (one configuration entry per layer)."""
    config = _check_config_v2(config)
    _check_size(path, _v2_size(config), _held(state), max_parameters)
    flow = _load_weights(_build_v2(config), state, _FLOAT_DTYPES[config["dtype"]], version)
    if config["num_parameters"] != sum(p.numel() for p in flow.parameters()):
        raise ValueError("the parameter count does not match the configuration")
    flow.config = config["builder"]
    return flow


def _flow_v1(path: Any, config: Any, state: dict, max_parameters: int) -> Flow:
    if not isinstance(config, dict) or not isinstance(config.get("flow"), dict):
        raise ValueError("the configuration has no 'flow' entry")
    dtype = _FLOAT_DTYPES.get(config.get("dtype", "float32"))
    if dtype is None:
        raise ValueError(f"bad dtype {config.get('dtype')!r}")
    builder, kwargs = _v1_kwargs(config["flow"])
    _check_size(path, builder_size(builder, kwargs), _held(state), max_parameters)
    flow = builder(**kwargs)
    for key, target, dim in (
        ("data_transforms", flow.data_transforms, flow.input_dim),
        ("context_transforms", flow.context_transforms, flow.context_dim),
    ):
        items = config.get(key, [])
        if not isinstance(items, list) or len(items) > 2:
            raise ValueError(f"{key} must be a list of at most 2 maps")
        for item in items:
            if not isinstance(item, dict) or item.get("type") not in _FIXED:
                raise ValueError(f"{key} may hold only Standardize and SupportMap")
            size = _int(item.get("input_dim"), "input_dim", dim, dim)
            target.append(_FIXED[item["type"]].placeholder(size))
    _unbound_splines(flow)
    return _load_weights(flow, state, dtype, version=1)


def _unbound_splines(flow: Flow) -> None:
    """Format-1 files predate the spline's raw-parameter bound: their splines had none."""
    for layer in flow.layers:
        transformer = getattr(layer, "transformer", None)
        if transformer is not None and "raw_bound" in vars(transformer):
            layer.transformer = type(transformer)(**{**vars(transformer), "raw_bound": math.inf})


# --------------------------------------------------------------------------- describing


@dataclass(frozen=True)
class ModelDescription:
    """What a model file holds, read without building the flow (see `describe`).

    Attributes:
        path: the file.
        format_version: its format (1 to 4).
        dtype: the floating dtype of its parameters.
        input_dim: event size ``D``.
        context_dim: context size (0: unconditional).
        builder: the builder call that made the flow (e.g. ``"nsf(num_layers=5, ...)"``),
            ``None`` for a hand-assembled flow.
        layers: one line per layer, e.g. ``"Autoregressive(RationalQuadraticSpline(...), ...)"``.
        num_parameters: learnable values.
        data_transforms: type names of the fixed maps on the data side.
        data_bounds: ``(low, high)`` per data column (``-inf``/``inf`` where unbounded), empty
            without a `SupportMap`.
        context_bounds: the same for the context columns.
        metadata: the saved metadata.
    """

    path: str
    format_version: int
    dtype: str
    input_dim: int
    context_dim: int
    builder: str | None
    layers: list[str]
    num_parameters: int
    data_transforms: list[str]
    data_bounds: list[tuple[float, float]] = field(default_factory=list)
    context_bounds: list[tuple[float, float]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


def _text(value: Any) -> str:
    """A configuration value as it would be written in Python."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict) and set(value) == {"type", "args"}:
        inner = ", ".join(f"{k}={_text(v)}" for k, v in value["args"].items())
        return f"{value['type']}({inner})"
    if isinstance(value, dict) and set(value) == {"transformer", "args"}:
        return _text({"type": value["transformer"], "args": value["args"]})
    if isinstance(value, dict) and set(value) == {"activation"}:
        return str(value["activation"])
    if isinstance(value, list | tuple):
        return "(" + ", ".join(_text(v) for v in value) + ")"
    return str(value)


def _layer_text(cfg: dict[str, Any]) -> str:
    if cfg["type"] == "Inverse":
        return f"Inverse({_layer_text(cfg['layer'])})"
    hidden = {"type", "input_dim", "context_dim", "order", "mask", "permutation"}
    args = ", ".join(f"{k}={_text(v)}" for k, v in cfg.items() if k not in hidden)
    return f"{cfg['type']}({args})"


def _builder_text(spec: Any) -> str | None:
    if not isinstance(spec, dict) or not isinstance(spec.get("kwargs"), dict):
        return None
    args = {k: v for k, v in spec["kwargs"].items() if k not in ("input_dim", "context_dim")}
    return f"{spec.get('builder')}({', '.join(f'{k}={_text(v)}' for k, v in args.items())})"


def _bounds(
    state: Mapping[str, torch.Tensor], prefix: str, kinds: list[str]
) -> list[tuple[float, float]]:
    """Per-column (low, high) of the SupportMap among the maps ``kinds`` (empty without one)."""
    if "SupportMap" not in kinds:
        return []
    i = kinds.index("SupportMap")
    lower, upper = state[f"{prefix}.{i}.lower"], state[f"{prefix}.{i}.upper"]
    return list(zip(lower.tolist(), upper.tolist(), strict=True))


def describe(path: str | os.PathLike, *, max_parameters: int = MAX_PARAMETERS) -> ModelDescription:
    """Describe the model file at ``path`` without building the flow.

    The file gets every check that needs no building (format, schema, size limit, digest).
    A format-1 file has no per-layer configuration, so it is loaded (with all of `load`'s
    checks) to be described.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ModelFileError: the file is not a valid pyroflows model.

    Example:
        >>> import tempfile
        >>> from pyroflows import flows, save
        >>> from pyroflows.io import describe
        >>> path = tempfile.mkdtemp() + "/model.pt"
        >>> save(flows.realnvp(3, num_layers=2), path)
        >>> describe(path).layers[0]
        'Coupling(transformer=Affine(log_scale_bound=3), hidden_dims=(64, 64), activation=ReLU)'
    """
    payload = _read(path, max_parameters)
    if payload["format_version"] < 2:
        return _describe_flow(path, load(path, max_parameters=max_parameters), 1)
    try:
        config = _check_config_v2(_json(path, payload["config"], "configuration"))
        state = payload["state_dict"]
        _check_size(path, _v2_size(config), sum(t.numel() for t in state.values()), max_parameters)
        data_kinds = [c["type"] for c in config["data_transforms"]]
        context_kinds = [c["type"] for c in config["context_transforms"]]
        return ModelDescription(
            path=os.fspath(path),
            format_version=payload["format_version"],
            dtype=config["dtype"],
            input_dim=config["input_dim"],
            context_dim=config["context_dim"],
            builder=_builder_text(config["builder"]),
            layers=[_layer_text(cfg) for cfg in config["layers"]],
            num_parameters=config["num_parameters"],
            data_transforms=data_kinds,
            data_bounds=_bounds(state, "data_transforms", data_kinds),
            context_bounds=_bounds(state, "context_transforms", context_kinds),
            metadata=_metadata(path, payload),
        )
    except ModelFileError:
        raise
    except (ValueError, TypeError, KeyError) as error:
        raise _fail(path, f"invalid model: {' '.join(str(error).split())}") from None


def _describe_flow(path: Any, flow: Flow, version: int) -> ModelDescription:
    def kinds(modules: Any) -> list[str]:
        return [type(m).__name__ for m in modules]

    def bounds(modules: Any) -> list[tuple[float, float]]:
        maps = [m for m in modules if isinstance(m, SupportMap)]
        return (
            list(zip(maps[0].lower.tolist(), maps[0].upper.tolist(), strict=True)) if maps else []
        )

    return ModelDescription(
        path=os.fspath(path),
        format_version=version,
        dtype=_dtype_name(flow),
        input_dim=flow.input_dim,
        context_dim=flow.context_dim,
        builder=_builder_text(flow.config),
        layers=[_layer_text(_layer_config(m)) for m in flow.layers],
        num_parameters=sum(p.numel() for p in flow.parameters()),
        data_transforms=kinds(flow.data_transforms),
        data_bounds=bounds(flow.data_transforms),
        context_bounds=bounds(flow.context_transforms),
        metadata=flow.metadata,
    )
