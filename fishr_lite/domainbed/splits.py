"""Seeds and in/out splits, as DomainBed makes them (``lib/misc.py``, ``scripts/train.py``).

Every environment is split once per trial into an *in* part (trained on, or tested on for the
test environments) and an *out* part (``holdout_fraction`` = 20 % held out, used for model
selection). The split of environment ``i`` depends only on ``seed_hash(trial_seed, i)``, so all
runs of one trial, whatever their algorithm or hyperparameters, see the same split.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset


def seed_hash(*args: Any) -> int:
    """An integer seed in [0, 2^31) from any arguments: ``int(md5(str(args))) mod 2^31``."""
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)


def split_dataset(dataset: Dataset, n: int, seed: int = 0) -> tuple[Subset, Subset]:
    """A random split: ``n`` items, then the rest; the order is a seeded numpy shuffle of
    ``range(len(dataset))`` (``np.random.RandomState(seed).shuffle``)."""
    if not 0 <= n <= len(dataset):
        raise ValueError(f"cannot take n={n} items from a dataset of {len(dataset)}; "
                         "use 0 <= n <= len(dataset).")
    keys = list(range(len(dataset)))
    np.random.RandomState(seed).shuffle(keys)
    return Subset(dataset, keys[:n]), Subset(dataset, keys[n:])


def in_out_splits(environments: list[Dataset], trial_seed: int,
                  holdout_fraction: float = 0.2) -> tuple[list[Subset], list[Subset]]:
    """``(in_splits, out_splits)``: environment ``i`` loses ``int(len * holdout_fraction)``
    items to its out split, drawn with seed ``seed_hash(trial_seed, i)``."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction={holdout_fraction} must be in [0, 1) (DomainBed: 0.2).")
    ins, outs = [], []
    for i, env in enumerate(environments):
        out, in_ = split_dataset(env, int(len(env) * holdout_fraction), seed_hash(trial_seed, i))
        ins.append(in_)
        outs.append(out)
    return ins, outs
