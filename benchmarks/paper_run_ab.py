"""One paper-profile Colored MNIST run, twice side by side: with the fused Linear + ReLU
layer (``fishr_lite.linear_relu``, the library's default) and with plain Linear then ReLU.

    python benchmarks/paper_run_ab.py                 # Fishr, restart 0: about 10 minutes
    python benchmarks/paper_run_ab.py --steps 50      # a shorter check

Each run is its own process with one torch thread and freed memory reused
(``fishr_lite.cpu_memory``), both started together, so they share the machine alike. Writes
``benchmarks/results/paper_run_ab_<date>-<time>_<host>.json``: both wall times, their ratio,
and how far the two histories lie apart (float32 rounding differs between the kernels).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

RUN = """
import json, sys, time, torch
torch.set_num_threads(1)
from fishr_lite.cpu_memory import reuse_freed_memory
reuse_freed_memory()
from fishr_lite.experiments import coloredmnist as cm
from fishr_lite.linear_relu import fused_linear_relu
config = cm.Config(**json.loads(sys.argv[1]))
cm.environments(config.restart, config.label_flip, config.fraction, "cpu")  # data outside the timer
start = time.perf_counter()
with fused_linear_relu(sys.argv[2] == "fused"):
    result = cm.train(config, "cpu")
print(json.dumps({"wall_time_s": time.perf_counter() - start, "history": result["history"]}))
"""


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algorithm", default="fishr")
    parser.add_argument("--restart", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="default: the paper profile's 501")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    from fishr_lite.experiments import coloredmnist as cm
    from fishr_lite.results import git_commit, write_json_atomic

    config = cm.Config(args.algorithm, restart=args.restart).to_dict()
    if args.steps:
        config["steps"] = args.steps
    root = Path(__file__).resolve().parents[1]
    runs = {kind: subprocess.Popen([sys.executable, "-c", RUN, json.dumps(config), kind], cwd=root,
                                   stdout=subprocess.PIPE, text=True,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
            for kind in ("fused", "plain")}
    results = {}
    for kind, process in runs.items():
        out, _ = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"the {kind} run failed (exit {process.returncode})")
        results[kind] = json.loads(out.strip().splitlines()[-1])
    fused, plain = results["fused"], results["plain"]
    gaps = {key: max(abs(a - b) for a, b in zip(fused["history"][key], plain["history"][key]))
            for key in ("train_nll", "train_acc", "test_acc")}
    record = {
        "benchmark": "paper_run_ab",
        "config": config,
        "torch_threads": 1,
        "wall_time_s": {"fused": fused["wall_time_s"], "plain": plain["wall_time_s"]},
        "plain_over_fused": plain["wall_time_s"] / fused["wall_time_s"],
        "final_test_acc": {"fused": fused["history"]["test_acc"][-1], "plain": plain["history"]["test_acc"][-1]},
        "history_max_abs_difference": gaps,
        "provenance": {"date": dt.datetime.now().isoformat(timespec="seconds"), "host": socket.gethostname(),
                       "torch": torch.__version__, "git_commit": git_commit()},
    }
    print(f"{args.algorithm} restart {args.restart}, {config['steps']} steps, one thread each, side by side:")
    print(f"  fused Linear + ReLU {fused['wall_time_s']:7.1f} s   plain {plain['wall_time_s']:7.1f} s   "
          f"plain / fused {record['plain_over_fused']:.3f}")
    print(f"  final test accuracy {record['final_test_acc']['fused']:.4f} vs {record['final_test_acc']['plain']:.4f}; "
          f"largest history gaps {json.dumps({k: round(v, 5) for k, v in gaps.items()})}")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.out_dir / f"paper_run_ab_{stamp}_{socket.gethostname()}.json"
    write_json_atomic(path, record)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
