"""The MNIST VAE example: its IDX reader, its log-joint, and a smoke run with tiny settings."""

from __future__ import annotations

import math
import struct
import zipfile
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from _scripts import load_script
from pyro import poutine

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT / ".." / "shared" / "data" / "mnist_test"


@pytest.fixture(scope="module")
def vae_mnist():
    return load_script("examples/vae_mnist.py")


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_read_idx_plain_and_zipped(vae_mnist, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 3, 4), dtype=np.uint8)
    labels = rng.integers(-(2**31), 2**31 - 1, size=7, dtype=np.int32)
    floats = rng.standard_normal((2, 3))
    (tmp_path / "images.idx").write_bytes(idx_bytes(images, 0x08))
    with zipfile.ZipFile(tmp_path / "labels.zip", "w") as archive:
        archive.writestr("labels-idx1", idx_bytes(labels, 0x0C))
    (tmp_path / "floats.idx").write_bytes(idx_bytes(floats, 0x0E))

    read = vae_mnist.read_idx(tmp_path / "images.idx")
    assert read.dtype == np.uint8 and read.shape == (5, 3, 4)
    np.testing.assert_array_equal(read, images)
    read = vae_mnist.read_idx(tmp_path / "labels.zip")
    assert read.shape == (7,) and read.dtype.kind == "i"
    np.testing.assert_array_equal(read, labels)  # big-endian int32 decoded correctly
    np.testing.assert_array_equal(vae_mnist.read_idx(tmp_path / "floats.idx"), floats)


def test_read_idx_errors(vae_mnist):
    good = idx_bytes(np.zeros((2, 2), np.uint8), 0x08)
    with pytest.raises(ValueError, match="two zero bytes"):
        vae_mnist.parse_idx(b"\x01" + good[1:])
    with pytest.raises(ValueError, match="type code"):
        vae_mnist.parse_idx(good[:2] + b"\x07" + good[3:])
    with pytest.raises(ValueError, match="should have 16 bytes, got 15"):
        vae_mnist.parse_idx(good[:-1])


def test_log_joint_matches_the_pyro_model(vae_mnist):
    vae = vae_mnist.VAE(3, (16,), 8, (8,), flow_layers=1)
    x = torch.bernoulli(torch.full((4, 784), 0.3))
    z = torch.randn(4, 3)
    conditioned = poutine.condition(vae.model, data={"z": z})
    trace = poutine.trace(conditioned).get_trace(x, len(x))
    trace.compute_log_prob()
    expected = trace.nodes["z"]["log_prob"] + trace.nodes["x"]["log_prob"]
    torch.testing.assert_close(vae.log_joint(x, z), expected)
    pyro.clear_param_store()


def test_smoke_run(vae_mnist, tmp_path):
    if not (MNIST / vae_mnist.IMAGES).is_file():
        pytest.skip(f"MNIST test images not found in {MNIST}")
    threads = torch.get_num_threads()
    argv = ["--data", str(MNIST), "--out", str(tmp_path), "--epochs", "1"]
    argv += ["--train-images", "300", "--iwae-k", "8", "--eval-images", "20", "--quiet"]
    argv += ["--hidden-dims", "64", "--flow-layers", "1"]
    results = vae_mnist.main(argv)
    assert torch.get_num_threads() == threads
    for name in ("gaussian", "flow"):
        elbo, iwae = results[name]["elbo"], results[name]["iwae"]
        assert math.isfinite(elbo) and math.isfinite(iwae)
        assert -800 < elbo < 0
        # log mean_k w_k >= mean_k log w_k (Jensen): the IWAE bound is the tighter one.
        assert iwae >= elbo - 1e-3
    assert math.isfinite(results["improvement_iwae"])
    for name in ("reconstructions.png", "samples.png", "results.json"):
        assert (tmp_path / name).stat().st_size > 0


def test_missing_data_is_a_clear_error(vae_mnist, tmp_path, capsys):
    with pytest.raises(SystemExit):
        vae_mnist.main(["--data", str(tmp_path / "nowhere")])
    assert "MNIST images not found" in capsys.readouterr().err
