"""`AmortizedFlow`: an amortized flow posterior in the standard Pyro VAE pattern."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from torch import nn

from pyroflows.infer import AmortizedFlow


class TinyVAE(nn.Module):
    def __init__(self, x_dim=6, z_dim=2, layers="affine", num_layers=2):
        super().__init__()
        self.z_dim = z_dim
        self.decoder = nn.Sequential(nn.Linear(z_dim, 32), nn.ReLU(), nn.Linear(32, x_dim))
        self.q = AmortizedFlow(
            z_dim,
            input_dim=x_dim,
            context_dim=16,
            hidden_dims=(32,),
            num_layers=num_layers,
            layers=layers,
        )

    def model(self, x, n_total):
        pyro.module("decoder", self.decoder)
        with pyro.plate("rows", n_total, subsample_size=x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 0.1).to_event(1), obs=x)

    def guide(self, x, n_total):
        pyro.module("q", self.q)
        with pyro.plate("rows", n_total, subsample_size=x.shape[0]):
            pyro.sample("z", self.q(x))


def synthetic(n=512, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=gen)
    w = torch.randn(2, 6, generator=gen)
    return torch.tanh(z @ w) + 0.1 * torch.randn(n, 6, generator=gen)


@pytest.mark.parametrize("layers", ["affine", "spline"])
def test_vae_elbo_improves_with_subsampling(layers):
    pyro.clear_param_store()
    torch.manual_seed(0)
    data = synthetic()
    vae = TinyVAE(layers=layers)
    svi = SVI(vae.model, vae.guide, Adam({"lr": 3e-3}), Trace_ELBO())
    losses = []
    for _ in range(300):
        batch = data[torch.randint(len(data), (64,))]
        losses.append(svi.step(batch, len(data)))
    early, late = sum(losses[:30]) / 30, sum(losses[-30:]) / 30
    assert late < early - 0.3 * abs(early)
    with torch.no_grad():
        z = vae.q(data[:5]).sample((3,))
    assert z.shape == (3, 5, 2)


def test_fresh_guide_is_a_standard_normal():
    q = AmortizedFlow(3, input_dim=4, context_dim=8)
    x = torch.randn(7, 4)
    d = q(x)
    assert d.batch_shape == (7,) and d.event_shape == (3,)
    z = torch.randn(7, 3)
    torch.testing.assert_close(d.log_prob(z), dist.Normal(0.0, 1.0).log_prob(z).sum(-1))


def test_custom_encoder_and_errors():
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(16, 8))
    q = AmortizedFlow(2, encoder, context_dim=8)
    assert q(torch.randn(5, 4, 4)).batch_shape == (5,)
    with pytest.raises(ValueError, match="context_dim=6"):
        AmortizedFlow(2, encoder, context_dim=6)(torch.randn(5, 4, 4))
    with pytest.raises(ValueError, match="input_dim"):
        AmortizedFlow(2)
    with pytest.raises(ValueError, match="num_layers must be an integer >= 0, got -1"):
        AmortizedFlow(2, encoder, context_dim=8, num_layers=-1)
