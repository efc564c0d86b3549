"""Capped exponential backoff with jitter: one definition for every retry loop that waits on Redis."""

from __future__ import annotations

import random


class Backoff:
    """`next()` is the next wait: up to `first_s` * 2^(failures - 1), capped, drawn from its upper half.

    The jitter keeps gateways and workers that lost the same Redis from retrying in step.
    """

    def __init__(self, first_s: float = 0.05, cap_s: float = 5.0) -> None:
        self._first_s = first_s
        self._cap_s = cap_s
        self.failures = 0

    def next(self) -> float:
        self.failures += 1
        ceiling = min(self._cap_s, self._first_s * 2 ** min(self.failures - 1, 30))
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0
