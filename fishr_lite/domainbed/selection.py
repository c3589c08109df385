"""Model selection exactly as DomainBed defines it (``domainbed/model_selection.py``).

A *trial* is one ``(trial_seed, dataset, algorithm, test_env)``: every run whose ``test_envs``
contains ``test_env`` belongs to it (a run with two test environments belongs to two trials).
Inside a trial, records are grouped by ``hparams_seed`` (one hyperparameter draw). For each
draw a method picks one checkpoint and returns ``{"val_acc", "test_acc"}``; the trial's
accuracy is the ``test_acc`` of the draw with the highest ``val_acc``. Ties go as DomainBed's
stable sort sends them: between draws, to the larger ``hparams_seed``; between checkpoints, to
the earliest. A NaN validation accuracy ranks lowest. The test accuracy is always the test
environment's *in* split (``env{t}_in_acc``); its *out* split (20 % held out) is what the
oracle validates on.

- :class:`IIDAccuracySelectionMethod` (training-domain validation): in the run with the single
  test environment ``t``, the checkpoint maximising the mean of ``env{i}_out_acc`` over the
  training environments ``i != t``.
- :class:`LeaveOneOutSelectionMethod` (leave-one-domain-out cross-validation): for each step,
  the validation accuracy is the mean over training environments ``v`` of ``env{v}_in_acc`` in
  the run whose test environments are ``{t, v}`` (so ``v`` was never trained on); steps where
  any such run is missing are dropped; the step with the best mean is chosen.
- :class:`OracleSelectionMethod` (test-domain validation): the *last* checkpoint of the run with
  the single test environment ``t`` (no early stopping); draws are ranked by ``env{t}_out_acc``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable, Optional

Record = dict[str, Any]
Acc = dict[str, float]


def _rank(value: float) -> float:
    """Sort key of an accuracy: NaN ranks lowest, as in DomainBed's ``Q.sorted``."""
    return -math.inf if isinstance(value, float) and math.isnan(value) else value


def _first_argmax(accs: Iterable[Optional[Acc]]) -> Optional[Acc]:
    """The first ``{val_acc, test_acc}`` with the largest ``val_acc`` (``None`` entries dropped)."""
    best = None
    for acc in accs:
        if acc is not None and (best is None or _rank(acc["val_acc"]) > _rank(best["val_acc"])):
            best = acc
    return best


def n_environments(record: Record) -> int:
    """Number of environments: the consecutive ``env{i}_out_acc`` keys from ``env0``."""
    n = 0
    while f"env{n}_out_acc" in record:
        n += 1
    return n


def single_test_env_records(records: list[Record]) -> list[Record]:
    """The records of runs with exactly one test environment (the ones that are evaluated)."""
    return [r for r in records if len(r["args"]["test_envs"]) == 1]


class SelectionMethod:
    """A rule choosing one checkpoint per hyperparameter draw; subclasses define ``run_acc``."""

    name: str = ""

    @classmethod
    def run_acc(cls, run_records: list[Record]) -> Optional[Acc]:
        """``{"val_acc", "test_acc"}`` of the chosen checkpoint of one draw, or ``None``."""
        raise NotImplementedError

    @classmethod
    def hparams_accs(cls, records: list[Record]) -> list[tuple[Acc, list[Record]]]:
        """Per draw (``hparams_seed``) of one trial: (chosen accuracies, its records), best first."""
        by_seed: dict[Any, list[Record]] = defaultdict(list)
        for r in records:
            by_seed[r["args"]["hparams_seed"]].append(r)
        scored = [(cls.run_acc(by_seed[s]), by_seed[s]) for s in sorted(by_seed)]
        scored = [(acc, recs) for acc, recs in scored if acc is not None]
        scored.sort(key=lambda pair: _rank(pair[0]["val_acc"]))  # stable, ascending
        return scored[::-1]

    @classmethod
    def sweep_acc(cls, records: list[Record]) -> Optional[float]:
        """Test accuracy of the trial: that of the best draw, or ``None`` if none qualifies."""
        ranked = cls.hparams_accs(records)
        return ranked[0][0]["test_acc"] if ranked else None


class OracleSelectionMethod(SelectionMethod):
    """Test-domain validation: last checkpoint; draws ranked by the test domain's out split."""

    name = "test-domain validation set (oracle)"

    @classmethod
    def run_acc(cls, run_records: list[Record]) -> Optional[Acc]:
        records = single_test_env_records(run_records)
        if not records:
            return None
        t = records[0]["args"]["test_envs"][0]
        last = max(reversed(records), key=lambda r: r["step"])  # the last of the latest step
        return {"val_acc": last[f"env{t}_out_acc"], "test_acc": last[f"env{t}_in_acc"]}


class IIDAccuracySelectionMethod(SelectionMethod):
    """Training-domain validation: mean out-split accuracy of the training domains."""

    name = "training-domain validation set"

    @staticmethod
    def step_acc(record: Record) -> Acc:
        t = record["args"]["test_envs"][0]
        val = [record[f"env{i}_out_acc"] for i in range(n_environments(record)) if i != t]
        return {"val_acc": float(sum(val) / len(val)), "test_acc": record[f"env{t}_in_acc"]}

    @classmethod
    def run_acc(cls, run_records: list[Record]) -> Optional[Acc]:
        return _first_argmax(cls.step_acc(r) for r in single_test_env_records(run_records))


class LeaveOneOutSelectionMethod(SelectionMethod):
    """Leave-one-domain-out: each training domain in turn held out as validation domain."""

    name = "leave-one-domain-out cross-validation"

    @staticmethod
    def step_acc(step_records: list[Record]) -> Optional[Acc]:
        tests = single_test_env_records(step_records)
        if len(tests) != 1:
            return None
        t = tests[0]["args"]["test_envs"][0]
        n = n_environments(step_records[0])
        val: dict[int, float] = {}
        for r in step_records:
            if len(r["args"]["test_envs"]) == 2:
                v = (set(r["args"]["test_envs"]) - {t}).pop()
                val[v] = r[f"env{v}_in_acc"]
        if any(i not in val for i in range(n) if i != t):
            return None
        mean = sum(val[i] for i in range(n) if i != t) / (n - 1)
        return {"val_acc": float(mean), "test_acc": tests[0][f"env{t}_in_acc"]}

    @classmethod
    def run_acc(cls, run_records: list[Record]) -> Optional[Acc]:
        by_step: dict[Any, list[Record]] = defaultdict(list)
        for r in run_records:
            by_step[r["step"]].append(r)
        return _first_argmax(cls.step_acc(by_step[s]) for s in sorted(by_step))


#: The three methods, in the order DomainBed reports them.
SELECTION_METHODS: list[type[SelectionMethod]] = [
    IIDAccuracySelectionMethod,
    LeaveOneOutSelectionMethod,
    OracleSelectionMethod,
]

_BY_ALIAS: dict[str, type[SelectionMethod]] = {
    "iid": IIDAccuracySelectionMethod, "training-domain": IIDAccuracySelectionMethod,
    "loo": LeaveOneOutSelectionMethod, "leave-one-out": LeaveOneOutSelectionMethod,
    "oracle": OracleSelectionMethod, "test-domain": OracleSelectionMethod,
}


def get_selection_method(name: str | type[SelectionMethod]) -> type[SelectionMethod]:
    """A method by class, DomainBed name, or alias (``iid``, ``loo``, ``oracle``)."""
    if isinstance(name, type) and issubclass(name, SelectionMethod):
        return name
    for method in SELECTION_METHODS:
        if name in (method.name, method.__name__):
            return method
    if name in _BY_ALIAS:
        return _BY_ALIAS[name]
    raise ValueError(
        f"unknown selection method {name!r}; use one of {sorted(_BY_ALIAS)} or a DomainBed "
        f"name {[m.name for m in SELECTION_METHODS]}."
    )


def group_trials(records: list[Record]) -> dict[tuple, list[Record]]:
    """Records by trial ``(trial_seed, dataset, algorithm, test_env)``, one key per test env."""
    groups: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        a = r["args"]
        for t in a["test_envs"]:
            groups[(a["trial_seed"], a["dataset"], a["algorithm"], t)].append(r)
    return dict(groups)


def selected_accuracies(
    records: list[Record], method: str | type[SelectionMethod]
) -> list[dict[str, Any]]:
    """One row per trial with a selected model: trial_seed, dataset, algorithm, test_env, acc.

    ``acc`` is the trial's test accuracy in [0, 1]; trials where the method finds no usable
    checkpoint (e.g. leave-one-out without the two-test-environment runs) are left out.
    """
    method = get_selection_method(method)
    rows = []
    for key, group in sorted(group_trials(records).items(), key=lambda kv: str(kv[0])):
        acc = method.sweep_acc(group)
        if acc is not None:
            trial_seed, dataset, algorithm, test_env = key
            rows.append({"trial_seed": trial_seed, "dataset": dataset, "algorithm": algorithm,
                         "test_env": test_env, "acc": acc})
    return rows
