"""Colored MNIST: the restarts of one algorithm trained at once, as one batched computation.

Restart r of :func:`fishr_lite.experiments.coloredmnist.train` has its own initial weights θ_r
(``make_model``), its own data (``environments(r, ...)``: shuffle, label noise and colours
seeded by r; the same sizes for every r) and the same everything else. Here the R models'
parameters are stacked along a leading restart dimension (``torch.func.stack_module_state``),
the R data sets likewise, and one step runs every restart with
``vmap(functional_call(RestartStep, θ_r, data_r))``, where :class:`RestartStep` is one
restart's loss written with the very functions ``train`` uses::

    loss_r = (R_r + l2 Σ ||θ_r||² + w(t) P_r) / max(w(t), 1)          (coloredmnist.total_loss)
    θ     <- Adam(θ, ∇_θ Σ_r loss_r)

Restarts share no parameter, so the gradient of Σ_r loss_r on restart r's slice is ∇ loss_r;
Adam is elementwise, so one Adam over the stacked tensors is R Adams, each with its own
moments (same learning rate, same step count). The result of each restart is shaped exactly
like ``train``'s (final metrics, ``steps``, ``history``), so its record is interchangeable
with a one-at-a-time record: same configuration, same key, same result fields; only the
provenance says ``"batched": {"restarts": [...], "wall_time_s": ...}`` and its
``wall_time_s`` is the batch's divided by R.

It equals ``train`` up to float32 rounding, not bit for bit: the matrix products run batched,
and inside ``torch.func`` the Fishr variance takes the plain formula
(``penalty.reference_variance``) where ``train`` takes the row-blocked one
(``tests/test_batched_restarts.py``, 12 steps at tiny sizes; over 501 steps such differences
can grow, as between a CPU and a GPU record of one configuration). A Fishr moving average (an
``ema`` in ``objective_options``, or DomainBed's convention) keeps state between steps and is
refused here, as is a diagnostics callback.

Command line (the options of ``python -m fishr_lite.experiments.coloredmnist``, plus
``--hidden-dim``)::

    python -m fishr_lite.experiments.coloredmnist_batched --algorithm erm --algorithm irm \\
        --algorithm vrex --algorithm fishr --profile paper --restarts 10 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import functools
import time
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from fishr_lite.cpu_memory import reuse_freed_memory
from fishr_lite.experiments import coloredmnist as cm
from fishr_lite.experiments import progress_bar
from fishr_lite.objectives import DomainBatch, FishrObjective, make_objective
from fishr_lite.profiles import default_device
from fishr_lite.results import ResultsCache

#: One environment's images and labels, shapes (n, 2, 14, 14) and (n,) for one restart, with
#: a leading restart dimension R where they are stacked.
ImagesAndLabels = tuple[Tensor, Tensor]


def check_batchable(configs: Sequence[cm.Config | dict]) -> list[cm.Config]:
    """The configurations as :class:`~fishr_lite.experiments.coloredmnist.Config` objects, if
    they differ only in ``restart`` (all distinct) and keep no state between steps; a
    ValueError saying why otherwise."""
    if len(configs) == 0:
        raise ValueError("no configurations given; pass one per restart to train together")
    if any(isinstance(c, dict) and "diagnostics" in c for c in configs):
        raise ValueError("diagnostics callbacks run one model at a time; use coloredmnist.train")
    configs = [cm.Config(**c) if isinstance(c, dict) else c for c in configs]
    shared = [{k: v for k, v in c.to_dict().items() if k != "restart"} for c in configs]
    if any(s != shared[0] for s in shared):
        differing = sorted(k for s in shared for k in s if s[k] != shared[0][k])
        raise ValueError(
            f"batched restarts must differ only in 'restart'; they differ in {differing}")
    restarts = [c.restart for c in configs]
    if len(set(restarts)) != len(restarts):
        raise ValueError(f"restarts {restarts} repeat; each restart is trained once")
    objective = cm.make_run_objective(configs[0], nn.Linear(1, 1, device="meta"))
    if getattr(objective, "moving_average", None) is not None:
        raise ValueError("a Fishr moving average keeps state between steps, which the batched "
                         "loop does not carry; train these runs with coloredmnist.train")
    return configs


@functools.lru_cache(maxsize=1)
def stacked_environments(restarts: tuple[int, ...], label_flip: float, fraction: float,
                         device: str) -> tuple[ImagesAndLabels, ...]:
    """The four environments of :func:`~fishr_lite.experiments.coloredmnist.environments` for
    each restart, stacked (cached: the algorithms of one sweep share their data)."""
    per_restart = [cm.environments(r, label_flip, fraction, device) for r in restarts]
    sizes = {tuple(len(env) for env in envs) for envs in per_restart}
    if len(sizes) != 1:  # colored_mnist's sizes do not depend on the seed; stacking needs it
        raise ValueError(f"restarts {restarts} have environments of different sizes {sizes}")
    return tuple((torch.stack([envs[e].images for envs in per_restart]),
                  torch.stack([envs[e].labels for envs in per_restart]))
                 for e in range(len(per_restart[0])))


def correct_fraction(logits: Tensor, labels: Tensor) -> Tensor:
    """:func:`~fishr_lite.experiments.coloredmnist.accuracy` as a tensor: mean of
    [(logit > 0) == label]."""
    return ((logits > 0).float() == labels).float().mean()


class RestartStep(nn.Module):
    """One restart's training step as a module, so that ``functional_call`` gives the restart's
    parameters to all of it: forward, penalty, weight norm and, at history steps, the row."""

    def __init__(self, config: cm.Config, model: cm.MLP) -> None:
        super().__init__()
        self.config, self.model = config, model
        self.objective = cm.make_run_objective(config, model.head)
        self.monitors = {f"{name}_penalty": make_objective(name, model.head, loss="bce",
                                                           **cm.SCRIPT_CONVENTION)
                         for name in cm.MONITORED_PENALTIES}

    def forward(self, step: int, record: bool, train_a: ImagesAndLabels,
                train_b: ImagesAndLabels, test: ImagesAndLabels,
                gray: ImagesAndLabels) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``(loss, penalty, row)`` as in ``train``'s loop; ``row`` is empty unless ``record``."""
        batches = [DomainBatch(*self.model(images), labels)
                   for images, labels in (train_a, train_b)]
        train_nll = self.objective.risks(batches).mean()
        penalty = self.objective.penalty(batches)
        loss = cm.total_loss(self.config, self.model, train_nll, penalty, step)
        if not record:
            return loss, penalty.detach(), {}
        with torch.no_grad():
            accuracies = [correct_fraction(b.logits, b.targets) for b in batches]
            row = {"train_nll": train_nll, "penalty": penalty, "train_acc": torch.stack(accuracies),
                   "test_acc": correct_fraction(self.model(test[0])[1], test[1]),
                   "gray_test_acc": correct_fraction(self.model(gray[0])[1], gray[1])}
        with torch.enable_grad():
            detached = [DomainBatch(b.features.detach(), b.logits.detach(), b.targets)
                        for b in batches]
            row.update({key: monitor.penalty(detached) for key, monitor in self.monitors.items()})
        return loss, penalty.detach(), {key: value.detach() for key, value in row.items()}


def restart_step(step_module: RestartStep, step: int, record: bool, theta: dict[str, Tensor],
                 *environments: ImagesAndLabels) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """``(loss, penalty, row)`` of one restart: ``step_module`` run on its parameters θ_r
    (what ``train_restarts`` vmaps over the restart dimension)."""
    parameters = {f"model.{name}": value for name, value in theta.items()}
    return functional_call(step_module, parameters, (step, record, *environments))


def history_rows(row: dict[str, Tensor], step: int) -> list[dict[str, float]]:
    """Per-restart history rows from the stacked row, with ``train``'s arithmetic (its train
    accuracy is the Python mean of the two environments' accuracies)."""
    values = {key: value.tolist() for key, value in row.items()}
    return [{"step": step, "train_nll": values["train_nll"][r],
             "train_acc": sum(values["train_acc"][r]) / len(values["train_acc"][r]),
             **{key: values[key][r] for key in values if key not in ("train_nll", "train_acc")}}
            for r in range(len(values["train_nll"]))]


def train_restarts(configs: Sequence[cm.Config | dict],
                   device: torch.device | str | None = None) -> list[dict[str, Any]]:
    """Train the restarts of ``configs`` together; one result per config, in order, shaped as
    :func:`~fishr_lite.experiments.coloredmnist.train`'s (see the module docstring)."""
    configs = check_batchable(configs)
    config = configs[0]
    device = torch.device(device) if device is not None else default_device()
    data = stacked_environments(tuple(c.restart for c in configs), config.label_flip,
                                config.fraction, str(device))
    models = [cm.make_model(c, device) for c in configs]
    params, _ = stack_module_state(models)  # leaves of shape (R, *parameter shape)
    step_module = RestartStep(config, copy.deepcopy(models[0]).to("meta"))
    optimizer = torch.optim.Adam(params.values(), lr=config.lr)
    checks_finite = isinstance(step_module.objective, FishrObjective)  # as train's Fishr does
    keys = ("step", "train_nll", "train_acc", "test_acc", "gray_test_acc", "penalty",
            *step_module.monitors)
    histories: list[dict[str, list]] = [{key: [] for key in keys} for _ in configs]

    for step in range(config.steps):
        record = step == config.steps - 1 or step % config.history_every == 0
        losses, penalties, row = vmap(functools.partial(restart_step, step_module, step, record))(
            params, *data)
        finite = torch.isfinite(penalties) if checks_finite else None
        if finite is not None and not bool(finite.all()):
            bad = [c.restart for c, ok in zip(configs, finite.tolist()) if not ok]
            raise ValueError(f"restarts {bad}: the Fishr penalty is NaN or Inf at step {step}; "
                             "lower the learning rate or check the inputs")
        if record:
            for history, values in zip(histories, history_rows(row, step)):
                for key in keys:
                    history[key].append(values[key])
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        optimizer.step()

    return [{**{key: history[key][-1] for key in keys if key != "step"},
             "steps": config.steps, "history": history} for history in histories]


def run_batched(
    algorithms: str | Sequence[str],
    *,
    profile: str | None = None,
    restarts: int | None = None,
    label_flip: float = 0.25,
    cache: ResultsCache | str | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    **overrides: Any,
) -> list[dict]:
    """:func:`~fishr_lite.experiments.coloredmnist.run` with the missing restarts of each
    algorithm trained together by :func:`train_restarts`; the same records, in the same order,
    in the same cache."""
    configs = cm.make_configs(algorithms, profile=profile, restarts=restarts,
                              label_flip=label_flip, **overrides)
    device = torch.device(device) if device is not None else default_device()
    cache = cm.as_cache(cache)
    records = {cache.key(c.to_dict()): cache.load(c.to_dict()) for c in configs}
    groups: dict[str, list[cm.Config]] = {}
    for c in configs:
        if records[cache.key(c.to_dict())] is None:
            groups.setdefault(c.algorithm, []).append(c)
    for group in progress_bar(list(groups.values()), enabled=progress,
                              desc="Colored MNIST (batched)", unit="algorithm"):
        start = time.perf_counter()
        results = train_restarts(group, device)
        wall_time = time.perf_counter() - start
        batched = {"batched": {"restarts": [c.restart for c in group],
                               "wall_time_s": round(wall_time, 3)}}
        for c, result in zip(group, results):
            records[cache.key(c.to_dict())] = cache.save(
                c.to_dict(), result, wall_time_s=wall_time / len(group), device=device,
                extra_provenance=batched)
    return [records[cache.key(c.to_dict())] for c in configs]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fishr_lite.experiments.coloredmnist_batched",
        description="Colored MNIST as python -m fishr_lite.experiments.coloredmnist, the "
        "restarts of each algorithm trained together (one batched computation).")
    parser.add_argument("--algorithm", action="append", choices=cm.ALGORITHMS, required=True,
                        help="repeat to run several algorithms (one batch each)")
    parser.add_argument("--profile", choices=tuple(cm.PROFILES), default=None,
                        help="default: $FISHR_PROFILE, else paper with CUDA, else quick")
    parser.add_argument("--restarts", type=int, default=None,
                        help="default: 10 (paper) or 2 (quick)")
    parser.add_argument("--label-flip", type=float, default=0.25)
    parser.add_argument("--out", default=None, help="results root; records go to OUT/coloredmnist/")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--steps", type=int, default=None, help="override the 501 steps")
    parser.add_argument("--fraction", type=float, default=None, help="override the data fraction")
    parser.add_argument("--hidden-dim", type=int, default=None, help="override the MLP width")
    args = parser.parse_args(argv)
    reuse_freed_memory()  # full-batch CPU steps: reuse large freed tensors (fishr_lite.cpu_memory)
    options = (("steps", args.steps), ("fraction", args.fraction), ("hidden_dim", args.hidden_dim))
    overrides = {key: value for key, value in options if value is not None}
    start = time.perf_counter()
    records = run_batched(list(dict.fromkeys(args.algorithm)), profile=args.profile,
                          restarts=args.restarts, label_flip=args.label_flip, cache=args.out,
                          device=args.device, **overrides)
    print(cm.format_table(cm.summarize(records)))
    print(f"{len(records)} records in {cm.as_cache(args.out).folder} "
          f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
