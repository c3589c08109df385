"""MNIST loading and checksums, and the Colored MNIST environments."""

import gzip
import shutil

import numpy as np
import pytest
import torch

from fishr_lite.data import (MNIST_SHA256, MNISTFileError, colored_mnist, default_mnist_root,
                             load_mnist, parse_idx)


@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


def test_shapes_and_ranges(mnist):
    assert mnist["train_images"].shape == (60000, 28, 28)
    assert mnist["test_images"].shape == (10000, 28, 28)
    assert mnist["train_labels"].shape == (60000,) and mnist["test_labels"].shape == (10000,)
    assert mnist["train_images"].dtype == np.uint8
    assert set(np.unique(mnist["train_labels"])) == set(range(10))
    # the well-known class counts of the MNIST training set
    assert np.bincount(mnist["train_labels"])[1] == 6742 and np.bincount(mnist["test_labels"])[0] == 980


def test_shipped_sha256sums_file_agrees_with_library():
    listed = dict(line.split()[::-1] for line in (default_mnist_root() / "SHA256SUMS").read_text().splitlines())
    assert listed == MNIST_SHA256


def _copy_root(tmp_path):
    root = tmp_path / "MNIST"
    shutil.copytree(default_mnist_root(), root)
    return root


def test_corrupt_file_raises_clear_error(tmp_path):
    root = _copy_root(tmp_path)
    path = root / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[100] ^= 0xFF  # flip one label byte
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(MNISTFileError) as info:
        load_mnist(root)
    message = str(info.value)
    assert str(path) in message and MNIST_SHA256["train-labels-idx1-ubyte"] in message
    assert "git checkout" in message and "download=True" in message


def test_truncated_gzip_raises_clear_error(tmp_path):
    root = _copy_root(tmp_path)
    path = root / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(MNISTFileError, match="t10k-images-idx3-ubyte"):
        load_mnist(root)


def test_missing_file_raises_clear_error(tmp_path):
    root = _copy_root(tmp_path)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(MNISTFileError) as info:
        load_mnist(root)
    assert "t10k-labels-idx1-ubyte" in str(info.value) and "missing" in str(info.value)
    assert MNIST_SHA256["t10k-labels-idx1-ubyte"] in str(info.value)


def test_uncompressed_files_are_accepted(tmp_path):
    root = _copy_root(tmp_path)
    for gz in root.glob("*.gz"):
        gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    assert load_mnist(root)["test_labels"].shape == (10000,)


def test_parse_idx_rejects_bad_headers():
    with pytest.raises(ValueError, match="magic"):
        parse_idx(b"\x01\x02\x03\x04")
    header = bytes([0, 0, 0x08, 1]) + (5).to_bytes(4, "big")
    assert parse_idx(header + bytes(range(5))).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="shape"):
        parse_idx(header + bytes(3))


@pytest.fixture(scope="module")
def envs():
    return colored_mnist(seed=0)


def test_environment_sizes_and_shapes(envs):
    assert [len(env) for env in envs] == [25000, 25000, 10000, 10000]
    assert [env.color_flip for env in envs] == [0.2, 0.1, 0.9, None]
    for env in envs:
        assert env.images.shape[1:] == (2, 14, 14) and env.images.dtype == torch.float32
        assert 0.0 <= env.images.min() and env.images.max() <= 1.0
        assert set(env.labels.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("index,e", [(0, 0.2), (1, 0.1), (2, 0.9)])
def test_colour_label_agreement_is_one_minus_e(envs, index, e):
    env = envs[index]
    agreement = (env.colors == env.labels).float().mean().item()
    assert abs(agreement - (1 - e)) < 0.01


def test_label_noise_is_25_percent(envs):
    for env in envs:
        noise = ((env.digits < 5).float() != env.labels).float().mean().item()
        assert abs(noise - 0.25) < 0.01


def test_images_are_the_digit_in_the_colour_channel(envs):
    mnist = load_mnist()
    env = envs[2]  # the test environment is the last 10,000 training images, in order
    small = torch.from_numpy(mnist["train_images"][50000:, ::2, ::2].copy()).float() / 255
    kept = env.images[torch.arange(len(env)), env.colors.long()]
    dropped = env.images[torch.arange(len(env)), 1 - env.colors.long()]
    assert torch.equal(kept, small) and dropped.abs().sum() == 0
    assert torch.equal(envs[3].images[:, 0], small) and torch.equal(envs[3].images[:, 1], small)


def test_training_environments_are_the_first_50000_shuffled(envs):
    mnist = load_mnist()
    train_digits = torch.cat([envs[0].digits, envs[1].digits]).sort().values
    expected = torch.from_numpy(mnist["train_labels"][:50000].astype(np.int64)).sort().values
    assert torch.equal(train_digits, expected)


@pytest.mark.slow
def test_seeding(envs):
    again = colored_mnist(seed=0, fraction=0.1)
    other = colored_mnist(seed=1, fraction=0.1)
    n = len(again[0])
    assert n == 2500 and torch.equal(again[0].labels, envs[0].labels[:n])
    assert not torch.equal(other[0].labels, again[0].labels)


def test_bad_arguments():
    with pytest.raises(ValueError, match="fraction"):
        colored_mnist(fraction=0.0)
    with pytest.raises(ValueError, match="label_flip"):
        colored_mnist(label_flip=0.7)
