"""Experiments: full training recipes that combine ``data``, ``objectives`` and ``results``.

Each experiment module (``coloredmnist``, ...) maps the profiles ``quick`` and ``paper`` to its
settings, trains through :mod:`fishr_lite.objectives`, stores one record per run with
:class:`fishr_lite.results.ResultsCache`, and is runnable as ``python -m``.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable, TypeVar

T = TypeVar("T")


def progress_enabled() -> bool:
    """Show progress bars on a terminal or in a Jupyter kernel, unless ``$CI`` is set or
    ``$FISHR_PROGRESS`` is ``0`` (as when chapters are executed to store their outputs)."""
    if os.environ.get("CI") or os.environ.get("FISHR_PROGRESS") == "0":
        return False
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def progress_bar(iterable: Iterable[T], enabled: bool | None = None, **kwargs: Any) -> Iterable[T]:
    """``tqdm(iterable)`` when progress is enabled (see :func:`progress_enabled`) and tqdm is
    installed, else ``iterable`` itself."""
    if enabled is None:
        enabled = progress_enabled()
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **kwargs)
