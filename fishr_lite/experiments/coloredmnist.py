"""Colored MNIST in the IRM setup, exactly as the official Fishr script trains it (Table 2).

Recipe of ``coloredmnist/train_coloredmnist.py`` (github.com/alexrame/fishr), itself the IRM
script (Arjovsky et al., 2019) plus the Fishr penalty:

- model: MLP 392 -> 390 -> 390 -> 1 with ReLU, Xavier-uniform weights and zero biases, on the
  flattened 2x14x14 image; the last Linear layer is the *head* ω that Fishr penalizes;
- full batch: every step sees all of both training environments (e = 0.2 and e = 0.1);
- Adam, lr = 0.0004898536566546834, created once (no reset when the penalty weight jumps);
- loss = mean_e R_e + l2 · Σ_θ ||θ||² + w(t) · penalty, with l2 = 0.00110794568 over *all*
  parameters (the script's weight norm loops over ``mlp.parameters()``, biases included);
  w(t) = 1 for t < 190, then 91257.18613115903, and the whole loss is divided by w(t) when
  w(t) > 1; ERM has no penalty and is never divided;
- 501 steps; the reported accuracies (train = mean over the two training environments, test
  e = 0.9, grayscale test) are those of the model at the last step, before its update.

Every algorithm is an objective of :func:`fishr_lite.objectives.make_objective` in the
script's convention (``convention="colored_mnist"``): IRM's squared gradient on each domain's
whole batch, V-REx's (R_0 - R_1)^2, and Fishr's gradients of the mean loss times the batch size,
no moving average, squared L2 summed over coordinates and over the two domains, on the head
only. The weight w(t) is :func:`fishr_lite.training.colored_mnist_schedule`.

Seeding: the script seeds once (seed 0) and lets its restarts draw from one continuing random
stream; here restart r seeds its own data (``colored_mnist(seed=r)``) and its own model
initialisation (``torch.manual_seed(r)`` inside a forked RNG), so every record can be
recomputed alone, on any machine, and a sweep can be resumed.

Profiles (``FISHR_PROFILE`` or ``--profile``; 501 steps and the penalty schedule in both):

- ``paper``: the script's settings: all the data (25,000 images per training environment,
  10,000 per test environment), hidden width 390, 10 restarts.
- ``quick``: a fifth of each environment (``fraction=0.2``: 5,000 + 5,000 training images)
  and hidden width 64 instead of 390, 2 restarts; the script's recipe otherwise. Why, with
  the measurements behind the choice: ``fishr_lite/experiments/README.md``.

Command line::

    python -m fishr_lite.experiments.coloredmnist --algorithm erm --algorithm fishr \\
        --profile quick --restarts 2 --label-flip 0.25 --out data/results

prints mean ± std over restarts and writes one record per (algorithm, restart) under
``<out>/coloredmnist/``; runs already recorded are read back, not recomputed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from fishr_lite.cpu_memory import reuse_freed_memory
from fishr_lite.data import Environment, colored_mnist
from fishr_lite.experiments import progress_bar
from fishr_lite.experiments.summaries import METRICS, format_table, histories, summarize  # noqa: F401
from fishr_lite.linear_relu import linear_relu
from fishr_lite.objectives import DomainBatch, FishrObjective, Objective, make_objective
from fishr_lite.profiles import current_profile, default_device
from fishr_lite.results import ResultsCache
from fishr_lite.training import PenaltySchedule, colored_mnist_schedule

EXPERIMENT = "coloredmnist"
ALGORITHMS = ("erm", "irm", "vrex", "fishr", "fishr-notcentered", "fishr-fullcov")
PROFILES: dict[str, dict[str, Any]] = {
    "paper": {"fraction": 1.0, "restarts": 10},
    "quick": {"fraction": 0.2, "hidden_dim": 64, "restarts": 2},
}
#: Options that make IRM, V-REx and the Fishr variants follow the Colored MNIST script.
SCRIPT_CONVENTION: dict[str, Any] = {"convention": "colored_mnist"}
#: Penalties recorded in every history, whatever the algorithm trains (as the script prints).
MONITORED_PENALTIES: tuple[str, ...] = ("fishr", "vrex", "irm")


@dataclass
class Config:
    """Everything that defines one run; its JSON form is hashed into the record's key."""

    algorithm: str
    restart: int = 0
    label_flip: float = 0.25
    fraction: float = 1.0
    steps: int = 501
    hidden_dim: int = 390
    lr: float = 0.0004898536566546834
    l2_weight: float = 0.00110794568
    penalty_weight: float = 91257.18613115903
    penalty_anneal_iters: int = 190
    history_every: int = 10
    objective_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(
                f"unknown algorithm {self.algorithm!r}; choose one of {ALGORITHMS}"
            )
        if self.steps < 1 or self.history_every < 1:
            raise ValueError(
                f"steps={self.steps} and history_every={self.history_every} must be >= 1"
            )
        if self.restart < 0:
            raise ValueError(f"restart={self.restart} must be >= 0 (it seeds the run)")
        if self.hidden_dim < 1:
            raise ValueError(f"hidden_dim={self.hidden_dim} must be >= 1 (390 in the paper)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class MLP(nn.Module):
    """features = ReLU(W2 ReLU(W1 x + b1) + b2), logits = head(features) = w3·features + b3."""

    def __init__(self, hidden_dim: int = 390, input_dim: int = 2 * 14 * 14):
        super().__init__()
        self.featurizer = nn.Sequential(
            nn.Flatten(),
            nn.Linear(input_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(hidden_dim, 1)
        for layer in [*self.featurizer, self.head]:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``self.featurizer(images)``, each Linear + ReLU pair as one :func:`.linear_relu`
        (one fused kernel per layer on a CPU; the same values up to float32 rounding)."""
        _, first, _, second, _ = self.featurizer
        hidden = linear_relu(images.flatten(1), first.weight, first.bias)
        return linear_relu(hidden, second.weight, second.bias)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(features, logits)``; logits have shape (n,)."""
        features = self.features(images)
        return features, self.head(features).squeeze(-1)


def make_model(config: Config, device: torch.device | str = "cpu") -> MLP:
    """The MLP of restart ``config.restart``, initialised from its own seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.restart)
        model = MLP(config.hidden_dim)
    return model.to(device)


def make_run_objective(config: Config, head: nn.Module) -> Objective:
    """The algorithm's objective on ``head``, its penalty in the script's convention."""
    options = {**SCRIPT_CONVENTION, **config.objective_options}
    return make_objective(config.algorithm, head, loss="bce", **options)


@functools.lru_cache(maxsize=2)
def environments(
    restart: int, label_flip: float, fraction: float, device: str
) -> tuple[Environment, ...]:
    """The four environments of a restart (cached: consecutive runs share their data)."""
    return tuple(colored_mnist(seed=restart, label_flip=label_flip, fraction=fraction,
                               device=device))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples where (logit > 0) equals the binary label."""
    return ((logits > 0).float() == labels).float().mean().item()


def penalty_schedule(config: Config) -> PenaltySchedule:
    """w(t) = 1 before ``penalty_anneal_iters``, then ``penalty_weight``, the loss divided by
    w(t) when it exceeds 1 (the script's); always 0 for ERM."""
    if config.algorithm == "erm":
        return PenaltySchedule(weight=0.0)
    return colored_mnist_schedule(config.penalty_weight, config.penalty_anneal_iters)


def total_loss(config: Config, model: nn.Module, train_nll: torch.Tensor,
               penalty: torch.Tensor, step: int) -> torch.Tensor:
    """(R + l2 · Σ_θ ||θ||² + w · penalty) / max(w, 1), with w = w(step), all parameters in
    the norm (biases included, as the script) and no penalty nor division for ERM."""
    weight_norm = sum(p.pow(2).sum() for p in model.parameters())
    loss = train_nll + config.l2_weight * weight_norm
    return penalty_schedule(config).combine(loss, penalty, step)


def training_batches(model: MLP, objective: Objective, domains: Sequence[tuple[torch.Tensor, torch.Tensor]]
                     ) -> tuple[list[DomainBatch], torch.Tensor | None]:
    """The step's batches for ``(images, labels)`` of each domain, and Fishr's penalty (None for
    the other objectives, whose penalty the loop computes after the risks). Fishr applies the
    head itself, with its variances in one autograd node per domain (``fishr_lite.fused_head``:
    the same values up to float rounding)."""
    if isinstance(objective, FishrObjective):
        features = [model.features(x) for x, _ in domains]
        logits, penalty = objective.logits_and_penalty(features, [y for _, y in domains])
        return [DomainBatch(z, s.squeeze(-1), y) for z, s, (_, y) in zip(features, logits, domains)], penalty
    return [DomainBatch(*model(x), y) for x, y in domains], None


def train(
    config: Config | dict,
    device: torch.device | str | None = None,
    callback: Callable[[int, nn.Module, tuple[Environment, ...]], Any] | None = None,
) -> dict[str, Any]:
    """Train one run of ``config``; return its final metrics and its history.

    The history holds, every ``history_every`` steps and at the last one: ``step``,
    ``train_nll``, ``train_acc``, ``test_acc``, ``gray_test_acc``, ``penalty`` (the trained
    algorithm's, before weighting; 0 for ERM) and, for every algorithm, ``fishr_penalty``,
    ``vrex_penalty`` and ``irm_penalty`` in the script's convention.

    ``callback(step, model, environments)``, if given, is called at *every* step with the
    model of that step before its update and the four environments (train e=0.2, train
    e=0.1, test, gray); it picks its own steps and returns a list of JSON-able records, or
    None. The records, in order, are the result's ``"diagnostics"``. It runs in a forked
    random state, and any ``.grad`` it leaves is cleared, so training is unchanged. To cache
    such runs, describe the callback in the config dict under the key ``"diagnostics"`` (any
    JSON; train ignores its value, the :class:`.ResultsCache` hashes it, so a run with
    diagnostics never shares a record with one without); a ``"diagnostics"`` entry without a
    callback is refused.
    """
    if isinstance(config, dict):
        config = dict(config)
        settings = config.pop("diagnostics", None)
        if settings is not None and callback is None:
            raise ValueError(
                f"the config asks for diagnostics {settings!r} but no callback computes them; "
                "pass train(config, callback=...) or drop the 'diagnostics' key"
            )
        config = Config(**config)
    if callback is not None and not callable(callback):
        raise ValueError(f"callback={callback!r} is not callable; pass a function "
                         "callback(step, model, environments) -> list of records or None")
    device = torch.device(device) if device is not None else default_device()
    train_a, train_b, test, gray = environments(
        config.restart, config.label_flip, config.fraction, str(device)
    )
    model = make_model(config, device)
    objective = make_run_objective(config, model.head)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    monitors = {f"{name}_penalty": make_objective(name, model.head, loss="bce", **SCRIPT_CONVENTION)
                for name in MONITORED_PENALTIES}
    history: dict[str, list] = {key: [] for key in (
        "step", "train_nll", "train_acc", "test_acc", "gray_test_acc", "penalty", *monitors)}
    diagnostics: list = []

    training_domains = [(env.images, env.labels) for env in (train_a, train_b)]
    for step in range(config.steps):
        batches, penalty = training_batches(model, objective, training_domains)
        train_nll = objective.risks(batches).mean()
        penalty = objective.penalty(batches) if penalty is None else penalty
        loss = total_loss(config, model, train_nll, penalty, step)

        last = step == config.steps - 1
        if last or step % config.history_every == 0:
            with torch.no_grad():  # the model of this step, before its update, as the script
                train_acc = sum(accuracy(b.logits, b.targets) for b in batches) / len(batches)
                row = {
                    "step": step,
                    "train_nll": train_nll.item(),
                    "train_acc": train_acc,
                    "test_acc": accuracy(model(test.images)[1], test.labels),
                    "gray_test_acc": accuracy(model(gray.images)[1], gray.labels),
                    "penalty": float(penalty.detach()),
                }
            with torch.enable_grad():  # the script prints all three penalties, whatever it trains
                detached = [DomainBatch(b.features.detach(), b.logits.detach(), b.targets)
                            for b in batches]
                row.update({key: float(monitor.penalty(detached).detach())
                            for key, monitor in monitors.items()})
            for key, value in row.items():
                history[key].append(value)

        if callback is not None:
            with torch.random.fork_rng(devices=[]):
                diagnostics.extend(callback(step, model, (train_a, train_b, test, gray)) or [])

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    final = {key: history[key][-1] for key in history if key != "step"}
    result = {**final, "steps": config.steps, "history": history}
    if callback is not None:
        result["diagnostics"] = diagnostics
    return result


def make_configs(
    algorithms: str | Sequence[str],
    *,
    profile: str | None = None,
    restarts: int | None = None,
    label_flip: float = 0.25,
    **overrides: Any,
) -> list[Config]:
    """The configurations of a sweep, restart-major (consecutive runs share their data).

    ``profile`` (default: :func:`fishr_lite.profiles.current_profile`) sets ``fraction`` and the
    default number of restarts; ``overrides`` set any other :class:`Config` field.
    """
    algorithms = [algorithms] if isinstance(algorithms, str) else list(algorithms)
    profile = profile or current_profile()
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {tuple(PROFILES)}")
    settings = {key: value for key, value in PROFILES[profile].items() if key != "restarts"}
    settings.update(overrides)
    restarts = PROFILES[profile]["restarts"] if restarts is None else restarts
    if restarts < 1:
        raise ValueError(f"restarts={restarts} must be >= 1")
    return [
        Config(algorithm=algorithm, restart=restart, label_flip=label_flip, **settings)
        for restart in range(restarts)
        for algorithm in algorithms
    ]


def as_cache(cache: ResultsCache | str | None) -> ResultsCache:
    """A :class:`.ResultsCache` for this experiment from a cache, a root folder or None."""
    if isinstance(cache, ResultsCache):
        if cache.experiment != EXPERIMENT:
            raise ValueError(
                f"cache is for experiment {cache.experiment!r}; pass "
                f"ResultsCache({EXPERIMENT!r}, root) or just the root folder"
            )
        return cache
    return ResultsCache(EXPERIMENT, cache)


def run(
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
    """Run (or read back) every (algorithm, restart) of a sweep; returns their records.

    ``cache`` is a :class:`.ResultsCache`, a root folder, or None for the default root
    (``$FISHR_RESULTS_DIR`` or the repository's ``data/results``). Records already stored are
    returned without training, so an interrupted sweep resumes where it stopped.
    """
    configs = [c.to_dict() for c in make_configs(
        algorithms, profile=profile, restarts=restarts, label_flip=label_flip, **overrides)]
    device = torch.device(device) if device is not None else default_device()
    bar = functools.partial(progress_bar, enabled=progress, desc="Colored MNIST", unit="run")
    return as_cache(cache).run_all(
        configs, functools.partial(train, device=device), device=device, progress=bar
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fishr_lite.experiments.coloredmnist",
        description="Colored MNIST (IRM setup) as in the official Fishr script; prints mean ± "
        "std over restarts and stores one record per (algorithm, restart).",
    )
    parser.add_argument("--algorithm", action="append", choices=ALGORITHMS, required=True,
                        help="repeat to run several algorithms")
    parser.add_argument("--profile", choices=tuple(PROFILES), default=None,
                        help="default: $FISHR_PROFILE, else paper with CUDA, else quick")
    parser.add_argument("--restarts", type=int, default=None,
                        help="default: 10 (paper) or 2 (quick)")
    parser.add_argument("--label-flip", type=float, default=0.25)
    parser.add_argument("--out", default=None,
                        help="results root; records go to OUT/coloredmnist/ (default: "
                        "$FISHR_RESULTS_DIR, else the repository's data/results)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--steps", type=int, default=None, help="override the 501 steps")
    parser.add_argument("--fraction", type=float, default=None,
                        help="override the profile's fraction of the data")
    args = parser.parse_args(argv)
    reuse_freed_memory()  # full-batch CPU steps: reuse large freed tensors (fishr_lite.cpu_memory)
    overrides = {key: value for key, value in
                 (("steps", args.steps), ("fraction", args.fraction)) if value is not None}
    algorithms = list(dict.fromkeys(args.algorithm))
    start = time.perf_counter()
    records = run(algorithms, profile=args.profile, restarts=args.restarts,
                  label_flip=args.label_flip, cache=args.out, device=args.device, **overrides)
    print(format_table(summarize(records)))
    print(f"{len(records)} records in {as_cache(args.out).folder} "
          f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
