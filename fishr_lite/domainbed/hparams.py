"""Hyperparameters as DomainBed's registry draws them (``hparams_registry.py``).

Each hyperparameter has a default and a random draw; the draw for ``name`` uses its own
``np.random.RandomState(seed_hash(seed, name))``, so adding a hyperparameter never changes the
others. A run with ``hparams_seed == 0`` uses the defaults; otherwise the draws with
``seed = seed_hash(hparams_seed, trial_seed)``. Fishr: lambda = 10^U(1, 4) (default 1000),
penalty_anneal_iters = int(U(0, 5000)) (default 1500), ema = U(0.90, 0.99) (default 0.95).
Only the algorithms of :mod:`.algorithms` plus IRM and VREx (for their published tables) are
listed.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .splits import seed_hash

SMALL_IMAGES = ("Debug28", "RotatedMNIST", "ColoredMNIST")


def _registry(algorithm: str, dataset: str) -> dict[str, tuple[Any, Callable[[np.random.RandomState], Any]]]:
    """``{name: (default, draw)}`` for one algorithm and dataset, in DomainBed's order."""
    small = dataset in SMALL_IMAGES
    h: dict[str, tuple[Any, Callable]] = {
        "data_augmentation": (True, lambda r: True),
        "resnet18": (False, lambda r: False),
        "resnet_dropout": (0.0, lambda r: float(r.choice([0.0, 0.1, 0.5]))),
        "class_balanced": (False, lambda r: False),
        "nonlinear_classifier": (False, lambda r: bool(r.choice([False, False]))),
    }
    if algorithm == "Fishr":
        h["lambda"] = (1000.0, lambda r: float(10 ** r.uniform(1.0, 4.0)))
        h["penalty_anneal_iters"] = (1500, lambda r: int(r.uniform(0.0, 5000.0)))
        h["ema"] = (0.95, lambda r: float(r.uniform(0.90, 0.99)))
    elif algorithm == "IRM":
        h["irm_lambda"] = (1e2, lambda r: float(10 ** r.uniform(-1, 5)))
        h["irm_penalty_anneal_iters"] = (500, lambda r: int(10 ** r.uniform(0, 4)))
    elif algorithm == "VREx":
        h["vrex_lambda"] = (1e1, lambda r: float(10 ** r.uniform(-1, 5)))
        h["vrex_penalty_anneal_iters"] = (500, lambda r: int(10 ** r.uniform(0, 4)))
    if small:
        h["lr"] = (1e-3, lambda r: float(10 ** r.uniform(-4.5, -2.5)))
        h["weight_decay"] = (0.0, lambda r: 0.0)
        h["batch_size"] = (64, lambda r: int(2 ** r.uniform(3, 9)))
    else:
        h["lr"] = (5e-5, lambda r: float(10 ** r.uniform(-5, -3.5)))
        h["weight_decay"] = (0.0, lambda r: float(10 ** r.uniform(-6, -2)))
        high = 5.0 if dataset == "DomainNet" else 5.5
        h["batch_size"] = (32, lambda r: int(2 ** r.uniform(3, high)))
    return h


def default_hparams(algorithm: str, dataset: str) -> dict[str, Any]:
    """DomainBed's default hyperparameters (used when ``hparams_seed == 0``)."""
    return {name: default for name, (default, _) in _registry(algorithm, dataset).items()}


def random_hparams(algorithm: str, dataset: str, seed: int) -> dict[str, Any]:
    """One random draw; hyperparameter ``name`` uses ``RandomState(seed_hash(seed, name))``."""
    return {name: draw(np.random.RandomState(seed_hash(seed, name)))
            for name, (_, draw) in _registry(algorithm, dataset).items()}


def run_hparams(algorithm: str, dataset: str, hparams_seed: int, trial_seed: int) -> dict[str, Any]:
    """The hyperparameters of a run, as DomainBed's ``train.py`` picks them."""
    if hparams_seed == 0:
        return default_hparams(algorithm, dataset)
    return random_hparams(algorithm, dataset, seed_hash(hparams_seed, trial_seed))
