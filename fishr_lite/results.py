"""The results cache: one JSON record per finished run, keyed by a hash of its configuration.

A record lives at ``<root>/<experiment>/<key>.json`` where ``key`` is the first 16 hex digits of
``sha256(canonical JSON of {"experiment": ..., "config": ...})`` (sorted keys, no spaces), so
the same configuration always lands in the same file, on any machine. A record holds::

    {"format": 1, "experiment": str, "key": str, "config": {...}, "result": {...},
     "provenance": {"library_version", "torch_version", "python_version", "device",
                    "torch_threads", "git_commit", "wall_time_s", "date"}}

The device is provenance, not configuration: the same run on a GPU and on a CPU is one record.

Records are written atomically (a temporary file in the same folder, fsync, ``os.replace``),
so a run killed at any moment leaves either the old state or the complete record, never half a
file. :meth:`ResultsCache.get_or_run` and :meth:`ResultsCache.run_all` skip configurations
already recorded, so an interrupted sweep resumes losing nothing and duplicating nothing.

A record that cannot be trusted (not JSON, truncated, missing fields, or a key that does not
match its configuration) is never used and never silently dropped: a
:class:`CorruptRecordWarning` names the file, the file is kept beside the cache as
``<key>.json.corrupt`` for inspection, and the run is computed again.

``root`` defaults to ``$FISHR_RESULTS_DIR`` if set, else the repository's ``data/results/``
when the package sits in a checkout, else ``./data/results`` under the current directory.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

import fishr_lite
from fishr_lite.compiled_variance import COMPILED
from fishr_lite.cpu_memory import reusing_freed_memory

FORMAT = 1
KEY_LENGTH = 16
REQUIRED_FIELDS = ("format", "experiment", "key", "config", "result", "provenance")
PACKAGE_DIR = Path(fishr_lite.__file__).resolve().parent


class CorruptRecordWarning(UserWarning):
    """A record file could not be trusted; it was set aside and the run is recomputed."""


def default_root() -> Path:
    """``$FISHR_RESULTS_DIR``, else ``<repository>/data/results``, else ``./data/results``."""
    env = os.environ.get("FISHR_RESULTS_DIR", "").strip()
    if env:
        return Path(env).expanduser()
    repository = PACKAGE_DIR.parent
    if (repository / "pyproject.toml").is_file() and (repository / "data").is_dir():
        return repository / "data" / "results"
    return Path.cwd() / "data" / "results"


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal configurations give equal strings."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"configuration {obj!r} is not plain JSON ({error}); use only dicts, lists, str, "
            "int, finite float, bool and None in a configuration"
        ) from error


def config_key(experiment: str, config: Mapping[str, Any]) -> str:
    """``sha256(canonical_json({"experiment": experiment, "config": config}))[:16]``."""
    text = canonical_json({"experiment": experiment, "config": dict(config)})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:KEY_LENGTH]


def git_commit(path: Path = PACKAGE_DIR) -> str | None:
    """The commit checked out where the package lives, or None (no git, no repository, no commit)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None


def provenance(device: str | torch.device | None, wall_time_s: float) -> dict[str, Any]:
    """Where and how a run was computed: versions, device, git commit, wall time and date (and
    ``reused_freed_memory`` if :func:`fishr_lite.cpu_memory.reuse_freed_memory` was on,
    ``compiled_closed_form`` if the run was inside
    :func:`fishr_lite.compiled_variance.compiled_closed_form`: same results up to float rounding)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return {
        "library_version": fishr_lite.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "wall_time_s": round(float(wall_time_s), 3),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **({"reused_freed_memory": True} if reusing_freed_memory() else {}),
        **({"compiled_closed_form": True} if COMPILED.on else {}),
    }


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path``: temporary file in the same folder, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(obj, handle, indent=1, sort_keys=True, allow_nan=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable; not possible on every OS, harmless to skip
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


class ResultsCache:
    """Records of one experiment under ``<root>/<experiment>/``; see the module docstring."""

    def __init__(self, experiment: str, root: str | os.PathLike | None = None):
        if not experiment or any(c in experiment for c in "/\\") or experiment.startswith("."):
            raise ValueError(
                f"experiment name {experiment!r} must be a plain folder name such as "
                "'coloredmnist' (non-empty, no slashes, not starting with a dot)"
            )
        self.experiment = experiment
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.folder = self.root / experiment

    def __repr__(self) -> str:
        return f"ResultsCache({self.experiment!r}, root={str(self.root)!r})"

    def key(self, config: Mapping[str, Any]) -> str:
        return config_key(self.experiment, config)

    def path(self, config: Mapping[str, Any]) -> Path:
        return self.folder / f"{self.key(config)}.json"

    def _problem(self, path: Path, record: Any) -> str | None:
        """Why the record read from ``path`` cannot be trusted, or None when it is sound."""
        if not isinstance(record, dict):
            return "the file does not hold a JSON object"
        missing = [field for field in REQUIRED_FIELDS if field not in record]
        if missing:
            return f"missing fields {missing}"
        if record["experiment"] != self.experiment:
            return f"experiment is {record['experiment']!r}, expected {self.experiment!r}"
        if not isinstance(record["config"], dict):
            return "its config is not a JSON object"
        expected = self.key(record["config"])
        if record["key"] != expected or path.stem != expected:
            return f"key {record['key']!r} / file name do not match its config's hash {expected!r}"
        return None

    def _read(self, path: Path) -> dict | None:
        """The record in ``path``; None (after a warning and setting the file aside) if corrupt."""
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            problem = self._problem(path, record)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            problem = f"not valid JSON ({error})"
        if problem is None:
            return record
        aside = path.with_name(path.name + ".corrupt")
        try:
            os.replace(path, aside)
        except FileNotFoundError:  # another process set it aside (or rewrote it) first
            pass
        warnings.warn(
            f"corrupt record {path}: {problem}. It was moved to {aside.name} and its run will "
            "be computed again; delete the .corrupt file once you have looked at it.",
            CorruptRecordWarning,
            stacklevel=3,
        )
        return None

    def load(self, config: Mapping[str, Any]) -> dict | None:
        """The stored record of ``config``, or None when there is none (or it was corrupt)."""
        path = self.path(config)
        return self._read(path) if path.is_file() else None

    def save(
        self,
        config: Mapping[str, Any],
        result: Mapping[str, Any],
        *,
        wall_time_s: float,
        device: str | torch.device | None = None,
        extra_provenance: Mapping[str, Any] | None = None,
    ) -> dict:
        """Write the record of a finished run atomically and return it; ``extra_provenance``
        adds fields to its provenance (how it was computed, e.g. batched with other runs)."""
        config = json.loads(canonical_json(dict(config)))
        record = {
            "format": FORMAT,
            "experiment": self.experiment,
            "key": self.key(config),
            "config": config,
            "result": dict(result),
            "provenance": {**provenance(device, wall_time_s), **(extra_provenance or {})},
        }
        write_json_atomic(self.path(config), record)
        return record

    def get_or_run(
        self,
        config: Mapping[str, Any],
        fn: Callable[[dict], Mapping[str, Any]],
        *,
        device: str | torch.device | None = None,
    ) -> dict:
        """The stored record of ``config``; if there is none, run ``fn(config)``, store and return it.

        ``fn`` returns the run's result (a JSON-serializable mapping); ``device`` is recorded as
        provenance (default: CUDA if available, else CPU).
        """
        record = self.load(config)
        if record is not None:
            return record
        start = time.perf_counter()
        result = fn(dict(config))
        return self.save(config, result, wall_time_s=time.perf_counter() - start, device=device)

    def run_all(
        self,
        configs: Iterable[Mapping[str, Any]],
        fn: Callable[[dict], Mapping[str, Any]],
        *,
        device: str | torch.device | None = None,
        progress: Callable[[Iterable], Iterable] | None = None,
    ) -> list[dict]:
        """:meth:`get_or_run` for each configuration in order; returns the records in that order.

        Interrupting the sweep loses only the run in progress: finished runs are on disk and a
        second call computes only the configurations without a record. ``progress`` optionally
        wraps the list of configurations (for example ``tqdm``).
        """
        configs = list(configs)
        iterable = progress(configs) if progress is not None else configs
        return [self.get_or_run(config, fn, device=device) for config in iterable]

    def records(self) -> list[dict]:
        """Every sound record of this experiment (sorted by file name); corrupt ones are reported."""
        if not self.folder.is_dir():
            return []
        found = (self._read(path) for path in sorted(self.folder.glob("*.json")))
        return [record for record in found if record is not None]
