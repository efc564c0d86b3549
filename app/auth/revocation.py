"""Revoked tokens and ended sessions: refused at once on every request, and the live streams
they opened ended on every gateway within seconds.

A request's credentials are checked against the broker's RevocationStore (one round trip). A
stream was checked when it opened, so each gateway also watches the store's announcements and
ends the streams a revocation covers with `event: auth-expired`, as at a token's expiry: the
page then asks for fresh credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
from collections.abc import Callable

from app.cancellation import pause
from app.errors import ServiceError
from app.models import Principal
from app.streams.seams import Revocation, RevocationStore

logger = logging.getLogger(__name__)

POLL_S = 1.0


def subject_hash(subject: str) -> str:
    """A subject as keys and limits name it: hashed, so no user name lands in a key or a metric."""
    return hashlib.sha256(subject.encode()).hexdigest()[:32]


def covers(revocation: Revocation, principal: Principal) -> bool:
    if revocation.kind == "session":
        return principal.session == revocation.key
    if principal.tenant != revocation.tenant:
        return False
    if revocation.kind == "token":
        return principal.token_id == revocation.key
    issued_at = principal.issued_at
    return subject_hash(principal.subject) == revocation.key and (issued_at is None or issued_at < revocation.before)


class RevocationWatcher:
    """Ends this gateway's live streams that a revocation covers; `async with` runs its poll task."""

    def __init__(self, store: RevocationStore, poll_s: float = POLL_S) -> None:
        self._store = store
        self._poll_s = poll_s
        self._streams: dict[int, tuple[Principal, Callable[[str], object]]] = {}
        self._numbers = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self.ended = 0  # streams ended by a revocation, for /metrics

    async def __aenter__(self) -> RevocationWatcher:
        self._task = asyncio.create_task(self._watch(), name="revocation-watcher")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def track(self, principal: Principal, end: Callable[[str], object]) -> Callable[[], None]:
        """Watch a live stream; `end("auth-expired")` ends it. Returns how to stop watching it."""
        number = next(self._numbers)
        self._streams[number] = (principal, end)
        return lambda: self._streams.pop(number, None) and None

    def apply(self, revocations: list[Revocation]) -> None:
        for revocation in revocations:
            ended = 0
            for number, (principal, end) in list(self._streams.items()):
                if covers(revocation, principal):
                    del self._streams[number]
                    ended += 1
                    end("auth-expired")
            if ended:
                self.ended += ended
                logger.info("a %s revocation ended %d live streams", revocation.kind, ended)

    async def _watch(self) -> None:
        cursor: str | None = None
        while cursor is None:  # from now on: what was revoked before was refused at the door
            try:
                _, cursor = await self._store.since(None)
            except ServiceError as exc:
                logger.warning("revocations: cannot read the broker yet (%s); retrying", exc)
                await pause(self._poll_s)
        while True:
            await pause(self._poll_s)
            try:
                revocations, cursor = await self._store.since(cursor)
            except ServiceError as exc:
                logger.warning("revocations: cannot read the broker (%s); streams are checked when it is back", exc)
                continue
            self.apply(revocations)
