"""Forged and damaged model files: every one is loaded or refused with a `ModelFileError`.

The files are generated from valid ones: every field of the configuration mutated (with the
digest recomputed, as a forger would, and without, as damage would leave it), weights
dropped, reshaped, retyped, set to NaN or infinity, structural buffers (masks, permutations)
and fixed maps (scales, bounds) falsified, the payload's entries removed or retyped, and the
raw bytes truncated or flipped. For each file `load` must either return a usable flow (no
NaN log-densities) or raise `ModelFileError`, and `describe` must refuse whatever `load`
refuses except weights that do not fit the layers (only building can tell). Anything else
is a failure: another exception type is a traceback for the user, NaN scores are a silent
wrong result, and a file damaged without a new digest must never load.

Set ``PYROFLOWS_FUZZ_REPORT=path.json`` to write the counts.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from pyroflows import ActNorm, Flow, Inverse, LULinear, Precondition, fit, flows, load, save
from pyroflows import io as io_module
from pyroflows.io import ModelFileError, describe

ODD_VALUES: list[Any] = [None, "x", True, -1, 10**10, 1.5, float("nan"), {}]


def _models() -> dict[str, Flow]:
    torch.manual_seed(0)
    data, context = torch.rand(64, 3) * 2, torch.randn(64, 2)
    nsf = flows.nsf(3, 2, num_layers=2, hidden_dims=(6,), count_bins=3)
    fit(
        nsf,
        data,
        context=context,
        epochs=1,
        bounds=[(0, 2), (0, None), (None, None)],
        progress=False,
    )
    coupling = flows.realnvp(3, num_layers=2, hidden_dims=(6,))
    fit(coupling, data, epochs=1, progress=False)
    mixed = Flow(
        [LULinear(3, [2, 0, 1]), Inverse(ActNorm(3)), Precondition(torch.zeros(3), torch.eye(3))], 3
    )
    return {"nsf_bounded_conditional": nsf, "realnvp_standardized": coupling, "mixed": mixed}


def _paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Paths to every entry of a JSON value (long lists: their first item and the list)."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value[:1] if len(value) > 3 else value):
            yield from _paths(item, prefix + (i,))


def _set(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    value = copy.deepcopy(value)
    target = value
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new
    return value


def _delete(value: Any, path: tuple) -> Any:
    value = copy.deepcopy(value)
    target = value
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return value


def _with(payload: dict, redigest: bool = True, **changes: Any) -> dict:
    payload = {**payload, **changes}
    if redigest and all(isinstance(payload.get(k), str) for k in ("config", "metadata")):
        if isinstance(payload.get("state_dict"), dict):
            payload["digest"] = io_module._digest(
                payload["config"], payload["metadata"], payload["state_dict"]
            )
    return payload


def _config_cases(payload: dict) -> Iterator[tuple[str, dict, bool]]:
    config = json.loads(payload["config"])
    for path in _paths(config):
        name = "/".join(map(str, path)) or "<root>"
        for odd in ODD_VALUES:
            new = json.dumps(_set(config, path, odd))
            yield f"config {name} = {odd!r:.20}", _with(payload, config=new), True
        if path:
            yield (
                f"config {name} deleted",
                _with(payload, config=json.dumps(_delete(config, path))),
                True,
            )
    yield "config not JSON", _with(payload, config="{"), True
    yield (
        "config edited, digest stale",
        _with(payload, False, config=payload["config"].replace("3", "4")),
        False,
    )


def _weight_cases(payload: dict) -> Iterator[tuple[str, dict, bool]]:
    state = payload["state_dict"]
    for key, tensor in state.items():
        variants = {
            "dropped": None,
            "reshaped": tensor.reshape(-1)[:-1] if tensor.numel() > 1 else tensor.reshape(1, 1, -1),
            "as int": tensor.to(torch.int32) if tensor.is_floating_point() else tensor.float(),
            "as float8": tensor.to(torch.float8_e4m3fn) if tensor.is_floating_point() else None,
        }
        if tensor.is_floating_point() and tensor.numel():
            variants |= {
                "NaN": tensor.clone().fill_(float("nan")),
                "inf": tensor.clone().fill_(float("inf")),
            }
            variants |= {"zero": torch.zeros_like(tensor), "negative": -tensor.abs() - 1}
            variants |= {"ones": torch.ones_like(tensor)}
        else:
            variants |= {
                "ones": torch.ones_like(tensor),
                "reversed": tensor.flip(0) if tensor.dim() else tensor,
            }
        for label, new in variants.items():
            if label != "dropped" and (new is None or _equal(new, tensor)):
                continue  # nothing changed
            changed = {k: v for k, v in state.items() if k != key}
            if new is not None:
                changed[key] = new
            yield f"weight {key} {label}", _with(payload, state_dict=changed), True
            if label == "zero" and tensor.numel():
                yield (
                    f"weight {key} {label}, digest stale",
                    _with(payload, False, state_dict=changed),
                    False,
                )
    flipped = {k: v.clone() for k, v in state.items()}
    key = next(k for k, v in flipped.items() if v.is_floating_point() and v.numel())
    flipped[key].view(torch.uint8).reshape(-1)[0] ^= 0x10
    yield "a flipped bit, digest stale", _with(payload, False, state_dict=flipped), False
    yield "an extra weight", _with(payload, state_dict={**state, "extra": torch.zeros(2)}), True


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _payload_cases(payload: dict) -> Iterator[tuple[str, Any, bool]]:
    for key in list(payload):
        yield f"payload without {key}", {k: v for k, v in payload.items() if k != key}, True
        for odd in (None, 3, "text", [], {"a": 1}):
            yield f"payload {key} = {odd!r}", _with(payload, False, **{key: odd}), True
    yield "payload is a list", [payload], True
    yield "format_version from the future", _with(payload, format_version=99), True
    yield "metadata is a list", _with(payload, metadata="[1, 2]"), True
    yield "metadata not JSON", _with(payload, metadata="{'a'"), True


def _usable(flow: Flow) -> bool:
    """Log-densities without NaN (``-inf`` outside a declared support is a right answer)."""
    x = torch.rand(5, flow.input_dim)
    c = torch.randn(5, flow.context_dim) if flow.context_dim else None
    with torch.no_grad():
        log_prob = flow.condition(c).log_prob(x.to(next(flow.parameters()).dtype))
    return not bool(torch.isnan(log_prob).any())


def _same(flow: Flow, original: Flow | None) -> bool:
    if original is None:
        return False
    a, b = flow.state_dict(), original.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _outcome(path: str, forged: bool, original: Flow | None = None) -> str:
    """``"loaded"``, ``"refused"``, ``"traceback: ..."``, ``"silent: ..."``.

    A damaged file (``forged=False``) may load only if its bytes changed nothing that is
    read (e.g. zip padding): the flow must equal ``original``.
    """
    results = []
    for reader in (load, describe):
        try:
            result = reader(path)
        except ModelFileError:
            results.append("refused")
            continue
        except Exception as error:  # anything else reaches the user as a traceback
            return f"traceback: {reader.__name__} raised {type(error).__name__}: {error}"
        if not forged and not (reader is describe or _same(result, original)):
            return f"silent: {reader.__name__} accepted a damaged file"
        if reader is load and not _usable(result):
            return "silent: loaded a flow with non-finite log-densities"
        results.append("loaded")
    # `describe` checks what needs no building (schema, size, digest); only `load` can
    # match the weights to the layers, so a forged file may be described yet not loaded.
    if results == ["loaded", "refused"]:
        return "silent: loaded, but describe refused"
    return results[0]


def _cases(payload: dict) -> Iterator[tuple[str, Any, bool]]:
    yield from _config_cases(payload)
    yield from _weight_cases(payload)
    yield from _payload_cases(payload)


def test_forged_and_damaged_model_files(tmp_path):
    counts: Counter = Counter()
    problems = []
    for model_name, flow in _models().items():
        payload = io_module._payload(flow, {"columns": ["a", "b", "c"]})
        for label, forged_payload, forged in _cases(payload):
            path = str(tmp_path / "m.pt")
            torch.save(forged_payload, path)
            outcome = _outcome(path, forged)
            counts[outcome.split(":")[0]] += 1
            if outcome.startswith(("traceback", "silent")):
                problems.append(f"{model_name}: {label}: {outcome}")
        save(flow, tmp_path / "valid.pt")
        raw = (tmp_path / "valid.pt").read_bytes()
        for cut in (0, 1, 10, len(raw) // 2, len(raw) - 1):
            (tmp_path / "m.pt").write_bytes(raw[:cut])
            outcome = _outcome(str(tmp_path / "m.pt"), False)
            counts[outcome.split(":")[0]] += 1
            if outcome.startswith(("traceback", "silent")):
                problems.append(f"{model_name}: cut at byte {cut}: {outcome}")
        for position in range(0, len(raw), max(1, len(raw) // 24)):
            damaged = bytearray(raw)
            damaged[position] ^= 0xFF
            (tmp_path / "m.pt").write_bytes(bytes(damaged))
            outcome = _outcome(str(tmp_path / "m.pt"), False, flow)
            counts[outcome.split(":")[0]] += 1
            if outcome.startswith(("traceback", "silent")):
                problems.append(f"{model_name}: byte {position} flipped: {outcome}")
    report = os.environ.get("PYROFLOWS_FUZZ_REPORT")
    if report:
        with open(report, "w") as handle:
            json.dump({"files": sum(counts.values()), **counts}, handle, indent=2)
    assert not problems, f"{len(problems)} of {sum(counts.values())} files:\n" + "\n".join(
        problems[:30]
    )
    assert counts["refused"] > 1000 and counts["loaded"] > 0


@pytest.mark.parametrize(
    "change",
    [
        {"hidden_dims": [10**6, 10**6]},
        {"hidden_dims": [2**20] * 64},
        {"layers": 999},
        {
            "transformer": {
                "type": "RationalQuadraticSpline",
                "args": {"count_bins": 999, "bound": 5.0},
            }
        },
    ],
    ids=["width_1e6", "deep_and_wide", "many_layers", "many_bins"],
)
def test_forged_sizes_fail_before_allocating(tmp_path, change):
    """Under a 1.5 GB address-space limit, huge configurations end in a one-line refusal."""
    flow = flows.nsf(4, num_layers=2, hidden_dims=(8,))
    payload = io_module._payload(flow, {})
    config = json.loads(payload["config"])
    if "layers" in change:
        config["layers"] = config["layers"] * change["layers"]
    else:
        for layer in config["layers"]:
            layer.update(change)
    torch.save(_with(payload, config=json.dumps(config)), tmp_path / "big.pt")
    script = textwrap.dedent(
        f"""
        import resource, sys
        import pyroflows
        from pyroflows.io import ModelFileError, describe, load
        peak = int(open('/proc/self/status').read().split('VmPeak:')[1].split()[0]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (peak + 1_500_000_000, resource.RLIM_INFINITY))
        for reader in (describe, load):
            try:
                reader({str(tmp_path / "big.pt")!r})
            except ModelFileError as error:
                print("refused:", error)
            else:
                sys.exit("loaded")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("refused:") == 2, result.stdout
