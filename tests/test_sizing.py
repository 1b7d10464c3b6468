"""The default sizes: a flow's capacity and its training budget from the data's shape."""

from __future__ import annotations

import math

import pytest
import torch

from pyroflows import fit, flows
from pyroflows.infer import fit_posterior
from pyroflows.training.sizing import (
    MAX_EPOCHS,
    STEP_BUDGET,
    batch_size_for,
    epochs_for,
    flow_size,
)


@pytest.mark.parametrize(
    "rows, dim, width",
    [(1_000, 2, 64), (29_999, 7, 64), (72_000, 1, 128), (299_999, 7, 128), (10**6, 2, 256)],
)
def test_width_grows_with_the_rows(rows, dim, width):
    size = flow_size(rows, dim)
    assert size.hidden_dims == (width, width)
    assert size.num_layers == 5 and size.count_bins == 8


def test_width_covers_every_feature():
    assert flow_size(1_000, 100).hidden_dims == (200, 200)


def test_options_fit_the_builders():
    size = flow_size(50_000, 3)
    nsf = flows.nsf(3, **size.options())
    maf = flows.maf(3, **size.options(spline=False))
    assert nsf.config["kwargs"]["hidden_dims"] == [128, 128]
    assert maf.config["kwargs"]["num_layers"] == 5


def test_batches_widen_with_the_rows_within_limits():
    batches = [batch_size_for(rows) for rows in (10, 900, 9_000, 20_000, 72_000, 10**6)]
    assert batches == sorted(batches) and batches[0] == 64 and batches[-1] == 512
    assert 64 < batch_size_for(20_000) < 512  # in between, about 64 steps per epoch


@pytest.mark.parametrize("rows", [10, 900, 9_000, 72_000, 10**6])
def test_budget_in_steps_and_epochs(rows):
    batch = batch_size_for(rows)
    epochs = epochs_for(rows, batch)
    steps = epochs * math.ceil(rows / batch)
    assert 1 <= epochs <= MAX_EPOCHS
    # the budget is used up unless the epoch limit binds first
    assert steps >= STEP_BUDGET or epochs == MAX_EPOCHS
    assert (epochs - 1) * math.ceil(rows / batch) < STEP_BUDGET


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="num_rows"):
        flow_size(0, 2)
    with pytest.raises(ValueError, match="batch_size"):
        epochs_for(100, 0)


def test_fit_records_what_the_rule_chose():
    data = torch.randn(1_000, 2)
    history = fit(flows.maf(2, num_layers=1, hidden_dims=(8,)), data, patience=1, progress=False)
    assert history.batch_size == batch_size_for(900) == 64
    assert history.max_epochs == epochs_for(900, 64) == MAX_EPOCHS
    given = fit(flows.maf(2, num_layers=1), data, epochs=2, batch_size=100, progress=False)
    assert (given.batch_size, given.max_epochs, given.epochs_run) == (100, 2, 2)


def test_posterior_flow_is_sized_for_the_simulations():
    theta = torch.randn(40_000, 2)
    x = theta + torch.randn(40_000, 2)
    posterior, history = fit_posterior(theta, x, epochs=1, progress=False)
    assert posterior.config["kwargs"]["hidden_dims"] == [128, 128]
    assert history.batch_size == 512
