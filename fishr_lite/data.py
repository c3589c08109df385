"""MNIST from the IDX files shipped in ``data/MNIST/``, and the Colored MNIST environments.

``load_mnist`` reads the four original IDX files (LeCun, Cortes & Burges) with numpy and checks
each against the SHA-256 of its uncompressed content; ``colored_mnist`` builds the environments
of the IRM setup (Arjovsky et al., 2019) exactly as the official IRM and Fishr scripts do.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

#: SHA-256 of the *uncompressed* IDX files (the files may be stored gzipped or not).
#:
#: :meta hide-value:
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
_KEYS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
#: Mirrors of the original gzipped files, tried in order by ``load_mnist(download=True)``.
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class MNISTFileError(ValueError):
    """An MNIST file is missing or does not match its checksum."""


def _checkout() -> Path | None:
    """The repository the package sits in (with ``data/MNIST``), or None for an installed copy."""
    repository = Path(__file__).resolve().parent.parent
    if (repository / "pyproject.toml").is_file() and (repository / "data" / "MNIST").is_dir():
        return repository
    return None


def default_mnist_root() -> Path:
    """``$FISHR_MNIST_DIR`` if set; else the repository's ``data/MNIST`` next to the package;
    for a pip-installed package (which ships no data), ``$XDG_CACHE_HOME/fishr_lite/MNIST``
    (``~/.cache/fishr_lite/MNIST`` by default), where ``load_mnist(download=True)`` puts it."""
    env = os.environ.get("FISHR_MNIST_DIR")
    if env:
        return Path(env).expanduser()
    repository = _checkout()
    if repository is not None:
        return repository / "data" / "MNIST"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "fishr_lite" / "MNIST"


def _restore_hint(root: Path) -> str:
    repository = _checkout()
    if repository is not None:
        shipped = (f"Restore the copy shipped with the Fishr book with "
                   f"`git checkout -- {repository / 'data' / 'MNIST'}`, or call ")
    else:
        shipped = ("fishr_lite installed with pip ships no data (MNIST lives in data/MNIST of the "
                   "Fishr book's repository). Call ")
    return (
        shipped + "`fishr_lite.data.load_mnist(download=True)` on a machine with internet access "
        f"(downloads into {root} from the usual MNIST mirrors, verified by the same checksums), "
        "or point $FISHR_MNIST_DIR at a folder holding the four IDX files (gzipped or not)."
    )


def _find(root: Path, name: str) -> Path | None:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.exists():
            return candidate
    return None


def _read_bytes(path: Path) -> bytes:
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (OSError, EOFError) as exc:  # truncated or not gzip at all
            raise MNISTFileError(f"{path} is not a readable gzip file ({exc}).") from exc
    return path.read_bytes()


def parse_idx(raw: bytes) -> np.ndarray:
    """Parse an IDX file: 2 zero bytes, a dtype code, the number of dimensions, the sizes
    (big-endian int32), then the data in C order."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError("not an IDX file (bad magic number)")
    ndim = raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    data = np.frombuffer(raw, _IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"IDX header announces shape {shape} but holds {data.size} values")
    return data.reshape(shape)


def _load_verified(root: Path, name: str) -> np.ndarray:
    path = _find(root, name)
    expected = MNIST_SHA256[name]
    if path is None:
        raise MNISTFileError(
            f"MNIST file {name}(.gz) is missing from {root} (expected SHA-256 of the "
            f"uncompressed file: {expected}). {_restore_hint(root)}"
        )
    raw = _read_bytes(path)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != expected:
        raise MNISTFileError(
            f"MNIST file {path} is corrupt: the SHA-256 of its uncompressed content is {digest}, "
            f"expected {expected}. {_restore_hint(root)}"
        )
    return parse_idx(raw)


def download_mnist(root: str | Path | None = None) -> Path:
    """Download the four gzipped IDX files into ``root`` from :data:`MNIST_MIRRORS`, keeping
    only files whose uncompressed SHA-256 matches :data:`MNIST_SHA256`."""
    root = Path(root) if root is not None else default_mnist_root()
    root.mkdir(parents=True, exist_ok=True)
    for name, expected in MNIST_SHA256.items():
        if _find(root, name) is not None:
            continue
        errors = []
        for mirror in MNIST_MIRRORS:
            with tempfile.NamedTemporaryFile(dir=root, suffix=".gz", delete=False) as tmp:
                try:
                    with urllib.request.urlopen(f"{mirror}{name}.gz", timeout=60) as response:
                        shutil.copyfileobj(response, tmp)
                except OSError as exc:
                    errors.append(f"{mirror}: {exc}")
                    continue
            raw = _read_bytes(Path(tmp.name))
            if hashlib.sha256(raw).hexdigest() == expected:
                os.replace(tmp.name, root / f"{name}.gz")
                break
            os.unlink(tmp.name)
            errors.append(f"{mirror}: checksum mismatch")
        else:
            raise MNISTFileError(f"could not download {name}: " + "; ".join(errors))
    return root


def load_mnist(root: str | Path | None = None, *, download: bool = False) -> dict[str, np.ndarray]:
    """Load MNIST as numpy arrays: ``train_images`` (60000, 28, 28) uint8, ``train_labels``
    (60000,) uint8, ``test_images`` (10000, 28, 28), ``test_labels`` (10000,).

    Every file is checked against :data:`MNIST_SHA256`; a missing or corrupt file raises
    :class:`MNISTFileError` naming the file, the expected checksum and how to restore it.
    With ``download=True`` missing files are first fetched from the usual mirrors.
    """
    root = Path(root) if root is not None else default_mnist_root()
    if download:
        download_mnist(root)
    return {key: _load_verified(root, name) for key, name in _KEYS.items()}


@dataclass
class Environment:
    """One Colored MNIST environment (a domain).

    ``images`` (n, 2, 14, 14) float32 in [0, 1], channel 0 red and 1 green; ``labels`` (n,)
    float32 in {0, 1}; ``colors`` (n,) the colour bit c, the index of the channel that is kept
    (1 = green, 0 = red); ``digits`` (n,) the MNIST digit.
    ``color_flip`` is e, the probability that the colour disagrees with the label (``None`` for
    the grayscale copy, where both channels hold the digit).
    """

    name: str
    color_flip: float | None
    images: torch.Tensor
    labels: torch.Tensor
    colors: torch.Tensor
    digits: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: str | torch.device) -> "Environment":
        move = lambda t: t.to(device)  # noqa: E731
        return Environment(self.name, self.color_flip, move(self.images), move(self.labels),
                           move(self.colors), move(self.digits))


def _make_environment(images: torch.Tensor, digits: torch.Tensor, e: float, label_flip: float,
                      generator: torch.Generator, name: str, grayscale: bool = False) -> Environment:
    """The IRM recipe: label = (digit < 5) xor Bernoulli(label_flip); colour = label xor
    Bernoulli(e); the image is downsampled to 14x14 and put in the colour's channel."""
    def bernoulli(p: float, n: int) -> torch.Tensor:
        return (torch.rand(n, generator=generator) < p).float()

    images = images.reshape(-1, 28, 28)[:, ::2, ::2]
    labels = (digits < 5).float()
    labels = (labels - bernoulli(label_flip, len(labels))).abs()
    colors = (labels - bernoulli(e, len(labels))).abs()
    images = torch.stack([images, images], dim=1).float() / 255.0
    if not grayscale:
        images[torch.arange(len(images)), (1 - colors).long()] *= 0
    return Environment(name, None if grayscale else e, images, labels, colors, digits.long())


def colored_mnist(seed: int = 0, *, label_flip: float = 0.25, fraction: float = 1.0,
                  device: str | torch.device = "cpu", root: str | Path | None = None,
                  train_color_flips: tuple[float, float] = (0.2, 0.1),
                  test_color_flip: float = 0.9) -> list[Environment]:
    """The Colored MNIST environments of Arjovsky et al. (2019), as the official IRM and Fishr
    scripts build them, for one restart ``seed``.

    The first 50,000 training images are shuffled (numpy, seeded); even-indexed ones form the
    training environment e=0.2 and odd-indexed ones e=0.1 (25,000 each); the last 10,000
    training images form the test environment e=0.9 and its grayscale copy. Unlike the
    official script, which draws all restarts from one random stream, each restart is seeded on
    its own (numpy for the shuffle, a torch generator for the Bernoulli draws), so restarts can
    run on different machines and be resumed. Returns
    ``[train e=0.2, train e=0.1, test e=0.9, test grayscale]``; ``fraction`` keeps the first
    ``round(fraction * n)`` samples of each (the quick profile).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction} must be in (0, 1]; use 1.0 for the paper's data.")
    if not 0.0 <= label_flip <= 0.5:
        raise ValueError(f"label_flip={label_flip} must be in [0, 0.5] (0.25 in the paper).")
    mnist = load_mnist(root)
    images = torch.from_numpy(mnist["train_images"][:50000].copy())
    digits = torch.from_numpy(mnist["train_labels"][:50000].astype(np.int64))
    order = np.random.RandomState(seed).permutation(len(images))
    images, digits = images[order], digits[order]
    test_images = torch.from_numpy(mnist["train_images"][50000:].copy())
    test_digits = torch.from_numpy(mnist["train_labels"][50000:].astype(np.int64))
    generator = torch.Generator().manual_seed(seed)
    e1, e2 = train_color_flips
    # Same order of random draws as the official script: each environment draws its label
    # noise, then its colours; the grayscale copy draws its own (so its labels are not
    # those of the coloured test environment).
    envs = [
        _make_environment(images[::2], digits[::2], e1, label_flip, generator, f"train (e={e1})"),
        _make_environment(images[1::2], digits[1::2], e2, label_flip, generator, f"train (e={e2})"),
        _make_environment(test_images, test_digits, test_color_flip, label_flip, generator,
                          f"test (e={test_color_flip})"),
        _make_environment(test_images, test_digits, test_color_flip, label_flip, generator,
                          "test (grayscale)", grayscale=True),
    ]
    kept = [_take_first(env, fraction) for env in envs]
    return [env.to(device) for env in kept]


def _take_first(env: Environment, fraction: float) -> Environment:
    n = max(2, round(fraction * len(env)))
    return Environment(env.name, env.color_flip, env.images[:n], env.labels[:n], env.colors[:n],
                       env.digits[:n])
