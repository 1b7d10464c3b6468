"""The property checks of ``pyroflows.testing`` run over every registered layer.

Layers x {no context, context} x batch shapes {(), (7,), (2, 3)}, in the ``--dtype`` and on
the ``--device`` given to pytest (float64 on the CPU by default).
"""

from __future__ import annotations

import inspect

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyroflows
from pyroflows import Flow, FlowModule, Inverse
from pyroflows.testing import (
    LAYERS,
    batch_jacobian,
    check_fused,
    check_jacobian_structure,
    check_log_det,
    check_round_trip,
    check_shapes,
    check_state_dict_round_trip,
    randomize_,
)

D, C = 4, 3
BATCH_SHAPES = [(), (7,), (2, 3)]
CASES = [
    (name, cond)
    for name, spec in LAYERS.items()
    for cond in ((False, True) if spec.conditional else (False,))
]


def _ids(cases: list[tuple[str, bool]]) -> list[str]:
    return [f"{name}-{'ctx' if cond else 'noctx'}" for name, cond in cases]


IDS = _ids(CASES)
# Subsets for the properties that apply to some layers only (instead of skipping the rest).
UNCONDITIONAL = [(name, cond) for name, cond in CASES if not cond]
CONDITIONAL = [(name, cond) for name, cond in CASES if cond]
IDENTITY_AT_START = [(name, cond) for name, cond in CASES if LAYERS[name].starts_as_identity]
WITH_PARAMETERS = [
    (name, cond)
    for name, cond in CASES
    if list(LAYERS[name].build(D, C if cond else 0).parameters())
]


def make(name: str, cond: bool, dtype: torch.dtype, device: torch.device) -> FlowModule:
    layer = LAYERS[name].build(D, C if cond else 0)
    return randomize_(layer).to(dtype=dtype, device=device)


def context_for(cond: bool, batch_shape, dtype, device):
    if not cond:
        return None
    return torch.randn(batch_shape + (C,), dtype=dtype, device=device)


@pytest.fixture(params=CASES, ids=IDS)
def case(request):
    return request.param


@pytest.fixture(params=BATCH_SHAPES, ids=str)
def conditioned(request, case, dtype, device):
    """The case's layer bound to a context (if it takes one), and inputs of a batch shape."""
    name, cond = case
    batch_shape = request.param
    layer = make(name, cond, dtype, device)
    x = LAYERS[name].sample(batch_shape + (D,), dtype, device)
    return layer.condition(context_for(cond, batch_shape, dtype, device)), x


def test_shapes(conditioned):
    check_shapes(*conditioned)


def test_round_trip(conditioned, tol):
    check_round_trip(*conditioned, tol)


def test_log_det_matches_autograd_jacobian(conditioned, tol):
    check_log_det(*conditioned, tol)


def test_fused_calls_match_separate_calls(conditioned, tol):
    check_fused(*conditioned, tol)


def test_jacobian_structure(case, dtype, device):
    name, cond = case
    layer = make(name, cond, dtype, device)
    x = LAYERS[name].sample((7, D), dtype, device)
    check_jacobian_structure(layer, layer.condition(context_for(cond, (7,), dtype, device)), x)


@pytest.mark.parametrize("case", UNCONDITIONAL, ids=_ids(UNCONDITIONAL))
def test_unconditional_module_is_its_own_transform(case, dtype, device, tol):
    name, cond = case
    layer = make(name, cond, dtype, device)
    x = LAYERS[name].sample((5, D), dtype, device)
    check_round_trip(layer, x, tol)
    check_fused(layer, x, tol)


@pytest.mark.parametrize("case", IDENTITY_AT_START, ids=_ids(IDENTITY_AT_START))
def test_zero_initialised_layer_is_identity(case, dtype, device):
    name, cond = case
    layer = LAYERS[name].build(D, C if cond else 0).to(dtype=dtype, device=device)
    x = LAYERS[name].sample((5, D), dtype, device)
    y, ladj = layer.condition(context_for(cond, (5,), dtype, device)).call_and_ladj(x)
    torch.testing.assert_close(y, x)
    torch.testing.assert_close(ladj, torch.zeros_like(ladj))


@pytest.mark.parametrize("case", WITH_PARAMETERS, ids=_ids(WITH_PARAMETERS))
def test_every_parameter_gets_a_finite_gradient(case, dtype, device):
    name, cond = case
    layer = make(name, cond, dtype, device)
    flow = Flow([layer], D, C if cond else 0).to(dtype=dtype, device=device)
    context = context_for(cond, (6,), dtype, device)
    x = LAYERS[name].sample((6, D), dtype, device)

    def elbo_like():  # the sample enters the loss too, as in an ELBO
        sample, log_q = flow.condition(context).rsample_and_log_prob((2,))
        return (sample.pow(2).sum(-1) + log_q).sum()

    for what, loss in (
        ("log_prob", lambda: -flow.condition(context).log_prob(x).sum()),
        ("rsample", elbo_like),
    ):
        flow.zero_grad()
        loss().backward()
        for pname, p in flow.named_parameters():
            assert p.grad is not None, f"{pname} got no gradient through {what}"
            assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient ({what})"
            assert p.grad.abs().sum() > 0, f"{pname} has a zero gradient ({what})"


def test_dtype_and_device_follow_the_module(case, device):
    name, cond = case
    layer = make(name, cond, torch.float32, torch.device("cpu"))
    flow = Flow([layer], D, C if cond else 0).to(device).double()
    context = context_for(cond, (5,), torch.float64, device)
    d = flow.condition(context)
    x = d.sample((2,))
    assert x.dtype == torch.float64 and x.device.type == device.type
    lp = d.log_prob(x)
    assert lp.dtype == torch.float64 and lp.device.type == device.type
    for tensor in list(flow.parameters()) + list(flow.buffers()):
        assert tensor.device.type == device.type
        assert not tensor.is_floating_point() or tensor.dtype == torch.float64


def test_state_dict_round_trip(case, dtype, device):
    name, cond = case
    x = LAYERS[name].sample((5, D), dtype, device)
    context = context_for(cond, (5,), dtype, device)

    def fresh():
        torch.manual_seed(123)  # different random init than the trained module
        return Flow([LAYERS[name].build(D, C if cond else 0)], D, C if cond else 0).to(
            dtype=dtype, device=device
        )

    module = fresh()
    randomize_(module, seed=7)
    check_state_dict_round_trip(fresh, module, lambda m: m.condition(context).log_prob(x))


@pytest.mark.parametrize("case", CONDITIONAL, ids=_ids(CONDITIONAL))
def test_context_changes_output_and_broadcasts(case, dtype, device, tol):
    name, cond = case
    layer = make(name, cond, dtype, device)
    x = LAYERS[name].sample((5, D), dtype, device)
    c1, c2 = torch.randn(2, C, dtype=dtype, device=device)
    y1, y2 = layer.condition(c1)(x), layer.condition(c2)(x)
    assert not torch.allclose(y1, y2), "output does not depend on the context"
    # A single context broadcasts over a batch of inputs ...
    y_each = layer.condition(c1.expand(5, C))(x)
    torch.testing.assert_close(y1, y_each, atol=tol, rtol=tol)
    # ... and a batch of contexts over a single input.
    y_batch, ladj = layer.condition(torch.stack([c1, c2]))._call(x[0]), None
    assert y_batch.shape == (2, D)
    torch.testing.assert_close(y_batch[1], layer.condition(c2)(x[0]), atol=tol, rtol=tol)
    del ladj


def test_bad_context_raises_value_error(case, dtype, device):
    name, cond = case
    layer = make(name, cond, dtype, device)
    x = LAYERS[name].sample((5, D), dtype, device)
    if not cond:
        c = torch.randn(5, C, dtype=dtype, device=device)
        if LAYERS[name].conditional:  # built without a context, it refuses one
            with pytest.raises(ValueError, match="unconditional"):
                layer.condition(c)
        else:  # a mixing layer ignores a context, as its documentation says
            assert torch.equal(layer.condition(c)(x), layer(x))
        return
    with pytest.raises(ValueError, match="needs a context"):
        layer(x)
    with pytest.raises(ValueError, match=f"context of shape \\(\\.\\.\\., {C}\\)"):
        layer.condition(torch.randn(5, C + 1, dtype=dtype, device=device))
    with pytest.raises(ValueError, match="does not broadcast"):
        layer.condition(torch.randn(4, C, dtype=dtype, device=device))(x)


def test_wrong_event_size_raises_value_error(case, dtype, device):
    name, cond = case
    layer = make(name, cond, dtype, device)
    t = layer.condition(context_for(cond, (5,), dtype, device))
    x = torch.zeros(5, D + 1, dtype=dtype, device=device)
    with pytest.raises(ValueError, match=f"shape \\(\\.\\.\\., {D}\\)"):
        t(x)
    with pytest.raises(ValueError, match=f"shape \\(\\.\\.\\., {D}\\)"):
        t.inv(x)


def test_inverse_exposes_parameters(case, dtype, device):
    """Pyro issue 2543: ``transform.inv`` must still expose the parameters."""
    name, cond = case
    layer = make(name, cond, dtype, device)
    assert [id(p) for p in layer.inv.parameters()] == [id(p) for p in layer.parameters()]
    if isinstance(layer, Inverse):
        assert layer.inv is layer.layer
    else:
        assert layer.inv.inv is layer


def test_works_in_pyro_transformed_distribution(case, dtype, device, tol):
    name, cond = case
    layer = make(name, cond, dtype, device)
    base = dist.Normal(
        torch.zeros(D, dtype=dtype, device=device), torch.ones(D, dtype=dtype, device=device)
    ).to_event(1)
    x = LAYERS[name].sample((6, D), dtype, device)
    ours = Flow([layer], D, C if cond else 0).to(dtype=dtype, device=device)
    if cond:
        context = context_for(cond, (6,), dtype, device)
        theirs = dist.ConditionalTransformedDistribution(base, [layer]).condition(context)
    else:
        context = None
        theirs = dist.TransformedDistribution(base, [layer])
    torch.testing.assert_close(
        theirs.log_prob(x), ours.condition(context).log_prob(x), atol=tol, rtol=tol
    )
    # pyro.module registers the layer's parameters.
    pyro.clear_param_store()
    pyro.module("layer", layer)
    assert len(pyro.get_param_store()) == len(list(layer.parameters()))


def test_registry_covers_every_exported_layer():
    exported = {
        obj
        for obj in vars(pyroflows.transforms).values()
        if inspect.isclass(obj) and issubclass(obj, FlowModule) and not inspect.isabstract(obj)
    }
    assert set(pyroflows.transforms.LAYER_TYPES) == exported
    assert {name: getattr(pyroflows, name) for name in pyroflows.transforms.__all__} == {
        name: getattr(pyroflows.transforms, name) for name in pyroflows.transforms.__all__
    }
    covered = {type(spec.build(D, C if spec.conditional else 0)) for spec in LAYERS.values()}
    assert exported - covered == set(), f"layers missing from the registry: {exported - covered}"


def test_batch_jacobian_helper_matches_dense_jacobian(dtype, device):
    w = torch.randn(D, D, dtype=dtype, device=device)
    x = torch.randn(3, D, dtype=dtype, device=device)
    jac = batch_jacobian(lambda v: torch.tanh(v @ w.T), x)
    for i in range(3):
        dense = torch.autograd.functional.jacobian(lambda v: torch.tanh(v @ w.T), x[i])
        torch.testing.assert_close(jac[i], dense)


@pytest.mark.parametrize("input_dim", [1, 2])
def test_small_dimensions(case, input_dim, dtype, device, tol):
    """D = 1 and D = 2: round trip, log-det, and a gradient for every parameter."""
    name, cond = case
    spec = LAYERS[name]
    layer = randomize_(spec.build(input_dim, C if cond else 0)).to(dtype=dtype, device=device)
    context = context_for(cond, (6,), dtype, device)
    x = spec.sample((6, input_dim), dtype, device)
    t = layer.condition(context)
    check_round_trip(t, x, tol)
    check_log_det(t, x, tol)
    if not list(layer.parameters()):
        return
    flow = Flow([layer], input_dim, C if cond else 0).to(dtype=dtype, device=device)
    sample, log_q = flow.condition(context).rsample_and_log_prob((3,))
    (sample.pow(2).sum() + log_q.sum() - flow.condition(context).log_prob(x).sum()).backward()
    for pname, p in flow.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.numel() == 0 or p.grad.abs().sum() > 0, f"{pname} is dead at D={input_dim}"


@pytest.mark.parametrize("case", CONDITIONAL, ids=_ids(CONDITIONAL))
def test_context_reaches_every_feature(case, dtype, device):
    """Each transformed feature depends on the context (MADE's first feature included)."""
    name, cond = case
    layer = make(name, cond, dtype, device)
    x = 0.5 * LAYERS[name].sample((D,), dtype, device)  # inside spline bounds (no tails)
    context = torch.randn(C, dtype=dtype, device=device)
    jac = torch.autograd.functional.jacobian(lambda c: layer.condition(c)._call(x), context)
    base = layer.layer if isinstance(layer, Inverse) else layer
    transformed = base.idx_tr if hasattr(base, "idx_tr") else torch.arange(D, device=device)
    depends = jac.abs().sum(-1)[transformed] > 0
    assert depends.all(), f"features {transformed[~depends].tolist()} ignore the context"
