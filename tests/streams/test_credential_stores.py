"""The session and revocation stores' conformance suite, on the memory broker and a real redis-server."""

from __future__ import annotations

import secrets

import anyio
import pytest

from app.streams.seams import Revocation
from tests.streams.conftest import Backend

pytestmark = pytest.mark.anyio


async def test_a_session_is_read_many_times_until_deleted_or_expired(backend: Backend) -> None:
    with anyio.fail_after(5):
        async with backend.open() as broker:
            key, short = secrets.token_hex(32), secrets.token_hex(32)
            await broker.sessions.put(key, b"principal", ttl_s=30)
            await broker.sessions.put(short, b"brief", ttl_s=0.3)
            assert await broker.sessions.get(key) == b"principal"
            assert await broker.sessions.get(key) == b"principal", "not single use"
            await broker.sessions.delete(key)
            assert await broker.sessions.get(key) is None
            await broker.sessions.delete(key)  # twice is harmless
            await backend.advance(0.5)
            assert await broker.sessions.get(short) is None, "expired"


async def test_a_revoked_token_is_refused_and_only_that_one(backend: Backend) -> None:
    with anyio.fail_after(5):
        async with backend.open() as broker:
            jti = secrets.token_hex(8)
            store = broker.revocations
            assert not await store.is_revoked("acme", jti, "subject-a", 100.0)
            await store.revoke(Revocation("token", "acme", jti), ttl_s=0.5)
            assert await store.is_revoked("acme", jti, "subject-a", 100.0)
            assert not await store.is_revoked("globex", jti, "subject-a", 100.0), "another tenant's token"
            assert not await store.is_revoked("acme", secrets.token_hex(8), "subject-a", 100.0)
            assert not await store.is_revoked("acme", None, "subject-a", 100.0)
            await backend.advance(0.7)
            assert not await store.is_revoked("acme", jti, "subject-a", 100.0), "forgotten after its time"


async def test_a_revoked_subject_refuses_tokens_issued_before_the_cut_off(backend: Backend) -> None:
    with anyio.fail_after(5):
        async with backend.open() as broker:
            subject = secrets.token_hex(16)
            store = broker.revocations
            await store.revoke(Revocation("subject", "acme", subject, before=1_000.0), ttl_s=30)
            assert await store.is_revoked("acme", None, subject, 999.0)
            assert await store.is_revoked("acme", "any", subject, None), "no iat: cannot show it came after"
            assert not await store.is_revoked("acme", None, subject, 1_000.0)
            assert not await store.is_revoked("acme", None, secrets.token_hex(16), 999.0)
            assert not await store.is_revoked("globex", None, subject, 999.0)


async def test_revocations_are_announced_in_order_after_a_cursor(backend: Backend) -> None:
    with anyio.fail_after(5):
        async with backend.open() as broker:
            store = broker.revocations
            before, cursor = await store.since(None)
            assert before == [], "from now on: nothing older"
            mine = [Revocation("session", "acme", secrets.token_hex(32)), Revocation("token", "acme", "j1")]
            for revocation in mine:
                await store.revoke(revocation, ttl_s=0)
            announced, cursor = await store.since(cursor)
            assert announced == mine
            assert await store.since(cursor) == ([], cursor)
            assert not await store.is_revoked("acme", "j1", "s", 1.0), "ttl 0: announced, not remembered"
