"""Fit a flow with `pyroflows.fit`; run alone or under torchrun. Writes a JSON summary."""

import json
import sys

import pyro.distributions as dist
import torch

from pyroflows import fit, flows
from pyroflows.training import is_main_process


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)  # every process draws the same data
    target = dist.MultivariateNormal(
        torch.tensor([1.0, -1.0]), torch.tensor([[1.0, 0.7], [0.7, 1.0]])
    )
    data = target.sample((4000,))
    test = target.sample((4000,))
    torch.manual_seed(0)
    flow = flows.maf(2, num_layers=2, hidden_dims=(16,))
    history = fit(flow, data, epochs=15, batch_size=128, lr=3e-3, progress=False)
    with torch.no_grad():
        summary = {
            "world_size": history.world_size,
            "test_log_likelihood": float(flow().log_prob(test).mean()),
            "truth": float(target.log_prob(test).mean()),
        }
    wrote = []
    if torch.distributed.is_initialized():
        flag = torch.tensor([1.0 if is_main_process() else 0.0])
        gathered = [torch.zeros(1) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(gathered, flag)
        wrote = [i for i, f in enumerate(gathered) if f.item() == 1.0]
        torch.distributed.destroy_process_group()
    else:
        wrote = [0]
    summary["ranks_that_wrote"] = wrote
    if is_main_process():
        with open(sys.argv[1], "w") as f:
            json.dump(summary, f)
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
