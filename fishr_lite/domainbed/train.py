"""One DomainBed run: train on the training environments, write ``results.jsonl`` and ``done``.

As DomainBed's ``scripts/train.py``: hyperparameters from :func:`.hparams.run_hparams` (then
overridden by ``args["hparams"]``, a JSON string), everything seeded by ``args["seed"]``, each
environment split in/out by the trial (:func:`.splits.in_out_splits`), minibatches drawn with
replacement from each training environment's *in* split, and every ``checkpoint_freq`` steps
(and at the last step) one JSON line with ``step``, ``epoch`` (step / steps per epoch of the
smallest in split), the means since the last checkpoint of ``update``'s values (``loss``, ...)
and of ``step_time``, ``env{i}_in_acc`` and ``env{i}_out_acc`` for every environment,
``mem_gb`` (peak CUDA memory; 0 on CPU), ``hparams`` and ``args``. Each line is flushed and
fsynced as it is written; ``done`` is written last. DomainBed's readers and ours read the file.

A run does not resume mid-way: started again without ``done``, it discards its partial
``results.jsonl`` and starts over. While it trains it holds an exclusive lock (``flock``) on
``.running`` in its folder; the operating system drops the lock when the process dies, even
by ``kill -9``, so :func:`is_running` tells a run in progress from one that was killed (the
sweep relaunches the latter), and a second process cannot train the same run at once. ::

    python -m fishr_lite.domainbed.train --dataset ColoredMNIST --algorithm Fishr \
        --test_envs 2 --steps 1000 --output_dir out/run0

The command line takes DomainBed's flags (``--data_dir --dataset --algorithm --task --hparams
--hparams_seed --trial_seed --seed --steps --checkpoint_freq --test_envs --output_dir
--holdout_fraction --uda_holdout_fraction --skip_model_save --save_model_every_checkpoint``),
plus ``--max_per_env`` (the first images of each environment only). As in DomainBed, it saves
``model.pkl`` at the end unless ``--skip_model_save`` (:func:`train` called from Python, as
sweeps do, skips it unless ``skip_model_save=False``), and ``model_step{step}.pkl`` at every
checkpoint with ``--save_model_every_checkpoint``. The hyperparameter ``class_balanced`` draws
each domain's minibatches with weights 1 / (n_classes * count of the sample's class), as
DomainBed. Domain adaptation (``--task domain_adaptation``, ``--uda_holdout_fraction``) is not
implemented: asking for it is an error, as is any argument :func:`train` does not know.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset, TensorDataset, WeightedRandomSampler

from .algorithms import get_algorithm_class
from .datasets import get_dataset
from .hparams import parse_overrides, run_hparams
from .splits import in_out_splits

DEFAULT_ARGS: dict[str, Any] = {
    "dataset": "ColoredMNIST", "algorithm": "ERM", "task": "domain_generalization",
    "hparams": None, "hparams_seed": 0, "trial_seed": 0, "seed": 0, "steps": None,
    "checkpoint_freq": None, "test_envs": [0], "output_dir": "train_output",
    "holdout_fraction": 0.2, "uda_holdout_fraction": 0, "skip_model_save": True,
    "save_model_every_checkpoint": False, "data_dir": None, "max_per_env": None,
}


def _tensors(split: Subset) -> Optional[tuple[torch.Tensor, ...]]:
    """The split's tensors when it is a subset of a TensorDataset (fast path), else None."""
    if isinstance(split.dataset, TensorDataset):
        index = torch.as_tensor(split.indices, dtype=torch.long)
        return tuple(t[index] for t in split.dataset.tensors)
    return None


def class_balanced_weights(split: Dataset) -> torch.Tensor:
    """w_i = 1 / (n_classes * count of y_i), DomainBed's ``make_weights_for_balanced_classes``."""
    tensors = _tensors(split) if isinstance(split, Subset) else None
    labels = tensors[1] if tensors is not None else torch.as_tensor([int(y) for _, y in split])
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    return 1.0 / (counts[inverse].double() * len(classes))


def infinite_minibatches(split: Dataset, batch_size: int, generator: torch.Generator,
                         num_workers: int = 0, weights: Optional[torch.Tensor] = None
                         ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless minibatches drawn with replacement (DomainBed's InfiniteDataLoader): uniformly,
    or with probabilities proportional to ``weights``."""
    tensors = _tensors(split) if isinstance(split, Subset) else None
    if tensors is not None:
        while True:
            if weights is None:
                index = torch.randint(len(tensors[0]), (batch_size,), generator=generator)
            else:
                index = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
            yield tensors[0][index], tensors[1][index]
    sampler = (RandomSampler(split, replacement=True, num_samples=10**9, generator=generator)
               if weights is None else
               WeightedRandomSampler(weights, num_samples=10**9, replacement=True, generator=generator))
    yield from DataLoader(split, batch_size=batch_size, sampler=sampler, num_workers=num_workers)


@torch.no_grad()
def accuracy(algorithm: torch.nn.Module, split: Dataset, device: torch.device, batch_size: int = 1024) -> float:
    """Fraction of correct predictions: argmax of the logits (sign of a single logit)."""
    algorithm.eval()
    tensors = _tensors(split) if isinstance(split, Subset) else None
    loader = ([(tensors[0][i:i + batch_size], tensors[1][i:i + batch_size])
               for i in range(0, len(tensors[0]), batch_size)] if tensors is not None
              else DataLoader(split, batch_size=64))
    correct = total = 0
    for x, y in loader:
        p = algorithm.predict(x.to(device))
        y = y.to(device)
        hits = p.gt(0).squeeze(1).long().eq(y) if p.size(1) == 1 else p.argmax(1).eq(y)
        correct += int(hits.sum())
        total += len(y)
    algorithm.train()
    return correct / total


def check_args(args: dict[str, Any]) -> None:
    """Reject arguments :func:`train` does not know or does not implement, saying which."""
    unknown = sorted(set(args) - set(DEFAULT_ARGS))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown}; train() takes {sorted(DEFAULT_ARGS)}.")
    if args.get("task", "domain_generalization") != "domain_generalization":
        raise ValueError(f"task={args['task']!r} is not implemented in fishr_lite (domain "
                         "adaptation); use task='domain_generalization'.")
    if args.get("uda_holdout_fraction") not in (None, 0, 0.0):
        raise ValueError("uda_holdout_fraction is for domain adaptation, which fishr_lite does not "
                         "implement; leave it at 0.")
    if args.get("hparams"):
        parse_overrides(args["hparams"])


def _save_model(path: Path, args: dict, algorithm: torch.nn.Module, dataset: Any, hparams: dict) -> None:
    """DomainBed's ``save_checkpoint``: arguments, model shape and hyperparameters, state dict."""
    torch.save({"args": args, "model_input_shape": dataset.input_shape,
                "model_num_classes": dataset.num_classes,
                "model_num_domains": len(dataset) - len(args["test_envs"]),
                "model_hparams": hparams, "model_dict": algorithm.state_dict()}, path)


LOCK_FILE = ".running"


def _flock(f: Any) -> bool:
    """Take an exclusive non-blocking lock on the open file ``f``; False if another holds it.
    Where ``fcntl`` does not exist (Windows), no lock is taken and True is returned."""
    try:
        import fcntl
    except ImportError:
        return True
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def is_running(output_dir: str | os.PathLike) -> bool:
    """True if a live process is training the run in ``output_dir`` (it holds the lock)."""
    try:
        with open(Path(output_dir) / LOCK_FILE) as f:
            return not _flock(f)  # closing the file releases a lock we took
    except OSError:
        return False


@contextlib.contextmanager
def _run_lock(out: Path) -> Iterator[None]:
    """Hold the run's lock while training; remove the lock file afterwards."""
    with open(out / LOCK_FILE, "a") as f:
        if not _flock(f):
            raise RuntimeError(f"another process is training the run in {str(out)!r} (it holds "
                               f"{LOCK_FILE}); wait for it, or kill it and start again.")
        try:
            yield
        finally:
            (out / LOCK_FILE).unlink(missing_ok=True)


def train(args: dict[str, Any]) -> Path:
    """Run one training job described by DomainBed-style ``args``; returns its output folder."""
    check_args(args)
    args = {**DEFAULT_ARGS, **args}
    args["test_envs"] = [int(t) for t in args["test_envs"]]
    out = Path(args["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    if (out / "done").exists():
        return out
    with _run_lock(out):
        if not (out / "done").exists():  # another process may have finished it meanwhile
            _train(args, out)
    return out


def _train(args: dict[str, Any], out: Path) -> None:
    """The body of :func:`train`, run under the run's lock."""
    results_path = out / "results.jsonl"
    results_path.unlink(missing_ok=True)  # a partial run starts over

    hparams = run_hparams(args["algorithm"], args["dataset"], args["hparams_seed"], args["trial_seed"])
    if args["hparams"]:
        hparams.update(parse_overrides(args["hparams"]))
    random.seed(args["seed"])
    np.random.seed(args["seed"] % 2**32)
    torch.manual_seed(args["seed"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    dataset = get_dataset(args["dataset"], data_dir=args["data_dir"], seed=args["seed"],
                          test_envs=args["test_envs"], hparams=hparams, max_per_env=args["max_per_env"])
    if any(not 0 <= t < len(dataset) for t in args["test_envs"]):
        raise ValueError(f"test_envs={args['test_envs']} but {args['dataset']} has environments "
                         f"0..{len(dataset) - 1}; pick test environments among them.")
    ins, outs = in_out_splits(dataset.datasets, args["trial_seed"], args["holdout_fraction"])
    generator = torch.Generator().manual_seed(args["seed"])
    balanced = bool(hparams.get("class_balanced", False))
    train_iters = [infinite_minibatches(s, hparams["batch_size"], generator,
                                        weights=class_balanced_weights(s) if balanced else None)
                   for i, s in enumerate(ins) if i not in args["test_envs"]]
    algorithm = get_algorithm_class(args["algorithm"])(
        dataset.input_shape, dataset.num_classes, len(dataset) - len(args["test_envs"]), hparams
    ).to(device)

    steps = args["steps"] or dataset.N_STEPS
    checkpoint_freq = args["checkpoint_freq"] or dataset.CHECKPOINT_FREQ
    steps_per_epoch = min(len(s) / hparams["batch_size"] for s in ins)
    values: dict[str, list[float]] = collections.defaultdict(list)
    with open(results_path, "a", encoding="utf-8") as f:
        for step in range(steps):
            start = time.time()
            minibatches = [(x.to(device), y.to(device)) for x, y in (next(it) for it in train_iters)]
            for key, value in algorithm.update(minibatches).items():
                values[key].append(value)
            values["step_time"].append(time.time() - start)
            if step % checkpoint_freq == 0 or step == steps - 1:
                record: dict[str, Any] = {"step": step, "epoch": step / steps_per_epoch}
                record.update({k: float(np.mean(v)) for k, v in values.items()})
                for i, (in_, out_) in enumerate(zip(ins, outs)):
                    record[f"env{i}_in_acc"] = accuracy(algorithm, in_, device)
                    record[f"env{i}_out_acc"] = accuracy(algorithm, out_, device)
                record["mem_gb"] = (torch.cuda.max_memory_allocated() / 1024**3
                                    if torch.cuda.is_available() else 0.0)
                record.update({"hparams": hparams, "args": args})
                f.write(json.dumps(record, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
                values = collections.defaultdict(list)
                if args["save_model_every_checkpoint"]:
                    _save_model(out / f"model_step{step}.pkl", args, algorithm, dataset, hparams)
    if not args["skip_model_save"]:
        _save_model(out / "model.pkl", args, algorithm, dataset, hparams)
    (out / "done").write_text("done")


def main(argv: Optional[list[str]] = None) -> Path:
    parser = argparse.ArgumentParser(description="One DomainBed training run (fishr_lite).")
    for key in ("dataset", "algorithm", "output_dir", "data_dir", "hparams"):
        parser.add_argument(f"--{key}", type=str, default=DEFAULT_ARGS[key])
    for key in ("hparams_seed", "trial_seed", "seed", "steps", "checkpoint_freq", "max_per_env"):
        parser.add_argument(f"--{key}", type=int, default=DEFAULT_ARGS[key])
    parser.add_argument("--task", default="domain_generalization",
                        choices=["domain_generalization", "domain_adaptation"])
    parser.add_argument("--holdout_fraction", type=float, default=0.2)
    parser.add_argument("--uda_holdout_fraction", type=float, default=0,
                        help="domain adaptation only (not implemented: must stay 0)")
    parser.add_argument("--test_envs", type=int, nargs="+", default=[0])
    parser.add_argument("--skip_model_save", action="store_true")
    parser.add_argument("--save_model_every_checkpoint", action="store_true")
    args = vars(parser.parse_args(argv))
    try:
        check_args(args)
    except ValueError as error:
        parser.error(str(error))
    return train(args)


if __name__ == "__main__":
    main()
