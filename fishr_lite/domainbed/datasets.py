"""DomainBed's datasets: ColoredMNIST and RotatedMNIST from the shipped MNIST, image folders.

A dataset is a list of environments (``torch.utils.data.Dataset`` of ``(x, y)``) with
``input_shape``, ``num_classes``, ``ENVIRONMENTS`` (names), ``N_STEPS`` and
``CHECKPOINT_FREQ`` (DomainBed's defaults). As in DomainBed (``datasets.py``):

- MNIST environments: the 70,000 MNIST images (train then test) are shuffled, and environment
  ``i`` of ``E`` takes every ``E``-th image from position ``i``. DomainBed draws the shuffle and
  the colours from torch's global generator, seeded by the run's ``seed`` just before; we use a
  ``torch.Generator`` seeded with ``seed``, which gives the same stream.
- ColoredMNIST (2x28x28, 2 classes): label = (digit < 5) xor Bernoulli(0.25); colour = label
  xor Bernoulli(e) for e = 0.1, 0.2, 0.9 (environments "+90%", "+80%", "-90%": how often the
  colour agrees with the label); the other channel is zeroed. Full 28x28 images, unlike the
  14x14 images of the IRM-style Colored MNIST in :mod:`fishr_lite.data`.
- RotatedMNIST (1x28x28, 10 classes): environment images rotated counter-clockwise by 0, 15,
  30, 45, 60, 75 degrees about the centre, zero fill, exactly as DomainBed at commit
  ``99353c2bdb5f2f50a935e0fb660ccf0144d25cf5`` (facebookresearch/DomainBed; the Fishr
  repository, alexrame/fishr at ``1f6f77a8dd9910bc746360a5964e8f1abe1be9e3``, does the same):
  the 8-bit digit goes through PIL's bilinear rotation (torchvision's ``rotate(x, angle,
  fill=(0,), interpolation=InterpolationMode.BILINEAR)`` on a PIL image calls PIL's
  ``Image.rotate``) and back to [0, 1] as k / 255. Older DomainBed commits (such as
  ``05a8cc004de8d8382bcddfed1de152ea688ce7d8``) passed ``resample=Image.BICUBIC``; we follow the
  newer one. We call PIL directly, so torchvision is not needed.
- Image folders ``root/<environment>/<class>/<image>``: environments and classes in sorted
  name order, as torchvision's ``ImageFolder``. Loading them needs torchvision (DomainBed's
  resize/normalise transforms and its augmentation); :func:`discover_image_folder` does not.

``max_per_env`` keeps the first items of each environment (the colours and labels of those
items are those of the full dataset): the quick profile's small data.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from .names import DATASET_ENVIRONMENTS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class MultipleDomainDataset:
    """A list of environments; subclasses set the class attributes below."""

    N_STEPS = 5001
    CHECKPOINT_FREQ = 100
    ENVIRONMENTS: list[str] = []
    input_shape: tuple[int, ...] = ()
    num_classes: int = 0

    def __init__(self, environments: list[Dataset]):
        self.datasets = environments

    def __getitem__(self, i: int) -> Dataset:
        return self.datasets[i]

    def __len__(self) -> int:
        return len(self.datasets)


@functools.lru_cache(maxsize=1)
def _load_mnist(root: Optional[str]) -> dict:
    """``fishr_lite.data.load_mnist`` (checksummed, ~1 s), cached for repeated datasets."""
    from fishr_lite.data import load_mnist

    return load_mnist(root)


def _bernoulli(p: float, n: int, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=generator) < p).float()


class MultipleEnvironmentMNIST(MultipleDomainDataset):
    """MNIST (train + test) shuffled with ``seed`` and dealt round-robin to the environments."""

    def __init__(self, parameters: list[float], seed: int = 0, max_per_env: Optional[int] = None,
                 root: Optional[str | os.PathLike] = None):
        mnist = _load_mnist(None if root is None else str(root))
        images = torch.from_numpy(np.concatenate([mnist["train_images"], mnist["test_images"]]))
        labels = torch.from_numpy(np.concatenate([mnist["train_labels"], mnist["test_labels"]])).long()
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(images), generator=generator)
        images, labels = images[order], labels[order]
        n = len(parameters)
        super().__init__([self.make_environment(images[i::n], labels[i::n], p, generator, max_per_env)
                          for i, p in enumerate(parameters)])

    def make_environment(self, images: torch.Tensor, labels: torch.Tensor, parameter: float,
                         generator: torch.Generator, max_per_env: Optional[int]) -> TensorDataset:
        raise NotImplementedError


class ColoredMNIST(MultipleEnvironmentMNIST):
    """DomainBed's ColoredMNIST: colour agrees with the (25 % noisy) label 90 %, 80 %, 10 %."""

    ENVIRONMENTS = DATASET_ENVIRONMENTS["ColoredMNIST"]
    input_shape, num_classes = (2, 28, 28), 2

    def __init__(self, seed: int = 0, max_per_env: Optional[int] = None, root: Optional[str] = None):
        super().__init__([0.1, 0.2, 0.9], seed, max_per_env, root)

    def make_environment(self, images: torch.Tensor, labels: torch.Tensor, color_flip: float,
                         generator: torch.Generator, max_per_env: Optional[int]) -> TensorDataset:
        labels = (labels < 5).float()
        labels = (labels - _bernoulli(0.25, len(labels), generator)).abs()
        colors = (labels - _bernoulli(color_flip, len(labels), generator)).abs()
        k = len(labels) if max_per_env is None else min(max_per_env, len(labels))
        x = torch.stack([images[:k], images[:k]], dim=1).float().div_(255.0)
        x[torch.arange(k), (1 - colors[:k]).long()] = 0.0
        return TensorDataset(x, labels[:k].long())


def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate (n, h, w) 8-bit images counter-clockwise by ``degrees`` about their centre, as
    DomainBed's RotatedMNIST does (PIL bilinear, zero fill); returns (n, 1, h, w) float32 in
    [0, 1], multiples of 1 / 255. Needs Pillow (installed with matplotlib)."""
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError("RotatedMNIST rotates its digits with Pillow, as DomainBed does: "
                          "pip install pillow") from error
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise ValueError(f"rotate takes (n, h, w) uint8 images (MNIST's 8-bit digits), got "
                         f"{images.dtype} of shape {tuple(images.shape)}.")
    array = images.numpy()
    rotated = np.stack([np.asarray(Image.fromarray(a).rotate(
        degrees, resample=Image.BILINEAR, fillcolor=0)) for a in array]) \
        if len(array) else array
    return torch.from_numpy(rotated.copy()).float().div_(255.0).unsqueeze(1)


class RotatedMNIST(MultipleEnvironmentMNIST):
    """DomainBed's RotatedMNIST: digits rotated by 0, 15, ..., 75 degrees; 10 classes."""

    ENVIRONMENTS = DATASET_ENVIRONMENTS["RotatedMNIST"]
    input_shape, num_classes = (1, 28, 28), 10

    def __init__(self, seed: int = 0, max_per_env: Optional[int] = None, root: Optional[str] = None):
        super().__init__([0, 15, 30, 45, 60, 75], seed, max_per_env, root)

    def make_environment(self, images: torch.Tensor, labels: torch.Tensor, angle: float,
                         generator: torch.Generator, max_per_env: Optional[int]) -> TensorDataset:
        k = len(labels) if max_per_env is None else min(max_per_env, len(labels))
        x = rotate(images[:k], angle)
        return TensorDataset(x, labels[:k])


def discover_image_folder(root: str | os.PathLike) -> list[tuple[str, list[str], list[tuple[str, int]]]]:
    """Per environment (sorted sub-folders of ``root``): its name, its classes (sorted
    sub-folders) and its ``(image path, class index)`` items, in sorted order. No torchvision."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{str(root)!r} is not a folder; pass the dataset folder holding one "
                         "sub-folder per environment, each with one sub-folder per class.")
    found = []
    for env in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        classes = sorted(p.name for p in env.iterdir() if p.is_dir() and not p.name.startswith("."))
        items = [(str(f), c) for c, name in enumerate(classes) for f in sorted((env / name).rglob("*"))
                 if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()]
        if not items:
            raise ValueError(f"environment folder {str(env)!r} holds no images in class "
                             "sub-folders; expected <environment>/<class>/<image>.jpg.")
        found.append((env.name, classes, items))
    if not found:
        raise ValueError(f"{str(root)!r} has no environment sub-folders.")
    if len({tuple(classes) for _, classes, _ in found}) != 1:
        raise ValueError(f"the environments of {str(root)!r} have different class folders: "
                         f"{ {e: c for e, c, _ in found} }; every environment needs the same classes.")
    return found


def image_transforms(augment: bool, size: int = 224) -> Callable:
    """DomainBed's transforms (torchvision): resize + normalise, or its training augmentation."""
    try:
        from torchvision import transforms as T
    except Exception as error:  # a broken install raises RuntimeError, not ImportError
        raise ImportError(
            "image-folder datasets need a working torchvision (pip install torchvision matching "
            f"your torch); importing it failed with: {error!r}") from error
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if augment:
        return T.Compose([T.RandomResizedCrop(size, scale=(0.7, 1.0)), T.RandomHorizontalFlip(),
                          T.ColorJitter(0.3, 0.3, 0.3, 0.3), T.RandomGrayscale(), *normalize])
    return T.Compose([T.Resize((size, size)), *normalize])


class ImageFolderEnvironment(Dataset):
    """One environment's images (RGB via PIL) and class indices, with a transform."""

    def __init__(self, items: list[tuple[str, int]], transform: Callable):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image

        path, y = self.items[i]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), y


class MultipleEnvironmentImageFolder(MultipleDomainDataset):
    """``root/<environment>/<class>/<image>``; training environments augmented if asked."""

    CHECKPOINT_FREQ = 300
    SUBFOLDER = ""
    input_shape = (3, 224, 224)

    def __init__(self, root: str | os.PathLike, test_envs: tuple[int, ...] = (),
                 augment: bool = True, size: int = 224):
        found = discover_image_folder(Path(root) / self.SUBFOLDER)
        plain, augmented = image_transforms(False, size), image_transforms(True, size)
        super().__init__([ImageFolderEnvironment(items, augmented if augment and i not in test_envs else plain)
                          for i, (_, _, items) in enumerate(found)])
        self.environment_folders = [name for name, _, _ in found]
        self.classes = found[0][1]
        self.num_classes = len(self.classes)
        self.input_shape = (3, size, size)
        if not self.ENVIRONMENTS:
            self.ENVIRONMENTS = self.environment_folders


class VLCS(MultipleEnvironmentImageFolder):
    ENVIRONMENTS, SUBFOLDER = DATASET_ENVIRONMENTS["VLCS"], "VLCS"


class PACS(MultipleEnvironmentImageFolder):
    ENVIRONMENTS, SUBFOLDER = DATASET_ENVIRONMENTS["PACS"], "PACS"


class OfficeHome(MultipleEnvironmentImageFolder):
    ENVIRONMENTS, SUBFOLDER = DATASET_ENVIRONMENTS["OfficeHome"], "office_home"


class TerraIncognita(MultipleEnvironmentImageFolder):
    ENVIRONMENTS, SUBFOLDER = DATASET_ENVIRONMENTS["TerraIncognita"], "terra_incognita"


class DomainNet(MultipleEnvironmentImageFolder):
    CHECKPOINT_FREQ = 1000
    ENVIRONMENTS, SUBFOLDER = DATASET_ENVIRONMENTS["DomainNet"], "domain_net"


DATASET_CLASSES: dict[str, type[MultipleDomainDataset]] = {
    c.__name__: c for c in (ColoredMNIST, RotatedMNIST, VLCS, PACS, OfficeHome, TerraIncognita, DomainNet)
}


def get_dataset(name: str, *, data_dir: Optional[str] = None, seed: int = 0, test_envs: Sequence[int] = (),
                hparams: Optional[dict] = None, max_per_env: Optional[int] = None) -> MultipleDomainDataset:
    """Build dataset ``name`` as DomainBed's ``train.py`` does (MNIST ones from the shipped MNIST;
    image folders from ``data_dir``, augmented when ``hparams["data_augmentation"]``)."""
    if name not in DATASET_CLASSES:
        raise ValueError(f"unknown dataset {name!r}; use one of {sorted(DATASET_CLASSES)}.")
    cls = DATASET_CLASSES[name]
    if issubclass(cls, MultipleEnvironmentMNIST):
        return cls(seed=seed, max_per_env=max_per_env)
    if data_dir is None:
        raise ValueError(f"{name} is an image-folder dataset: pass data_dir, the folder holding "
                         f"{cls.SUBFOLDER}/<environment>/<class>/<image>.")
    return cls(data_dir, tuple(test_envs), augment=bool((hparams or {}).get("data_augmentation", True)))
