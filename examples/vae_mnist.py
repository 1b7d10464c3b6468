"""Variational autoencoder on binarised MNIST: a diagonal-Gaussian posterior against a flow one.

One encoder/decoder pair (MLPs) is trained twice with Pyro's SVI (``Trace_ELBO``), the same
budget, seed, minibatch order and optimiser:

* (a) a diagonal-Gaussian posterior, ``AmortizedFlow(..., num_layers=0)``;
* (b) a flow posterior, ``AmortizedFlow(..., num_layers=k)``: the same Gaussian encoder
  refined by ``k`` conditional IAF (or spline) layers.

Both start as the same function (the flow layers start as the identity and the shared
networks are copied from (a) into (b)), so the two posteriors differ only by the flow layers.

Data: the 10,000 MNIST test images (zipped IDX files, read with the standard library and
numpy), statically binarised with the fixed threshold 0.5 (pixel / 255 > 0.5). The first
9,000 images are the training set, the last 1,000 are held out. The model is a Bernoulli
likelihood with logits from the decoder and a standard normal prior ``N(0, I)`` on ``z``.

On the held-out images the script reports, for both posteriors and in nats per image:

* the mean ELBO, estimated with the ``--iwae-k`` samples per image (their mean log-weight);
* the importance-weighted estimate of ``log p(x)`` (the IWAE bound, Burda et al. 2016),
  ``log (1/K) sum_k exp(log p(x, z_k) - log q(z_k | x))`` with ``K = --iwae-k`` (>= 500 for
  the reported numbers), computed in chunks with ``logsumexp``;
* the improvement of the flow posterior over the Gaussian one.

It writes ``results.json``, ``reconstructions.png`` (held-out images and their
reconstructions by both models) and ``samples.png`` (decoder means for the same prior draws).

Run it from the repository root::

    python examples/vae_mnist.py --out vae_out                 # ~6 minutes on one CPU thread
    python examples/vae_mnist.py --epochs 1 --train-images 300 --iwae-k 8 --eval-images 20

The data default to ``../shared/data/mnist_test`` next to the repository; use ``--data``
for another folder holding ``t10k-images-idx3-ubyte.zip``.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from torch import Tensor, nn

from pyroflows.infer import AmortizedFlow
from pyroflows.utils import torch_threads

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "mnist_test"
IMAGES = "t10k-images-idx3-ubyte.zip"
NUM_TRAIN = 9000
NUM_HELD_OUT = 1000
SIDE = 28

# IDX type codes (http://yann.lecun.com/exdb/mnist/): numbers are stored big-endian.
IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def parse_idx(buffer: bytes) -> np.ndarray:
    """Decode the bytes of an IDX file into an array of the stored type and shape.

    The header is two zero bytes, a type code, the number of dimensions ``n``, then ``n``
    big-endian ``uint32`` sizes; the data follow in C order.
    """
    if len(buffer) < 4 or buffer[0] != 0 or buffer[1] != 0:
        raise ValueError("not an IDX file: it must start with two zero bytes")
    code, ndim = buffer[2], buffer[3]
    if code not in IDX_DTYPES:
        raise ValueError(f"unknown IDX type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(buffer) < header:
        raise ValueError(f"truncated IDX header: {ndim} dimensions need {header} bytes")
    shape = struct.unpack(f">{ndim}I", buffer[4:header])
    dtype = IDX_DTYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(buffer) != expected:
        raise ValueError(
            f"IDX file of shape {shape} and type {dtype} should have {expected} bytes, "
            f"got {len(buffer)}"
        )
    array = np.frombuffer(buffer, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, plain or zipped (a zip archive holding one IDX file)."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if not n.endswith("/")]
            if len(names) != 1:
                raise ValueError(f"{path} should hold one IDX file, found {names}")
            buffer = archive.read(names[0])
    else:
        buffer = path.read_bytes()
    return parse_idx(buffer)


def load_mnist(folder: Path) -> Tensor:
    """The MNIST images of ``folder`` as a float32 ``(N, 784)`` tensor of zeros and ones.

    Static binarisation with the fixed threshold 0.5: a pixel is 1 where ``value / 255 > 0.5``.
    """
    images = read_idx(folder / IMAGES)
    if images.ndim != 3 or images.shape[1:] != (SIDE, SIDE):
        raise ValueError(f"expected images of shape (N, 28, 28), got {images.shape}")
    x = images.reshape(len(images), -1).astype(np.float32) / 255.0
    return torch.from_numpy((x > 0.5).astype(np.float32))


# --------------------------------------------------------------------------------------------
# Model and guide
# --------------------------------------------------------------------------------------------


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers of the given sizes with ReLU between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """Bernoulli decoder ``p(x | z)``, prior ``N(0, I)`` and an `AmortizedFlow` posterior.

    Args:
        latent_dim: size of ``z``.
        hidden_dims: hidden widths of the encoder and (reversed) decoder MLPs.
        context_dim: size of the encoder output, the context of the posterior.
        flow_hidden_dims: hidden widths of the Gaussian head and of the flow conditioners.
        flow_layers: flow layers on top of the Gaussian (0: a diagonal-Gaussian posterior).
        flow_type: ``"affine"`` (IAF) or ``"spline"`` layers.
    """

    def __init__(
        self,
        latent_dim: int,
        hidden_dims: Sequence[int],
        context_dim: int,
        flow_hidden_dims: Sequence[int],
        flow_layers: int,
        flow_type: str = "affine",
    ):
        super().__init__()
        self.latent_dim = latent_dim
        input_dim = SIDE * SIDE
        self.decoder = mlp([latent_dim, *reversed(hidden_dims), input_dim])  # logits
        encoder = nn.Sequential(mlp([input_dim, *hidden_dims, context_dim]), nn.ReLU())
        self.q = AmortizedFlow(
            latent_dim,
            encoder,
            context_dim=context_dim,
            hidden_dims=flow_hidden_dims,
            num_layers=flow_layers,
            layers=flow_type,
        )

    def model(self, x: Tensor, num_total: int, beta: float = 1.0) -> None:
        """``z ~ N(0, I)``, ``x ~ Bernoulli(logits=decoder(z))`` for a minibatch ``x``."""
        pyro.module("decoder", self.decoder)
        prior = dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1)
        with pyro.plate("images", num_total, subsample_size=len(x)):
            with poutine.scale(scale=beta):  # KL warm-up: beta < 1 in the first epochs
                z = pyro.sample("z", prior)
            likelihood = dist.Bernoulli(logits=self.decoder(z), validate_args=False)
            pyro.sample("x", likelihood.to_event(1), obs=x)

    def guide(self, x: Tensor, num_total: int, beta: float = 1.0) -> None:
        """``z ~ q(z | x)``, the amortized (flow) posterior."""
        pyro.module("q", self.q)
        with pyro.plate("images", num_total, subsample_size=len(x)):
            with poutine.scale(scale=beta):
                pyro.sample("z", self.q(x))

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """``log p(x, z)`` for ``z`` of shape ``(..., B, latent_dim)`` and ``x`` of ``(B, 784)``."""
        log_prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        logits = self.decoder(z)
        log_lik = -F.binary_cross_entropy_with_logits(
            logits, x.expand_as(logits), reduction="none"
        ).sum(-1)
        return log_prior + log_lik


# --------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------


def train(vae: VAE, x: Tensor, args: argparse.Namespace, label: str) -> dict:
    """Fit ``vae`` to ``x`` by SVI; the minibatch order depends on ``args.seed`` only."""
    pyro.clear_param_store()
    torch.manual_seed(args.seed)
    order = torch.Generator().manual_seed(args.seed)
    svi = SVI(vae.model, vae.guide, Adam({"lr": args.lr}), Trace_ELBO())
    num, steps_per_epoch = len(x), math.ceil(len(x) / args.batch_size)
    history, start = [], time.perf_counter()
    for epoch in range(args.epochs):
        total = 0.0
        for step, idx in enumerate(torch.randperm(num, generator=order).split(args.batch_size)):
            beta = 1.0
            if args.warmup_epochs > 0:
                progress = epoch * steps_per_epoch + step + 1
                beta = min(1.0, progress / (args.warmup_epochs * steps_per_epoch))
            total += svi.step(x[idx], num, beta) * len(idx) / num
        history.append(-total / num)  # mean training ELBO per image (beta-weighted in warm-up)
        if not args.quiet:
            print(
                f"  {label:8s} epoch {epoch + 1:3d}/{args.epochs}  train ELBO {history[-1]:9.3f}"
                f"  ({time.perf_counter() - start:6.1f} s)",
                flush=True,
            )
    return {"train_elbo": history, "train_seconds": time.perf_counter() - start}


@torch.no_grad()
def evaluate(
    vae: VAE, x: Tensor, k: int, image_chunk: int, sample_chunk: int
) -> tuple[Tensor, Tensor]:
    """Per-image ELBO and IWAE estimate of ``log p(x)`` (nats) from ``k`` samples each.

    For every image the ``k`` log-weights ``log p(x, z_k) - log q(z_k | x)``, with ``z_k`` and
    ``log q`` from one forward pass of the guide (``rsample_and_log_prob``), give both the
    ELBO estimate (their mean) and the IWAE bound (``logsumexp - log k``).
    """
    chunks = [sample_chunk] * (k // sample_chunk) + ([k % sample_chunk] if k % sample_chunk else [])
    elbos, iwaes = [], []
    for xb in x.split(image_chunk):
        q = vae.q(xb)
        log_w = []
        for n in chunks:
            z, log_q = q.rsample_and_log_prob((n,))
            log_w.append(vae.log_joint(xb, z) - log_q)
        log_w = torch.cat(log_w)  # (k, B)
        elbos.append(log_w.mean(0))
        iwaes.append(torch.logsumexp(log_w, 0) - math.log(k))
    return torch.cat(elbos), torch.cat(iwaes)


def mean_and_se(values: Tensor) -> tuple[float, float]:
    """Mean over images and its standard error."""
    se = values.std() / math.sqrt(len(values)) if len(values) > 1 else values.new_zeros(())
    return values.mean().item(), se.item()


def build(args: argparse.Namespace, flow_layers: int) -> VAE:
    torch.manual_seed(args.seed)
    return VAE(
        args.latent_dim,
        args.hidden_dims,
        args.context_dim,
        args.flow_hidden_dims,
        flow_layers,
        args.flow_type,
    )


def share_initialisation(source: VAE, target: VAE) -> None:
    """Copy the decoder, encoder and Gaussian head of ``source`` into ``target``.

    With the flow layers starting as the identity, both VAEs then start as the same function.
    """
    target.decoder.load_state_dict(source.decoder.state_dict())
    target.q.encoder.load_state_dict(source.q.encoder.state_dict())
    target.q.flow.layers[-1].load_state_dict(source.q.flow.layers[-1].state_dict())


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _grid(images: Tensor, rows: int) -> np.ndarray:
    cols = len(images) // rows
    tiles = images[: rows * cols].reshape(rows, cols, SIDE, SIDE).permute(0, 2, 1, 3)
    return tiles.reshape(rows * SIDE, cols * SIDE).numpy()


@torch.no_grad()
def plot(vaes: dict[str, VAE], held_out: Tensor, out: Path, seed: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.manual_seed(seed)
    originals = held_out[:12]
    rows = [("held-out images", originals)]
    for name, vae in vaes.items():
        z = vae.q(originals).sample()
        rows.append((f"{name}: reconstruction", torch.sigmoid(vae.decoder(z))))
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 1.0 * len(rows) + 0.4))
    for ax, (title, images) in zip(axes, rows, strict=True):
        ax.imshow(_grid(images, 1), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    recon = out / "reconstructions.png"
    fig.savefig(recon, dpi=110)
    plt.close(fig)

    z = torch.randn(64, next(iter(vaes.values())).latent_dim)
    fig, axes = plt.subplots(1, len(vaes), figsize=(4.2 * len(vaes), 4.5))
    for ax, (name, vae) in zip(np.atleast_1d(axes), vaes.items(), strict=True):
        ax.imshow(_grid(torch.sigmoid(vae.decoder(z)), 8), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(f"{name}: decoder means, z ~ N(0, I)", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    samples = out / "samples.png"
    fig.savefig(samples, dpi=110)
    plt.close(fig)
    return [recon, samples]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help=f"folder holding {IMAGES} (default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, default=Path("vae_out"), help="folder for outputs")
    parser.add_argument("--epochs", type=int, default=80, help="passes over the training images")
    parser.add_argument("--latent-dim", type=int, default=16, help="size of z")
    parser.add_argument("--batch-size", type=int, default=100, help="images per SVI step")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument(
        "--flow-layers", type=int, default=4, help="flow layers of posterior (b) (>= 1)"
    )
    parser.add_argument(
        "--flow-type", choices=["affine", "spline"], default="affine", help="IAF or spline layers"
    )
    parser.add_argument(
        "--hidden-dims", type=_dims, default=(256, 256), help="encoder/decoder widths, e.g. 256,256"
    )
    parser.add_argument("--context-dim", type=int, default=64, help="encoder output size")
    parser.add_argument(
        "--flow-hidden-dims",
        type=_dims,
        default=(128,),
        help="widths of the Gaussian head and flow conditioners",
    )
    parser.add_argument(
        "--warmup-epochs",
        type=float,
        default=10.0,
        help="KL warm-up: the latent terms are weighted by beta rising linearly to 1 over "
        "this many epochs (0: none; without it the Gaussian VAE's result depends on the seed)",
    )
    parser.add_argument("--iwae-k", type=int, default=500, help="importance samples per image")
    parser.add_argument("--eval-images", type=int, default=1000, help="held-out images scored")
    parser.add_argument(
        "--train-images", type=int, default=NUM_TRAIN, help="training images (first N of 9,000)"
    )
    parser.add_argument("--image-chunk", type=int, default=100, help="images scored at once")
    parser.add_argument("--sample-chunk", type=int, default=100, help="samples drawn at once")
    parser.add_argument("--seed", type=int, default=0, help="seed of models, batches and samples")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    args = parser.parse_args(argv)
    folder = args.data
    if not (folder / IMAGES).is_file():
        parser.error(
            f"MNIST images not found: {folder / IMAGES} does not exist; pass --data FOLDER "
            f"holding {IMAGES} (the MNIST test set as a zipped IDX file)"
        )
    positive = (
        "epochs",
        "latent_dim",
        "batch_size",
        "flow_layers",
        "context_dim",
        "iwae_k",
        "eval_images",
        "train_images",
        "image_chunk",
        "sample_chunk",
        "threads",
    )
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0 or args.warmup_epochs < 0:
        parser.error("--lr must be positive and --warmup-epochs non-negative")
    if not args.hidden_dims or not args.flow_hidden_dims:
        parser.error("--hidden-dims and --flow-hidden-dims need at least one width")
    if args.train_images > NUM_TRAIN or args.eval_images > NUM_HELD_OUT:
        parser.error(f"at most {NUM_TRAIN} training and {NUM_HELD_OUT} held-out images")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Train both VAEs, evaluate them on the held-out images, write figures; return metrics."""
    args = parse_args(argv)
    with torch_threads(args.threads):  # the caller's setting is restored after
        return run(args)


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    images = load_mnist(args.data)
    if len(images) < NUM_TRAIN + NUM_HELD_OUT:
        raise SystemExit(f"expected {NUM_TRAIN + NUM_HELD_OUT} images, found {len(images)}")
    train_x = images[: args.train_images]
    held_out = images[NUM_TRAIN : NUM_TRAIN + NUM_HELD_OUT][: args.eval_images]
    print(
        f"MNIST: {len(train_x)} training and {len(held_out)} held-out images (binarised at 0.5)",
        flush=True,
    )
    if args.iwae_k < 500:
        print(f"note: --iwae-k {args.iwae_k} < 500 gives a looser log-likelihood estimate")

    gaussian = build(args, 0)
    flow = build(args, args.flow_layers)
    share_initialisation(gaussian, flow)
    vaes = {"gaussian": gaussian, "flow": flow}
    names = {
        "gaussian": "diagonal Gaussian",
        "flow": f"Gaussian + {args.flow_layers} {args.flow_type} flow layers",
    }

    results: dict = {"settings": {k: str(v) for k, v in vars(args).items()}}
    per_image: dict[str, tuple[Tensor, Tensor]] = {}
    for name, vae in vaes.items():
        fit = train(vae, train_x, args, name)
        vae.eval()
        torch.manual_seed(args.seed + 1)
        tic = time.perf_counter()
        per_image[name] = evaluate(vae, held_out, args.iwae_k, args.image_chunk, args.sample_chunk)
        metrics = {}
        for key, values in zip(("elbo", "iwae"), per_image[name], strict=True):
            metrics[key], metrics[f"{key}_se"] = mean_and_se(values)
        metrics["eval_seconds"] = time.perf_counter() - tic
        metrics["train_seconds"] = fit["train_seconds"]
        metrics["final_train_elbo"] = fit["train_elbo"][-1]
        metrics["posterior"] = names[name]
        results[name] = metrics
        print(
            f"{names[name]}: held-out ELBO {metrics['elbo']:.2f}, "
            f"IWAE (K={args.iwae_k}) {metrics['iwae']:.2f} nats "
            f"[train {metrics['train_seconds']:.0f} s, eval {metrics['eval_seconds']:.0f} s]",
            flush=True,
        )

    # Both posteriors are scored on the same images: the paired differences have a much
    # smaller standard error than either mean.
    for i, key in enumerate(("elbo", "iwae")):
        difference = per_image["flow"][i] - per_image["gaussian"][i]
        results[f"improvement_{key}"], results[f"improvement_{key}_se"] = mean_and_se(difference)
    args.out.mkdir(parents=True, exist_ok=True)
    results["figures"] = [str(p) for p in plot(vaes, held_out, args.out, args.seed)]
    results["seconds"] = time.perf_counter() - start
    (args.out / "results.json").write_text(json.dumps(results, indent=2))

    print()
    print(f"held-out images: {len(held_out)}; nats per image (higher is better)")
    print(f"{'posterior':42s} {'ELBO':>9s} {'IWAE log p(x)':>14s}")
    for name in vaes:
        r = results[name]
        print(f"{r['posterior']:42s} {r['elbo']:9.2f} {r['iwae']:14.2f}")
    print(
        f"flow - Gaussian: ELBO {results['improvement_elbo']:+.2f} "
        f"(+/- {results['improvement_elbo_se']:.2f}), "
        f"IWAE {results['improvement_iwae']:+.2f} (+/- {results['improvement_iwae_se']:.2f}) nats"
    )
    print(f"total time {results['seconds']:.0f} s; wrote {args.out}", flush=True)
    return results


if __name__ == "__main__":
    main()
