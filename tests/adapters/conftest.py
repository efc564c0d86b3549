"""Fixtures the adapter tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.adapters.mosquitto import MosquittoBroker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A mosquitto of the test's own on a free loopback port (anonymous unless the test configures one)."""
    server = MosquittoBroker(tmp_path)
    server.start()
    yield server
    server.stop()
