"""``pyroflows demo``: fit a small flow to a 2-D toy density and write plots, model and data."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import datasets, flows
from .._optional import require
from ..files import atomic_write
from ..io import save
from ..training import FitHistory, fit
from .fit import history_summary
from .paths import STDIO, check_folder
from .tables import open_output, write_rows
from .text import CLIError, note, printable, say

FIGURES = ("data", "samples", "density", "training", "overview")


def _prepare_folder(out: str) -> Path:
    """The output folder, created if needed; refuses ``-`` and an existing file."""
    shown = printable(out)
    if out == STDIO:
        raise CLIError("--out -: cannot write to standard output: demo writes a folder of files")
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise CLIError(f"--out {shown} exists and is not a folder")
    if not folder.exists():
        parent = folder.parent
        while not parent.exists():
            parent = parent.parent
        check_folder(str(parent), f"cannot create {shown}")
        folder.mkdir(parents=True)
    check_folder(str(folder), f"cannot write into {shown}")
    for name in [*(f"{f}.png" for f in FIGURES), "model.pt", "data.csv"]:
        if (folder / name).is_dir():
            raise CLIError(f"cannot write {printable(folder / name)}: it is a directory")
    return folder


def _train(args: argparse.Namespace, data: torch.Tensor) -> tuple[Any, FitHistory]:
    torch.manual_seed(args.seed)
    # Coupling layers: one pass to score and one to sample, the fastest on a CPU.
    flow = flows.nsf(2, coupling=True, num_layers=6, hidden_dims=(64, 64), count_bins=10)
    if not args.quiet:
        note(
            f"fitting a neural spline flow to {args.num_points} points of {args.dataset!r} "
            f"({args.epochs} epochs)"
        )
    history = fit(
        flow,
        data,
        validation=0.2,
        epochs=args.epochs,
        batch_size=512,
        lr=5e-3,
        patience=None,
        seed=args.seed,
        progress=not args.quiet,
    )
    return flow, history


def _save_figures(figures: dict[str, Any], folder: Path, dpi: int) -> list[str]:
    """Write each figure as ``NAME.png`` atomically; close them all."""
    plt = require("matplotlib.pyplot", "cli", "pyroflows demo")

    written = []
    try:
        for name, fig in figures.items():
            with atomic_write(folder / f"{name}.png", "wb") as handle:
                fig.savefig(handle, format="png", dpi=dpi)
            written.append(f"{name}.png")
    finally:
        for fig in figures.values():
            plt.close(fig)
    return written


def _save_model_and_data(flow: Any, history: FitHistory, data: np.ndarray, folder: Path) -> None:
    pd = require("pandas", "cli")

    heldout = -history.best_val_loss
    meta = {"columns": ["x", "y"], "context_columns": [], "created_by": "pyroflows demo"}
    flow.metadata = meta | {"history": history_summary(history, heldout)}
    save(flow, folder / "model.pt")
    with open_output(os.fspath(folder / "data.csv")) as handle:
        write_rows(handle, pd.DataFrame(data.astype(np.float64), columns=["x", "y"]), True)


def run(args: argparse.Namespace) -> int:
    """Run ``pyroflows demo``."""
    try:
        matplotlib = require("matplotlib", "cli", "pyroflows demo")
    except ImportError as error:
        raise CLIError(str(error)) from None
    matplotlib.use("Agg")
    from ..plot import plot_demo

    folder = _prepare_folder(args.out)
    data = datasets.load_toy(args.dataset, args.num_points, seed=args.seed)
    flow, history = _train(args, data)
    with torch.no_grad():
        samples = flow().sample((args.num_points,))
    title = args.dataset.replace("_", " ")
    figures = plot_demo(data, samples, flow, history, title=title, resolution=args.resolution)
    written = _save_figures(figures, folder, args.dpi)
    _save_model_and_data(flow, history, data.numpy(), folder)
    say(
        f"fitted in {history.wall_time:.1f} s ({history.epochs_run} epochs, "
        f"{history.num_train} training / {history.num_val} held-out points)"
    )
    say(f"held-out log-likelihood: {-history.best_val_loss:.4f} nats per point")
    say(f"wrote {', '.join(written)} to {folder}/")
    say(f"also model.pt and data.csv: try `pyroflows info {folder / 'model.pt'}`")
    return 0
