"""Why a component is doing without the store (it is a cache), for its ``degraded`` gauge and logs."""

from __future__ import annotations

import time


class Degradation:
    """``failed(reason)`` when a store call fails; ``active`` for ``window_s`` after the last one.

    A window, not a flag a success clears: a store that takes one small call may still refuse the
    next entry, and a gauge that flickers tells an operator nothing.
    """

    def __init__(self, window_s: float = 30.0):
        self.window_s = window_s
        self.reason = ""
        self._until = 0.0

    def failed(self, reason: str) -> None:
        self.reason = reason
        self._until = time.monotonic() + self.window_s

    @property
    def active(self) -> bool:
        return time.monotonic() < self._until
