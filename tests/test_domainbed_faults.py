"""Faults in a sweep: the launcher killed (``kill -9``) mid-job, then launched again; a log
folder inside the sweep; ``delete_incomplete``. Nothing finished is lost or run twice."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fishr_lite.domainbed import sweep
from fishr_lite.domainbed.records import is_run_folder, load_records
from fishr_lite.domainbed.sweep import DONE, INCOMPLETE, NOT_LAUNCHED, make_jobs, summary
from fishr_lite.domainbed.train import is_running

ROOT = Path(__file__).resolve().parents[1]
HPARAMS = {"batch_size": 4, "mnist_cnn_width": 8}
STEPS, CHECKPOINT_FREQ = 300, 100  # checkpoints at steps 0, 100, 200, 299


def sweep_args(out: Path) -> list[str]:
    return ["--datasets", "ColoredMNIST", "--algorithms", "ERM", "--n_hparams", "1",
            "--n_trials", "1", "--single_test_envs", "--steps", str(STEPS),
            "--checkpoint_freq", str(CHECKPOINT_FREQ), "--max_per_env", "40",
            "--hparams", json.dumps(HPARAMS), "--output_dir", str(out),
            "--command_launcher", "local", "--skip_confirmation"]


def wait_for_kill_point(jobs, process, timeout_s: float = 300.0):
    """Poll until one job is done and another is training (holds its lock, wrote a record);
    return (finished job, job in progress)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the sweep ended before it could be killed mid-job"
        done = [j for j in jobs if j.state == DONE]
        running = [j for j in jobs if j.state == INCOMPLETE and (j.output_dir / "results.jsonl").exists()
                   and (j.output_dir / "results.jsonl").read_text().strip() and is_running(j.output_dir)]
        if done and running:
            return done[0], running[0]
        time.sleep(0.02)
    raise AssertionError(f"no job finished with another in progress within {timeout_s} s")


@pytest.fixture
def one_thread():
    """Tiny runs are fastest on one thread (the machine may be shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_sweep_killed_mid_job_is_finished_by_launching_again(tmp_path, capsys, one_thread):
    out = tmp_path / "sweep"
    (out / "logs").mkdir(parents=True)  # a log folder in the sweep: not a run
    (out / "logs" / "launcher.out").write_text("log\n")
    jobs = make_jobs(out, datasets=["ColoredMNIST"], algorithms=["ERM"], n_hparams=1, n_trials=1,
                     single_test_envs=True, steps=STEPS, checkpoint_freq=CHECKPOINT_FREQ,
                     max_per_env=40, hparams=HPARAMS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "fishr_lite.domainbed.sweep", "launch",
                                *sweep_args(out)], cwd=ROOT, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        finished, killed = wait_for_kill_point(jobs, process)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and the job it runs (one process)
        process.wait()
    finished_bytes = (finished.output_dir / "results.jsonl").read_bytes()
    finished_mtime = (finished.output_dir / "results.jsonl").stat().st_mtime_ns
    assert not is_running(killed.output_dir) and killed.state == INCOMPLETE

    # the reader sees one finished and one incomplete run; the log folder is not a run
    records = load_records(out)
    assert not is_run_folder(out / "logs") and records.n_runs == sum(j.output_dir.exists() for j in jobs)
    assert records.incomplete_runs == [str(killed.output_dir)]

    # launching again finishes every job; the finished run is neither re-run nor touched
    relaunched = sweep.main(["launch", *sweep_args(out)])
    assert killed.output_dir in [j.output_dir for j in relaunched]
    assert finished.output_dir not in [j.output_dir for j in relaunched]
    assert summary(jobs) == {DONE: 3, INCOMPLETE: 0, NOT_LAUNCHED: 0}
    assert (finished.output_dir / "results.jsonl").read_bytes() == finished_bytes
    assert (finished.output_dir / "results.jsonl").stat().st_mtime_ns == finished_mtime
    steps = [json.loads(line)["step"] for line in (killed.output_dir / "results.jsonl").read_text().splitlines()]
    assert steps == [0, 100, 200, 299]  # started over: no duplicated checkpoints
    records = load_records(out)
    assert (records.n_runs, records.n_incomplete_runs, len(records)) == (3, 0, 12)
    assert (out / "logs" / "launcher.out").read_text() == "log\n"
    assert not any((j.output_dir / ".running").exists() for j in jobs)

    # delete_incomplete removes only the unfinished job's folder, never a log folder
    (jobs[1].output_dir / "done").unlink()
    capsys.readouterr()
    deleted = sweep.main(["delete_incomplete", *sweep_args(out)])
    assert "3 jobs: 2 done, 1 incomplete, 0 not launched." in capsys.readouterr().out
    assert [j.output_dir for j in deleted] == [jobs[1].output_dir]
    assert sorted(p.name for p in out.iterdir()) == sorted(["logs", jobs[0].output_dir.name,
                                                            jobs[2].output_dir.name])
    assert (out / "logs" / "launcher.out").exists()


def test_delete_incomplete_ignores_log_folders_and_done_runs(tmp_path, capsys):
    """Without training: job folders made by hand (done / not done), plus log folders."""
    out = tmp_path / "sweep"
    jobs = make_jobs(out, datasets=["ColoredMNIST"], algorithms=["ERM"], n_hparams=1, n_trials=1,
                     single_test_envs=True, steps=STEPS, checkpoint_freq=CHECKPOINT_FREQ,
                     max_per_env=40, hparams=HPARAMS)
    for j in jobs[:2]:
        j.output_dir.mkdir(parents=True)
    (jobs[0].output_dir / "done").write_text("done")
    for log_dir in ("logs", ".submitit", "slurm_logs"):
        (out / log_dir).mkdir()
        (out / log_dir / "x.out").write_text("log")
    records = load_records(out)
    assert (records.n_runs, records.incomplete_runs) == (2, [str(jobs[1].output_dir)])
    deleted = sweep.main(["delete_incomplete", *sweep_args(out)])
    assert "3 jobs: 1 done, 1 incomplete, 1 not launched." in capsys.readouterr().out
    assert [j.output_dir for j in deleted] == [jobs[1].output_dir]
    assert sorted(p.name for p in out.iterdir()) == sorted([".submitit", "logs", "slurm_logs",
                                                            jobs[0].output_dir.name])


def test_a_run_in_progress_is_locked(tmp_path):
    """While a process holds a run's lock, is_running says so and train refuses to start it."""
    fcntl = pytest.importorskip("fcntl")
    from fishr_lite.domainbed.train import LOCK_FILE, train

    run = tmp_path / "run"
    run.mkdir()
    assert not is_running(run)
    with open(run / LOCK_FILE, "w") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert is_running(run)
        with pytest.raises(RuntimeError, match="another process is training"):
            train({"output_dir": str(run), "steps": 1})
        assert not (run / "results.jsonl").exists()
    assert not is_running(run)  # the lock went with the file's closing
