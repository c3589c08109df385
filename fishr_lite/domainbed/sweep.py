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

The command line is DomainBed's ``scripts/sweep.py`` (``launch`` or ``delete_incomplete``)::

    python -m fishr_lite.domainbed.sweep launch --datasets ColoredMNIST --algorithms ERM Fishr \
        --n_hparams 5 --n_trials 3 --single_test_envs --steps 1000 --output_dir sweep_out \
        --command_launcher local

``--command_launcher``: ``local`` runs the jobs one after the other in this process;
``submitit`` runs them through submitit's local executor (this machine); ``slurm`` submits
them to Slurm through submitit (``--slurm_partition``, ``--gpus_per_node``,
``--cpus_per_task``, ``--timeout_min``). As in DomainBed, ``launch`` starts only the jobs
never launched and ``delete_incomplete`` removes the folders of the others not done; both
list the jobs and ask for confirmation unless ``--skip_confirmation``. Unknown datasets and
algorithms are rejected before anything runs.

One difference from DomainBed, for the ``local`` launcher only: ``launch`` also starts again
the incomplete jobs that no process is training any more (a launcher killed mid-job, even by
``kill -9``, leaves one; :func:`.train.is_running` tells), so launching again finishes the
sweep. With submitit or Slurm an incomplete job may be queued or running elsewhere, so, as in
DomainBed, ``delete_incomplete`` then ``launch`` starts those over. Finished jobs are never
run again. Folders in the sweep that are not jobs (``logs/``, submitit's folder) are left alone.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from .algorithms import ALGORITHM_CLASSES
from .hparams import parse_overrides
from .names import DATASET_ENVIRONMENTS
from .splits import seed_hash
from .train import is_running, train

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
    An unknown algorithm or dataset is a ``ValueError`` before any job is made.
    """
    unknown = [a for a in algorithms if a not in ALGORITHM_CLASSES]
    if unknown:
        raise ValueError(f"unknown algorithm(s) {unknown}; use some of {list(ALGORITHM_CLASSES)}.")
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


def delete(jobs: Iterable[Job]) -> None:
    """Remove the jobs' folders (DomainBed's ``Job.delete``)."""
    for job in jobs:
        shutil.rmtree(job.output_dir, ignore_errors=True)


def _confirm(skip: bool) -> bool:
    if skip:
        return True
    try:
        answer = input("Are you sure? (y/n) ")
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        print("Nevermind!")
        return False
    return True


LAUNCHERS = {"local": ("sequential", None), "submitit": ("submitit", "local"),
             "slurm": ("submitit", "slurm")}


def main(argv: Optional[Sequence[str]] = None) -> list[Job]:
    """DomainBed's sweep command line; returns the jobs launched or deleted."""
    parser = argparse.ArgumentParser(description="Run a DomainBed sweep (fishr_lite).")
    parser.add_argument("command", choices=["launch", "delete_incomplete"])
    parser.add_argument("--datasets", nargs="+", default=["ColoredMNIST"])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHM_CLASSES))
    parser.add_argument("--task", default="domain_generalization",
                        choices=["domain_generalization", "domain_adaptation"])
    parser.add_argument("--n_hparams_from", type=int, default=0)
    parser.add_argument("--n_hparams", type=int, default=20)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--n_trials", type=int, default=3)
    parser.add_argument("--command_launcher", required=True, choices=list(LAUNCHERS))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--hparams", default=None, help="JSON overriding every job's hyperparameters")
    parser.add_argument("--holdout_fraction", type=float, default=0.2)
    parser.add_argument("--single_test_envs", action="store_true")
    parser.add_argument("--skip_confirmation", action="store_true")
    extra = parser.add_argument_group("fishr_lite additions")
    extra.add_argument("--checkpoint_freq", type=int, default=None)
    extra.add_argument("--max_per_env", type=int, default=None)
    extra.add_argument("--log_dir", default=None, help="submitit's logs (default OUTPUT_DIR/.submitit)")
    for name in ("slurm_partition", "gpus_per_node", "cpus_per_task", "timeout_min"):
        extra.add_argument(f"--{name}", type=str if name == "slurm_partition" else int, default=None)
    args = parser.parse_args(argv)
    if args.task != "domain_generalization":
        parser.error("--task domain_adaptation is not implemented in fishr_lite.")
    options = {k: getattr(args, k) for k in ("checkpoint_freq", "max_per_env", "data_dir")
               if getattr(args, k) is not None}
    try:
        jobs = make_jobs(args.output_dir, datasets=args.datasets, algorithms=args.algorithms,
                         n_hparams=args.n_hparams, n_hparams_from=args.n_hparams_from,
                         n_trials=args.n_trials, steps=args.steps,
                         holdout_fraction=args.holdout_fraction,
                         single_test_envs=args.single_test_envs,
                         hparams=parse_overrides(args.hparams) if args.hparams else None, **options)
    except ValueError as error:
        parser.error(str(error))
    for job in jobs:
        print(f"{job.state:<13} {job.output_dir}")
    counts = summary(jobs)
    print(f"{len(jobs)} jobs: {counts[DONE]} done, {counts[INCOMPLETE]} incomplete, "
          f"{counts[NOT_LAUNCHED]} not launched.")
    if args.command == "delete_incomplete":
        chosen = [job for job in jobs if job.state == INCOMPLETE]
        print(f"About to delete {len(chosen)} incomplete jobs.")
        if chosen and _confirm(args.skip_confirmation):
            delete(chosen)
            return chosen
        return []
    chosen = [job for job in jobs if job.state == NOT_LAUNCHED or (
        args.command_launcher == "local" and job.state == INCOMPLETE and not is_running(job.output_dir))]
    print(f"About to launch {len(chosen)} jobs.")
    if not chosen or not _confirm(args.skip_confirmation):
        return []
    launcher, cluster = LAUNCHERS[args.command_launcher]
    slurm = {k: getattr(args, k) for k in ("slurm_partition", "gpus_per_node", "cpus_per_task",
                                           "timeout_min") if getattr(args, k) is not None}
    log_dir = args.log_dir or str(Path(args.output_dir) / ".submitit")
    return launch(chosen, launcher, log_dir=log_dir, cluster=cluster, **slurm) \
        if launcher == "submitit" else launch(chosen, launcher)


if __name__ == "__main__":
    main()
