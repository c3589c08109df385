"""Sweeps as DomainBed runs them (``scripts/sweep.py``): every trial, dataset, algorithm, test
environment(s) and hyperparameter draw is one job, in its own folder under ``output_dir``
named by the md5 of its arguments. Relaunching runs only the jobs without ``done``.

Test environments: every single environment and, unless ``single_test_envs``, every pair
(pairs are what leave-one-domain-out selection validates on). A job's ``seed`` is
``seed_hash(dataset, algorithm, test_envs, hparams_seed, trial_seed)``. Jobs run in this
process one after the other (``launcher="sequential"``) or through submitit
(``launcher="submitit"``): its local executor on one machine, Slurm on a cluster (pass
``cluster="slurm"`` and Slurm options such as ``slurm_partition``, ``gpus_per_node``,
``timeout_min``). ::

    jobs = make_jobs("sweep_out", datasets=["ColoredMNIST"], algorithms=["ERM", "Fishr"],
                     n_hparams=5, n_trials=3, steps=1000)
    launch(jobs, launcher="submitit", cluster="local")
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from .names import DATASET_ENVIRONMENTS
from .splits import seed_hash
from .train import train

NOT_LAUNCHED, INCOMPLETE, DONE = "Not launched", "Incomplete", "Done"


def all_test_env_combinations(n: int) -> list[list[int]]:
    """Every single test environment and every pair, for a dataset with n >= 3 environments."""
    if n < 3:
        raise ValueError(f"a dataset with {n} environments cannot hold out pairs; use >= 3 "
                         "environments or single_test_envs=True.")
    return [c for i in range(n) for c in ([i], *([i, j] for j in range(i + 1, n)))]


@dataclass
class Job:
    """One run: its ``train`` arguments and its folder (named by the md5 of the arguments)."""

    args: dict[str, Any]

    @property
    def output_dir(self) -> Path:
        return Path(self.args["output_dir"])

    @property
    def state(self) -> str:
        if (self.output_dir / "done").exists():
            return DONE
        return INCOMPLETE if self.output_dir.exists() else NOT_LAUNCHED


def make_job(train_args: dict[str, Any], sweep_dir: str | Path) -> Job:
    args_hash = hashlib.md5(json.dumps(train_args, sort_keys=True).encode("utf-8")).hexdigest()
    args = copy.deepcopy(train_args)
    args["output_dir"] = str(Path(sweep_dir) / args_hash)
    return Job(args)


def make_jobs(sweep_dir: str | Path, *, datasets: Sequence[str], algorithms: Sequence[str],
              n_hparams: int = 20, n_hparams_from: int = 0, n_trials: int = 3,
              steps: Optional[int] = None, holdout_fraction: float = 0.2,
              single_test_envs: bool = False, hparams: Optional[dict] = None,
              **extra: Any) -> list[Job]:
    """The jobs of a sweep, in DomainBed's order (trial, dataset, algorithm, test envs, draw).

    ``extra`` adds arguments to every job (``checkpoint_freq``, ``max_per_env``, ``data_dir``).
    """
    jobs = []
    for trial_seed in range(n_trials):
        for dataset in datasets:
            if dataset not in DATASET_ENVIRONMENTS:
                raise ValueError(f"unknown dataset {dataset!r}; use one of {list(DATASET_ENVIRONMENTS)}.")
            n_envs = len(DATASET_ENVIRONMENTS[dataset])
            combos = [[i] for i in range(n_envs)] if single_test_envs else all_test_env_combinations(n_envs)
            for algorithm in algorithms:
                for test_envs in combos:
                    for hparams_seed in range(n_hparams_from, n_hparams):
                        args = {"dataset": dataset, "algorithm": algorithm, "test_envs": test_envs,
                                "holdout_fraction": holdout_fraction, "hparams_seed": hparams_seed,
                                "trial_seed": trial_seed, "task": "domain_generalization",
                                "seed": seed_hash(dataset, algorithm, test_envs, hparams_seed, trial_seed)}
                        if steps is not None:
                            args["steps"] = steps
                        if hparams is not None:
                            args["hparams"] = json.dumps(hparams, sort_keys=True)
                        args.update(extra)
                        jobs.append(make_job(args, sweep_dir))
    return jobs


def summary(jobs: Iterable[Job]) -> dict[str, int]:
    """How many jobs are done, incomplete (folder without ``done``) and not launched."""
    counts = {DONE: 0, INCOMPLETE: 0, NOT_LAUNCHED: 0}
    for job in jobs:
        counts[job.state] += 1
    return counts


def launch(jobs: Sequence[Job], launcher: str = "sequential", *, log_dir: Optional[str | Path] = None,
           cluster: Optional[str] = "local", **executor_options: Any) -> list[Job]:
    """Run every job not yet done; returns those launched (an incomplete job starts over).

    ``launcher="submitit"`` submits them as one job array to ``submitit.AutoExecutor(folder=
    log_dir, cluster=cluster)`` with ``executor_options`` and waits for all of them.
    """
    todo = [job for job in jobs if job.state != DONE]
    if launcher == "sequential":
        for job in todo:
            train(job.args)
    elif launcher == "submitit":
        import submitit

        if log_dir is None:
            raise ValueError("launcher='submitit' needs log_dir, a folder for submitit's logs.")
        executor = submitit.AutoExecutor(folder=str(log_dir), cluster=cluster)
        if executor_options:
            executor.update_parameters(**executor_options)
        for job in todo:
            job.output_dir.mkdir(parents=True, exist_ok=True)
        handles = executor.map_array(train, [job.args for job in todo]) if todo else []
        for handle in handles:
            handle.result()  # re-raises a job's error here
    else:
        raise ValueError(f"unknown launcher {launcher!r}; use 'sequential' or 'submitit'.")
    return todo
