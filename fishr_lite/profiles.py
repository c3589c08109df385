"""Run profiles: ``quick`` (CPU-sized, for CI and laptops) and ``paper`` (the paper's settings).

The profile is chosen by the environment variable ``FISHR_PROFILE``; when it is unset the
default is ``paper`` on a machine with CUDA and ``quick`` otherwise. Each experiment maps a
profile name to its own settings; this module only decides which name is in force.
"""

from __future__ import annotations

import os

import torch

PROFILES = ("quick", "paper")


def current_profile() -> str:
    """Return the profile in force: ``$FISHR_PROFILE`` if set, else ``paper`` with CUDA, else ``quick``."""
    name = os.environ.get("FISHR_PROFILE", "").strip().lower()
    if not name:
        return "paper" if torch.cuda.is_available() else "quick"
    if name not in PROFILES:
        raise ValueError(
            f"FISHR_PROFILE={name!r} is not a known profile; set it to one of {PROFILES} "
            "(or unset it to pick 'paper' on a GPU and 'quick' on a CPU)."
        )
    return name


def default_device() -> torch.device:
    """The device chapters and experiments use by default: CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
