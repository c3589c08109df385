"""One paper-profile Colored MNIST run, twice side by side, with a switch of the library on and off:
``linear_relu`` (default): the fused Linear + ReLU layer (``fishr_lite.linear_relu``, on by
default) against plain Linear then ReLU; ``compiled_closed_form``: the closed form's compiled
kernels against the eager closed form; ``onednn_input_gradient``: the fused layer's input
gradient by oneDNN against ``@``; ``fuse_head_and_variances``: the head and the closed form's
variances in one node per domain (``fishr_lite.fused_head``, on by default) against the head,
then the variances.

    python benchmarks/paper_run_ab.py                 # Fishr, restart 0: about 10 minutes
    python benchmarks/paper_run_ab.py --steps 50      # a shorter check
    python benchmarks/paper_run_ab.py --switch compiled_closed_form
    python benchmarks/paper_run_ab.py --switch onednn_input_gradient
    python benchmarks/paper_run_ab.py --switch fuse_head_and_variances

Each run is its own process with one torch thread and freed memory reused
(``fishr_lite.cpu_memory``), both started together, so they share the machine alike. The
compiled run starts from an empty kernel cache, so its wall time includes compiling. Writes
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
import tempfile
from pathlib import Path

import torch

RUN = """
import json, sys, time, torch
torch.set_num_threads(1)
from fishr_lite.cpu_memory import reuse_freed_memory
reuse_freed_memory()
from fishr_lite.experiments import coloredmnist as cm
from fishr_lite.compiled_variance import compiled_closed_form
from fishr_lite.fused_head import fuse_head_and_variances
from fishr_lite.linear_relu import fused_linear_relu, onednn_input_gradient
config = cm.Config(**json.loads(sys.argv[1]))
switch = {"linear_relu": fused_linear_relu, "compiled_closed_form": compiled_closed_form,
          "onednn_input_gradient": onednn_input_gradient, "fuse_head_and_variances": fuse_head_and_variances}[sys.argv[2]]
cm.environments(config.restart, config.label_flip, config.fraction, "cpu")  # data outside the timer
start = time.perf_counter()
with switch(sys.argv[3] == "on"):
    result = cm.train(config, "cpu")
print(json.dumps({"wall_time_s": time.perf_counter() - start, "history": result["history"]}))
"""


#: switch -> (name of the run with it on, with it off)
KINDS = {"linear_relu": ("fused", "plain"), "compiled_closed_form": ("compiled", "eager"),
         "onednn_input_gradient": ("onednn", "blas"), "fuse_head_and_variances": ("one_node", "head_then_variances")}
LABELS = {"fused": "fused Linear + ReLU", "compiled": "compiled closed form",
          "onednn": "oneDNN input gradient", "one_node": "head and variances in one node"}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algorithm", default="fishr")
    parser.add_argument("--restart", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="default: the paper profile's 501")
    parser.add_argument("--switch", choices=tuple(KINDS), default="linear_relu",
                        help="what differs between the two runs (default: the fused Linear + ReLU layer)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    from fishr_lite.experiments import coloredmnist as cm
    from fishr_lite.results import git_commit, write_json_atomic

    config = cm.Config(args.algorithm, restart=args.restart).to_dict()
    if args.steps:
        config["steps"] = args.steps
    root = Path(__file__).resolve().parents[1]
    on, off = KINDS[args.switch]
    with tempfile.TemporaryDirectory() as kernel_cache:  # compiled kernels: built inside the run
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": kernel_cache}
        runs = {kind: subprocess.Popen([sys.executable, "-c", RUN, json.dumps(config), args.switch,
                                        "on" if kind == on else "off"],
                                       cwd=root, stdout=subprocess.PIPE, text=True, env=env)
                for kind in (on, off)}
        results = {}
        for kind, process in runs.items():
            out, _ = process.communicate()
            if process.returncode != 0:
                raise SystemExit(f"the {kind} run failed (exit {process.returncode})")
            results[kind] = json.loads(out.strip().splitlines()[-1])
    gaps = {key: max(abs(a - b) for a, b in zip(results[on]["history"][key], results[off]["history"][key]))
            for key in ("train_nll", "train_acc", "test_acc")}
    ratio = f"{off}_over_{on}"
    record = {
        "benchmark": "paper_run_ab",
        "switch": args.switch,
        "config": config,
        "torch_threads": 1,
        "wall_time_s": {kind: results[kind]["wall_time_s"] for kind in (on, off)},
        ratio: results[off]["wall_time_s"] / results[on]["wall_time_s"],
        "final_test_acc": {kind: results[kind]["history"]["test_acc"][-1] for kind in (on, off)},
        "history_max_abs_difference": gaps,
        "provenance": {"date": dt.datetime.now().isoformat(timespec="seconds"), "host": socket.gethostname(),
                       "torch": torch.__version__, "git_commit": git_commit()},
    }
    print(f"{args.algorithm} restart {args.restart}, {config['steps']} steps, one thread each, side by side:")
    print(f"  {LABELS[on]} {results[on]['wall_time_s']:7.1f} s   {off} {results[off]['wall_time_s']:7.1f} s   "
          f"{off} / {on} {record[ratio]:.3f}")
    print(f"  final test accuracy {record['final_test_acc'][on]:.4f} vs {record['final_test_acc'][off]:.4f}; "
          f"largest history gaps {json.dumps({k: round(v, 5) for k, v in gaps.items()})}")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.out_dir / f"paper_run_ab_{stamp}_{socket.gethostname()}.json"
    write_json_atomic(path, record)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
