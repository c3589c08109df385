"""Measured seconds per training step, for sweep cost estimates (``cost = runs x steps x t``).

:func:`measure_step_times` times ``algorithm.update`` on real minibatches of a dataset, one
minibatch of ``batch_size`` per training domain, as the runner does (Fishr with its penalty
switched on from the first step, so the time includes it). The algorithms take turns, one step
each, so a burst of load from other processes hits them alike; medians over ``n_steps`` after
``warmup`` untimed rounds. The record carries its provenance (device, CPU, threads, versions,
git commit, date), so an estimate can say which machine it holds for.

    python -m fishr_lite.domainbed.timing --out data/results/domainbed/step_times_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .algorithms import get_algorithm_class
from .datasets import get_dataset
from .hparams import default_hparams, parse_overrides


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Where the timing ran: device, CPU, threads, versions, commit, date."""
    import fishr_lite

    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "fishr_lite": getattr(fishr_lite, "__version__", None), "python": platform.python_version(),
            "git_commit": _git_commit(), "host": platform.node(),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def measure_step_times(dataset: str = "ColoredMNIST", algorithms: Sequence[str] = ("ERM", "Fishr"),
                       batch_size: int = 64, n_steps: int = 5, warmup: int = 1,
                       hparams: Optional[dict] = None, test_envs: Sequence[int] = (0,),
                       data_dir: Optional[str] = None) -> dict[str, Any]:
    """Median seconds per ``update`` for each algorithm, with the setting and the machine."""
    if n_steps < 1 or warmup < 0:
        raise ValueError(f"n_steps={n_steps}, warmup={warmup}: time at least one step "
                         "(n_steps >= 1) after warmup >= 0 untimed steps.")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = get_dataset(dataset, data_dir=data_dir, seed=0, test_envs=test_envs,
                       max_per_env=max(batch_size, 256))
    train_envs = [data[i] for i in range(len(data)) if i not in test_envs]
    generator = torch.Generator().manual_seed(0)
    result: dict[str, Any] = {"dataset": dataset, "batch_size": batch_size, "n_steps": n_steps,
                              "warmup": warmup, "n_train_domains": len(train_envs),
                              "hparams": dict(hparams or {}), "seconds_per_step": {},
                              "all_times_s": {}}
    models = {}
    for name in algorithms:
        h = {**default_hparams(name, dataset), "batch_size": batch_size, **(hparams or {})}
        if name == "Fishr":
            h["penalty_anneal_iters"] = 0  # time the step with its penalty
        torch.manual_seed(0)
        models[name] = get_algorithm_class(name)(data.input_shape, data.num_classes,
                                                 len(train_envs), h).to(device)
    times: dict[str, list[float]] = {name: [] for name in algorithms}
    for step in range(warmup + n_steps):
        batches = []
        for env in train_envs:
            index = torch.randint(len(env), (batch_size,), generator=generator)
            x, y = zip(*(env[int(i)] for i in index))
            batches.append((torch.stack(x).to(device), torch.as_tensor(y).to(device)))
        for name, algorithm in models.items():  # round-robin: one step of each in turn
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            algorithm.update(batches)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    for name in algorithms:
        result["seconds_per_step"][name] = statistics.median(times[name])
        result["all_times_s"][name] = times[name]
    result["machine"] = machine()
    return result


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Seconds per DomainBed training step.")
    parser.add_argument("--dataset", default="ColoredMNIST")
    parser.add_argument("--algorithms", nargs="+", default=["ERM", "Fishr"])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--n_steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--hparams", default=None, help="JSON overrides, e.g. '{\"resnet18\": true}'")
    parser.add_argument("--out", default=None, help="write the JSON record here")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.hparams) if args.hparams else None
    except ValueError as error:
        parser.error(str(error))
    result = measure_step_times(args.dataset, args.algorithms, args.batch_size, args.n_steps,
                                args.warmup, overrides, data_dir=args.data_dir)
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.out)
    return result


if __name__ == "__main__":
    main()
