"""Fit a flow with `pyroflows.fit`; run alone or under torchrun. Writes a JSON summary.

Under torchrun `fit` creates the process group and destroys it before returning;
`is_main_process` still tells rank 0 apart (from ``RANK``). Every process that believes it
is the main one leaves a marker file ``OUT.mainRANK``, so the test can check that only
rank 0 did.
"""

import json
import os
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
            "group_left_after_fit": torch.distributed.is_initialized(),
            "test_log_likelihood": float(flow().log_prob(test).mean()),
            "truth": float(target.log_prob(test).mean()),
        }
    if is_main_process():
        with open(f"{sys.argv[1]}.main{os.environ.get('RANK', '0')}", "w") as f:
            f.write("main\n")
        with open(sys.argv[1], "w") as f:
            json.dump(summary, f)
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
