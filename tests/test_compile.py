"""``torch.compile`` sees the spline math and flow densities as one graph each."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch.distributions import Distribution

from pyroflows import flows
from pyroflows.splines import rational_quadratic_spline


def _graph_breaks(fn, *args, **kwargs) -> tuple[int, list]:
    """Graph breaks of ``fn``, traced as users compile: validation off (restored afterwards).

    torch's own sample validation branches on data, so compiled code runs without it.
    """
    torch._dynamo.reset()
    validate = Distribution._validate_args
    Distribution.set_default_validate_args(False)
    try:
        explanation = torch._dynamo.explain(fn)(*args, **kwargs)
    finally:
        Distribution.set_default_validate_args(validate)
    return explanation.graph_break_count, explanation.break_reasons


@pytest.mark.parametrize("inverse", [False, True])
def test_spline_has_no_graph_break(inverse):
    x = torch.randn(50, 3)
    w, h, d = torch.randn(50, 3, 8), torch.randn(50, 3, 8), torch.randn(50, 3, 7)
    count, reasons = _graph_breaks(rational_quadratic_spline, x, w, h, d, inverse=inverse)
    assert count == 0, reasons


@pytest.mark.parametrize(
    "builder",
    [
        lambda: flows.nsf(3, 2, num_layers=2, hidden_dims=(8,)),
        lambda: flows.nsf(3, 2, coupling=True, num_layers=2, hidden_dims=(8,)),
        lambda: flows.maf(3, 2, num_layers=2, hidden_dims=(8,)),
        lambda: flows.realnvp(3, 2, num_layers=2, hidden_dims=(8,)),
    ],
    ids=["nsf", "nsf_coupling", "maf", "realnvp"],
)
def test_flow_log_prob_has_no_graph_break(builder):
    flow = builder()
    x, context = torch.randn(50, 3), torch.randn(50, 2)
    count, reasons = _graph_breaks(lambda v, c: flow.condition(c).log_prob(v), x, context)
    assert count == 0, reasons
