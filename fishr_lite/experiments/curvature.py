"""Curvature diagnostics tracked while Colored MNIST trains (chapter "Looking inside").

:func:`curvature_callback` makes a ``callback(step, model, environments)`` for
:func:`fishr_lite.experiments.coloredmnist.train`. It measures the two training domains
(colour flip 0.2 and 0.1, named ``NAMES``) with :mod:`fishr_lite.diagnostics` and returns
records ``{"step", "quantity", "domain", "value"}``, where ``domain`` is one of ``NAMES``
or ``PAIR`` (a comparison of the two). Its settings, ``DIAGNOSTICS``, are part of the
run's configuration (key ``"diagnostics"``), so a run with diagnostics has its own record.

What is recorded, for the head ω (the last Linear layer, the featurizer frozen) unless said
otherwise; every curvature is that of a domain's mean loss R_e:

- at every ``every``-th step, at the ``extra_steps`` (190: the last warm-up step) and at the
  last step (:func:`head_records`). For the pair: ``<name>_distance``, the relative Frobenius
  distance 2‖M_A − M_B‖ / (‖M_A‖ + ‖M_B‖) of the domains' ``grad_variance`` (Fishr's v_e, a
  diagonal), ``empirical_fisher``, ``fisher`` and ``hessian``; ``inconsistency``, the paper's
  score I^ε with ``epsilon`` and a damping δ = ``damping``; ``risk_gap`` = ``|R_0.2 − R_0.1|``;
  ``lambda_max``, the larger λ_max((H_A + δI)⁻¹ H_B) of the two ordered pairs; and
  ``fisher_hessian_max_diff``, the largest ``|F_e − H_e|`` entry (zero up to rounding: for a
  linear head and the logistic loss the Hessian is the Fisher). Per domain: ``risk``.
- at the ``network_steps`` (−1: the last step; :func:`network_records`), per domain, the
  ``top_k`` largest eigenvalues of the whole network's Hessian, ``network_eigenvalue_1``, ...,
  estimated by ``lanczos_steps`` Lanczos iterations.
- at the last step (:func:`final_records`), per domain, lists: ``grad_variance`` and
  ``grad_mean`` (D values, D = head size), ``hessian_diag`` (D), ``hessian`` and
  ``empirical_fisher`` (D × D), and the risk along the top two eigenvectors u₁, u₂ of the mean
  head Hessian: ``slice_1d``, R_e(ω + a u₁) at ``slice_points[0]`` values of a in [−r, r], and
  ``slice_2d``, R_e(ω + a u₁ + b u₂) on a grid of ``slice_points[1]`` values per axis
  (r = ``slice_radius``).

Command line: ERM and Fishr with diagnostics, one record per (algorithm, restart) under
``<out>/coloredmnist/``; runs already recorded are read back, not recomputed::

    python -m fishr_lite.experiments.curvature --profile paper --restarts 3 --out data/results
"""

from __future__ import annotations

import argparse
import functools
import math
import shlex
import time
from typing import Any, Callable, Sequence

import torch

from fishr_lite import diagnostics as dx
from fishr_lite.cpu_memory import reuse_freed_memory
from fishr_lite.diagnostics.functional import Domain, flat_parameters, mean_loss_function
from fishr_lite.experiments import coloredmnist as cm
from fishr_lite.experiments import progress_bar
from fishr_lite.experiments.summaries import require_pandas
from fishr_lite.profiles import default_device
from fishr_lite.results import ResultsCache

ALGORITHMS = ("erm", "fishr")
RESTARTS = 3
NAMES = ("e=0.2", "e=0.1")  # the two training domains (colour-flip rates)
PAIR = "e=0.2 vs e=0.1"
WARMUP = cm.Config(algorithm="erm").penalty_anneal_iters  # last step with penalty weight 1
DIAGNOSTICS: dict[str, Any] = {
    "version": 1, "every": 25, "extra_steps": [WARMUP],
    "epsilon": 0.1, "damping": 1e-3,  # inconsistency score: epsilon and delta
    "network_steps": [0, WARMUP, -1], "lanczos_steps": 15, "top_k": 2,
    "slice_radius": 3.0, "slice_points": [41, 21],  # 1-D and 2-D slices
}
HEAD_CURVATURES = ["grad_variance", "empirical_fisher", "fisher", "hessian"]


def head_curvatures(
    model: cm.MLP, domains: Sequence[Domain]
) -> tuple[dict[str, list[torch.Tensor]], list[dx.GradientMoments]]:
    """Per domain: v_e (diagonal), empirical and true Fisher, Hessian of the head."""
    args = (model.featurizer, model.head, domains)
    moments = dx.gradient_moments(*args, full=False)
    return {"grad_variance": [m.variance for m in moments],
            "empirical_fisher": dx.empirical_fisher(*args),
            "fisher": dx.fisher(*args), "hessian": dx.hessian(*args)}, moments


def head_records(step: int, model: cm.MLP, domains: Sequence[Domain],
                 settings: dict[str, Any]) -> list[dict]:
    """Distances between the domains' head curvatures, risks and the inconsistency score."""
    curv, _ = head_curvatures(model, domains)
    risks = dx.domain_risks(model.featurizer, model.head, domains)
    score = dx.inconsistency_score(risks, curv["hessian"], settings["epsilon"],
                                   damping=settings["damping"], names=NAMES)
    values = {f"{name}_distance": dx.relative_frobenius_distance(*curv[name])
              for name in HEAD_CURVATURES}
    values.update(
        inconsistency=score.value, risk_gap=float((risks[0] - risks[1]).abs()),
        lambda_max=max(row["lambda_max"] for row in score.pairs),
        fisher_hessian_max_diff=max(float((f - h).abs().max())
                                    for f, h in zip(curv["fisher"], curv["hessian"])))
    rows = [{"step": step, "quantity": q, "domain": PAIR, "value": v}
            for q, v in values.items()]
    return rows + [{"step": step, "quantity": "risk", "domain": name, "value": float(r)}
                   for name, r in zip(NAMES, risks)]


def final_records(step: int, model: cm.MLP, domains: Sequence[Domain],
                  settings: dict[str, Any]) -> list[dict]:
    """Per domain at the final weights: head diagonals and matrices, and loss slices."""
    curv, moments = head_curvatures(model, domains)
    _, vectors = torch.linalg.eigh(sum(curv["hessian"]) / len(domains))
    u1, u2 = vectors[:, -1], vectors[:, -2]
    theta = flat_parameters(model.head)
    radius, (n1, n2) = settings["slice_radius"], settings["slice_points"]
    line = torch.linspace(-radius, radius, n1)
    grid = torch.linspace(-radius, radius, n2)
    rows = []
    for e, (name, (x, y)) in enumerate(zip(NAMES, domains)):
        with torch.no_grad():
            risk = mean_loss_function(model.head, model.featurizer(x), y, "bce")
            values = {
                "grad_variance": moments[e].variance, "grad_mean": moments[e].mean,
                "hessian_diag": torch.diagonal(curv["hessian"][e]),
                "hessian": curv["hessian"][e],
                "empirical_fisher": curv["empirical_fisher"][e],
                "slice_1d": torch.stack([risk(theta + a * u1) for a in line]),
                "slice_2d": torch.stack([torch.stack([risk(theta + a * u1 + b * u2)
                                                      for b in grid]) for a in grid]),
            }
        rows += [{"step": step, "quantity": q, "domain": name, "value": v.tolist()}
                 for q, v in values.items()]
    return rows


def network_records(step: int, model: cm.MLP, domains: Sequence[Domain],
                    settings: dict[str, Any]) -> list[dict]:
    """Per domain, the top eigenvalues of the whole network's Hessian (Lanczos)."""
    tops = dx.top_eigenvalues(model.featurizer, model.head, domains,
                              k=settings["top_k"], iterations=settings["lanczos_steps"])
    return [{"step": step, "quantity": f"network_eigenvalue_{k + 1}", "domain": name,
             "value": float(value)}
            for name, top in zip(NAMES, tops) for k, value in enumerate(top)]


def curvature_callback(settings: dict[str, Any], steps: int) -> Callable[..., list[dict]]:
    """callback(step, model, environments) for cm.train: the records listed above."""
    last = steps - 1
    head_steps = {s for s in range(0, steps, settings["every"])} | {last}
    head_steps |= set(settings["extra_steps"])
    network_steps = {last if s == -1 else s for s in settings["network_steps"]}

    def callback(step, model, environments):
        domains = [(env.images, env.labels) for env in environments[:2]]
        rows = []
        if step in head_steps:
            rows += head_records(step, model, domains, settings)
        if step in network_steps:
            rows += network_records(step, model, domains, settings)
        if step == last:
            rows += final_records(step, model, domains, settings)
        return rows

    return callback


def train_with_diagnostics(config: dict[str, Any],
                           device: torch.device | str | None = None) -> dict[str, Any]:
    """:func:`~fishr_lite.experiments.coloredmnist.train` with the callback of
    ``config["diagnostics"]``; the result's ``"diagnostics"`` holds its records."""
    callback = curvature_callback(config["diagnostics"], config["steps"])
    return cm.train(config, device, callback=callback)


def make_configs(algorithms: Sequence[str] = ALGORITHMS, *, profile: str | None = None,
                 restarts: int = RESTARTS, only: Sequence[int] | None = None,
                 settings: dict[str, Any] | None = None, **overrides: Any) -> list[dict]:
    """The configurations (dicts with ``"diagnostics"``) of restarts ``0 .. restarts - 1``,
    or of the restart indices ``only``; ``profile`` and ``overrides`` as in
    :func:`fishr_lite.experiments.coloredmnist.make_configs`."""
    settings = DIAGNOSTICS if settings is None else settings
    count = restarts if only is None else max(restarts, max(only, default=-1) + 1)
    configs = cm.make_configs(algorithms, profile=profile, restarts=count, **overrides)
    return [{**c.to_dict(), "diagnostics": settings} for c in configs
            if only is None or c.restart in only]


def run(algorithms: Sequence[str] = ALGORITHMS, *, cache: ResultsCache | str | None = None,
        device: torch.device | str | None = None, progress: bool | None = None,
        **options: Any) -> list[dict]:
    """Run (or read back) the runs of :func:`make_configs` (``**options``); their records."""
    device = torch.device(device) if device is not None else default_device()
    bar = functools.partial(progress_bar, enabled=progress, desc="runs", unit="run")
    return cm.as_cache(cache).run_all(
        make_configs(algorithms, **options),
        functools.partial(train_with_diagnostics, device=device), device=device, progress=bar)


def stored_records(algorithms: Sequence[str] = ALGORITHMS, *,
                   cache: ResultsCache | str | None = None,
                   **options: Any) -> tuple[list[dict], list[dict]]:
    """``(records, missing)``: the stored records of :func:`make_configs` (``**options``),
    and the configurations that have none. Never trains."""
    cache = cm.as_cache(cache)
    records, missing = [], []
    for config in make_configs(algorithms, **options):
        record = cache.load(config)
        if record is None:
            missing.append(config)
        else:
            records.append(record)
    return records, missing


def command(profile: str = "paper", restarts: int = RESTARTS, out: str = "data/results") -> str:
    """The command line that runs (or resumes) the ERM and Fishr runs with diagnostics."""
    return shlex.join(["python", "-m", "fishr_lite.experiments.curvature", "--profile", profile,
                       "--restarts", str(restarts), "--out", out])


def frames(records: Sequence[dict]) -> tuple["pandas.DataFrame", "pandas.DataFrame"]:
    """``(scalars, arrays)``: the records' diagnostics as two pandas DataFrames, one row per
    diagnostic record (``step``, ``quantity``, ``domain``, ``value``) with the run's
    ``algorithm`` and ``restart``; ``arrays`` holds the list values."""
    pd = require_pandas()
    rows = [{**row, "algorithm": r["config"]["algorithm"], "restart": r["config"]["restart"]}
            for r in records for row in r["result"]["diagnostics"]]
    scalar = [isinstance(row["value"], float) for row in rows]
    return (pd.DataFrame([r for r, s in zip(rows, scalar) if s]),
            pd.DataFrame([r for r, s in zip(rows, scalar) if not s]))


FINAL = ["grad_variance_distance", "empirical_fisher_distance", "hessian_distance",
         "risk_gap", "inconsistency"]


def final_table(records: Sequence[dict]) -> "pandas.DataFrame":
    """One row per (algorithm, restart): test accuracy (%); at the last step the head
    distances, risk gap and inconsistency score of ``FINAL``, and ``network_gap``, the
    relative gap 2|λ_A − λ_B| / (λ_A + λ_B) of the domains' top whole-network eigenvalues;
    ``hessian_distance_warmup``, the head-Hessian distance at the last warm-up step (NaN when
    a quantity was not measured)."""
    pd = require_pandas()
    rows = {}
    for r in records:
        values = {(d["step"], d["quantity"], d["domain"]): d["value"]
                  for d in r["result"]["diagnostics"] if isinstance(d["value"], float)}
        last = r["config"]["steps"] - 1
        row = {"test_acc": 100 * r["result"]["test_acc"]}
        row.update({q: values.get((last, q, PAIR), math.nan) for q in FINAL})
        a, b = (values.get((last, "network_eigenvalue_1", n), math.nan) for n in NAMES)
        row["network_gap"] = 2 * abs(a - b) / (a + b)
        warmup = r["config"]["penalty_anneal_iters"]
        row["hessian_distance_warmup"] = values.get((warmup, "hessian_distance", PAIR), math.nan)
        rows[(r["config"]["algorithm"], r["config"]["restart"])] = row
    if not rows:
        return pd.DataFrame(columns=["test_acc", *FINAL, "network_gap",
                                     "hessian_distance_warmup"])
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.names = ["algorithm", "restart"]
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: runs or reads back each run, prints accuracies and final diagnostics."""
    parser = argparse.ArgumentParser(
        prog="python -m fishr_lite.experiments.curvature",
        description="Colored MNIST with the curvature diagnostics of the chapter 'Looking "
        "inside': one record per (algorithm, restart); stored runs are read back.")
    parser.add_argument("--algorithm", action="append", choices=cm.ALGORITHMS,
                        help="repeat for several (default: erm and fishr)")
    parser.add_argument("--profile", choices=tuple(cm.PROFILES), default=None,
                        help="default: $FISHR_PROFILE, else paper with CUDA, else quick")
    parser.add_argument("--restarts", type=int, default=RESTARTS,
                        help=f"restarts 0 .. RESTARTS-1 (default {RESTARTS})")
    parser.add_argument("--restart", type=int, action="append", default=None,
                        help="run only this restart index (repeat for several)")
    parser.add_argument("--out", default=None,
                        help="results root; records go to OUT/coloredmnist/ (default: "
                        "$FISHR_RESULTS_DIR, else the repository's data/results)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=None, help="override the 501 steps")
    parser.add_argument("--fraction", type=float, default=None,
                        help="override the profile's fraction of the data")
    parser.add_argument("--hidden-dim", type=int, default=None,
                        help="override the profile's hidden width")
    args = parser.parse_args(argv)
    reuse_freed_memory()  # full-batch CPU steps: reuse large freed tensors (fishr_lite.cpu_memory)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    overrides = {key: value for key, value in (("steps", args.steps), ("fraction", args.fraction),
                                               ("hidden_dim", args.hidden_dim))
                 if value is not None}
    options = dict(profile=args.profile, restarts=args.restarts, only=args.restart, **overrides)
    algorithms = list(dict.fromkeys(args.algorithm or ALGORITHMS))
    cache = cm.as_cache(args.out)
    _, missing = stored_records(algorithms, cache=cache, **options)
    start = time.perf_counter()
    records = run(algorithms, cache=cache, device=args.device, **options)
    plain = [{**r, "config": {k: v for k, v in r["config"].items() if k != "diagnostics"}}
             for r in records]
    print(cm.format_table(cm.summarize(plain)))
    print(final_table(records).round(3).to_string())
    print(f"{len(records)} records in {cache.folder}, {len(missing)} trained "
          f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
