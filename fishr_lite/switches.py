"""An on/off setting that a ``with`` block changes and then restores."""

from __future__ import annotations

import contextlib
from typing import Iterator


class Switch:
    """``switch.on`` is read by the code it guards; ``with switch.turned(False):`` changes it
    for the block and restores the previous value afterwards, also after an exception."""

    def __init__(self, on: bool) -> None:
        self.on = on

    @contextlib.contextmanager
    def turned(self, on: bool) -> Iterator[None]:
        previous, self.on = self.on, on
        try:
            yield
        finally:
            self.on = previous


__all__ = ["Switch"]
