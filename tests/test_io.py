"""`pyroflows.save` / `pyroflows.load`: round trips and refusal of foreign files."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch

from pyroflows import (
    ActNorm,
    Coupling,
    Flow,
    Inverse,
    LULinear,
    Permute,
    Precondition,
    Reverse,
    fit,
    flows,
    load,
    save,
)
from pyroflows import io as io_module
from pyroflows.io import FORMAT_VERSION, describe
from pyroflows.testing import LAYERS, randomize_
from pyroflows.transformers import Affine, RationalQuadraticSpline
from pyroflows.transforms import Standardize, SupportMap

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize(
    "make",
    [
        lambda: flows.nsf(3, 2, num_layers=2, hidden_dims=(8,)),
        lambda: flows.nsf(3, 2, coupling=True, num_layers=2, count_bins=4),
        lambda: flows.maf(3, 2, num_layers=2, residual=True, hidden_dims=(8, 8)),
        lambda: flows.iaf(3, 2, num_layers=2, activation=torch.nn.Tanh),
        lambda: flows.realnvp(3, 2, num_layers=2),
        lambda: flows.nice(3, 2, num_layers=2),
        lambda: flows.coupling_flow(3, RationalQuadraticSpline(5, bound=3.0), 2, num_layers=2),
    ],
    ids=["nsf", "nsf_coupling", "maf_residual", "iaf_tanh", "realnvp", "nice", "custom_spline"],
)
def test_round_trip_reproduces_log_prob(make, tmp_path):
    torch.manual_seed(0)
    flow = make()
    data, context = torch.randn(200, 3) * 4 + 1, torch.randn(200, 2) * 3
    fit(flow, data, context=context, epochs=2, progress=False)  # adds standardisation
    flow.metadata = {"columns": ["a", "b", "c"]}
    path = tmp_path / "model.pt"
    save(flow, path)
    loaded = load(path)
    assert loaded.metadata == {"columns": ["a", "b", "c"]}
    assert len(loaded.data_transforms) == len(flow.data_transforms) == 1
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.condition(context).log_prob(data),
            flow.condition(context).log_prob(data),
            rtol=0,
            atol=0,
        )


def test_double_precision_is_kept(tmp_path):
    flow = flows.maf(2, num_layers=1).double()
    save(flow, tmp_path / "m.pt")
    loaded = load(tmp_path / "m.pt")
    assert all(p.dtype == torch.float64 for p in loaded.parameters())


def test_hand_assembled_and_extended_flows_round_trip(tmp_path):
    """The configuration comes from the layers, so flows not (only) made by a builder save."""
    torch.manual_seed(0)
    layers = [
        LULinear(3, permutation=[2, 0, 1]),
        Inverse(flows.iaf(3, num_layers=1, hidden_dims=(8,)).layers[0]),
        Permute([1, 2, 0]),
        Reverse(3),
        ActNorm(3),
    ]
    flow = Flow(layers, 3)
    extended = flows.nsf(3, num_layers=2, hidden_dims=(8,))
    extended.layers.append(Precondition(torch.randn(3), torch.tensor([0.5, 1.0, 2.0])))
    x = torch.randn(10, 3)
    for model in (flow, extended):
        randomize_(model, seed=1)
        save(model, tmp_path / "m.pt")
        loaded = load(tmp_path / "m.pt")
        assert [type(m) for m in loaded.layers] == [type(m) for m in model.layers]
        with torch.no_grad():
            torch.testing.assert_close(loaded().log_prob(x), model().log_prob(x), rtol=0, atol=0)


def test_layers_that_cannot_be_described_are_refused(tmp_path):
    custom = Coupling(2, Affine(), conditioner=torch.nn.Linear(1, 2))
    with pytest.raises(TypeError, match="custom conditioner"):
        save(Flow([custom], 2), tmp_path / "m.pt")
    odd_activation = flows.maf(2, num_layers=1, activation=torch.nn.Hardswish)
    with pytest.raises(ValueError, match="activations can be saved"):
        save(odd_activation, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize(
    "name, context, expected",
    [
        # log_prob of these rows under the files as written by pyroflows 0.1 (format 1).
        ("format1_nsf_coupling.pt", [[0.1], [-1.0]], [-37.82332229614258, -93.51616668701172]),
        ("format1_maf.pt", None, [-9.287528038024902, -15.087287902832031]),
    ],
)
def test_format1_files_still_load(name, context, expected):
    flow = load(DATA / name)
    x = torch.tensor([[0.5, 1.0], [2.0, 0.3]])
    c = None if context is None else torch.tensor(context)
    with torch.no_grad():
        torch.testing.assert_close(
            flow.condition(c).log_prob(x), torch.tensor(expected), rtol=1e-7, atol=2e-6
        )
    described = describe(DATA / name)
    assert described.format_version == 1 and described.input_dim == 2


# Files and state dicts written by the code of format 2, whose conditioners' output layers
# were feature-major, with the log-densities that code gave for the rows below.
X3 = [[0.5, 1.0, -0.3], [2.0, 0.3, 0.1], [-1.2, 0.4, 0.9]]
C2 = [[0.1, -0.2], [-1.0, 0.5], [0.3, 0.3]]


def _format2_mixed_context():
    torch.manual_seed(0)
    coupling = Coupling(3, RationalQuadraticSpline(4), context_dim=2, hidden_dims=(8,))
    maf = flows.maf(3, 2, num_layers=1, hidden_dims=(8, 8), residual=True).layers[0]
    return Flow([Inverse(coupling), maf], 3, 2)


FORMAT2 = [
    (
        "format2_nsf_ar_context",
        lambda: flows.nsf(3, 2, num_layers=2, hidden_dims=(8, 8), count_bins=4),
        C2,
        [-5.07468843460083, -7.244353294372559, -6.863560199737549],
    ),
    (
        "format2_realnvp",
        lambda: flows.realnvp(3, num_layers=2, hidden_dims=(8,)),
        None,
        [-4.1661272048950195, -4.777801513671875, -3.501389503479004],
    ),
    (
        "format2_mixed_context",
        _format2_mixed_context,
        C2,
        [-6.391707897186279, -4.940603733062744, -6.979788303375244],
    ),
]


@pytest.mark.parametrize("name, build, context, expected", FORMAT2, ids=[f[0] for f in FORMAT2])
def test_format2_files_and_old_state_dicts_give_the_same_densities(
    name, build, context, expected, tmp_path
):
    x, c = torch.tensor(X3), None if context is None else torch.tensor(context)
    loaded = load(DATA / f"{name}.pt")
    assert describe(DATA / f"{name}.pt").format_version == 2
    rebuilt = build()  # an old state dict records its layers' version: converted on loading
    rebuilt.load_state_dict(torch.load(DATA / f"{name}_state_dict.pt", weights_only=True))
    with torch.no_grad():
        for flow in (loaded, rebuilt):
            torch.testing.assert_close(
                flow.condition(c).log_prob(x), torch.tensor(expected), rtol=1e-6, atol=2e-6
            )
    # saved again, it is format 3 and loads as it is
    save(loaded, tmp_path / "m.pt")
    assert describe(tmp_path / "m.pt").format_version == FORMAT_VERSION
    with torch.no_grad():
        torch.testing.assert_close(
            load(tmp_path / "m.pt").condition(c).log_prob(x), loaded.condition(c).log_prob(x)
        )


def _format3_support_map():
    flow = flows.maf(2, num_layers=1, hidden_dims=(8,))
    flow.data_transforms.append(Standardize.identity(2))
    flow.data_transforms.append(SupportMap.unbounded(2))
    return flow


def test_format3_support_maps_stay_logarithmic(tmp_path):
    # Written before one-sided scales existed: lower bound 0 on x0, upper bound 4 on x1.
    x = torch.tensor([[0.5, 1.0], [2.0, 0.3], [0.01, -5.0]])
    expected = torch.tensor([-5.21762228012085, -5.963449478149414, -7.850760459899902])
    loaded = load(DATA / "format3_support_map.pt")
    rebuilt = _format3_support_map()
    rebuilt.load_state_dict(
        torch.load(DATA / "format3_support_map_state_dict.pt", weights_only=True)
    )
    for flow in (loaded, rebuilt):
        assert torch.isinf(flow.data_transforms[1].scale).all()
        with torch.no_grad():
            torch.testing.assert_close(flow.condition(None).log_prob(x), expected)
    save(loaded, tmp_path / "m.pt")
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "m.pt").condition(None).log_prob(x), expected)


def test_todays_state_dict_round_trips_unconverted():
    flow = flows.nsf(3, 2, num_layers=2, hidden_dims=(8,), count_bins=4)
    randomize_(flow, seed=3)
    again = flows.nsf(3, 2, num_layers=2, hidden_dims=(8,), count_bins=4)
    again.load_state_dict(flow.state_dict())
    for name, tensor in flow.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_describe_reads_without_building(tmp_path, monkeypatch):
    flow = flows.nsf(2, 1, num_layers=3, hidden_dims=(8,))
    fit(
        flow,
        torch.rand(100, 2),
        context=torch.randn(100, 1),
        epochs=1,
        progress=False,
        bounds=[(0.0, 1.0), (None, None)],
    )
    flow.metadata = {"columns": ["p", "q"]}
    save(flow, tmp_path / "m.pt")
    monkeypatch.setattr(io_module, "_build_v2", None)  # describing must not build
    d = describe(tmp_path / "m.pt")
    assert d.builder.startswith("nsf(") and len(d.layers) == 3
    assert d.layers[0].startswith("Autoregressive(transformer=RationalQuadraticSpline(")
    assert d.num_parameters == sum(p.numel() for p in flow.parameters())
    assert d.data_transforms == ["Standardize", "SupportMap"]
    assert d.data_bounds == [(0.0, 1.0), (-math.inf, math.inf)]
    assert d.metadata == {"columns": ["p", "q"]} and d.dtype == "float32"


def test_foreign_files_are_refused(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a model")
    with pytest.raises(ValueError, match="not a pyroflows model"):
        load(garbage)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(ValueError, match="not a pyroflows model"):
        load(plain)
    # A pickle that would run code on load is refused by weights_only loading.
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump(Exploit(), f)
    with pytest.raises(ValueError, match="not a pyroflows model"):
        load(evil)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.pt")


class Exploit:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {__import__('tempfile').gettempdir()}/pwned",))


def test_guides_extended_flows_save_and_load(tmp_path):
    """AutoFlow and AmortizedFlow append layers after building; their flows still load."""
    import pyro
    import pyro.distributions as dist

    from pyroflows.infer import AmortizedFlow, AutoFlow

    def model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
        with pyro.plate("n", len(data)):
            pyro.sample("x", dist.Normal(mu, sigma), obs=data)

    pyro.clear_param_store()
    guide = AutoFlow(model, model_args=(torch.randn(20) + 3.0,), num_layers=1)
    q = AmortizedFlow(latent_dim=2, input_dim=4, context_dim=3, hidden_dims=(8,))
    for flow, context in ((guide.flow, None), (q.flow, torch.randn(5, 3))):
        randomize_(flow, seed=2)
        save(flow, tmp_path / "m.pt")
        loaded = load(tmp_path / "m.pt")
        z = torch.randn(5, flow.input_dim)
        with torch.no_grad():
            torch.testing.assert_close(
                loaded.condition(context).log_prob(z), flow.condition(context).log_prob(z)
            )


def test_map_location_is_checked_before_reading(tmp_path):
    save(flows.maf(2, num_layers=1), tmp_path / "m.pt")
    with pytest.raises(ValueError, match="not a device"):
        load(tmp_path / "m.pt", map_location="foo")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load(tmp_path / "m.pt", map_location="cuda")


def test_failed_save_leaves_the_previous_file(tmp_path):
    path = tmp_path / "m.pt"
    save(flows.maf(2, num_layers=1), path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="JSON"):
        save(flows.maf(2, num_layers=1), path, metadata={"bad": object()})
    with pytest.raises(IsADirectoryError):
        save(flows.maf(2, num_layers=1), tmp_path)
    with pytest.raises(OSError, match="missing"):
        save(flows.maf(2, num_layers=1), tmp_path / "missing" / "m.pt")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_every_registered_layer_saves_and_loads(name, tmp_path):
    """`get_config`/`from_config` round trip for each layer of the registry, exactly."""
    spec = LAYERS[name]
    context_dim = 2 if spec.conditional else 0
    flow = Flow([randomize_(spec.build(3, context_dim), seed=3)], 3, context_dim)
    save(flow, tmp_path / "m.pt")
    loaded = load(tmp_path / "m.pt")
    x = spec.sample((6, 3), dtype=torch.float32)
    c = torch.randn(6, context_dim) if context_dim else None
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.condition(c).log_prob(x), flow.condition(c).log_prob(x), rtol=0, atol=0
        )


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_size_bound_covers_every_layer_tightly(name):
    """The size computed from a configuration bounds the real size, and not loosely."""
    spec = LAYERS[name]
    layer = spec.build(5, 2 if spec.conditional else 0)
    actual = sum(t.numel() for t in layer.state_dict().values())
    bound = io_module._layer_size(io_module._layer_config(layer))
    assert actual <= bound <= 3 * actual + 20


def test_atomic_write_goes_through_links_and_refuses_devices(tmp_path):
    from pyroflows.files import atomic_write

    real, link = tmp_path / "real.csv", tmp_path / "link.csv"
    real.write_text("old\n")
    link.symlink_to(real)
    with atomic_write(link, "w") as handle:
        handle.write("new\n")
    assert link.is_symlink() and real.read_text() == "new\n"
    with pytest.raises(OSError, match="regular file"):
        with atomic_write("/dev/null", "w") as handle:
            handle.write("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.csv", "real.csv"]
