"""Saving and loading flows: one file with a JSON configuration and the weights.

The file is written with `torch.save` and read with ``torch.load(weights_only=True)``:
it holds only strings and tensors, so loading a model never executes code.

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

import json
import os
from typing import Any

import torch

from . import flows as _flows
from .distribution import Flow
from .transforms.preprocessing import Standardize, SupportMap

__all__ = ["save", "load", "FORMAT"]

#: Marker stored in every model file.
FORMAT = "pyroflows-model"
_FORMAT_VERSION = 1
_BUILDERS = {name: getattr(_flows, name) for name in _flows.__all__}
_FIXED = {"Standardize": Standardize.identity, "SupportMap": SupportMap.unbounded}


def _fixed_config(modules: torch.nn.ModuleList) -> list[dict[str, Any]]:
    out = []
    for m in modules:
        name = type(m).__name__
        if name not in _FIXED:
            raise ValueError(f"cannot save a flow with a {name} in its data/context transforms")
        out.append({"type": name, "input_dim": m.input_dim})
    return out


def save(flow: Flow, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> None:
    """Write ``flow`` (configuration, weights, ``flow.metadata``) to ``path``.

    Args:
        flow: a flow made by a `pyroflows.flows` builder (its ``config`` says how to rebuild
            it). Hand-assembled flows have no config: save their ``state_dict`` instead.
        path: file to write.
        metadata: JSON-serialisable information to store; defaults to ``flow.metadata``.
    """
    if not isinstance(flow, Flow):
        raise TypeError(f"expected a pyroflows.Flow, got {type(flow).__name__}")
    if flow.config is None:
        raise ValueError(
            "this flow was not made by a pyroflows.flows builder, so it has no configuration "
            "to rebuild it from; save flow.state_dict() with torch.save instead"
        )
    dtypes = {t.dtype for t in flow.parameters()} | {
        t.dtype for t in flow.buffers() if t.is_floating_point()
    }
    config = {
        "flow": flow.config,
        "dtype": str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32",
        "data_transforms": _fixed_config(flow.data_transforms),
        "context_transforms": _fixed_config(flow.context_transforms),
    }
    meta = flow.metadata if metadata is None else metadata
    try:
        config_json, meta_json = json.dumps(config), json.dumps(meta)
    except TypeError as error:
        raise ValueError(f"configuration or metadata is not JSON-serialisable: {error}") from None
    state = {k: v.detach().cpu() for k, v in flow.state_dict().items()}
    torch.save(
        {
            "format": FORMAT,
            "format_version": _FORMAT_VERSION,
            "config": config_json,
            "metadata": meta_json,
            "state_dict": state,
        },
        path,
    )


def load(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> Flow:
    """Read a flow written by `save`; ``flow.metadata`` holds the saved metadata.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a pyroflows model (or was written by a newer format).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # pickle, zip or unsafe-type errors all mean "not ours"
        raise ValueError(f"{path} is not a pyroflows model file") from None
    if (
        not isinstance(payload, dict)
        or payload.get("format") != FORMAT
        or not {"config", "metadata", "state_dict"} <= set(payload)
    ):
        raise ValueError(f"{path} is not a pyroflows model file")
    if payload.get("format_version", 0) > _FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer pyroflows; upgrade to load it")
    config = json.loads(payload["config"])
    spec = config["flow"]
    builder = _BUILDERS.get(spec.get("builder"))
    if builder is None:
        raise ValueError(f"{path}: unknown builder {spec.get('builder')!r}")
    kwargs = {k: _flows.decode_config_value(v) for k, v in spec["kwargs"].items()}
    flow = builder(**kwargs)
    for key, target in (
        ("data_transforms", flow.data_transforms),
        ("context_transforms", flow.context_transforms),
    ):
        for item in config[key]:
            target.append(_FIXED[item["type"]](item["input_dim"]))
    dtype = getattr(torch, config.get("dtype", "float32"), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{path}: bad dtype {config.get('dtype')!r}")
    flow = flow.to(dtype)
    flow.load_state_dict(payload["state_dict"])
    flow.metadata = json.loads(payload["metadata"])
    return flow
