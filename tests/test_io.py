"""`pyroflows.save` / `pyroflows.load`: round trips and refusal of foreign files."""

from __future__ import annotations

import pickle

import pytest
import torch

from pyroflows import Flow, fit, flows, load, save
from pyroflows.transformers import RationalQuadraticSpline


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


def test_hand_assembled_flow_cannot_be_saved_by_config(tmp_path):
    flow = Flow(list(flows.maf(2, num_layers=1).layers), 2)
    with pytest.raises(ValueError, match="state_dict"):
        save(flow, tmp_path / "m.pt")


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
