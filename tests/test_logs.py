"""app/logs.py's configure(): our logs at the level asked for, the field libraries' chatter kept out."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import anyio
import orjson
import pytest
from asyncua.client.client import Client
from pymodbus.client import AsyncModbusTcpClient

from app import logs
from tests.conftest import free_port

pytestmark = pytest.mark.anyio

LOGGERS = ("", "asyncua", "pymodbus", "hypercorn.error")


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """configure() rewires the process's logging; put back what pytest had."""
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in LOGGERS]
    handlers = logging.getLogger().handlers[:]
    yield
    logging.getLogger().handlers[:] = handlers
    for logger, level in saved:
        logger.setLevel(level)


@pytest.mark.usefixtures("restored_logging")
async def test_asyncua_and_pymodbus_log_only_warnings_even_in_a_debug_run(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("DEBUG")
    port = free_port()  # nothing listens: both connects fail at once

    with anyio.fail_after(5):
        modbus = AsyncModbusTcpClient("127.0.0.1", port=port, retries=0, reconnect_delay=0)
        assert not await modbus.connect()  # pymodbus: DEBUG "Connecting to ...", WARNING "Failed to connect"
        modbus.close()
        with pytest.raises(ConnectionRefusedError):
            await Client(f"opc.tcp://127.0.0.1:{port}/").connect()  # asyncua: INFO "connect", "opening connection"
    logging.getLogger("app.adapters.opcua").debug("opcua %s: ours", "pad-7")

    lines = [orjson.loads(line) for line in capsys.readouterr().err.splitlines()]
    theirs = {(line["logger"].split(".")[0], line["level"]) for line in lines}
    assert ("pymodbus", "warning") in theirs, "their warnings still show"
    assert {("asyncua", "info"), ("asyncua", "debug"), ("pymodbus", "info"), ("pymodbus", "debug")}.isdisjoint(theirs)
    assert {"logger": "app.adapters.opcua", "level": "debug", "msg": "opcua pad-7: ours"} in [
        {key: line[key] for key in ("logger", "level", "msg")} for line in lines
    ]
