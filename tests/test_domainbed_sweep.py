"""Hyperparameter registry, the training runner's records, and a sweep through submitit."""

import json
from pathlib import Path

import pytest

from fishr_lite.domainbed.hparams import default_hparams, random_hparams, run_hparams
from fishr_lite.domainbed.records import load_records
from fishr_lite.domainbed.reporting import build_report
from fishr_lite.domainbed.splits import seed_hash
from fishr_lite.domainbed.sweep import DONE, NOT_LAUNCHED, launch, make_jobs, summary
from fishr_lite.domainbed.train import train

SWEEP = Path(__file__).parent / "data" / "domainbed_test_sweep"
TINY = {"steps": 2, "checkpoint_freq": 1, "max_per_env": 10, "hparams": {"batch_size": 2}}


def test_hparams_reproduce_domainbed_test_sweep_draws():
    """DomainBed recorded its draws: all 40 runs' hparams must come out identical."""
    for results in sorted(SWEEP.glob("*/results.jsonl")):
        record = json.loads(results.read_text().splitlines()[0])
        a = record["args"]
        assert run_hparams(a["algorithm"], a["dataset"], a["hparams_seed"], a["trial_seed"]) == record["hparams"]


def test_fishr_hparams_ranges_and_defaults():
    assert {k: default_hparams("Fishr", "ColoredMNIST")[k] for k in ("lambda", "penalty_anneal_iters", "ema")} \
        == {"lambda": 1000.0, "penalty_anneal_iters": 1500, "ema": 0.95}
    draws = [random_hparams("Fishr", "RotatedMNIST", s) for s in range(200)]
    assert all(10 <= d["lambda"] <= 1e4 and 0.90 <= d["ema"] <= 0.99 for d in draws)
    assert all(isinstance(d["penalty_anneal_iters"], int) and 0 <= d["penalty_anneal_iters"] < 5000 for d in draws)
    assert max(d["lambda"] for d in draws) > 1e3 > 100 > min(d["lambda"] for d in draws)


def test_make_jobs_enumerates_domainbed_sweep():
    jobs = make_jobs("/tmp/x", datasets=["ColoredMNIST"], algorithms=["ERM", "Fishr"], n_hparams=2, n_trials=1)
    assert len(jobs) == 2 * (3 + 3) * 2  # algorithms x (singles + pairs) x draws
    assert len({j.output_dir for j in jobs}) == len(jobs)
    a = jobs[1].args
    assert a["seed"] == seed_hash(a["dataset"], a["algorithm"], a["test_envs"], a["hparams_seed"], a["trial_seed"])
    assert [j.args["test_envs"] for j in jobs[:12:2]] == [[0], [0, 1], [0, 2], [1], [1, 2], [2]]
    with pytest.raises(ValueError, match="unknown dataset"):
        make_jobs("/tmp/x", datasets=["MNIST"], algorithms=["ERM"])


@pytest.mark.slow
def test_train_writes_domainbed_schema_and_restarts_partial_runs(tmp_path):
    args = {"dataset": "ColoredMNIST", "algorithm": "Fishr", "test_envs": [2], "output_dir": str(tmp_path / "run"),
            "steps": 3, "checkpoint_freq": 2, "max_per_env": 10,
            "hparams": json.dumps({"batch_size": 2, "penalty_anneal_iters": 1})}
    out = train(args)
    lines = (out / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [0, 2] and (out / "done").exists()
    required = {"args", "hparams", "step", "epoch", "loss", "nll", "penalty", "step_time", "mem_gb"}
    assert required | {f"env{i}_{s}_acc" for i in range(3) for s in ("in", "out")} <= set(records[0])
    assert records[0]["hparams"]["batch_size"] == 2 and records[0]["args"]["test_envs"] == [2]
    (out / "done").unlink()
    train(args)  # an incomplete run starts over instead of appending duplicates
    assert len((out / "results.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_submitit_local_sweep_completes_and_relaunch_reruns_only_missing(tmp_path):
    pytest.importorskip("submitit")
    sweep_dir = tmp_path / "sweep"
    jobs = make_jobs(sweep_dir, datasets=["ColoredMNIST"], algorithms=["ERM"], n_hparams=1, n_trials=1,
                     single_test_envs=True, **TINY)
    assert summary(jobs)[NOT_LAUNCHED] == 3
    launched = launch(jobs, "submitit", log_dir=tmp_path / "logs", cluster="local", timeout_min=5)
    assert len(launched) == 3 and summary(jobs)[DONE] == 3
    mtimes = {j.output_dir: (j.output_dir / "results.jsonl").stat().st_mtime_ns for j in jobs}
    (jobs[1].output_dir / "done").unlink()
    relaunched = launch(jobs, "submitit", log_dir=tmp_path / "logs", cluster="local", timeout_min=5)
    assert [j.output_dir for j in relaunched] == [jobs[1].output_dir] and summary(jobs)[DONE] == 3
    for j in (jobs[0], jobs[2]):
        assert (j.output_dir / "results.jsonl").stat().st_mtime_ns == mtimes[j.output_dir]
    sweep = load_records(sweep_dir)
    assert (len(sweep), sweep.n_incomplete_runs) == (6, 0)  # 3 runs x checkpoints at steps 0 and 1
    table = build_report(sweep).table("ColoredMNIST", "oracle")
    assert table.col_labels == ["+90%", "+80%", "-90%", "Avg"] and None not in table.means[0]
