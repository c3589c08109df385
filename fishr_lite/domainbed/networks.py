"""DomainBed's networks (``networks.py``): a featurizer, then a linear classifier (the head).

- :class:`MNIST_CNN` for 28x28 inputs: four 3x3 convolutions (64, 128 stride 2, 128, 128
  channels), each followed by ReLU and GroupNorm(8 groups), then global average pooling to 128
  features. ``width`` (the first layer's channels, DomainBed's 64) narrows it for CPU-sized
  runs: channels (w, 2w, 2w, 2w), 2w features; set through the hyperparameter
  ``mnist_cnn_width`` (absent from the registry, so DomainBed's runs keep 64).
- :class:`ResNet` for 224x224 inputs: torchvision's ResNet-18 or ResNet-50 without its last
  layer (512 or 2048 features), BatchNorm kept in eval mode (running statistics frozen) during
  training, dropout ``resnet_dropout`` on the features. Needs torchvision. The ImageNet weights
  are those DomainBed loads, ``torchvision.models.resnet50(pretrained=True)``, which torchvision
  maps to ``ResNet50_Weights.IMAGENET1K_V1`` (76.1 % top-1), not ``DEFAULT`` (``IMAGENET1K_V2``,
  80.9 %, a newer training recipe that the published DomainBed tables did not use); likewise
  ``ResNet18_Weights.IMAGENET1K_V1``. :func:`resnet_spec` names the choice.
- :func:`Classifier`: ``nn.Linear(n_features, n_classes)``, or DomainBed's small MLP head when
  ``nonlinear``. Fishr's per-sample gradients are taken with respect to this head only.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MNIST_CNN(nn.Module):  # noqa: N801 (DomainBed's name)
    """(n, c, 28, 28) -> (n, 2 * width); ``width=64`` is DomainBed's network (128 features)."""

    def __init__(self, input_shape: tuple[int, ...], width: int = 64):
        super().__init__()
        if not isinstance(width, int) or width < 8 or width % 8:
            raise ValueError(f"MNIST_CNN width={width!r}: use a positive multiple of 8 (GroupNorm "
                             "has 8 groups); DomainBed's network is width=64.")
        w = width
        self.n_outputs = 2 * w
        self.conv1 = nn.Conv2d(input_shape[0], w, 3, 1, padding=1)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(2 * w, 2 * w, 3, 1, padding=1)
        self.conv4 = nn.Conv2d(2 * w, 2 * w, 3, 1, padding=1)
        self.bn0 = nn.GroupNorm(8, w)
        self.bn1 = nn.GroupNorm(8, 2 * w)
        self.bn2 = nn.GroupNorm(8, 2 * w)
        self.bn3 = nn.GroupNorm(8, 2 * w)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn0(F.relu(self.conv1(x)))
        x = self.bn1(F.relu(self.conv2(x)))
        x = self.bn2(F.relu(self.conv3(x)))
        x = self.bn3(F.relu(self.conv4(x)))
        return self.avgpool(x).flatten(1)


def _torchvision_models():
    try:
        import torchvision.models as models
    except Exception as error:  # a broken install raises RuntimeError, not ImportError
        raise ImportError(
            "ResNet featurizers need a working torchvision (pip install torchvision matching "
            f"your torch); importing it failed with: {error!r}") from error
    return models


# DomainBed's ``pretrained=True``: torchvision's first ImageNet weights (V1), not DEFAULT (V2).
RESNET_SPECS: dict[bool, tuple[str, str, str, int]] = {
    True: ("resnet18", "ResNet18_Weights", "IMAGENET1K_V1", 512),
    False: ("resnet50", "ResNet50_Weights", "IMAGENET1K_V1", 2048),
}


def resnet_spec(hparams: dict) -> tuple[str, str, str, int]:
    """(torchvision builder, weights enum, weights member, n features) for ``hparams``:
    ResNet-18 when ``hparams["resnet18"]``, else ResNet-50, with the V1 ImageNet weights."""
    return RESNET_SPECS[bool(hparams.get("resnet18", False))]


class ResNet(nn.Module):
    """torchvision ResNet-18/50 features; BatchNorm layers stay in eval mode."""

    def __init__(self, input_shape: tuple[int, ...], hparams: dict, pretrained: bool = True):
        super().__init__()
        models = _torchvision_models()
        builder, enum, member, self.n_outputs = resnet_spec(hparams)
        weights = getattr(getattr(models, enum), member) if pretrained else None
        self.network = getattr(models, builder)(weights=weights)
        if input_shape[0] != 3:  # DomainBed: repeat the RGB filters over the input channels
            old = self.network.conv1.weight.data.clone()
            self.network.conv1 = nn.Conv2d(input_shape[0], 64, 7, 2, 3, bias=False)
            for i in range(input_shape[0]):
                self.network.conv1.weight.data[:, i] = old[:, i % 3]
        self.network.fc = nn.Identity()
        self.dropout = nn.Dropout(hparams.get("resnet_dropout", 0.0))
        self.freeze_bn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.network(x))

    def train(self, mode: bool = True) -> "ResNet":
        super().train(mode)
        self.freeze_bn()
        return self

    def freeze_bn(self) -> None:
        for m in self.network.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()


def Featurizer(input_shape: tuple[int, ...], hparams: dict) -> nn.Module:  # noqa: N802
    """MNIST_CNN for (c, 28, 28) inputs (``hparams["mnist_cnn_width"]`` channels, default 64),
    ResNet for (c, 224, 224), as DomainBed chooses."""
    if tuple(input_shape[1:3]) == (28, 28):
        return MNIST_CNN(input_shape, int(hparams.get("mnist_cnn_width", 64)))
    if tuple(input_shape[1:3]) == (224, 224):
        return ResNet(input_shape, hparams)
    raise ValueError(f"no DomainBed featurizer for input shape {tuple(input_shape)}; use "
                     "(c, 28, 28) images (MNIST_CNN) or (c, 224, 224) images (ResNet).")


def Classifier(in_features: int, out_features: int, nonlinear: bool = False) -> nn.Module:  # noqa: N802
    """The head: a linear layer, or DomainBed's MLP (in, in/2, in/4, out) when ``nonlinear``."""
    if not nonlinear:
        return nn.Linear(in_features, out_features)
    return nn.Sequential(nn.Linear(in_features, in_features // 2), nn.ReLU(),
                         nn.Linear(in_features // 2, in_features // 4), nn.ReLU(),
                         nn.Linear(in_features // 4, out_features))
