"""Command line: DomainBed's ``list_top_hparams``, the hyperparameter draws of one trial ranked.

    python -m fishr_lite.domainbed.list_top_hparams --input_dir SWEEP_DIR \
        --dataset ColoredMNIST --algorithm Fishr --test_env 2

For each model selection method (training-domain validation, leave-one-domain-out, oracle)
and each trial (``trial_seed``) of the given dataset, algorithm and test environment: every
draw's ``{val_acc, test_acc}`` at the checkpoint the method picks, best first (DomainBed's
``hparams_accs`` order), with its hyperparameters and run folders. As DomainBed's
``scripts/list_top_hparams.py``; runs without ``done`` are left out unless
``--include_incomplete``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .records import load_records
from .selection import SELECTION_METHODS, group_trials


def list_top_hparams(input_dir: str, dataset: str, algorithm: str, test_env: int,
                     include_incomplete: bool = False) -> str:
    """The listing described in the module docstring, as text."""
    sweep = load_records(input_dir, include_incomplete=include_incomplete)
    lines = [f"Total records: {len(sweep)}"]
    trials = {key: group for key, group in sorted(group_trials(sweep.records).items())
              if key[1:] == (dataset, algorithm, test_env)}
    if not trials:
        lines.append(f"No records for dataset {dataset!r}, algorithm {algorithm!r}, test env "
                     f"{test_env} in {input_dir}.")
    for method in SELECTION_METHODS:
        lines.append(f"Model selection: {method.name}")
        for (trial_seed, *_), group in trials.items():
            lines.append(f"trial_seed: {trial_seed}")
            for run_acc, records in method.hparams_accs(group):
                lines.append(f"\t{run_acc}")
                lines.append("\t\thparams:")
                lines += [f"\t\t\t{k}: {v}" for k, v in sorted(records[0]["hparams"].items())]
                lines.append("\t\toutput_dirs:")
                dirs = dict.fromkeys(r["args"].get("output_dir") for r in records)
                lines += [f"\t\t\t{d}" for d in dirs]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input_dir", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--algorithm", required=True)
    parser.add_argument("--test_env", type=int, required=True)
    parser.add_argument("--include_incomplete", action="store_true")
    args = parser.parse_args(argv)
    text = list_top_hparams(args.input_dir, args.dataset, args.algorithm, args.test_env,
                            args.include_incomplete)
    sys.stdout.write(text)
    return text


if __name__ == "__main__":
    main()
