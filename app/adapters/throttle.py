"""One warning per key at most every `every_s`, saying how many were held back: a device or node
that goes wrong at every scan or message writes a line a minute, not one each time."""

from __future__ import annotations

import logging
import time


class WarningThrottle:
    """`warn(key, text)`: a WARNING on `logger`, or DEBUG while the key's last warning is recent."""

    def __init__(self, logger: logging.Logger, every_s: float = 60.0) -> None:
        self._logger = logger
        self._every_s = every_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warn(self, key: str, text: str) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self._every_s) < self._every_s:
            self._held[key] = self._held.get(key, 0) + 1
            self._logger.debug("%s", text)
            return
        self._last[key] = now
        held = self._held.pop(key, 0)
        self._logger.warning("%s%s", text, f" (and {held} more since the last warning)" if held else "")
