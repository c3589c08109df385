"""Tests of the results cache: keys, atomic writes, resume after a kill, corrupt records."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import fishr_lite
from fishr_lite import results
from fishr_lite.results import CorruptRecordWarning, ResultsCache, config_key

CONFIGS = [{"algorithm": "fishr", "restart": r, "lr": 1e-3} for r in range(5)]


class CountingRun:
    """A run function that counts its calls and can simulate a kill at a given call."""

    def __init__(self, kill_at: int | None = None):
        self.calls: list[dict] = []
        self.kill_at = kill_at

    def __call__(self, config: dict) -> dict:
        self.calls.append(config)
        if self.kill_at is not None and len(self.calls) == self.kill_at:
            raise KeyboardInterrupt  # what Ctrl-C or a scheduler's SIGINT raises mid-sweep
        return {"test_acc": 0.5 + config["restart"] / 100}


def test_key_is_canonical_and_sensitive():
    a = {"lr": 1e-3, "algorithm": "erm", "options": {"b": 1, "a": 2}}
    b = {"options": {"a": 2, "b": 1}, "algorithm": "erm", "lr": 1e-3}
    assert config_key("x", a) == config_key("x", b)
    assert config_key("x", a) != config_key("y", a)
    assert config_key("x", a) != config_key("x", {**a, "lr": 2e-3})
    assert len(config_key("x", a)) == results.KEY_LENGTH


def test_config_that_is_not_json_is_refused(tmp_path):
    with pytest.raises(ValueError, match="plain JSON"):
        ResultsCache("exp", tmp_path).key({"device": object()})
    with pytest.raises(ValueError, match="plain folder name"):
        ResultsCache("../escape", tmp_path)


def test_record_layout_and_provenance(tmp_path):
    cache = ResultsCache("exp", tmp_path)
    record = cache.get_or_run(CONFIGS[0], CountingRun(), device="cpu")
    path = tmp_path / "exp" / f"{cache.key(CONFIGS[0])}.json"
    assert path.is_file()
    on_disk = json.loads(path.read_text())
    assert on_disk == record
    assert on_disk["config"] == CONFIGS[0]
    assert on_disk["result"] == {"test_acc": 0.5}
    prov = on_disk["provenance"]
    for field in ("library_version", "torch_version", "device", "git_commit", "wall_time_s", "date"):
        assert field in prov
    assert prov["library_version"] == fishr_lite.__version__
    assert prov["device"] == "cpu"
    assert prov["wall_time_s"] >= 0
    assert prov["git_commit"] is None or len(prov["git_commit"]) == 40


def test_provenance_says_when_a_run_used_the_compiled_closed_form(tmp_path):
    from fishr_lite.compiled_variance import compiled_closed_form

    cache = ResultsCache("exp", tmp_path)
    assert "compiled_closed_form" not in cache.get_or_run(CONFIGS[0], CountingRun())["provenance"]
    with compiled_closed_form():
        record = cache.get_or_run(CONFIGS[1], CountingRun())
    assert record["provenance"]["compiled_closed_form"] is True


def test_git_absent_does_not_fail(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable can be found
    assert results.git_commit() is None
    record = ResultsCache("exp", tmp_path).get_or_run(CONFIGS[0], CountingRun())
    assert record["provenance"]["git_commit"] is None


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    results.write_json_atomic(path, {"a": 1})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(results.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        results.write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporary file left


def test_atomic_write_syncs_before_rename(tmp_path, monkeypatch):
    order = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(results.os, "fsync", lambda fd: (order.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(
        results.os, "replace", lambda a, b: (order.append("replace"), real_replace(a, b))
    )
    results.write_json_atomic(tmp_path / "r.json", {"a": 1})
    assert order[:2] == ["fsync", "replace"]
    mode = (tmp_path / "r.json").stat().st_mode & 0o777
    assert mode == 0o666 & ~results._umask()  # not the private 0o600 of mkstemp


def test_resume_after_kill_runs_only_missing_configs(tmp_path):
    cache = ResultsCache("exp", tmp_path)
    killed = CountingRun(kill_at=3)
    with pytest.raises(KeyboardInterrupt):
        cache.run_all(CONFIGS, killed)
    assert len(list(cache.folder.glob("*.json"))) == 2

    resumed = CountingRun()
    records = cache.run_all(CONFIGS, resumed)
    assert [c["restart"] for c in resumed.calls] == [2, 3, 4]
    assert [r["config"]["restart"] for r in records] == [0, 1, 2, 3, 4]
    assert len(list(cache.folder.glob("*.json"))) == len(CONFIGS)
    assert list(cache.folder.glob(".*")) == []  # no temporary files left behind

    again = CountingRun()
    assert cache.run_all(CONFIGS, again) == records
    assert again.calls == []
    assert len(cache.records()) == len(CONFIGS)


@pytest.mark.parametrize(
    "damage",
    ["truncated", "wrong_key", "missing_field", "not_an_object"],
)
def test_corrupt_record_is_reported_by_name_and_recomputed(tmp_path, damage):
    cache = ResultsCache("exp", tmp_path)
    cache.run_all(CONFIGS[:2], CountingRun())
    path = cache.path(CONFIGS[1])
    text = path.read_text()
    record = json.loads(text)
    if damage == "truncated":
        path.write_text(text[: len(text) // 2])
    elif damage == "wrong_key":
        record["config"]["lr"] = 0.5  # the stored config no longer hashes to the file name
        path.write_text(json.dumps(record))
    elif damage == "missing_field":
        del record["result"]
        path.write_text(json.dumps(record))
    else:
        path.write_text("[1, 2]")

    rerun = CountingRun()
    with pytest.warns(CorruptRecordWarning, match=path.name):
        records = cache.run_all(CONFIGS[:2], rerun)
    assert [c["restart"] for c in rerun.calls] == [1]
    assert records[1]["config"] == CONFIGS[1]
    assert json.loads(path.read_text()) == records[1]
    assert path.with_name(path.name + ".corrupt").is_file()  # kept for inspection


def test_records_lists_sound_records_and_reports_corrupt(tmp_path):
    cache = ResultsCache("exp", tmp_path)
    assert cache.records() == []
    cache.run_all(CONFIGS[:3], CountingRun())
    cache.path(CONFIGS[0]).write_text("{")
    with pytest.warns(CorruptRecordWarning, match=cache.key(CONFIGS[0])):
        found = cache.records()
    assert sorted(r["config"]["restart"] for r in found) == [1, 2]


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("FISHR_RESULTS_DIR", str(tmp_path / "elsewhere"))
    assert ResultsCache("exp").folder == tmp_path / "elsewhere" / "exp"
    monkeypatch.delenv("FISHR_RESULTS_DIR")
    root = results.default_root()
    assert root.parts[-2:] == ("data", "results")
    repository = results.PACKAGE_DIR.parent
    if (repository / "pyproject.toml").is_file():
        assert root == repository / "data" / "results"
    monkeypatch.setattr(results, "PACKAGE_DIR", tmp_path / "site-packages" / "fishr_lite")
    monkeypatch.chdir(tmp_path)
    assert results.default_root() == tmp_path / "data" / "results"
