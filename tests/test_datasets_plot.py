"""Tests of the toy datasets (`pyroflows.datasets`) and the plots (`pyroflows.plot`)."""

from __future__ import annotations

import math
import subprocess
import sys
from types import SimpleNamespace

import matplotlib
import numpy as np
import pyro.distributions as dist
import pytest
import torch

matplotlib.use("Agg")

import matplotlib.image  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from pyroflows import datasets, flows, plot  # noqa: E402
from pyroflows._optional import require  # noqa: E402

NAMES = sorted(datasets.TOY_DATASETS)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _saves_png(fig, path) -> None:
    fig.savefig(path, dpi=40)
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 10 and image.shape[1] > 10


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


def test_registry_lists_the_five_datasets():
    assert NAMES == sorted(["two_moons", "eight_gaussians", "checkerboard", "spirals", "rings"])
    for name, function in datasets.TOY_DATASETS.items():
        assert function is getattr(datasets, name)


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_and_reproducibility(name):
    f = datasets.TOY_DATASETS[name]
    x = f(2000, seed=4)
    assert x.shape == (2000, 2) and x.dtype == torch.float32
    assert torch.equal(x, f(2000, seed=4))
    assert not torch.equal(x, f(2000, seed=5))
    assert torch.equal(datasets.load_toy(name, 2000, 4), x)
    x64 = f(2000, seed=4, dtype=torch.float64)
    assert x64.dtype == torch.float64
    assert torch.allclose(x64.float(), x)
    assert f(1).shape == (1, 2)
    assert f().shape == (10_000, 2)


@pytest.mark.parametrize("name", NAMES)
def test_global_random_state_untouched(name):
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    datasets.TOY_DATASETS[name](100, seed=1)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.random.get_state()[1].tolist() == np_state[1].tolist()


@pytest.mark.parametrize("name", NAMES)
def test_finite_centred_and_in_range(name):
    x = datasets.TOY_DATASETS[name](5000)
    assert torch.isfinite(x).all()
    assert x.abs().max() < 4.0
    assert x.mean(0).abs().max() < 0.2
    assert (x.std(0) > 0.5).all()


@pytest.mark.parametrize("name", NAMES)
def test_noise_changes_the_spread(name):
    f = datasets.TOY_DATASETS[name]
    clean, noisy = f(3000, noise=0.0), f(3000, noise=0.3)
    assert not torch.equal(clean, noisy)
    assert noisy.var(0).sum() > clean.var(0).sum()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [0, -3, 2.5, True, "10"])
def test_invalid_n(name, n):
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        datasets.TOY_DATASETS[name](n)


@pytest.mark.parametrize("name", NAMES)
def test_invalid_noise_and_dtype(name):
    f = datasets.TOY_DATASETS[name]
    with pytest.raises(ValueError, match="noise"):
        f(10, noise=-0.1)
    with pytest.raises(ValueError, match="noise"):
        f(10, noise=float("nan"))
    with pytest.raises(ValueError, match="dtype"):
        f(10, dtype=torch.int64)


def test_load_toy_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown toy dataset 'moons'") as info:
        datasets.load_toy("moons", 10)
    for name in NAMES:
        assert name in str(info.value)
    assert datasets.load_toy("rings", 10, noise=0.0).norm(dim=-1).min() > 0.7


def test_two_moons_geometry():
    x = datasets.two_moons(1000, noise=0.0, dtype=torch.float64)
    upper = (x - torch.tensor([-1.0, -0.5], dtype=x.dtype)).norm(dim=-1)
    lower = (x - torch.tensor([1.0, 0.5], dtype=x.dtype)).norm(dim=-1)
    on_upper = torch.isclose(upper, torch.tensor(2.0, dtype=x.dtype))
    on_lower = torch.isclose(lower, torch.tensor(2.0, dtype=x.dtype))
    assert (on_upper ^ on_lower).all()
    assert on_upper.sum() == 500
    assert (x[on_upper, 1] >= -0.5 - 1e-9).all() and (x[on_lower, 1] <= 0.5 + 1e-9).all()


def test_eight_gaussians_components():
    x = datasets.eight_gaussians(4000, noise=0.0, dtype=torch.float64)
    assert torch.allclose(x.norm(dim=-1), torch.tensor(2.5, dtype=x.dtype))
    k = torch.atan2(x[:, 1], x[:, 0]) / (math.pi / 4)
    assert torch.allclose(k, k.round(), atol=1e-9)
    counts = torch.bincount(k.round().long() % 8, minlength=8)
    assert (counts > 400).all() and (counts < 600).all()


def test_checkerboard_fills_the_dark_squares_evenly():
    x = datasets.checkerboard(8000)
    cells = ((x + 3) // 1.5).long()
    assert ((cells >= 0) & (cells <= 3)).all()
    assert (cells.sum(-1) % 2 == 0).all()
    counts = torch.bincount(cells[:, 0] * 4 + cells[:, 1], minlength=16)
    dark = counts[(torch.arange(16) // 4 + torch.arange(16) % 4) % 2 == 0]
    assert len(dark) == 8 and (dark > 800).all() and (dark < 1200).all()


def test_spirals_are_two_archimedean_arms():
    x = datasets.spirals(1000, noise=0.0, turns=1.5, dtype=torch.float64)
    r = x.norm(dim=-1)
    t = r / 3.0 * (3 * math.pi)
    arm = torch.stack([torch.cos(t), torch.sin(t)], dim=-1) * r[:, None]
    first = (x - arm).norm(dim=-1) < 1e-9
    second = (x + arm).norm(dim=-1) < 1e-9
    assert (first | second).all()
    assert first.sum() == 500


def test_rings_share_points_in_proportion_to_radius():
    x = datasets.rings(10_000, noise=0.0, dtype=torch.float64)
    ring = (x.norm(dim=-1) / 0.75).round().long()
    counts = torch.bincount(ring, minlength=5)[1:].double()
    assert torch.allclose(
        counts / counts.sum(), torch.tensor([0.1, 0.2, 0.3, 0.4]).double(), atol=0.02
    )
    assert datasets.rings(10, num_rings=2, noise=0.0).norm(dim=-1).max() < 1.5 + 1e-5


# ---------------------------------------------------------------------------------------------
# plot_samples_2d
# ---------------------------------------------------------------------------------------------


def test_plot_samples_side_by_side(tmp_path):
    data, samples = torch.randn(300, 2), np.random.default_rng(0).normal(size=(150, 2))
    fig = plot.plot_samples_2d(data, samples)
    assert len(fig.axes) == 2
    (left,), (right,) = fig.axes[0].collections, fig.axes[1].collections
    np.testing.assert_allclose(left.get_offsets(), data.numpy(), rtol=1e-6)
    np.testing.assert_allclose(right.get_offsets(), samples)
    assert fig.axes[0].get_xlim() == fig.axes[1].get_xlim()
    _saves_png(fig, tmp_path / "samples.png")


def test_plot_samples_overlay_and_subsampling():
    data = torch.randn(500, 2, requires_grad=True)
    fig = plot.plot_samples_2d(data, torch.randn(80, 2), overlay=True, max_points=100)
    (ax,) = fig.axes
    assert [len(c.get_offsets()) for c in ax.collections] == [100, 80]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["data", "flow samples"]


def test_plot_samples_into_given_axes():
    fig, ax = plt.subplots()
    assert plot.plot_samples_2d(torch.randn(10, 2), torch.randn(20, 2), ax=ax) is fig
    assert len(ax.collections) == 2
    fig, pair = plt.subplots(1, 2)
    plot.plot_samples_2d(torch.randn(10, 2), torch.randn(20, 2), ax=pair, bounds=((-1, 1), (0, 2)))
    assert [len(a.collections[0].get_offsets()) for a in pair] == [10, 20]
    assert pair[1].get_ylim() == (0, 2)


def test_plot_samples_bad_input():
    good = torch.randn(10, 2)
    with pytest.raises(ValueError, match=r"data must have shape \(N, 2\)"):
        plot.plot_samples_2d(torch.randn(10, 3), good)
    with pytest.raises(ValueError, match="samples must have shape"):
        plot.plot_samples_2d(good, torch.randn(10))
    with pytest.raises(ValueError, match="empty"):
        plot.plot_samples_2d(good, torch.randn(0, 2))
    fig, axes = plt.subplots(1, 3)
    with pytest.raises(ValueError, match="pair of Axes"):
        plot.plot_samples_2d(good, good, ax=axes)
    with pytest.raises(ValueError, match="bounds"):
        plot.plot_samples_2d(good, good, bounds=((1, -1), (0, 1)))
    with pytest.raises(ValueError, match="max_points"):
        plot.plot_samples_2d(good, good, max_points=0)


# ---------------------------------------------------------------------------------------------
# plot_density_2d
# ---------------------------------------------------------------------------------------------


def _pixel_area(bounds, resolution):
    (x0, x1), (y0, y1) = bounds
    return (x1 - x0) * (y1 - y0) / resolution**2


def test_plot_density_of_fresh_flow_is_standard_normal(tmp_path):
    flow = flows.nsf(2, num_layers=1, hidden_dims=(8,))
    ax = plot.plot_density_2d(flow, resolution=40)
    image = np.asarray(ax.images[0].get_array())
    assert image.shape == (40, 40)
    # A fresh flow is its standard normal base: compare with the exact density at pixel centres.
    centres = -4 + 0.2 * (np.arange(40) + 0.5)
    normal = np.exp(-0.5 * centres**2) / math.sqrt(2 * math.pi)
    np.testing.assert_allclose(image, np.outer(normal, normal), rtol=1e-4, atol=1e-7)
    assert image.sum() * _pixel_area(((-4, 4), (-4, 4)), 40) == pytest.approx(1.0, abs=0.01)
    _saves_png(ax.figure, tmp_path / "density.png")


def test_plot_density_orientation_and_chunks():
    d = dist.Normal(torch.tensor([1.5, -2.0]), 0.3).to_event(1)
    bounds = ((-4, 4), (-3, 3))
    ax = plot.plot_density_2d(d, bounds=bounds, resolution=80, chunk_size=1000)
    image = np.asarray(ax.images[0].get_array())
    row, column = np.unravel_index(image.argmax(), image.shape)
    assert -4 + 0.1 * (column + 0.5) == pytest.approx(1.5, abs=0.1)
    assert -3 + 0.075 * (row + 0.5) == pytest.approx(-2.0, abs=0.1)
    assert image.sum() * _pixel_area(bounds, 80) == pytest.approx(1.0, abs=0.01)
    same = plot.plot_density_2d(d, bounds=bounds, resolution=80, chunk_size=7)
    np.testing.assert_allclose(np.asarray(same.images[0].get_array()), image)
    assert ax.get_xlim() == (-4, 4) and ax.get_ylim() == (-3, 3)


def test_plot_density_conditional_float64_flow_with_extras():
    flow = flows.nsf(2, context_dim=3, num_layers=1, hidden_dims=(8,)).double()
    flow.train()
    fig, ax = plt.subplots()
    out = plot.plot_density_2d(
        flow,
        context=torch.randn(3, dtype=torch.float64),
        ax=ax,
        resolution=20,
        contours=3,
        colorbar=True,
        log_density=True,
    )
    assert out is ax and flow.training
    assert ax.images[0].get_array().shape == (20, 20)
    assert len(fig.axes) == 2  # the colour bar
    assert len(ax.collections) > 0  # the contour lines
    log_image = np.asarray(ax.images[0].get_array())
    # A fresh flow is standard normal; the pixel centres nearest the mode are (+-0.2, +-0.2).
    assert log_image.max() == pytest.approx(-math.log(2 * math.pi) - 0.04, abs=1e-6)


def test_plot_density_bad_input():
    flow = flows.nsf(2, context_dim=3, num_layers=1, hidden_dims=(8,))
    with pytest.raises(ValueError, match="single context"):
        plot.plot_density_2d(flow, context=torch.randn(4, 3), resolution=4)
    batched = dist.Normal(torch.zeros(5, 2), 1.0).to_event(1)
    with pytest.raises(ValueError, match="batch shape"):
        plot.plot_density_2d(batched, resolution=4)
    # One context with a leading batch of one is a single density.
    ax = plot.plot_density_2d(flow, context=torch.randn(1, 3), resolution=4)
    assert ax.images[0].get_array().shape == (4, 4)
    with pytest.raises(ValueError, match="event shape"):
        plot.plot_density_2d(flows.nsf(3, num_layers=1, hidden_dims=(8,)), resolution=4)
    normal = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    with pytest.raises(ValueError, match="context is only used with a flow"):
        plot.plot_density_2d(normal, context=torch.randn(3))
    with pytest.raises(ValueError, match="bounds"):
        plot.plot_density_2d(normal, bounds=(-4, 4))
    with pytest.raises(ValueError, match="resolution"):
        plot.plot_density_2d(normal, resolution=1)
    with pytest.raises(TypeError, match="Flow"):
        plot.plot_density_2d(object())


# ---------------------------------------------------------------------------------------------
# plot_corner
# ---------------------------------------------------------------------------------------------


def test_plot_corner_panels(tmp_path):
    data, samples = torch.randn(400, 3), np.random.default_rng(1).normal(size=(250, 3))
    fig = plot.plot_corner(data, samples, labels=["a", "b", "c"], max_points=300, bins=12)
    axes = np.array(fig.axes).reshape(3, 3)
    for i in range(3):
        for j in range(3):
            a = axes[i, j]
            assert a.get_visible() == (j <= i)
            if i == j:
                assert len(a.patches) == 2  # step histograms of data and samples
                heights = [p.get_path().vertices for p in a.patches]
                assert all(len(h) > 12 for h in heights)
            elif j < i:
                assert [len(c.get_offsets()) for c in a.collections] == [300, 250]
    assert [a.get_xlabel() for a in axes[2]] == ["a", "b", "c"]
    assert [a.get_ylabel() for a in axes[1:, 0]] == ["b", "c"]
    np.testing.assert_allclose(axes[2, 0].collections[1].get_offsets(), samples[:, [0, 2]])
    _saves_png(fig, tmp_path / "corner.png")


def test_plot_corner_many_dimensions_into_given_figure():
    fig = plt.figure(figsize=(8, 8))
    out = plot.plot_corner(torch.randn(50, 5), torch.randn(60, 5), fig=fig)
    assert out is fig and len(fig.axes) == 25
    assert sum(a.get_visible() for a in fig.axes) == 15
    assert [a.get_xlabel() for a in fig.axes[-5:]] == [f"$x_{{{i}}}$" for i in range(5)]


def test_plot_corner_bad_input():
    with pytest.raises(ValueError, match="D >= 2"):
        plot.plot_corner(torch.randn(10, 1), torch.randn(10, 1))
    with pytest.raises(ValueError, match="same number of coordinates"):
        plot.plot_corner(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError, match=r"shape \(N, D\)"):
        plot.plot_corner(torch.randn(10, 3, 1), torch.randn(10, 3))
    with pytest.raises(ValueError, match="labels"):
        plot.plot_corner(torch.randn(10, 3), torch.randn(10, 3), labels=["a", "b"])
    fig, _ = plt.subplots()
    with pytest.raises(ValueError, match="empty figure"):
        plot.plot_corner(torch.randn(10, 3), torch.randn(10, 3), fig=fig)


# ---------------------------------------------------------------------------------------------
# plot_training_curves
# ---------------------------------------------------------------------------------------------


def test_plot_training_curves_from_object(tmp_path):
    history = SimpleNamespace(
        train_loss=[3.0, 2.0, 1.5, 1.2], val_loss=[3.2, 2.1, 2.4, 2.6], best_epoch=1
    )
    ax = plot.plot_training_curves(history)
    train, val, best = ax.get_lines()
    np.testing.assert_array_equal(train.get_xdata(), [0, 1, 2, 3])
    np.testing.assert_array_equal(train.get_ydata(), history.train_loss)
    np.testing.assert_array_equal(val.get_ydata(), history.val_loss)
    assert best.get_label() == "best epoch (1)" and list(best.get_xdata()) == [1, 1]
    np.testing.assert_array_equal(ax.collections[0].get_offsets(), [[1, 2.1]])
    _saves_png(ax.figure, tmp_path / "curves.png")


def test_plot_training_curves_from_dict_without_validation():
    fig, ax = plt.subplots()
    history = {"train_loss": [torch.tensor(2.0), 1.0], "val_loss": [], "best_epoch": None}
    assert plot.plot_training_curves(history, ax=ax, log_scale=True) is ax
    assert [line.get_label() for line in ax.get_lines()] == ["train"]
    assert ax.get_yscale() == "log"
    ax = plot.plot_training_curves({"train_loss": [2.0, 1.0, 1.5], "best_epoch": 1})
    assert ax.collections[0].get_offsets().tolist() == [[1.0, 1.0]]


def test_plot_training_curves_from_fit_history():
    from pyroflows.training import FitHistory

    history = FitHistory(train_loss=[2.0, 1.5, 1.4], val_loss=[2.1, 1.6, 1.7], best_epoch=1)
    ax = plot.plot_training_curves(history)
    assert [line.get_label() for line in ax.get_lines()][-1] == "best epoch (1)"
    # FitHistory's default best_epoch=-1 means no best epoch: nothing is marked.
    ax = plot.plot_training_curves(FitHistory(train_loss=[2.0, 1.5]))
    assert [line.get_label() for line in ax.get_lines()] == ["train"]
    assert len(ax.collections) == 0


def test_plot_training_curves_bad_input():
    with pytest.raises(ValueError, match="train_loss"):
        plot.plot_training_curves({"val_loss": [1.0]})
    with pytest.raises(ValueError, match="train_loss"):
        plot.plot_training_curves(SimpleNamespace(train_loss=[]))
    with pytest.raises(ValueError, match="best_epoch=3"):
        plot.plot_training_curves({"train_loss": [1, 2, 3], "val_loss": [1, 2, 3], "best_epoch": 3})
    with pytest.raises(ValueError, match="best_epoch"):
        plot.plot_training_curves({"train_loss": [1, 2], "best_epoch": 0.5})


@pytest.mark.parametrize("name", sorted(datasets.TOY_DATASETS))
def test_toy_datasets_are_drawn_on_the_host_whatever_the_default_device(name):
    """Under another default device (here ``meta``; ``cuda`` in practice) the points are the
    same CPU tensor, drawn from the seeded CPU generator."""
    expected = datasets.load_toy(name, 64, seed=3)
    with torch.device("meta"):
        got = datasets.load_toy(name, 64, seed=3)
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, expected)


def test_integral_n_of_other_types_is_accepted():
    for n in (np.int64(7), torch.tensor(7), np.array(7)):
        assert datasets.two_moons(n).shape == (7, 2)
    assert datasets.rings(5, num_rings=np.int32(2)).shape == (5, 2)
    with pytest.raises(ValueError, match="num_rings must be an integer >= 1"):
        datasets.rings(5, num_rings=0)


def test_plot_bad_counts_use_the_shared_wording():
    normal = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1, got 0"):
        plot.plot_density_2d(normal, resolution=4, chunk_size=0)
    with pytest.raises(ValueError, match="contours must be an integer >= 0, got -1"):
        plot.plot_density_2d(normal, resolution=4, contours=-1)
    x = torch.randn(10, 2)
    with pytest.raises(ValueError, match="bins must be an integer >= 1, got 0"):
        plot.plot_corner(x, x, bins=0)
    with pytest.raises(ValueError, match="max_points must be an integer >= 1 or None"):
        plot.plot_corner(x, x, max_points=2.5)


# ---------------------------------------------------------------------------------------------
# Optional dependencies
# ---------------------------------------------------------------------------------------------


def test_plot_without_matplotlib_names_the_extra(monkeypatch):
    # None in sys.modules makes the import raise ImportError (matplotlib.pyplot is cached).
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(
        ImportError, match=r"^plotting needs matplotlib: pip install 'pyroflows\[plot\]'$"
    ) as info:
        plot.plot_samples_2d(torch.randn(10, 2), torch.randn(10, 2))
    assert info.value.name == "matplotlib"
    assert isinstance(info.value.__cause__, ImportError)


def test_require_names_the_extra_and_purpose(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"the command line needs pandas: .*'pyroflows\[cli\]'"):
        require("pandas", "cli")
    with pytest.raises(ImportError, match=r"^pyroflows demo needs pandas: "):
        require("pandas", "cli", "pyroflows demo")
    assert require("math", "plot").pi == math.pi


def test_core_imports_without_the_optional_packages():
    """``import pyroflows`` (and its command line module) needs neither matplotlib nor pandas."""
    code = (
        "import sys\n"
        "for name in ('matplotlib', 'pandas'):\n"
        "    sys.modules[name] = None\n"
        "import pyroflows, pyroflows.cli, pyroflows.plot\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
