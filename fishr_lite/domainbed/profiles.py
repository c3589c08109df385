"""The sweeps of the protocol chapter, one per run profile (``quick`` on a CPU, ``paper``).

``paper`` is DomainBed's protocol for ERM and Fishr on ColoredMNIST: 20 hyperparameter draws
(draw 0 = the defaults), 3 trials, every test environment and pair, 5001 steps, a checkpoint
every 100 steps, the full data and DomainBed's MNIST_CNN (``scripts/sweep.py`` defaults).

``quick`` keeps the protocol (draws, trials, in/out splits, test environments and pairs, the
three selection methods) and shrinks what costs time on a CPU: 3 draws, 1 trial, 160 steps
(a checkpoint every 40), the first 1000 images of each environment, MNIST_CNN of width 8
(channels 8/16/16/16 instead of 64/128/128/128) and a fixed batch of 32 per domain. Fishr's
warm-up is fixed to 50 steps, about the fraction of training that DomainBed's default (1500 of
5001 steps) leaves without the penalty; the draws still vary the learning rate, lambda and ema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .sweep import Job, make_jobs

SWEEP_PROFILES: dict[str, dict[str, Any]] = {
    "quick": {
        "datasets": ["ColoredMNIST"], "algorithms": ["ERM", "Fishr"], "n_hparams": 3,
        "n_trials": 1, "steps": 160, "checkpoint_freq": 40, "max_per_env": 1000,
        "fixed_hparams": {"batch_size": 32, "mnist_cnn_width": 8},
        "fixed_hparams_by_algorithm": {"Fishr": {"penalty_anneal_iters": 50}},
    },
    "paper": {
        "datasets": ["ColoredMNIST"], "algorithms": ["ERM", "Fishr"], "n_hparams": 20,
        "n_trials": 3, "steps": None, "checkpoint_freq": None, "max_per_env": None,
        "fixed_hparams": {}, "fixed_hparams_by_algorithm": {},
    },
}


def profile_jobs(sweep_dir: str | Path, profile: str) -> list[Job]:
    """The jobs of ``profile``'s sweep, in ``sweep_dir`` (one ``make_jobs`` per algorithm, so
    each algorithm gets only its own fixed hyperparameters)."""
    if profile not in SWEEP_PROFILES:
        raise ValueError(f"unknown profile {profile!r}; use one of {sorted(SWEEP_PROFILES)}.")
    p = SWEEP_PROFILES[profile]
    extra = {k: p[k] for k in ("checkpoint_freq", "max_per_env") if p[k] is not None}
    jobs = []
    for algorithm in p["algorithms"]:
        fixed = {**p["fixed_hparams"], **p["fixed_hparams_by_algorithm"].get(algorithm, {})}
        jobs += make_jobs(sweep_dir, datasets=p["datasets"], algorithms=[algorithm],
                          n_hparams=p["n_hparams"], n_trials=p["n_trials"], steps=p["steps"],
                          hparams=fixed or None, **extra)
    return jobs
