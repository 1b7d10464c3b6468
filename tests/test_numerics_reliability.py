"""Numerics users can trust: precision of the data maps, huge inputs, spline edges, and
clear errors for invalid settings and inputs."""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyroflows import Flow, diagnose, fit, flows
from pyroflows.conditioners import MADE, MLP
from pyroflows.infer import AmortizedFlow
from pyroflows.splines import packed_spline
from pyroflows.testing import LAYERS, randomize_
from pyroflows.transformers import (
    BoundedRationalQuadraticSpline,
    CircularRationalQuadraticSpline,
    RationalQuadraticSpline,
)
from pyroflows.transforms import Standardize, SupportMap

F32, F64 = torch.float32, torch.float64
LOG_2PI = math.log(2 * math.pi)


def _normal_ll(x: torch.Tensor, loc: float, scale: float) -> torch.Tensor:
    return -0.5 * ((x - loc) / scale) ** 2 - math.log(scale) - 0.5 * LOG_2PI


def _gaussian_columns(n: int, loc: float, scale: float, seed: int = 0) -> torch.Tensor:
    """Column 0 ~ N(loc, scale^2), column 1 ~ N(0, 1), in float64."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g, dtype=F64)
    return torch.stack([loc + scale * z[:, 0], z[:, 1]], 1)


def _true_ll(x: torch.Tensor, loc: float, scale: float) -> float:
    return float((_normal_ll(x[:, 0], loc, scale) + _normal_ll(x[:, 1], 0.0, 1.0)).mean())


# --- 1. float64 data maps ---------------------------------------------------------------


@pytest.mark.parametrize("cast", ["float", "to_f32", "half", "double"])
def test_data_maps_keep_float64_buffers(cast):
    s = Standardize([1.7e9 + 0.25, 0.0], [100.0, 1.0])
    m = SupportMap([0.0, -math.inf], [1e10, math.inf])
    for module in (s, m):
        {
            "float": module.float,
            "to_f32": lambda mod=module: mod.to(F32),
            "half": module.half,
            "double": module.double,
        }[cast]()
        assert all(b.dtype == F64 for b in module.buffers())
    assert float(s.loc[0]) == 1.7e9 + 0.25  # not rounded to a float32 (multiple of 128)


def test_data_maps_compute_in_float64_and_return_input_dtype():
    s = Standardize([1.7e9, 0.0], [100.0, 1.0])
    x64 = torch.tensor([[1.7e9 + 37.0, 0.5]], dtype=F64)
    u, ladj = s.inv_and_ladj(x64)
    assert u.dtype == F64 and ladj.dtype == F64
    assert torch.allclose(u, torch.tensor([[0.37, 0.5]], dtype=F64), atol=1e-12)
    u32, ladj32 = s.inv_and_ladj(torch.tensor([[0.25, 1.0]]))
    assert u32.dtype == F32 and ladj32.dtype == F32
    x_back, _ = s.call_and_ladj(u)
    assert x_back.dtype == F64 and float((x_back - x64).abs().max()) < 1e-6
    m = SupportMap([0.0, -math.inf], [math.inf, math.inf]).float()
    y, ladj = m.call_and_ladj(torch.tensor([[0.0, -3.0]]))
    assert y.dtype == F32 and ladj.dtype == F32 and torch.allclose(y, torch.tensor([[1.0, -3.0]]))


def test_old_float32_state_dict_loads_into_float64_buffers():
    flow = flows.maf(2, num_layers=1, hidden_dims=(8,))
    flow.data_transforms.append(Standardize.identity(2))
    state = flow.state_dict()
    key_loc = "data_transforms.0.loc"
    state[key_loc] = torch.tensor([3.5, -1.25], dtype=F32)  # as an old save would hold
    state["data_transforms.0.scale"] = torch.tensor([2.0, 0.5], dtype=F32)
    flow.load_state_dict(state)
    s = flow.data_transforms[0]
    assert s.loc.dtype == F64 and s.loc.tolist() == [3.5, -1.25]
    assert s.scale.tolist() == [2.0, 0.5]


def _gaussian_flow(loc: float, scale: float) -> Flow:
    """A fresh (identity-layer) float32 flow with a Standardize: exactly N(loc, scale^2) x N."""
    flow = flows.maf(2, num_layers=2, hidden_dims=(8,))
    flow.data_transforms.append(Standardize([loc, 0.0], [scale, 1.0]))
    return flow


def test_float64_values_are_scored_exactly_by_a_float32_flow():
    flow = _gaussian_flow(1.7e9, 100.0)
    x = _gaussian_columns(500, 1.7e9, 100.0)
    with torch.no_grad():
        lp = flow().log_prob(x)
    expected = _normal_ll(x[:, 0], 1.7e9, 100.0) + _normal_ll(x[:, 1], 0.0, 1.0)
    assert lp.dtype == F32
    assert float((lp.double() - expected).abs().max()) < 1e-4
    # float32 values keep giving float32 results (and are rounded, as they must be)
    assert flow().log_prob(x.float()).dtype == F32


def test_float64_values_need_data_maps():
    with pytest.raises(ValueError, match="dtype torch.float64"):
        flows.maf(2)().log_prob(torch.zeros(3, 2, dtype=F64))


def test_float64_samples_keep_their_spread():
    flow = _gaussian_flow(1.7e9, 100.0)
    torch.manual_seed(0)
    x = flow().sample((4000,), dtype=F64)
    assert x.dtype == F64
    assert len(torch.unique(x[:, 0])) > 3900  # float32 has ~6 values per 100 at 1.7e9
    assert abs(float(x[:, 0].std()) - 100.0) < 5.0
    y, lp = flow().rsample_and_log_prob((10,), dtype=F64)
    assert y.dtype == F64 and lp.dtype == F32
    assert torch.allclose(lp, flow().log_prob(y), atol=1e-4)


def test_float64_context_goes_through_context_maps():
    flow = flows.maf(2, 1, num_layers=1, hidden_dims=(8,))
    flow.context_transforms.append(Standardize([1.7e9], [100.0]))
    c = torch.tensor([[1.7e9 + 50.0]], dtype=F64)
    lp = flow.condition(c).log_prob(torch.zeros(1, 2))
    assert lp.dtype == F32 and torch.isfinite(lp).all()


def test_fit_large_offset_column_matches_the_true_density():
    data = _gaussian_columns(2400, 1.7e9, 100.0)
    train, test = data[:2000], data[2000:]
    flow = flows.maf(2, num_layers=2, hidden_dims=(16,))
    fit(flow, train, epochs=10, lr=3e-3, progress=False)
    s = flow.data_transforms[0]
    assert s.loc.dtype == F64 and abs(float(s.scale[0]) - 100.0) < 10.0
    with torch.no_grad():
        held_out = float(flow().log_prob(test).mean())
    truth = _true_ll(test, 1.7e9, 100.0)
    # float32 standardisation left spikes, with a held-out LL several nats above the truth
    assert abs(held_out - truth) < 0.1, (held_out, truth)


def test_fit_near_constant_column_is_scaled_not_ignored():
    data = _gaussian_columns(2400, 0.0, 5e-9)
    train, test = data[:2000], data[2000:]
    flow = flows.maf(2, num_layers=2, hidden_dims=(16,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sd 5e-9 around 0 is a real spread: no warning
        fit(flow, train, epochs=10, lr=3e-3, progress=False)
    scale = float(flow.data_transforms[0].scale[0])
    assert abs(scale / 5e-9 - 1.0) < 0.1
    with torch.no_grad():
        held_out = float(flow().log_prob(test).mean())
    truth = _true_ll(test, 0.0, 5e-9)  # about 17.7 nats per row
    assert abs(held_out - truth) < 0.1, (held_out, truth)


def test_constant_columns_warn_with_their_index():
    data = torch.stack([torch.randn(50, dtype=F64), torch.full((50,), 1e6, dtype=F64)], 1)
    data[::2, 1] += 1e-7  # 1e-13 relative to the mean: constant up to float64 rounding
    with pytest.warns(UserWarning, match=r"column\(s\) \[1\]"):
        s = Standardize.from_data(data)
    assert s.scale[1] == 1.0 and s.scale[0] != 1.0


# --- 2. huge finite inputs ----------------------------------------------------------------

BUILDERS = {
    "nsf": lambda: flows.nsf(3, num_layers=2, hidden_dims=(16,)),
    "nsf_iaf": lambda: flows.nsf(3, num_layers=2, hidden_dims=(16,), invert=False),
    "nsf_coupling": lambda: flows.nsf(3, num_layers=2, hidden_dims=(16,), coupling=True),
    "maf": lambda: flows.maf(3, num_layers=2, hidden_dims=(16,)),
    "iaf": lambda: flows.iaf(3, num_layers=2, hidden_dims=(16,)),
    "realnvp": lambda: flows.realnvp(3, num_layers=2, hidden_dims=(16,)),
    "nice": lambda: flows.nice(3, num_layers=2, hidden_dims=(16,)),
}
HUGE = [(F32, 1e20), (F32, -1e30), (F32, 3e38), (F32, 1e6), (F64, 1e300), (F64, -1e200)]


def _huge_rows(value: float, dtype: torch.dtype) -> torch.Tensor:
    x = torch.tensor([[0.3, -0.2, 0.5]] * 3, dtype=dtype)
    x[range(3), range(3)] = value  # the huge value in each position in turn
    return x


def _assert_no_nan(lp: torch.Tensor) -> None:
    assert not bool(torch.isnan(lp).any()), lp
    assert not bool((lp == math.inf).any()), lp


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_huge_inputs_never_give_nan(name):
    flow = randomize_(BUILDERS[name](), scale=0.5)
    with pyro.validation_enabled(False), torch.no_grad():
        for dtype, value in HUGE:
            _assert_no_nan(flow.to(dtype)().log_prob(_huge_rows(value, dtype)))


def _layer_cases():
    for name in sorted(LAYERS):
        for dtype, value in HUGE:
            yield pytest.param(name, dtype, value, id=f"{name}-{value:g}")


@pytest.mark.parametrize("name, dtype, value", list(_layer_cases()))
def test_every_layer_scores_huge_inputs_without_nan(name, dtype, value):
    spec = LAYERS[name]
    context_dim = 2 if spec.conditional else 0
    flow = Flow([randomize_(spec.build(3, context_dim), scale=0.5)], 3, context_dim).to(dtype)
    context = torch.full((3, 2), 0.3, dtype=dtype) if context_dim else None
    with pyro.validation_enabled(False), torch.no_grad():
        _assert_no_nan(flow.condition(context).log_prob(_huge_rows(value, dtype)))


@pytest.mark.parametrize("net", ["made", "mlp"])
def test_conditioners_give_finite_parameters_for_huge_inputs(net):
    torch.manual_seed(0)
    module = (
        MADE(3, 4, (16,), zero_init=False) if net == "made" else MLP(3, 4, (16,), zero_init=False)
    )
    x = torch.tensor([[3e38, -3e38, 1.0], [float("inf"), 0.0, -1e20]])
    assert torch.isfinite(module(x)).all()
    at_limit, beyond, inside = (torch.tensor([[0.5, v, -0.5]]) for v in (1e6, 3e6, 5e5))
    assert torch.equal(module(beyond), module(at_limit))  # constant beyond the limit
    assert not torch.equal(module(inside), module(at_limit))  # untouched inside it


# --- 3. spline edges ----------------------------------------------------------------------


def test_bounded_spline_outside_its_interval_has_zero_density_both_ways():
    t = BoundedRationalQuadraticSpline(5, low=-1.0, high=2.0)
    g = torch.Generator().manual_seed(0)
    params = torch.randn(t.num_params, 4, generator=g, requires_grad=True)
    x = torch.tensor([-1.5, 0.5, 2.5, 1e30])
    y, ladj = t.forward(params, x)
    z, ladj_inv = t.inverse(params, x)
    inside = torch.tensor([False, True, False, False])
    assert torch.isfinite(ladj[inside]).all() and torch.isfinite(ladj_inv[inside]).all()
    assert (ladj[~inside] == math.inf).all() and (ladj_inv[~inside] == -math.inf).all()
    assert ((y >= -1.0) & (y <= 2.0)).all() and ((z >= -1.0) & (z <= 2.0)).all()
    # a flow's log-density (base - forward ladj, or base + inverse ladj) is -inf outside
    (y.sum() + ladj[inside].sum() + ladj_inv[inside].sum()).backward()
    assert torch.isfinite(params.grad).all()


def _round_trip_error(t, raw_scale: float, span: tuple[float, float]) -> tuple[float, float]:
    g = torch.Generator().manual_seed(1)
    n = 20_000
    params = torch.randn(t.num_params, n, generator=g, dtype=F64) * raw_scale
    params[:, ::2] = params[:, ::2].sign() * raw_scale  # extreme values: the worst case
    low, high = span
    x = low + (high - low) * (0.001 + 0.998 * torch.rand(n, generator=g, dtype=F64))
    y, ladj = t.forward(params.float(), x.float())
    x2, ladj_inv = t.inverse(params.float(), y)
    return float((x2.double() - x).abs().max()) / (high - low), float((ladj + ladj_inv).abs().max())


SPLINES = [
    (RationalQuadraticSpline, {"bound": 5.0}, (-5.0, 5.0)),
    (BoundedRationalQuadraticSpline, {"low": -1.0, "high": 2.0}, (-1.0, 2.0)),
    (CircularRationalQuadraticSpline, {}, (-math.pi, math.pi)),
]


@pytest.mark.parametrize("cls, kwargs, span", SPLINES, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("raw_scale", [1.0, 3.0, 10.0, 100.0, 1e4])
def test_float32_spline_round_trip_stays_accurate(cls, kwargs, span, raw_scale):
    x_err, ladj_err = _round_trip_error(cls(8, **kwargs), raw_scale, span)
    assert x_err < 4e-3 and ladj_err < 2e-2, (x_err, ladj_err)


def test_unbounded_raw_parameters_do_lose_the_round_trip():
    # The reason for the bound: without it float32 inversion fails from raw values ~2-3 on.
    t = RationalQuadraticSpline(8, bound=5.0, raw_bound=math.inf)
    x_err, _ = _round_trip_error(t, 10.0, (-5.0, 5.0))
    assert x_err > 1e-2


def test_raw_bound_keeps_the_identity_and_is_checked():
    t = RationalQuadraticSpline(8)
    x = torch.linspace(-6, 6, 50)
    y, ladj = t.forward(torch.zeros(t.num_params, 50), x)
    assert torch.allclose(y, x, atol=1e-6) and ladj.abs().max() < 1e-6
    for bad in (0.0, -1.0, math.nan, True):
        with pytest.raises(ValueError, match="raw_bound"):
            RationalQuadraticSpline(8, raw_bound=bad)
    # the packed kernel bounds inside (raw_bound=2 is the transformer's 2 * tanh(r / 2))
    theta = torch.randn(23, 4) * 5
    x = torch.rand(4) * 8 - 4
    inside = packed_spline(x, theta, count_bins=8, raw_bound=2.0)
    outside = packed_spline(x, 2.0 * torch.tanh(theta / 2.0), count_bins=8)
    torch.testing.assert_close(inside, outside)


# --- 4. settings of fit -------------------------------------------------------------------

BAD_SETTINGS = [
    ({"clip_grad_norm": -1.0}, "clip_grad_norm"),
    ({"clip_grad_norm": 0.0}, "clip_grad_norm"),
    ({"clip_grad_norm": math.inf}, "clip_grad_norm"),
    ({"lr": math.inf}, "lr"),
    ({"lr": 0.0}, "lr"),
    ({"lr": math.nan}, "lr"),
    ({"epochs": True}, "epochs"),
    ({"epochs": 2.0}, "epochs"),
    ({"batch_size": True}, "batch_size"),
    ({"patience": True}, "patience"),
    ({"seed": True}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"weight_decay": -1e-3}, "weight_decay"),
    ({"weight_decay": math.inf}, "weight_decay"),
    ({"validation": math.nan}, "validation"),
]


@pytest.mark.parametrize("kwargs, name", BAD_SETTINGS, ids=[str(k) for k, _ in BAD_SETTINGS])
def test_fit_rejects_invalid_settings(kwargs, name):
    flow = flows.maf(2, num_layers=1, hidden_dims=(8,))
    with pytest.raises(ValueError, match=name) as info:
        fit(flow, torch.randn(20, 2), progress=False, **kwargs)
    assert "\n" not in str(info.value)


def test_fit_rejects_a_column_bounded_twice():
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0], "y": [0.5, 0.1, 0.2, 0.3]})
    flow = flows.maf(2, num_layers=1, hidden_dims=(8,))
    with pytest.raises(ValueError, match="twice"):
        fit(flow, frame, bounds={"x": (0.0, None), 0: (None, 10.0)}, progress=False)


def test_values_beyond_float32_name_their_column():
    data = torch.randn(40, 3, dtype=F64)
    data[5, 2] = 1e39
    flow = flows.maf(3, num_layers=1, hidden_dims=(8,))
    with pytest.raises(ValueError, match="data column 2 has values up to 1e\\+39"):
        fit(flow, data, standardize=False, epochs=1, progress=False)
    # standardised in float64 such a column fits (its outlier becomes a moderate value)
    flow = flows.maf(3, num_layers=1, hidden_dims=(8,))
    history = fit(flow, data, epochs=1, validation=0.0, progress=False)
    assert math.isfinite(history.train_loss[0])


# --- 5. error types -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_empty_batches_give_empty_results(name):
    d = BUILDERS[name]()()
    lp = d.log_prob(torch.zeros(0, 3))
    assert lp.shape == (0,)
    assert d.sample((0,)).shape == (0, 3)
    x, lp = d.rsample_and_log_prob((0,))
    assert x.shape == (0, 3) and lp.shape == (0,)


def test_amortized_flow_names_the_expected_width():
    q = AmortizedFlow(latent_dim=2, input_dim=5, context_dim=8)
    with pytest.raises(ValueError, match="input_dim=5.*width 4"):
        q(torch.randn(10, 4))
    assert q(torch.randn(10, 5)).batch_shape == (10,)


def test_diagnose_needs_at_least_two_draws():
    def model():
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    def guide():
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="num_samples must be an integer >= 2"):
        diagnose(model, guide, num_samples=1)


def test_autoflow_quantiles_are_checked_and_set_up_lazily():
    import pyro.distributions as dist

    from pyroflows.infer import AutoFlow

    def model():
        pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(0.0, 1.0), obs=torch.tensor(0.5))

    pyro.clear_param_store()
    guide = AutoFlow(model, num_layers=1)
    for bad in ([1.5], [-0.1], [float("nan")], [[0.5]]):
        with pytest.raises(ValueError, match="quantiles"):
            guide.quantiles(bad)
    medians = guide.median()  # sets the guide up under no_grad, mode search included
    assert guide.preconditioning.centre == "mode" and medians["mu"].shape == ()


@pytest.mark.parametrize("variant, extra", [("identity", -1), ("free", 1), ("circular", 0)])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("bound", [2.0, 50.0])  # without and with the max shift of the softmax
def test_kernel_bound_has_the_gradients_of_the_explicit_bound(variant, extra, inverse, bound):
    """The bound inside the fused kernel is differentiated like ``B * tanh(theta / B)``."""
    gen = torch.Generator().manual_seed(0)
    theta = (
        torch.randn(3 * 6 + extra, 50, generator=gen, dtype=torch.float64) * 4
    ).requires_grad_()
    x = (torch.rand(50, generator=gen, dtype=torch.float64) * 8 - 4).requires_grad_()
    weights = torch.randn(2, 50, generator=gen, dtype=torch.float64)

    def loss(bound_inside: bool) -> tuple[torch.Tensor, ...]:
        t = theta if bound_inside else bound * torch.tanh(theta / bound)
        y, ladj = packed_spline(
            x, t, count_bins=6, variant=variant, low=-5.0, high=5.0, inverse=inverse,
            raw_bound=bound if bound_inside else math.inf,
        )  # fmt: skip
        return torch.autograd.grad((weights[0] * y + weights[1] * ladj).sum(), (x, theta))

    for inside, explicit in zip(loss(True), loss(False), strict=True):
        torch.testing.assert_close(inside, explicit)
