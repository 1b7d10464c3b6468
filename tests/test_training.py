"""`pyroflows.fit`: recovery of known densities, early stopping, bad input, recovery from NaN."""

from __future__ import annotations

import functools
import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyro.distributions as dist
import pytest
import torch
import torch.distributed as torch_dist

import pyroflows.training.loop as loop_module
from pyroflows import Standardize, SupportMap, fit, flows
from pyroflows.training import (
    is_main_process,
    negative_log_likelihood,
    prepare_data,
    process_group,
)

SCRIPTS = Path(__file__).parent / "scripts"


def gaussian_data(n=3000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cov = torch.tensor([[1.0, 0.6], [0.6, 1.0]])
    chol = torch.linalg.cholesky(cov)
    z = torch.randn(n, 2, generator=gen)
    scale = torch.tensor([50.0, 0.01])
    loc = torch.tensor([100.0, -3.0])
    target = dist.MultivariateNormal(loc, scale_tril=scale[:, None] * chol)
    return loc + (z @ chol.T) * scale, target


def test_fit_recovers_a_gaussian_on_the_users_scale():
    """Columns on wildly different scales: the standardisation is inside the model."""
    data, target = gaussian_data()
    test, _ = gaussian_data(seed=1)
    flow = flows.maf(2, num_layers=2, hidden_dims=(16,))
    history = fit(flow, data, epochs=40, batch_size=256, lr=3e-3, progress=False)
    assert history.standardized == "fitted"
    assert isinstance(flow.data_transforms[0], Standardize)
    with torch.no_grad():
        held_out = float(flow().log_prob(test).mean())
        truth = float(target.log_prob(test).mean())
    assert held_out == pytest.approx(truth, abs=0.05)
    assert history.best_val_loss == pytest.approx(-held_out, abs=0.1)
    assert len(history.train_loss) == len(history.val_loss) == history.epochs_run
    assert history.train_loss[-1] < history.train_loss[0]


def test_conditional_fit_recovers_the_conditional_density():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4000, 1, generator=gen) * 4 - 2
    y = 3 * x + 10 + 0.5 * torch.randn(4000, 1, generator=gen)
    flow = flows.maf(1, 1, num_layers=2, hidden_dims=(32,))
    history = fit(flow, y, context=x, epochs=40, batch_size=256, lr=1e-2, progress=False)
    assert len(flow.context_transforms) == 1
    contexts = torch.tensor([[-1.5], [0.0], [1.0]])
    with torch.no_grad():
        samples = flow.condition(contexts).sample((4000,))  # (n, 3, 1)
        truth = dist.Normal(3 * contexts + 10, 0.5).log_prob(3 * contexts + 10)
        at_mean = flow.condition(contexts).log_prob(3 * contexts + 10)
    torch.testing.assert_close(samples.mean(0), 3 * contexts + 10, atol=0.06, rtol=0)
    torch.testing.assert_close(samples.std(0), torch.full((3, 1), 0.5), atol=0.05, rtol=0)
    torch.testing.assert_close(at_mean, truth.squeeze(-1), atol=0.1, rtol=0)
    assert math.isfinite(history.best_val_loss)


def test_early_stopping_restores_the_best_weights():
    data, _ = gaussian_data(n=120)
    flow = flows.nsf(2, num_layers=2, hidden_dims=(64, 64))  # overfits 108 rows
    history = fit(
        flow,
        data,
        epochs=300,
        batch_size=32,
        lr=1e-2,
        patience=5,
        schedule="constant",
        validation=0.1,
        progress=False,
    )
    assert history.stopped_early
    assert history.epochs_run == history.best_epoch + 1 + 5
    assert history.best_epoch == int(np.argmin(history.val_loss))
    # The flow holds the best epoch's weights: recompute its validation loss.
    order = torch.randperm(120, generator=torch.Generator().manual_seed(0))
    val = data[order[:12]]
    with torch.no_grad():
        recomputed = float(-flow().log_prob(val).mean())
    assert recomputed == pytest.approx(history.best_val_loss, rel=1e-5, abs=1e-5)


def test_same_seed_same_history():
    data, _ = gaussian_data(n=500)
    histories = []
    for _ in range(2):
        torch.manual_seed(0)
        flow = flows.realnvp(2, num_layers=2, hidden_dims=(8,))
        histories.append(fit(flow, data, epochs=3, seed=3, progress=False).train_loss)
    assert histories[0] == histories[1]


def test_accepts_tensor_numpy_and_dataframe():
    data, _ = gaussian_data(n=300)
    results = []
    for value in (data, data.numpy(), pd.DataFrame(data.numpy(), columns=["a", "b"])):
        torch.manual_seed(0)
        flow = flows.maf(2, num_layers=1, hidden_dims=(8,))
        results.append(fit(flow, value, epochs=2, progress=False).val_loss)
    assert results[0] == pytest.approx(results[1])
    assert results[0] == pytest.approx(results[2])


def test_non_finite_loss_is_rejected_and_recovered():
    data, _ = gaussian_data(n=600)
    flow = flows.maf(2, num_layers=2, hidden_dims=(8,))
    calls = {"n": 0}

    def poison(module, inputs, output):  # the 5th training pass returns NaN parameters
        calls["n"] += 1
        if calls["n"] == 5:
            return output * float("nan")
        return output

    handle = flow.layers[0].conditioner.register_forward_hook(poison)
    history = fit(flow, data, epochs=3, batch_size=100, lr=1e-2, progress=False)
    handle.remove()
    assert len(history.rejected_steps) == 1
    assert history.rejected_steps[0]["new_lr_scale"] == 0.5
    assert all(torch.isfinite(p).all() for p in flow.parameters())
    assert all(math.isfinite(v) for v in history.train_loss + history.val_loss)


def test_steps_checked_in_windows_undo_the_bad_step_and_the_rest_of_its_window(monkeypatch):
    """On an accelerator steps are checked in windows (here of four); the first non-finite one
    is recorded, the weights go back to the best epoch's and the window's rows are dropped."""
    monkeypatch.setattr(loop_module, "steps_between_checks", lambda device: 4)
    data, _ = gaussian_data(n=600)  # 540 training rows: 6 steps per epoch, windows 0-3, 4-5
    flow = flows.maf(2, num_layers=2, hidden_dims=(8,))
    calls = {"n": 0}

    def poison(module, inputs, output):  # the 5th training pass: step 4 of epoch 0
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 5 else output

    handle = flow.layers[0].conditioner.register_forward_hook(poison)
    history = fit(flow, data, epochs=3, batch_size=100, lr=1e-2, progress=False)
    handle.remove()
    assert [(r["epoch"], r["step"]) for r in history.rejected_steps] == [(0, 4)]
    assert math.isnan(history.rejected_steps[0]["loss"])
    assert all(torch.isfinite(p).all() for p in flow.parameters())
    assert all(math.isfinite(v) for v in history.train_loss + history.val_loss)


def test_steps_are_checked_one_by_one_on_the_cpu():
    assert loop_module.steps_between_checks(torch.device("cpu")) == 1
    assert loop_module.steps_between_checks(torch.device("cuda", 0)) > 1


def _adam_steps(flow, device):
    """The loop's step machinery for ``flow`` alone: NLL, Adam, cosine schedule, clipping."""
    return loop_module._Steps(
        flow,
        loop_module._LossModule(flow, negative_log_likelihood),
        torch.optim.Adam(flow.parameters()),
        loop_module.cosine_schedule,
        5.0,
        10,
        device,
    )


@pytest.mark.parametrize(
    "build",
    [
        functools.partial(flows.nsf, coupling=True),
        flows.nsf,
        flows.maf,
        flows.realnvp,
    ],
    ids=["nsf-coupling", "nsf-ar", "maf", "realnvp"],
)
@pytest.mark.parametrize("context", [0, 3])
def test_a_training_step_never_waits_for_the_device(build, context):
    """A step (maps, log-density, backward, clipping, Adam) on the ``meta`` device, which
    holds no values: any read of a value back to the host (``.item()``, ``bool(t)``, a
    data-dependent shape) raises there, so none is made; on CUDA it would stall the queue."""
    x = torch.randn(64, 4).exp()
    c = torch.randn(64, context) if context else None
    flow = build(4, context_dim=context, num_layers=2, hidden_dims=(8,))
    prepared = prepare_data(flow, x, context=c, bounds=[(0, None)] + [(None, None)] * 3)
    prepared.attach_maps(flow)
    flow.to("meta")
    steps = _adam_steps(flow, torch.device("meta"))
    xb = prepared.x_train[:32].double().to("meta")
    cb = None if c is None else prepared.c_train[:32].double().to("meta")
    for _ in range(2):  # the second step runs Adam on its state
        stats = steps._step(xb, cb)
    assert stats.device.type == "meta" and stats.shape == (2,)


def test_streamed_batches_are_the_rows_in_order():
    """Host rows streamed through the two staging buffers: each batch holds its rows (with
    their contexts) until the batch after next is requested."""
    x, c = torch.randn(250, 3), torch.randn(250, 2)
    idx = torch.randperm(250, generator=torch.Generator().manual_seed(0))
    batches = loop_module._streamed(x, c, idx, 64, torch.device("cpu"))
    for start, (xb, cb) in zip(range(0, 250, 64), batches, strict=True):
        torch.testing.assert_close(xb, x[idx[start : start + 64]], rtol=0, atol=0)
        torch.testing.assert_close(cb, c[idx[start : start + 64]], rtol=0, atol=0)


@pytest.mark.gpu
def test_rows_too_large_for_the_gpu_stream_from_the_host(monkeypatch):
    """Rows kept on the host (as when over a quarter of the free memory) train like rows on
    the device: the same shuffled batches, so the same losses."""
    data, _ = gaussian_data(n=2000)
    histories = []
    for fits in (True, False):
        monkeypatch.setattr(loop_module, "_fits", lambda device, *t, fits=fits: fits)
        torch.manual_seed(0)
        flow = flows.maf(2, num_layers=2, hidden_dims=(16,))
        histories.append(fit(flow, data, epochs=3, device="cuda", progress=False))
    np.testing.assert_allclose(histories[0].train_loss, histories[1].train_loss, rtol=1e-5)
    np.testing.assert_allclose(histories[0].val_loss, histories[1].val_loss, rtol=1e-5)


@pytest.mark.gpu
def test_a_cuda_training_step_never_synchronises():
    """CUDA's sync debug mode turns any host synchronisation inside a step into an error."""
    flow = flows.nsf(4, num_layers=2, hidden_dims=(16,)).cuda()
    steps = _adam_steps(flow, torch.device("cuda", 0))
    x = torch.randn(256, 4, device="cuda")
    steps._step(x, None)  # the first step creates Adam's state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps._step(x, None)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_bounded_column_has_zero_density_outside():
    gen = torch.Generator().manual_seed(0)
    data = torch.cat(
        [
            torch.rand(2000, 1, generator=gen).pow(2) * 3,  # in (0, 3)
            torch.randn(2000, 1, generator=gen),
        ],
        1,
    )
    flow = flows.nsf(2, num_layers=2, hidden_dims=(16,))
    fit(flow, data, epochs=5, bounds=[(0, 3), (None, None)], progress=False)
    assert isinstance(flow.data_transforms[-1], SupportMap)
    with torch.no_grad():
        samples = flow().sample((5000,))
        lp = flow().log_prob(torch.tensor([[-0.1, 0.0], [3.5, 0.0], [1.0, 0.0]]))
    assert ((samples[:, 0] > 0) & (samples[:, 0] < 3)).all()
    assert lp[0] == -math.inf and lp[1] == -math.inf and torch.isfinite(lp[2])


def _far_from_its_bound(n: int, seed: int) -> torch.Tensor:
    """A positive column with most mass away from 0 (as redshifts are) and a dependent one."""
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, generator=gen) * 0.6 + 1.2).abs()
    return torch.stack([z, z + torch.randn(n, generator=gen)], 1)


def test_declaring_a_true_lower_bound_costs_no_likelihood():
    # A logarithm here stretches the few values near 0 into a long tail: 0.09 nats worse
    # than no bound (the galaxies' redshift showed the same); the fitted scale is not.
    train, test = _far_from_its_bound(4000, 0), _far_from_its_bound(4000, 1)
    scores = {}
    for bounds in (None, [(0, None), (None, None)]):
        flow = flows.nsf(2, num_layers=2, hidden_dims=(32, 32))
        fit(flow, train, epochs=30, bounds=bounds, progress=False)
        with torch.no_grad():
            scores[bounds is None] = float(flow().log_prob(test).mean())
    assert scores[False] >= scores[True] - 0.02, scores


def test_one_sided_scale_follows_the_data():
    gen = torch.Generator().manual_seed(0)
    lognormal = torch.randn(5000, 1, generator=gen).exp()  # the logarithm makes it normal
    far = 10.0 + torch.randn(5000, 1, generator=gen)  # almost the identity
    below = 4.0 - torch.randn(5000, 1, generator=gen).abs()  # upper bound 4, at the edge
    assert SupportMap([0.0], [math.inf]).fitted(lognormal).scale.item() > 8.0
    assert SupportMap([0.0], [math.inf]).fitted(far).scale.item() < 2.0
    assert SupportMap([-math.inf], [4.0]).fitted(below).scale.item() < math.inf
    two = SupportMap([0.0, 0.0, -math.inf], [math.inf, 1.0, math.inf]).fitted(
        torch.cat([far, torch.rand(5000, 1, generator=gen), far], 1)
    )
    assert math.isfinite(two.scale[0]) and torch.isinf(two.scale[1:]).all()  # others kept


def test_constant_column_does_not_break_training():
    data = torch.cat([torch.randn(400, 1), torch.full((400, 1), 7.0)], 1)
    flow = flows.realnvp(2, num_layers=2, hidden_dims=(8,))
    history = fit(flow, data, epochs=2, progress=False)
    assert torch.equal(flow.data_transforms[0].scale[1], torch.tensor(1.0))
    assert all(math.isfinite(v) for v in history.train_loss)


class TestBadInput:
    def test_nan_rows_are_named(self):
        data = torch.randn(50, 2)
        data[7, 1] = float("nan")
        data[30, 0] = float("inf")
        with pytest.raises(ValueError, match=r"2 row\(s\) with NaN or Inf \(0-based rows 7, 30\)"):
            fit(flows.maf(2), data, progress=False)

    def test_wrong_number_of_columns(self):
        with pytest.raises(ValueError, match="3 columns, the flow models 2"):
            fit(flows.maf(2), torch.randn(50, 3), progress=False)

    def test_context_problems(self):
        with pytest.raises(ValueError, match="unconditional"):
            fit(flows.maf(2), torch.randn(50, 2), context=torch.randn(50, 1), progress=False)
        with pytest.raises(ValueError, match="conditional"):
            fit(flows.maf(2, 1), torch.randn(50, 2), progress=False)
        with pytest.raises(ValueError, match="context has 40 rows but data has 50"):
            fit(flows.maf(2, 1), torch.randn(50, 2), context=torch.randn(40, 1), progress=False)

    def test_non_numeric_and_empty(self):
        frame = pd.DataFrame({"a": [1.0, 2.0], "b": ["x", "y"]})
        with pytest.raises(ValueError, match="non-numeric"):
            fit(flows.maf(2), frame, progress=False)
        with pytest.raises(ValueError, match="empty"):
            fit(flows.maf(2), np.zeros((0, 2)), progress=False)

    def test_rows_outside_bounds_are_named_by_their_row_in_the_users_data(self):
        data = torch.rand(50, 2)
        data[4, 0] = -1.0
        data[41, 0] = -2.0
        with pytest.raises(ValueError, match=r"2 row\(s\) outside the declared bounds.*rows 4, 41"):
            fit(flows.maf(2), data, bounds={0: (0, None)}, progress=False)
        with pytest.raises(ValueError, match=r"validation_data has 1 row\(s\) outside"):
            fit(
                flows.maf(2),
                data.abs(),
                validation_data=data[:5],
                bounds={0: (0, None)},
                progress=False,
            )

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"epochs": 0},
            {"batch_size": 0},
            {"lr": -1.0},
            {"validation": 1.0},
            {"schedule": "linear"},
            {"patience": 0},
            {"seed": -1},
            {"weight_decay": -0.1},
            {"clip_grad_norm": 0.0},
        ],
    )
    def test_bad_settings(self, kwargs):
        with pytest.raises(ValueError):
            fit(flows.maf(2), torch.randn(50, 2), progress=False, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_matches_single_process(tmp_path):
    """`fit` under torchrun (2 CPU processes, gloo, loopback) trains as well as one process."""
    out = tmp_path / "ddp.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "--master_addr=127.0.0.1",
        str(SCRIPTS / "ddp_fit.py"),
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = json.loads(out.read_text())
    assert ddp["world_size"] == 2
    # fit created the group, so it destroyed it; is_main_process still knew rank 0 (RANK).
    assert not ddp["group_left_after_fit"]
    assert sorted(p.name for p in tmp_path.glob("ddp.json.main*")) == ["ddp.json.main0"]
    # The same fit in this process.
    single = json.loads(
        subprocess.run(
            [sys.executable, str(SCRIPTS / "ddp_fit.py"), str(tmp_path / "single.json")],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    assert single["world_size"] == 1
    assert ddp["test_log_likelihood"] == pytest.approx(single["test_log_likelihood"], abs=0.1)
    assert ddp["test_log_likelihood"] > ddp["truth"] - 0.1


def test_second_fit_keeps_the_scaling_and_refuses_new_bounds():
    data, _ = gaussian_data(n=300)
    flow = flows.maf(2, num_layers=1, hidden_dims=(8,))
    fit(flow, data, epochs=1, progress=False)
    scale = flow.data_transforms[0].scale.clone()
    history = fit(flow, data * 2, epochs=1, progress=False)
    assert history.standardized == "kept"
    assert torch.equal(flow.data_transforms[0].scale, scale)
    with pytest.raises(ValueError, match="already has data/context transforms"):
        fit(flow, data, bounds={0: (0, None)}, epochs=1, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_request_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        fit(flows.maf(2), torch.randn(50, 2), device="cuda", progress=False)


@pytest.mark.gpu
def test_fit_on_gpu_scores_on_the_users_scale():
    data, target = gaussian_data(n=2000)
    flow = flows.maf(2, num_layers=2, hidden_dims=(16,))
    fit(flow, data, epochs=20, lr=3e-3, device="cuda", progress=False)
    assert all(t.device.type == "cuda" for t in flow.state_dict().values())
    with torch.no_grad():
        lp = flow().log_prob(data[:500].cuda()).mean().item()
    assert lp == pytest.approx(target.log_prob(data[:500]).mean().item(), abs=0.1)


def test_compiled_fit_trains_like_the_eager_one():
    """``fit(compile=...)`` runs the same steps through a compiled loss: same losses, weights.

    ``aot_eager`` traces and differentiates the loss as inductor does, without generating code;
    300 rows in batches of 128 end each epoch on a smaller batch, which recompiles once.
    """
    import torch._dynamo

    data, _ = gaussian_data(n=300)
    runs = []
    for compile in (False, "aot_eager"):
        torch.manual_seed(0)
        flow = flows.nsf(2, coupling=True, num_layers=2, hidden_dims=(8,), count_bins=4)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        history = fit(flow, data, epochs=3, batch_size=128, compile=compile, progress=False)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (graphs > 0) == bool(compile)  # the compiled run really went through dynamo
        runs.append((history, flow.state_dict()))
    torch._dynamo.reset()
    (eager, eager_state), (compiled, compiled_state) = runs
    np.testing.assert_allclose(compiled.train_loss, eager.train_loss, rtol=1e-4)
    np.testing.assert_allclose(compiled.val_loss, eager.val_loss, rtol=1e-4)
    for name, value in eager_state.items():
        torch.testing.assert_close(compiled_state[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_fit_rejects_an_unknown_compile_backend():
    with pytest.raises(ValueError, match="not a torch.compile backend"):
        fit(flows.maf(2, num_layers=1), torch.randn(50, 2), compile="fastest", progress=False)


class TestWhatFitLeaves:
    """The flow's mode, device and data maps after `fit`, and no global side effects."""

    @pytest.mark.parametrize("training", [True, False])
    def test_mode_device_and_maps(self, training):
        data, _ = gaussian_data(n=300)
        flow = flows.maf(2, num_layers=1, hidden_dims=(8,))
        flow.train(training)
        rng = torch.get_rng_state()
        fit(flow, data, epochs=2, progress=False)
        assert flow.training == training
        assert [type(m) for m in flow.data_transforms] == [Standardize]
        assert all(t.device.type == "cpu" for t in flow.state_dict().values())
        assert torch.equal(torch.get_rng_state(), rng)  # the global generator is untouched

    def test_invalid_settings_leave_the_flow_unchanged(self):
        data, _ = gaussian_data(n=300)
        flow = flows.maf(2, num_layers=1, hidden_dims=(8,))
        foreign = torch.optim.SGD(flows.maf(2, num_layers=1).parameters(), lr=0.1)
        with pytest.raises(ValueError, match="not the flow's"):
            fit(flow, data, optimizer=foreign, progress=False)
        with pytest.raises(TypeError, match="optimizer must be"):
            fit(flow, data, optimizer="adam", progress=False)
        assert len(flow.data_transforms) == 0

    def test_an_exception_closes_the_bar_and_restores_the_mode(self, monkeypatch):
        closed = []

        class Bar(loop_module.tqdm):
            def close(self):
                closed.append(True)
                super().close()

        def failing(flow, x, context):
            raise RuntimeError("no loss today")

        monkeypatch.setattr(loop_module, "tqdm", Bar)
        flow = flows.maf(2, num_layers=1, hidden_dims=(8,)).eval()
        with pytest.raises(RuntimeError, match="no loss today") as error:
            fit(flow, torch.randn(100, 2), loss=failing, progress=True)
        assert closed, error  # closed by fit, not later by garbage collection
        assert not flow.training


def test_custom_optimizer_loss_and_schedule_are_used():
    data, _ = gaussian_data(n=200)
    calls = {"loss": 0, "schedule": []}

    def loss(flow, x, context):
        calls["loss"] += 1
        return negative_log_likelihood(flow, x, context)

    def schedule(step, total):
        calls["schedule"].append((step, total))
        return 0.5

    flow = flows.maf(2, num_layers=1, hidden_dims=(8,))
    history = fit(
        flow,
        data,
        epochs=2,
        batch_size=60,  # 180 training rows: 3 steps per epoch
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        loss=loss,
        schedule=schedule,
        progress=False,
    )
    assert calls["loss"] == 6
    assert calls["schedule"] == [(step, 6) for step in range(6)]
    assert history.learning_rate == [0.05, 0.05]
    # An optimizer instance: its own rate is the peak rate, also on a second call.
    sgd = torch.optim.SGD(flow.parameters(), lr=0.2)
    before = [p.detach().clone() for p in flow.parameters()]
    for _ in range(2):
        history = fit(flow, data, epochs=1, batch_size=60, optimizer=sgd, progress=False)
        assert history.learning_rate == [pytest.approx(0.05)]  # cosine, at step 2 of 3
    assert any(not torch.equal(a, b) for a, b in zip(before, flow.parameters(), strict=True))


class TestPrepareData:
    def test_validation_rows_and_contexts_get_the_same_row_checks(self):
        flow = flows.maf(2, 1, num_layers=1)
        x, c = torch.randn(50, 2), torch.randn(50, 1)
        bad = x[:10].clone()
        bad[3, 0] = float("nan")
        with pytest.raises(ValueError, match=r"validation_data has 1 row\(s\) with NaN or Inf"):
            prepare_data(flow, x, context=c, validation_data=bad, validation_context=c[:10])
        with pytest.raises(ValueError, match="validation_context has 9 rows but validation_data"):
            prepare_data(flow, x, context=c, validation_data=x[:10], validation_context=c[:9])
        with pytest.raises(ValueError, match="validation_context has 2 columns"):
            prepare_data(flow, x, context=c, validation_data=x[:9], validation_context=x[:9])
        c_bad = c.clone()
        c_bad[7] = float("inf")
        with pytest.raises(ValueError, match=r"context has 1 row\(s\) .* \(0-based rows 7\)"):
            prepare_data(flow, x, context=c_bad)

    def test_splits_and_fits_maps_without_changing_the_flow(self):
        flow = flows.maf(2, 1, num_layers=1)
        x, c = torch.randn(50, 2) * 3 + 1, torch.randn(50, 1)
        prepared = prepare_data(flow, x, context=c, validation=0.2, seed=3)
        assert (prepared.num_train, prepared.num_val) == (40, 10)
        assert prepared.x_train.dtype == torch.float64
        rows = torch.cat([prepared.x_train, prepared.x_val]).float()
        assert torch.equal(rows.sort(0).values, x.sort(0).values)
        assert prepared.standardized == "fitted" and len(prepared.context_maps) == 1
        assert len(flow.data_transforms) == 0 and len(flow.context_transforms) == 0
        prepared.attach_maps(flow)
        assert len(flow.data_transforms) == 1 and len(flow.context_transforms) == 1
        assert flow.data_transforms[0] is not prepared.data_maps[0]  # a copy
        with pytest.raises(ValueError, match="attach the maps once"):
            prepared.attach_maps(flow)
        again = prepare_data(flow, x, context=c)
        assert again.standardized == "kept" and again.data_maps == ()


class TestProcessGroup:
    def test_a_group_the_caller_owns_is_used_and_left(self, tmp_path):
        torch_dist.init_process_group(
            "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
        )
        try:
            history = fit(flows.maf(2, num_layers=1), torch.randn(100, 2), epochs=1, progress=False)
            assert torch_dist.is_initialized() and history.world_size == 1
        finally:
            torch_dist.destroy_process_group()

    @pytest.fixture
    def launched_by_torchrun(self, monkeypatch, tmp_path):
        """WORLD_SIZE=2 in the environment; the group `fit` creates has one process."""
        real, created = torch_dist.init_process_group, []

        def init(backend, **kwargs):
            created.append(backend)
            store = f"file://{tmp_path / f'store{len(created)}'}"
            real("gloo", init_method=store, rank=0, world_size=1)

        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setattr(torch_dist, "init_process_group", init)
        yield created
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()

    def test_a_group_fit_creates_is_destroyed_even_on_an_exception(self, launched_by_torchrun):
        flow = flows.maf(2, num_layers=1)
        fit(flow, torch.randn(100, 2), epochs=1, progress=False)
        assert launched_by_torchrun == ["gloo"] and not torch_dist.is_initialized()

        def failing(flow, x, context):
            raise RuntimeError("interrupted")

        with pytest.raises(RuntimeError, match="interrupted"):
            fit(flow, torch.randn(100, 2), epochs=1, loss=failing, progress=False)
        assert len(launched_by_torchrun) == 2 and not torch_dist.is_initialized()

    def test_the_cuda_device_it_selects_is_unselected_after(self, monkeypatch, tmp_path):
        """NCCL, no GPU index asked for: cuda:LOCAL_RANK is current inside, the old one after."""
        selected = []
        monkeypatch.setenv("LOCAL_RANK", "1")
        monkeypatch.setattr(torch_dist, "get_backend", lambda *args: "nccl")
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
        monkeypatch.setattr(torch.cuda, "set_device", selected.append)
        torch_dist.init_process_group(
            "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
        )
        try:
            with process_group() as group:
                assert group.device == torch.device("cuda", 1) and not group.owned
                assert selected == [torch.device("cuda", 1)]
            assert selected == [torch.device("cuda", 1), 3]
            with process_group(torch.device("cpu")) as group:  # a CPU run selects nothing
                assert group.device == torch.device("cpu")
            assert len(selected) == 2 and torch_dist.is_initialized()
        finally:
            torch_dist.destroy_process_group()

    def test_is_main_process_reads_the_launch_rank_without_a_group(self, monkeypatch):
        assert is_main_process()
        monkeypatch.setenv("RANK", "1")
        assert not is_main_process()
