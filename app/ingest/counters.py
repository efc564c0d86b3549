"""What the publisher and its spool drain did with the readings, for the health line and /metrics."""

from __future__ import annotations

from app.ingest.spool import Spool


class IngestCounters:
    """Readings counted as they pass through the publisher and the spool drain.

    Both count through the methods; everyone else reads the plain ints. `accepted` (submitted
    by adapters), `published` (the broker took them, directly or from the spool), `spooled`,
    `drained` (published from the spool) and `lost` (neither the broker nor the spool took
    them, only on exit) only grow, except that a publish counted as lost that succeeded after
    all moves to `published`. `dropped` and the depths are the spool's own, 0 without one.
    """

    def __init__(self, spool: Spool | None = None) -> None:
        self._spool = spool
        self.accepted = 0
        self.published = 0
        self.spooled = 0
        self.drained = 0
        self.lost = 0

    def count_accepted(self, readings: int) -> None:
        self.accepted += readings

    def count_published(self, readings: int) -> None:
        self.published += readings

    def count_spooled(self, readings: int) -> None:
        self.spooled += readings

    def count_drained(self, readings: int) -> None:
        self.published += readings
        self.drained += readings

    def count_lost(self, readings: int) -> None:
        self.lost += readings

    def count_lost_as_published(self, readings: int) -> None:
        """A publish given up as lost on exit (no spooled copy either) reached the broker after all."""
        self.lost -= readings
        self.published += readings

    @property
    def dropped(self) -> int:
        return self._spool.dropped if self._spool is not None else 0

    @property
    def depth(self) -> int:
        return self._spool.readings if self._spool is not None else 0

    @property
    def depth_bytes(self) -> int:
        return self._spool.bytes if self._spool is not None else 0

    def report(self, pending: int) -> dict[str, object]:
        """The fields of the publisher's health line; `pending` is what waits in memory for a batch."""
        return {
            "accepted": self.accepted,
            "published": self.published,
            "pending": pending,
            "spooled": self.spooled,
            "drained": self.drained,
            "lost": self.lost,
            "dropped": self.dropped,
            "spool_depth": self.depth,
            "spool_bytes": self.depth_bytes,
        }
