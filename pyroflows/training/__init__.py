"""Maximum-likelihood training of flows: `fit`, and the parts it is made of.

`fit` is a complete minibatch training loop: validation split, early stopping that keeps
the best weights, gradient clipping, a learning-rate schedule, standardisation fitted to the
training split and stored inside the flow, recovery from non-finite losses, and
data-parallel training when launched with ``torchrun``. It is three reusable parts:

* `prepare_data` (module ``data``): the rows checked once, split, and the `Standardize` /
  `SupportMap` data maps fitted to them, as a `PreparedData`;
* `train` (module ``loop``): the epochs, with any optimizer, loss and schedule;
* `process_group` (module ``distributed``): the process group to train in, and who owns it.

Example: the parts by hand, with SGD and a loss of your own (`fit` does the same with Adam
and the negative log-likelihood):

    >>> import functools, torch
    >>> from pyroflows import flows
    >>> from pyroflows.training import prepare_data, train
    >>> data = torch.randn(500, 2) * torch.tensor([1.0, 5.0]) + 3.0
    >>> flow = flows.maf(2, num_layers=2, hidden_dims=(16,))
    >>> prepared = prepare_data(flow, data, validation=0.2)
    >>> prepared.attach_maps(flow)  # the fitted Standardize becomes part of the flow
    >>> def loss(flow, x, context):
    ...     return -flow(context).log_prob(x).mean()
    >>> history = train(flow, prepared, epochs=3, progress=False,
    ...                 optimizer=functools.partial(torch.optim.SGD, lr=0.01), loss=loss)
    >>> len(history.train_loss), prepared.num_train, prepared.num_val
    (3, 400, 100)
"""

from .data import Bounds, PreparedData, as_data_tensor, find_bad_rows, prepare_data
from .distributed import DataParallel, is_main_process, process_group
from .fitting import fit
from .loop import (
    FitHistory,
    Loss,
    OptimizerFactory,
    Schedule,
    constant_schedule,
    cosine_schedule,
    negative_log_likelihood,
    rows_per_rank,
    steps_between_checks,
    train,
)

__all__ = [
    "fit",
    "FitHistory",
    "prepare_data",
    "PreparedData",
    "train",
    "negative_log_likelihood",
    "cosine_schedule",
    "constant_schedule",
    "process_group",
    "DataParallel",
    "is_main_process",
    "as_data_tensor",
    "find_bad_rows",
    "rows_per_rank",
    "steps_between_checks",
    "Bounds",
    "Loss",
    "Schedule",
    "OptimizerFactory",
]
