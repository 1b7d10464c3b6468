"""``torch.compile`` sees the spline math and flow densities as one graph each.

The zero-graph-break property is what makes a compiled training step worthwhile: every
layer, the fused spline kernel included, is traced into one graph, forward and backward.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch.distributions import Distribution

from pyroflows import flows
from pyroflows.splines import rational_quadratic_spline

BUILDERS = {
    "nsf": lambda: flows.nsf(3, 2, num_layers=2, hidden_dims=(8,)),
    "nsf_coupling": lambda: flows.nsf(3, 2, coupling=True, num_layers=2, hidden_dims=(8,)),
    "maf": lambda: flows.maf(3, 2, num_layers=2, hidden_dims=(8,)),
    "realnvp": lambda: flows.realnvp(3, 2, num_layers=2, hidden_dims=(8,)),
}


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


@pytest.mark.parametrize("name", BUILDERS)
def test_flow_log_prob_has_no_graph_break(name):
    flow = BUILDERS[name]()
    x, context = torch.randn(50, 3), torch.randn(50, 2)
    count, reasons = _graph_breaks(lambda v, c: flow.condition(c).log_prob(v), x, context)
    assert count == 0, reasons


@pytest.mark.parametrize("name", BUILDERS)
def test_flow_forward_has_no_graph_break(name):
    """Sampling and the forward pass with its log-density (``rsample_and_log_prob``)."""
    flow = BUILDERS[name]()
    context = torch.randn(50, 2)
    count, reasons = _graph_breaks(lambda c: flow.condition(c).rsample_and_log_prob(), context)
    assert count == 0, reasons
    count, reasons = _graph_breaks(lambda c: flow.condition(c).sample((4,)), context)
    assert count == 0, reasons


@pytest.mark.parametrize("name", BUILDERS)
def test_compiled_training_step_matches_eager(name):
    """A compiled loss (forward and backward through AOTAutograd) trains like the eager one.

    ``aot_eager`` traces and differentiates the whole step as inductor would, without
    generating code, so the test takes seconds; ``benchmarks/speed.py --compile`` times the
    inductor-compiled step.
    """
    torch.manual_seed(0)
    eager, compiled = BUILDERS[name](), BUILDERS[name]()
    with torch.no_grad():  # away from the identity, so every term of the gradient counts
        for p in eager.parameters():
            p.normal_(0.0, 0.1)
    compiled.load_state_dict(eager.state_dict())
    x, context = torch.randn(64, 3), torch.randn(64, 2)
    torch._dynamo.reset()
    validate = Distribution._validate_args
    Distribution.set_default_validate_args(False)
    try:
        loss_fn = torch.compile(
            lambda v, c: -compiled.condition(c).log_prob(v).mean(), backend="aot_eager"
        )
        opt_e = torch.optim.Adam(eager.parameters(), lr=1e-2)
        opt_c = torch.optim.Adam(compiled.parameters(), lr=1e-2)
        for _ in range(3):
            loss_e = -eager.condition(context).log_prob(x).mean()
            opt_e.zero_grad()
            loss_e.backward()
            opt_e.step()
            loss_c = loss_fn(x, context)
            opt_c.zero_grad()
            loss_c.backward()
            opt_c.step()
            torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-4)
    finally:
        Distribution.set_default_validate_args(validate)
        torch._dynamo.reset()
    for (n, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=n)


@pytest.mark.gpu
def test_inductor_training_step_on_cuda_matches_eager():
    """On a GPU, inductor generates Triton kernels for the spline: same loss and gradients."""
    torch.manual_seed(0)
    flow = flows.nsf(3, 2, coupling=True, num_layers=2, hidden_dims=(16,)).cuda()
    with torch.no_grad():
        for p in flow.parameters():
            p.normal_(0.0, 0.1)
    x, context = torch.randn(256, 3, device="cuda"), torch.randn(256, 2, device="cuda")
    torch._dynamo.reset()
    validate = Distribution._validate_args
    Distribution.set_default_validate_args(False)
    try:
        grads = []
        for fn in (
            lambda v, c: -flow.condition(c).log_prob(v).mean(),
            torch.compile(lambda v, c: -flow.condition(c).log_prob(v).mean()),
        ):
            flow.zero_grad()
            loss = fn(x, context)
            loss.backward()
            grads.append((loss.detach(), [p.grad.clone() for p in flow.parameters()]))
    finally:
        Distribution.set_default_validate_args(validate)
        torch._dynamo.reset()
    (loss_e, grads_e), (loss_c, grads_c) = grads
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
