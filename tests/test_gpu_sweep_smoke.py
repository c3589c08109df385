"""The one-GPU DomainBed sweep (benchmarks/domainbed_gpu_sweep.py and gpu_run.sh's step 3):
its runs, its cost estimate, and the whole path on the CPU at tiny sizes (--smoke, which also
runs step 2's batched Colored MNIST Table 2 at tiny sizes)."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from fishr_lite.domainbed.profiles import profile_jobs
from fishr_lite.domainbed.records import load_records
from fishr_lite.domainbed.reporting import build_report
from fishr_lite.domainbed.sweep import DONE, INCOMPLETE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # spawned workers import the module by this name
import domainbed_gpu_sweep as gpu  # noqa: E402


def test_gpu_sweep_is_domainbeds_runs_in_launch_order():
    jobs = gpu.sweep_jobs("/tmp/sweep", gpu.GPU, ["ERM", "Fishr"])
    assert len(jobs) == 2 * 1 * 3 * (3 + 6)  # algorithms x draws x trials x single test envs
    assert all(len(j.args["test_envs"]) == 1 and j.args["hparams_seed"] == 0 for j in jobs)
    domainbed_defaults = {"steps", "checkpoint_freq", "max_per_env", "hparams"}  # not overridden
    assert all(not domainbed_defaults & set(j.args) for j in jobs)
    # the same run folders as DomainBed's full ColoredMNIST sweep (chapter 10's paper profile)
    paper = {j.output_dir.name for j in profile_jobs("/tmp/sweep", "paper")}
    assert {j.output_dir.name for j in jobs if j.args["dataset"] == "ColoredMNIST"} <= paper
    trials = [j.args["trial_seed"] for j in jobs]
    assert trials == sorted(trials)  # whole trials finish first
    first = jobs[:18]
    assert [j.args["dataset"] for j in first] == ["RotatedMNIST"] * 12 + ["ColoredMNIST"] * 6


def test_default_algorithms_start_with_erm_and_fishr():
    assert gpu.sweep_algorithms()[:2] == ["ERM", "Fishr"]
    with pytest.raises(ValueError, match="unknown algorithm"):
        gpu.sweep_algorithms(["ERM", "NotAnAlgorithm"])


def test_cost_estimate_is_the_one_the_docstring_gives():
    jobs = gpu.sweep_jobs("/tmp/sweep", gpu.GPU, ["ERM", "Fishr"])
    seconds = {j.args["dataset"]: gpu.estimated_gpu_seconds(j) for j in jobs
               if j.args["trial_seed"] == 0 and j.args["algorithm"] == "ERM"}
    assert 10 < seconds["ColoredMNIST"] < 12 and 17 < seconds["RotatedMNIST"] < 19
    total = sum(gpu.estimated_gpu_seconds(j) for j in jobs) / 60
    assert 13.5 < total < 14.5, total
    smoke = gpu.sweep_jobs("/tmp/sweep", gpu.SMOKE, ["ERM"])
    assert gpu.estimated_gpu_seconds(smoke[0]) < 0.01  # narrow network, 6 steps, 24 images


def _smoke(tmp_path: Path, out: str, **variables: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / out),
               DOMAINBED_SMOKE_BASE=str(tmp_path / "base"), **variables)
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), "--smoke"], env=env,
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def check_table2_smoke(first_out: Path, second_out: Path) -> None:
    """Step 2's Table 2 at tiny sizes: 4 algorithms x 2 restarts trained batched, archived, and
    read back (not retrained) by the second call."""
    archives = []
    for out in (first_out, second_out):
        assert "8 records in" in (out / "coloredmnist_table2.txt").read_text()
        with tarfile.open(out / "coloredmnist_records.tgz") as tar:
            archives.append({m.name: json.load(tar.extractfile(m)) for m in tar.getmembers()
                             if m.isfile()})
    assert len(archives[0]) == 8 and archives[0] == archives[1]
    for record in archives[0].values():
        assert record["provenance"]["batched"]["restarts"] == [0, 1]
        assert record["config"]["algorithm"] in ("erm", "irm", "vrex", "fishr")


def test_a_call_starts_nothing_its_budget_cannot_hold(tmp_path):
    result = _smoke(tmp_path, "out", GPU_RUN_BUDGET="0")
    left = (tmp_path / "out" / "left_for_next_call.txt").read_text().splitlines()
    assert len(left) == 2 and "Table 2" in left[0] and "DomainBed sweep" in left[1], left
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["left_for_next_call.txt"]
    assert "left for the next call" in result.stdout


@pytest.mark.slow
def test_smoke_runs_the_sweep_archives_it_and_resumes(tmp_path):
    first = _smoke(tmp_path, "out1", GPU_RUN_BUDGET="300")  # step 3's limits shrink to fit
    assert "this call: 18 runs finished, 0 failed" in first.stdout
    archive = tmp_path / "out1" / "domainbed_records.tgz"
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    sweep_dir = tmp_path / "unpacked" / "data/results/domainbed/gpu_sweep_smoke"
    runs = [p for p in sweep_dir.iterdir() if p.is_dir()]
    assert len(runs) == 18 and all((p / "done").exists() for p in runs)
    call = json.loads((sweep_dir / "calls.jsonl").read_text())
    assert call["options"]["smoke"] and call["machine"]["device"] == "cpu"
    limit = call["options"]["time_limit"]
    assert 200 < limit <= 280 and call["options"]["stop_starting_after"] == limit - 150, call["options"]
    assert len(call["finished"]) == 18 and all(s > 0 for s in call["finished"].values())

    stray = tmp_path / "base/data/results/domainbed/gpu_sweep_smoke/0123abcd"
    stray.mkdir()  # a run stopped mid-way: no 'done', so it stays out of the archive
    (stray / "results.jsonl").write_text("{}\n")
    second = _smoke(tmp_path, "out2")  # the same sweep folder: nothing left to run
    assert "this call: 0 runs finished" in second.stdout and "18 of 18 runs done" in second.stdout
    with tarfile.open(tmp_path / "out2" / "domainbed_records.tgz") as tar:
        names = tar.getnames()
    assert not any("0123abcd" in n for n in names) and sum(n.endswith("/done") for n in names) == 18
    assert len((tmp_path / "base" / "data/results/domainbed/gpu_sweep_smoke/calls.jsonl")
               .read_text().splitlines()) == 1

    check_table2_smoke(tmp_path / "out1", tmp_path / "out2")

    report = build_report(sweep_dir)
    assert report.sweep.n_runs == 18 and report.sweep.n_incomplete_runs == 0
    for dataset, n_envs in (("ColoredMNIST", 3), ("RotatedMNIST", 6)):
        table = report.table(dataset, "oracle")
        assert table.row_labels == ["ERM", "Fishr"] and len(table.col_labels) == n_envs + 1
        assert all(m is not None for row in table.means for m in row)
        assert all(m is None for row in report.table(dataset, "loo").means for m in row)  # no pairs
    assert "Dataset: RotatedMNIST" in (tmp_path / "out1" / "domainbed_sweep.txt").read_text()


@pytest.mark.slow
def test_time_limit_stops_runs_and_the_next_call_starts_them_over(tmp_path):
    long, short = gpu.sweep_jobs(tmp_path, gpu.SMOKE, ["ERM"])[:2]
    long.args["steps"] = 10**7  # cannot finish before the limit
    # the limit leaves a loaded machine time to start the run (and create its folder)
    result = gpu.run_parallel([long, short], workers=1, time_limit=40, stop_starting_after=38)
    assert result.stopped == [long.output_dir.name]
    assert result.not_started == [short.output_dir.name]
    assert long.state == INCOMPLETE and not result.finished and not result.failed
    assert load_records(tmp_path).incomplete_runs == [str(long.output_dir)]
    long.args["steps"] = 3
    result = gpu.run_parallel([long, short], workers=2)
    assert sorted(result.finished) == sorted([long.output_dir.name, short.output_dir.name])
    assert long.state == DONE  # started over: 3 steps, checkpoints at steps 0 and 2
    assert len((long.output_dir / "results.jsonl").read_text().splitlines()) == 2


def _full_call(tmp_path: Path, budget: int, bench_seconds: int) -> tuple[list[str], str]:
    """gpu_run.sh's GPU mode with a stand-in interpreter that logs each call (and sleeps in the
    step benchmark): the order of the steps and what the budget leaves out, without a GPU."""
    tmp_path.mkdir(exist_ok=True)
    log, out = tmp_path / "calls.log", tmp_path / "out"
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{log}"\ncat > /dev/null\n'
                    f'if [[ "$1" == benchmarks/bench_step.py ]]; then sleep {bench_seconds}; fi\n')
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), OUT=str(out), GPU_RUN_BUDGET=str(budget),
               COLOREDMNIST_ROOT=str(tmp_path / "coloredmnist"))
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh")], env=env, cwd=ROOT,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    left = out / "left_for_next_call.txt"
    return log.read_text().splitlines(), left.read_text() if left.exists() else ""


def test_a_full_call_runs_its_steps_in_order_and_leaves_what_its_budget_cannot_hold(tmp_path):
    calls, left = _full_call(tmp_path, budget=203, bench_seconds=4)
    steps = [c for c in calls if "pip install" not in c]
    assert steps[0].startswith("-c import torch") and steps[1].startswith("benchmarks/bench_step.py --device cuda")
    assert "--algorithm erm --algorithm irm --algorithm vrex --algorithm fishr" in steps[2]
    assert "--label-flip 0" in steps[3] and "fishr-fullcov" in steps[4] and steps[5].startswith("- ")
    assert len(steps) == 6 and "step 3, the DomainBed sweep" in left  # at most 199 s left: under its 200

    calls, left = _full_call(tmp_path / "roomy", budget=560, bench_seconds=0)
    sweep = [c for c in calls if c.startswith("benchmarks/domainbed_gpu_sweep.py")]
    assert len(sweep) == 1 and not left
    assert "--time-limit 510 --stop-starting-after 360" in sweep[0]  # the sweep's own defaults
