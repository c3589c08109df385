"""Our sweep's records are DomainBed's records: what DomainBed's ``collect_results``,
``model_selection`` and ``list_top_hparams`` read is there, with DomainBed's JSON types, and
our reader reads DomainBed's own test sweep (tests/data/domainbed_test_sweep, MIT, see README).

The schema below is what DomainBed's readers touch (``reporting.get_grouped_records``:
``args.trial_seed/dataset/algorithm/test_envs``; ``model_selection``: ``args.hparams_seed``,
``step``, ``env{i}_in_acc``, ``env{i}_out_acc`` for i = 0, 1, ... until a key is missing;
``list_top_hparams``: ``hparams``, ``args.output_dir``), plus the rest of the line that
DomainBed's ``train.py`` writes, typed as its argparse flags type them. It is checked against
DomainBed's records first, so it cannot drift from them.
"""

import json
from pathlib import Path

import pytest

from fishr_lite.domainbed.names import DATASET_ENVIRONMENTS
from fishr_lite.domainbed.records import load_records
from fishr_lite.domainbed.selection import SELECTION_METHODS, selected_accuracies
from fishr_lite.domainbed.sweep import DONE, launch, make_jobs, summary

SWEEP = Path(__file__).parent / "data" / "domainbed_test_sweep"
NONE = type(None)

# args, as DomainBed's scripts/train.py argparse types them (None where its default is None)
ARG_TYPES = {
    "algorithm": str, "dataset": str, "task": str, "output_dir": str,
    "data_dir": (str, NONE),  # DomainBed always has one; MNIST datasets do not need it here
    "hparams": (str, NONE), "hparams_seed": int, "trial_seed": int, "seed": int,
    "steps": (int, NONE), "checkpoint_freq": (int, NONE), "test_envs": list,
    "holdout_fraction": float, "uda_holdout_fraction": (int, float),
    "skip_model_save": bool, "save_model_every_checkpoint": bool,
}
RECORD_TYPES = {"args": dict, "hparams": dict, "step": int, "epoch": float, "step_time": float}


def is_json_type(value, types) -> bool:
    """isinstance, except that a bool is not an int and an int is not a float (JSON's view)."""
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int):
        return int in types
    return isinstance(value, tuple(t for t in types if t not in (int, bool)))


def check_domainbed_record(record: dict, n_envs: int) -> None:
    """Every key DomainBed's readers use, with DomainBed's types."""
    for key, types in RECORD_TYPES.items():
        assert is_json_type(record[key], types), (key, record[key])
    for key, types in ARG_TYPES.items():
        assert is_json_type(record["args"][key], types), ("args." + key, record["args"][key])
    test_envs = record["args"]["test_envs"]
    assert test_envs and all(is_json_type(t, int) and 0 <= t < n_envs for t in test_envs)
    # model_selection counts environments by probing env0_out_acc, env1_out_acc, ... in order
    envs = [i for i in range(n_envs + 2) if f"env{i}_out_acc" in record]
    assert envs == list(range(n_envs))
    for i in envs:
        for split in ("in", "out"):
            acc = record[f"env{i}_{split}_acc"]
            assert is_json_type(acc, float) and 0.0 <= acc <= 1.0


def records_and_lines(sweep_dir: Path) -> list[tuple[dict, str]]:
    return [(json.loads(line), line) for path in sorted(sweep_dir.glob("*/results.jsonl"))
            for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def our_sweep(tmp_path_factory) -> Path:
    """Fishr on ColoredMNIST, every single and paired test environment (leave-one-domain-out
    needs the pairs), one draw, one trial; width-8 network, 3 steps, checkpoints at 0 and 2."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    jobs = make_jobs(sweep_dir, datasets=["ColoredMNIST"], algorithms=["Fishr"], n_hparams=1,
                     n_trials=1, steps=3, checkpoint_freq=2, max_per_env=16,
                     hparams={"batch_size": 4, "mnist_cnn_width": 8, "penalty_anneal_iters": 1})
    launch(jobs, "sequential")
    assert summary(jobs)[DONE] == 6
    return sweep_dir


def test_schema_holds_for_domainbeds_own_records():
    pairs = records_and_lines(SWEEP)
    assert len(pairs) == 200
    for record, line in pairs:
        check_domainbed_record(record, len(DATASET_ENVIRONMENTS[record["args"]["dataset"]]))
        assert json.dumps(record, sort_keys=True) == line  # DomainBed's json.dumps(sort_keys=True)


@pytest.mark.slow
def test_our_records_have_domainbeds_keys_types_and_line_format(our_sweep):
    ours = records_and_lines(our_sweep)
    assert len(ours) == 6 * 2
    domainbed = records_and_lines(SWEEP)[0][0]
    for record, line in ours:
        check_domainbed_record(record, 3)
        assert json.dumps(record, sort_keys=True) == line
        # every key of DomainBed's lines (ERM's update value "loss" included), and its args
        assert {k for k in domainbed if not k.startswith("env")} <= set(record)
        assert set(domainbed["args"]) <= set(record["args"])
        assert is_json_type(record["mem_gb"], float)  # DomainBed's newer train.py writes it too
        assert record["args"]["output_dir"] == str(Path(record["args"]["output_dir"]))
        assert Path(record["args"]["output_dir"]).parent == our_sweep


@pytest.mark.slow
def test_domainbed_selection_reads_our_sweep_and_our_reader_reads_domainbeds(our_sweep):
    """Each of DomainBed's three selection methods picks a model for each test environment of
    our sweep; our reader reads all of DomainBed's test sweep and selects on it too."""
    ours = load_records(our_sweep)
    assert (len(ours), ours.n_runs, ours.n_incomplete_runs, ours.n_skipped_lines) == (12, 6, 0, 0)
    for method in SELECTION_METHODS:
        rows = selected_accuracies(ours.records, method)
        assert sorted(r["test_env"] for r in rows) == [0, 1, 2], method.name
    theirs = load_records(SWEEP)
    assert (len(theirs), theirs.n_runs, theirs.n_incomplete_runs, theirs.n_skipped_lines) == (200, 40, 0, 0)
    for method in SELECTION_METHODS:
        assert len(selected_accuracies(theirs.records, method)) == 2 * 4  # 2 trials x 4 test envs
