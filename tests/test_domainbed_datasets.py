"""DomainBed datasets, in/out splits and networks (tiny subsets, CPU)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fishr_lite.domainbed.datasets import _load_mnist
from fishr_lite.domainbed.datasets import (
    ColoredMNIST,
    RotatedMNIST,
    discover_image_folder,
    get_dataset,
    rotate,
)
from fishr_lite.domainbed.networks import MNIST_CNN, Classifier, Featurizer
from fishr_lite.domainbed.splits import in_out_splits, seed_hash

SWEEP = Path(__file__).parent / "data" / "domainbed_test_sweep"


def torchvision_or_skip():
    try:
        import torchvision  # noqa: F401
    except Exception as error:  # the CI venv's torchvision raises RuntimeError on import
        pytest.skip(f"torchvision does not import here ({type(error).__name__}: {error})")


def test_seed_hash_reproduces_domainbed_run_seeds():
    """Every run of DomainBed's test sweep records seed = seed_hash(dataset, algorithm, test_envs,
    hparams_seed, trial_seed)."""
    for results in sorted(SWEEP.glob("*/results.jsonl")):
        a = json.loads(results.read_text().splitlines()[0])["args"]
        assert a["seed"] == seed_hash(a["dataset"], a["algorithm"], a["test_envs"], a["hparams_seed"], a["trial_seed"])


def test_colored_mnist_environments_follow_domainbed_recipe():
    k = 2000
    data = ColoredMNIST(seed=3, max_per_env=k)
    assert len(data) == 3 and data.ENVIRONMENTS == ["+90%", "+80%", "-90%"] and data.num_classes == 2
    # the digits behind environment i, recomputed from MNIST and the same shuffle
    mnist = _load_mnist(None)
    digits = torch.from_numpy(np.concatenate([mnist["train_labels"], mnist["test_labels"]])).long()
    digits = digits[torch.randperm(70000, generator=torch.Generator().manual_seed(3))]
    for i, agreement in enumerate([0.9, 0.8, 0.1]):
        x, y = data[i].tensors
        assert x.shape == (k, 2, 28, 28) and x.dtype == torch.float32 and set(y.tolist()) == {0, 1}
        red, green = x[:, 0].flatten(1).sum(1), x[:, 1].flatten(1).sum(1)
        assert ((red > 0) ^ (green > 0)).all()  # exactly one channel lit
        color = (green > 0).long()
        assert abs((color == y).float().mean().item() - agreement) < 0.035
        clean = (digits[i::3][:k] < 5).long()
        assert abs((clean == y).float().mean().item() - 0.75) < 0.035
    assert not torch.equal(ColoredMNIST(seed=4, max_per_env=50)[0].tensors[0], data[0].tensors[0][:50])


def bilinear_rotation_reference(image: np.ndarray, degrees: float) -> np.ndarray:
    """PIL's bilinear rotation written out in numpy (Pillow's Image.rotate and Geometry.c):
    output pixel centre (x + 0.5, y + 0.5) maps back through R(-degrees) about (w/2, h/2);
    outside [0, w) x [0, h) -> 0; else bilinear on the pixel grid, edge pixels repeated,
    truncated to 8 bits."""
    h, w = image.shape
    t = -math.radians(degrees)
    c, s = round(math.cos(t), 15), round(math.sin(t), 15)
    out = np.zeros_like(image)
    a = image.astype(np.float64)
    for y in range(h):
        for x in range(w):
            px, py = x + 0.5 - w / 2, y + 0.5 - h / 2
            xin, yin = c * px + s * py + w / 2, -s * px + c * py + h / 2
            if not (0 <= xin < w and 0 <= yin < h):
                continue
            x0, y0 = math.floor(xin - 0.5), math.floor(yin - 0.5)
            dx, dy = xin - 0.5 - x0, yin - 0.5 - y0
            xa, xb = min(max(x0, 0), w - 1), min(max(x0 + 1, 0), w - 1)
            top = a[max(y0, 0), xa] + (a[max(y0, 0), xb] - a[max(y0, 0), xa]) * dx
            bottom = a[y0 + 1, xa] + (a[y0 + 1, xb] - a[y0 + 1, xa]) * dx if y0 + 1 < h else top
            out[y, x] = int(top + (bottom - top) * dy)
    return out


def test_rotate_is_domainbeds_pil_bilinear_rotation():
    """Against an independent numpy transcription of PIL's bilinear rotation: at most one grey
    level apart (floating-point ties), on almost every pixel equal; a bicubic or nearest
    rotation would be many levels off."""
    images = torch.from_numpy(_load_mnist(None)["train_images"][:20].copy())
    for degrees in (15, 30, 45, 60, 75):
        ours = rotate(images, degrees)
        assert ours.shape == (20, 1, 28, 28) and ours.dtype == torch.float32
        levels = (ours[:, 0] * 255).round().long()
        torch.testing.assert_close(levels.float() / 255, ours[:, 0])  # 8-bit, as ToTensor gives
        reference = torch.from_numpy(np.stack([bilinear_rotation_reference(a.numpy(), degrees)
                                               for a in images])).long()
        difference = (levels - reference).abs()
        assert difference.max() <= 1 and (difference == 0).float().mean() > 0.999
    x = torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8)
    torch.testing.assert_close(rotate(x, 0.0)[:, 0], x.float() / 255)
    torch.testing.assert_close(rotate(x, 90.0)[:, 0], torch.rot90(x, 1, dims=(1, 2)).float() / 255)
    with pytest.raises(ValueError, match="uint8"):
        rotate(x.float() / 255, 15.0)


def test_rotate_matches_domainbeds_torchvision_pipeline():
    """DomainBed 99353c2's rotate_dataset, run through torchvision when it imports here."""
    torchvision_or_skip()
    from torchvision import transforms
    from torchvision.transforms.functional import InterpolationMode
    from torchvision.transforms.functional import rotate as tv_rotate

    images = torch.from_numpy(_load_mnist(None)["train_images"][:50].copy())
    for angle in (15, 45, 75):
        rotation = transforms.Compose([
            transforms.ToPILImage(),
            transforms.Lambda(lambda x: tv_rotate(x, angle, fill=(0,), interpolation=InterpolationMode.BILINEAR)),
            transforms.ToTensor()])
        expected = torch.stack([rotation(image) for image in images])
        assert torch.equal(rotate(images, angle), expected)


def test_rotated_mnist_environments():
    data = RotatedMNIST(seed=0, max_per_env=64)
    assert len(data) == 6 and data.ENVIRONMENTS == ["0", "15", "30", "45", "60", "75"]
    x0, y0 = data[0].tensors
    assert x0.shape == (64, 1, 28, 28) and y0.max() <= 9 and data.num_classes == 10
    mnist = _load_mnist(None)
    images = torch.from_numpy(np.concatenate([mnist["train_images"], mnist["test_images"]]))
    images = images[torch.randperm(70000, generator=torch.Generator().manual_seed(0))]
    torch.testing.assert_close(x0[:, 0], images[0::6][:64].float() / 255)
    torch.testing.assert_close(data[1].tensors[0], rotate(images[1::6][:64], 15))


def test_in_out_split_is_seeded_by_trial_and_disjoint():
    envs = [torch.utils.data.TensorDataset(torch.arange(n)) for n in (50, 41)]
    ins, outs = in_out_splits(envs, trial_seed=0)
    for env, in_, out in zip(envs, ins, outs):
        assert len(out) == int(len(env) * 0.2)
        assert sorted(in_.indices + out.indices) == list(range(len(env)))
    expected = list(range(50))
    np.random.RandomState(seed_hash(0, 0)).shuffle(expected)
    assert outs[0].indices == expected[:10]
    assert in_out_splits(envs, trial_seed=1)[1][0].indices != outs[0].indices
    with pytest.raises(ValueError, match="holdout_fraction"):
        in_out_splits(envs, 0, holdout_fraction=1.0)


def make_image_folder(root, classes=("dog", "cat"), envs=("photo", "art"), per_class=2):
    from PIL import Image

    for e in envs:
        for c in classes:
            (root / e / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / e / c / f"{i}.jpg")
    return root


def test_image_folder_discovery_without_torchvision(tmp_path):
    root = make_image_folder(tmp_path / "PACS")
    (root / "photo" / "notes.txt").write_text("not an image")
    found = discover_image_folder(root)
    assert [e for e, _, _ in found] == ["art", "photo"]
    assert found[0][1] == ["cat", "dog"] and [y for _, y in found[1][2]] == [0, 0, 1, 1]
    (root / "sketch" / "horse").mkdir(parents=True)
    (root / "sketch" / "horse" / "0.png").write_bytes(b"")
    with pytest.raises(ValueError, match="different class folders"):
        discover_image_folder(root)
    with pytest.raises(ValueError, match="is not a folder"):
        discover_image_folder(tmp_path / "missing")


def test_image_folder_dataset_with_torchvision(tmp_path):
    torchvision_or_skip()
    make_image_folder(tmp_path / "PACS", envs=("art_painting", "cartoon", "photo", "sketch"))
    data = get_dataset("PACS", data_dir=str(tmp_path), test_envs=[0], hparams={"data_augmentation": True})
    x, y = data[0][1]
    assert len(data) == 4 and x.shape == (3, 224, 224) and y == 0 and data.num_classes == 2


def test_mnist_cnn_and_heads():
    net = MNIST_CNN((2, 28, 28))
    assert net(torch.randn(5, 2, 28, 28)).shape == (5, 128)
    assert isinstance(Featurizer((1, 28, 28), {}), MNIST_CNN)
    assert Classifier(128, 10)(torch.randn(3, 128)).shape == (3, 10)
    assert Classifier(128, 10, nonlinear=True)(torch.randn(3, 128)).shape == (3, 10)
    with pytest.raises(ValueError, match="no DomainBed featurizer"):
        Featurizer((3, 32, 32), {})
    with pytest.raises(ValueError, match="unknown dataset"):
        get_dataset("MNIST")


def test_resnet_featurizer_with_torchvision():
    torchvision_or_skip()
    from fishr_lite.domainbed.networks import ResNet

    net = ResNet((3, 224, 224), {"resnet18": True, "resnet_dropout": 0.0}, pretrained=False).train()
    assert net(torch.randn(2, 3, 224, 224)).shape == (2, 512)
    assert not any(m.training for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))


class FakeWeights:
    """Stands for a torchvision weights enum: its members are their own names."""

    IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT = "IMAGENET1K_V1", "IMAGENET1K_V2", "IMAGENET1K_V2"


def fake_torchvision_models(calls):
    """A stand-in for torchvision.models recording which builder and weights are asked for."""
    import types

    def builder(name):
        def build(weights=None):
            calls.append((name, weights))
            net = torch.nn.Sequential()
            net.conv1 = torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            net.bn1, net.fc = torch.nn.BatchNorm2d(64), torch.nn.Linear(64, 1000)
            return net
        return build

    return types.SimpleNamespace(resnet18=builder("resnet18"), resnet50=builder("resnet50"),
                                 ResNet18_Weights=FakeWeights, ResNet50_Weights=FakeWeights)


def test_resnet_loads_domainbeds_v1_imagenet_weights(monkeypatch):
    """DomainBed calls resnet50(pretrained=True), i.e. IMAGENET1K_V1 (not DEFAULT, which is V2)."""
    from fishr_lite.domainbed import networks

    assert networks.resnet_spec({}) == ("resnet50", "ResNet50_Weights", "IMAGENET1K_V1", 2048)
    assert networks.resnet_spec({"resnet18": True}) == ("resnet18", "ResNet18_Weights", "IMAGENET1K_V1", 512)
    calls = []
    monkeypatch.setattr(networks, "_torchvision_models", lambda: fake_torchvision_models(calls))
    net = networks.Featurizer((3, 224, 224), {"resnet18": False, "resnet_dropout": 0.0})
    assert calls == [("resnet50", "IMAGENET1K_V1")] and net.n_outputs == 2048
    networks.ResNet((2, 224, 224), {"resnet18": True}, pretrained=False)
    assert calls[-1] == ("resnet18", None)


def test_resnet_weights_exist_in_torchvision():
    """The enum members named by resnet_spec are torchvision's V1 checkpoints (their file names)."""
    torchvision_or_skip()
    import torchvision.models as models

    from fishr_lite.domainbed.networks import resnet_spec

    for hparams, checkpoint in (({}, "resnet50-0676ba61.pth"), ({"resnet18": True}, "resnet18-f37072fd.pth")):
        builder, enum, member, _ = resnet_spec(hparams)
        assert getattr(getattr(models, enum), member).url.endswith(checkpoint)
