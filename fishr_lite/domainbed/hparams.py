"""Hyperparameters as DomainBed's registry draws them (``hparams_registry.py``).

Each hyperparameter has a default and a random draw; the draw for ``name`` uses its own
``np.random.RandomState(seed_hash(seed, name))``, so adding a hyperparameter never changes the
others. A run with ``hparams_seed == 0`` uses the defaults; otherwise the draws with
``seed = seed_hash(hparams_seed, trial_seed)``. Algorithm-specific (default; random draw),
as DomainBed's ``hparams_registry.py`` (read at commit 04cfc61):

- Fishr: lambda 1000; 10^U(1, 4). penalty_anneal_iters 1500; int(U(0, 5000)). ema 0.95;
  U(0.90, 0.99).
- IRM: irm_lambda 1e2; 10^U(-1, 5). irm_penalty_anneal_iters 500; int(10^U(0, 4)).
- VREx: vrex_lambda 1e1; 10^U(-1, 5). vrex_penalty_anneal_iters 500; int(10^U(0, 4)).
- CORAL, MMD: mmd_gamma 1; 10^U(-1, 1). GroupDRO: groupdro_eta 1e-2; 10^U(-3, -1).
- Mixup: mixup_alpha 0.2; 10^U(-1, 1). Fish: meta_lr 0.5; one of 0.05, 0.1, 0.5.
- IGA: penalty 1000; 10^U(1, 5). ANDMask: tau 1; U(0.5, 1).
- SANDMask: tau 1.0; U(0, 1). k 10; 10^U(-3, 5).

The algorithms are those of :mod:`.algorithms`.
"""

from __future__ import annotations

import json
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
    elif algorithm == "Fish":
        h["meta_lr"] = (0.5, lambda r: float(r.choice([0.05, 0.1, 0.5])))
    elif algorithm == "IRM":
        h["irm_lambda"] = (1e2, lambda r: float(10 ** r.uniform(-1, 5)))
        h["irm_penalty_anneal_iters"] = (500, lambda r: int(10 ** r.uniform(0, 4)))
    elif algorithm == "Mixup":
        h["mixup_alpha"] = (0.2, lambda r: float(10 ** r.uniform(-1, 1)))
    elif algorithm == "GroupDRO":
        h["groupdro_eta"] = (1e-2, lambda r: float(10 ** r.uniform(-3, -1)))
    elif algorithm in ("MMD", "CORAL"):
        h["mmd_gamma"] = (1.0, lambda r: float(10 ** r.uniform(-1, 1)))
    elif algorithm == "VREx":
        h["vrex_lambda"] = (1e1, lambda r: float(10 ** r.uniform(-1, 5)))
        h["vrex_penalty_anneal_iters"] = (500, lambda r: int(10 ** r.uniform(0, 4)))
    elif algorithm == "ANDMask":
        h["tau"] = (1, lambda r: float(r.uniform(0.5, 1.0)))
    elif algorithm == "IGA":
        h["penalty"] = (1000, lambda r: float(10 ** r.uniform(1, 5)))
    elif algorithm == "SANDMask":
        h["tau"] = (1.0, lambda r: float(r.uniform(0.0, 1.0)))
        h["k"] = (1e1, lambda r: float(10 ** r.uniform(-3, 5)))
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


def parse_overrides(text: str) -> dict[str, Any]:
    """The ``--hparams`` JSON of DomainBed's commands as a dict, or a ValueError that shows the
    expected form."""
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"hparams={text!r} is not valid JSON ({error}); pass an object such as "
                         """'{"lr": 0.0001, "lambda": 1000}'.""") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"hparams={text!r} is JSON but not an object; pass one such as "
                         """'{"lr": 0.0001}' (names as in fishr_lite.domainbed.hparams).""")
    return overrides
