"""The sweeps of the protocol chapter, one per run profile (``quick`` on a CPU, ``paper``).

``paper`` is DomainBed's protocol for ERM and Fishr on ColoredMNIST: 20 hyperparameter draws
(draw 0 = the defaults), 3 trials, every test environment and pair, 5001 steps, a checkpoint
every 100 steps, the full data and DomainBed's MNIST_CNN (``scripts/sweep.py`` defaults).

``quick`` is a teaching-size sweep of five algorithms (ERM, Fishr, IRM, VREx, CORAL). It keeps
the protocol (random draws, trials, in/out splits, every test environment and pair, the three
selection methods) and shrinks what costs time on a CPU: 2 draws (the defaults and one random
draw), 1 trial, 160 steps (a checkpoint every 80), the first 1000 images of each environment,
MNIST_CNN of width 8 (channels 8/16/16/16 instead of 64/128/128/128) and a fixed batch of 32
per domain. The penalties' warm-ups are fixed to the fraction of training that DomainBed's
defaults leave without the penalty (Fishr 1500 of 5001 steps: 50 of 160; IRM and VREx 500 of
5001: 16 of 160). DomainBed's defaults would leave a 160-step run without any penalty, and so
would its draws (Fishr: U(0, 5000) steps; IRM, VREx: 10^U(0, 4)) in 97 % and 45 % of the runs.
The draws still vary the learning rate, the penalties' weights (CORAL's is ``mmd_gamma``) and
Fishr's ema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .sweep import Job, make_jobs

SWEEP_PROFILES: dict[str, dict[str, Any]] = {
    "quick": {
        "datasets": ["ColoredMNIST"], "algorithms": ["ERM", "Fishr", "IRM", "VREx", "CORAL"],
        "n_hparams": 2, "n_trials": 1, "steps": 160, "checkpoint_freq": 80, "max_per_env": 1000,
        "fixed_hparams": {"batch_size": 32, "mnist_cnn_width": 8},
        "fixed_hparams_by_algorithm": {"Fishr": {"penalty_anneal_iters": 50},
                                       "IRM": {"irm_penalty_anneal_iters": 16},
                                       "VREx": {"vrex_penalty_anneal_iters": 16}},
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
