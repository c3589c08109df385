"""DomainBed's ColoredMNIST and RotatedMNIST sweep for ERM and Fishr, several runs at a time on
one GPU, resumable, returning within a time limit.

The sweep keeps DomainBed's protocol for every run (``scripts/sweep.py`` defaults: 5001 steps,
a checkpoint every 100 steps evaluated on every environment's in and out splits, the full data,
MNIST_CNN of width 64, the hyperparameters of :mod:`fishr_lite.domainbed.hparams`) and
reduces the sweep itself: 1 hyperparameter draw (draw 0, DomainBed's defaults) x 3 trials x
every single test environment (no pairs, so no leave-one-domain-out selection), for ERM and
Fishr and then every other algorithm registered in :mod:`fishr_lite.domainbed.algorithms`
(they run after ERM and Fishr). That is 2 x 3 x (3 + 6) = 54 runs for ERM and Fishr. The run
arguments are those of :func:`fishr_lite.domainbed.sweep.make_jobs`, so a run's folder has the
same name as in the full sweep (chapter 10's ``paper`` profile), and ``--n-hparams 2`` later
adds draw 1 without redoing draw 0.

How it was sized (estimated, not measured; no GPU was at hand). ``torch.utils.flop_counter``
counts 437 MFLOP per training image (forward and backward, the same for Fishr, whose closed-form
penalty on the linear head adds only small element-wise work) and 146 MFLOP per evaluated image.
A ColoredMNIST run trains on 2 x 64 images per step (280 TFLOP over 5001 steps) and evaluates
all 70,000 images at 51 checkpoints (521 TFLOP); a RotatedMNIST run trains on 5 x 64 (700 TFLOP)
and evaluates as much. With the rates of :data:`ASSUMED_H200` (TF32 convolutions at 60 TFLOP/s
in training and 120 in evaluation, about 12 % and 24 % of an H200's dense TF32 peak of about 495
TFLOP/s, plus 0.4 ms of small kernels per step) a ColoredMNIST run is about 11 s of GPU time and
a RotatedMNIST run 18 s, so the 54 runs need about 14 minutes when the GPU is kept busy, more if
it is not. Several processes keep it busy: a run alone leaves the GPU idle while Python launches
kernels, and the GPU interleaves the work of 8 processes (2 CPU threads each on 16 cores). That
is more than the 9 minutes one call may take, but one draw is the least a sweep can have, and
fewer trials, test environments or datasets would lose what the sweep is for; so a call stops at
its time limit instead, and a second call finishes the rest. Runs go in the order draw, trial,
dataset (what finishes first are whole trials of both datasets); no run starts after
``--stop-starting-after`` seconds (default 3/4 of ``--time-limit``); runs still going at
``--time-limit`` are stopped (they start over next time). Every call appends what it ran, how
long each run took and on which machine to ``calls.jsonl`` in the sweep folder: the data to
recalibrate :data:`ASSUMED_H200`.

    python benchmarks/domainbed_gpu_sweep.py --plan    # the runs and the estimate only
    python benchmarks/domainbed_gpu_sweep.py --time-limit 510 --stop-starting-after 360
    python benchmarks/domainbed_gpu_sweep.py --smoke   # the whole path on a CPU, tiny sizes

``--smoke`` runs the same code on the CPU at tiny sizes (6 steps, 24 images per environment,
MNIST_CNN of width 8, 1 trial, 2 worker processes) into a temporary folder, in about half a
minute on 2 CPU cores. ``bash benchmarks/gpu_run.sh --domainbed`` runs this sweep on a lent GPU
machine and returns its finished runs as one archive. The records are DomainBed's (one folder
per run with ``results.jsonl`` and ``done``); read them with

    python -m fishr_lite.domainbed.report --input_dir data/results/domainbed/gpu_sweep
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from fishr_lite.domainbed.algorithms import ALGORITHM_CLASSES  # noqa: E402
from fishr_lite.domainbed.hparams import run_hparams  # noqa: E402
from fishr_lite.domainbed.names import ALGORITHMS, DATASET_ENVIRONMENTS, ordered  # noqa: E402
from fishr_lite.domainbed.sweep import DONE, Job, make_jobs, summary  # noqa: E402

SWEEP_DIR = ROOT / "data" / "results" / "domainbed" / "gpu_sweep"
DATASETS = ("ColoredMNIST", "RotatedMNIST")
FIRST_ALGORITHMS = ("ERM", "Fishr")
MNIST_IMAGES = 70_000  # DomainBed's MNIST datasets deal train + test to the environments
TRAIN_FLOPS_PER_IMAGE = 437e6  # MNIST_CNN width 64, forward + backward (torch flop counter)
EVAL_FLOPS_PER_IMAGE = 146e6  # forward only


@dataclass(frozen=True)
class SweepSize:
    """What a sweep keeps of DomainBed's runs (``None``: DomainBed's value)."""

    n_hparams: int
    n_trials: int
    steps: Optional[int] = None
    checkpoint_freq: Optional[int] = None
    max_per_env: Optional[int] = None
    fixed_hparams: dict[str, Any] = field(default_factory=dict)
    fixed_hparams_by_algorithm: dict[str, dict[str, Any]] = field(default_factory=dict)


GPU = SweepSize(n_hparams=1, n_trials=3)
SMOKE = SweepSize(n_hparams=1, n_trials=1, steps=6, checkpoint_freq=3, max_per_env=24,
                  fixed_hparams={"batch_size": 8, "mnist_cnn_width": 8},
                  fixed_hparams_by_algorithm={"Fishr": {"penalty_anneal_iters": 2}})


@dataclass(frozen=True)
class GpuRates:
    """Assumed sustained rates of one GPU shared by several runs (for estimates only)."""

    train_flops_per_s: float
    eval_flops_per_s: float
    step_overhead_s: float  # small kernels (GroupNorm, ReLU, Adam, loss) per training step


ASSUMED_H200 = GpuRates(train_flops_per_s=60e12, eval_flops_per_s=120e12, step_overhead_s=4e-4)


def sweep_algorithms(requested: Optional[Sequence[str]] = None) -> list[str]:
    """``requested``, or ERM and Fishr then every other registered algorithm (DomainBed order)."""
    if requested:
        unknown = [a for a in requested if a not in ALGORITHM_CLASSES]
        if unknown:
            raise ValueError(f"unknown algorithm(s) {unknown}; registered: "
                             f"{sorted(ALGORITHM_CLASSES)}.")
        return list(requested)
    others = sorted(set(ALGORITHM_CLASSES) - set(FIRST_ALGORITHMS))
    return list(FIRST_ALGORITHMS) + ordered(others, ALGORITHMS)


def job_hparams(job: Job) -> dict[str, Any]:
    """The hyperparameters the run will use (the registry's, then the sweep's fixed ones)."""
    a = job.args
    hparams = run_hparams(a["algorithm"], a["dataset"], a["hparams_seed"], a["trial_seed"])
    hparams.update(json.loads(a.get("hparams") or "{}"))
    return hparams


def estimated_gpu_seconds(job: Job, rates: GpuRates = ASSUMED_H200) -> float:
    """GPU seconds of one run under ``rates``: training steps plus checkpoint evaluations."""
    a, h = job.args, job_hparams(job)
    n_envs = len(DATASET_ENVIRONMENTS[a["dataset"]])
    steps, freq = a.get("steps") or 5001, a.get("checkpoint_freq") or 100
    checkpoints = len(range(0, steps, freq)) + (1 if (steps - 1) % freq else 0)
    per_env = MNIST_IMAGES // n_envs
    eval_images = n_envs * min(per_env, a.get("max_per_env") or per_env)
    scale = (h.get("mnist_cnn_width", 64) / 64) ** 2  # the 128-channel convolutions dominate
    train_flops = h["batch_size"] * (n_envs - len(a["test_envs"])) * TRAIN_FLOPS_PER_IMAGE * scale
    return (steps * (rates.step_overhead_s + train_flops / rates.train_flops_per_s)
            + checkpoints * eval_images * EVAL_FLOPS_PER_IMAGE * scale / rates.eval_flops_per_s)


def sweep_jobs(sweep_dir: str | Path, size: SweepSize = GPU,
               algorithms: Optional[Sequence[str]] = None) -> list[Job]:
    """The sweep's runs, in launch order: ERM and Fishr first, then by draw, trial, and the
    longest runs first within a trial (RotatedMNIST before ColoredMNIST)."""
    names = sweep_algorithms(algorithms)
    extra = {k: getattr(size, k) for k in ("checkpoint_freq", "max_per_env") if getattr(size, k)}
    jobs = []
    for algorithm in names:
        fixed = {**size.fixed_hparams, **size.fixed_hparams_by_algorithm.get(algorithm, {})}
        jobs += make_jobs(sweep_dir, datasets=list(DATASETS), algorithms=[algorithm],
                          n_hparams=size.n_hparams, n_trials=size.n_trials, steps=size.steps,
                          single_test_envs=True, hparams=fixed or None, **extra)
    later = lambda job: job.args["algorithm"] not in FIRST_ALGORITHMS  # noqa: E731
    return sorted(jobs, key=lambda j: (later(j), j.args["hparams_seed"], j.args["trial_seed"],
                                       -estimated_gpu_seconds(j)))


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_job(args: dict[str, Any], start_before: float) -> tuple[str, float]:
    """In a worker: train one run unless the time to start runs is over."""
    if time.time() > start_before:
        return "not started", 0.0
    from fishr_lite.domainbed.train import train

    start = time.time()
    train(args)
    return "done", time.time() - start


@dataclass
class CallResult:
    """What one call did: runs finished, failed, not started, stopped at the time limit."""

    finished: dict[str, float] = field(default_factory=dict)  # run folder -> wall seconds
    failed: dict[str, str] = field(default_factory=dict)  # run folder -> error
    not_started: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)


def run_parallel(jobs: Sequence[Job], workers: int, time_limit: Optional[float] = None,
                 stop_starting_after: Optional[float] = None,
                 threads: Optional[int] = None) -> CallResult:
    """Run the jobs without ``done`` in ``workers`` processes (spawned: each opens its own CUDA
    context), at most ``time_limit`` seconds; a failed run is reported, the others go on."""
    if workers < 1:
        raise ValueError(f"workers={workers}: use at least 1 worker process.")
    todo = [job for job in jobs if job.state != DONE]
    result = CallResult()
    if not todo:
        return result
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    start = time.time()
    if stop_starting_after is None and time_limit is not None:
        stop_starting_after = 0.75 * time_limit
    start_before = math.inf if stop_starting_after is None else start + stop_starting_after
    stop_at = math.inf if time_limit is None else start + time_limit
    with mp.get_context("spawn").Pool(min(workers, len(todo)), _init_worker, (threads,)) as pool:
        pending = [(job, pool.apply_async(_run_job, (job.args, start_before))) for job in todo]
        for job, handle in pending:
            name = job.output_dir.name
            try:
                status, seconds = handle.get(None if stop_at == math.inf
                                             else max(0.0, stop_at - time.time()))
            except mp.TimeoutError:  # the time limit: started runs are stopped, others wait
                (result.stopped if job.output_dir.exists() else result.not_started).append(name)
                continue
            except Exception as error:  # noqa: BLE001 - one failed run must not stop the sweep
                result.failed[name] = f"{type(error).__name__}: {error}"
                print(f"run {name} ({job.args['dataset']}, {job.args['algorithm']}) failed:\n"
                      + "".join(traceback.format_exception(error)), file=sys.stderr)
                continue
            if status == "done":
                result.finished[name] = round(seconds, 1)
            else:
                result.not_started.append(name)
        pool.terminate()  # stops runs still going at the time limit
    return result


def plan(jobs: Sequence[Job], rates: GpuRates = ASSUMED_H200) -> str:
    """Runs per dataset and algorithm, their state, and the estimated GPU time of what is left."""
    lines = [f"{'dataset':<14}{'algorithm':<10}{'runs':>6}{'done':>6}{'GPU min left':>14}"]
    groups: dict[tuple[str, str], list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.args["dataset"], job.args["algorithm"]), []).append(job)
    for (dataset, algorithm), group in groups.items():
        left = sum(estimated_gpu_seconds(j, rates) for j in group if j.state != DONE) / 60
        done = sum(j.state == DONE for j in group)
        lines.append(f"{dataset:<14}{algorithm:<10}{len(group):>6}{done:>6}{left:>14.1f}")
    left = sum(estimated_gpu_seconds(j, rates) for j in jobs if j.state != DONE) / 60
    lines.append(f"total: {len(jobs)} runs, {summary(jobs)[DONE]} done; about {left:.1f} min of "
                 "GPU time left at the assumed H200 rates")
    return "\n".join(lines)


def record_call(sweep_dir: Path, options: dict[str, Any], result: CallResult,
                wall_s: float) -> None:
    """Append one line to ``calls.jsonl``: the options, what ran, the machine (provenance)."""
    from fishr_lite.domainbed.timing import machine

    line = {"options": options, "wall_s": round(wall_s, 1), "machine": machine(), **asdict(result)}
    with open(sweep_dir / "calls.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(line, sort_keys=True) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on the CPU, 2 workers, a temporary folder by default")
    parser.add_argument("--sweep-dir", type=Path, default=None,
                        help=f"where the runs go (default {SWEEP_DIR.relative_to(ROOT)})")
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel runs (default 8; smoke 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker "
                        "(default: CPU cores / workers)")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds; runs still "
                        "going then are stopped (they start over on the next call)")
    parser.add_argument("--stop-starting-after", type=float, default=None,
                        help="seconds after which no run starts (default 3/4 of --time-limit)")
    parser.add_argument("--n-hparams", type=int, default=None,
                        help="hyperparameter draws (default 1)")
    parser.add_argument("--algorithms", nargs="+", default=None,
                        help="default: ERM, Fishr, then every other registered algorithm "
                        "(--smoke: ERM and Fishr)")
    parser.add_argument("--plan", action="store_true",
                        help="print the runs and the estimate; run nothing")
    args = parser.parse_args(argv)

    size = SMOKE if args.smoke else GPU
    if args.n_hparams is not None:
        size = SweepSize(**{**asdict(size), "n_hparams": args.n_hparams})
    sweep_dir = args.sweep_dir or (Path(tempfile.mkdtemp(prefix="gpu_sweep_smoke_")) if args.smoke
                                   else SWEEP_DIR)
    workers = args.workers or (2 if args.smoke else 8)
    algorithms = args.algorithms or (list(FIRST_ALGORITHMS) if args.smoke else None)
    jobs = sweep_jobs(sweep_dir, size, algorithms)
    print(f"sweep folder: {sweep_dir}\n{plan(jobs)}", flush=True)
    if args.plan:
        return 0
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA GPU: this sweep is sized for one (use --smoke to run it on a CPU at "
                  "tiny sizes)", file=sys.stderr)
            return 2
    sweep_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    result = run_parallel(jobs, workers, args.time_limit, args.stop_starting_after, args.threads)
    wall = time.time() - start
    options = {"smoke": args.smoke, "workers": workers, "time_limit": args.time_limit,
               "stop_starting_after": args.stop_starting_after, "size": asdict(size)}
    if result.finished or result.failed or result.stopped:
        record_call(sweep_dir, options, result, wall)
    print(f"this call: {len(result.finished)} runs finished, {len(result.failed)} failed, "
          f"{len(result.stopped)} stopped at the time limit, {len(result.not_started)} not "
          f"started, in {wall:.0f} s", flush=True)
    counts = summary(jobs)
    print(f"sweep: {counts[DONE]} of {len(jobs)} runs done" + (
        "; call again to finish the rest" if counts[DONE] < len(jobs) else ""), flush=True)
    if counts[DONE]:
        from fishr_lite.domainbed.reporting import build_report

        print(build_report(sweep_dir).to_text(), flush=True)
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
