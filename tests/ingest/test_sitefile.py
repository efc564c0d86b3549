"""The site file and `wellstream ingest`, as real processes against a real redis-server."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.errors import SiteError
from app.ingest.sitefile import Site, load_site
from tests.conftest import ROOT, RedisServer, clean_env, ingest_command, ingest_env

SITE = """
[tenants.acme]
wells = ["well-01", "well-02"]

[[connections]]
protocol = "simulator"
id = "sim"
tenant = "acme"
wells = ["well-01", "well-02"]
interval_s = 0.1
"""


def test_the_example_site_file_is_valid() -> None:
    site = load_site(ROOT / "config" / "site.toml")
    assert site.registry()["acme"] == ["well-01", "well-02", "well-03", "well-04", "well-05"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[tenants.acme]\nwells = ["w*"]\n', "tenants.acme.wells[0]"),
        ("[tenants.acme]\nwells = []\n", "tenants.acme.wells"),
        ('[tenants.acme]\nwells = ["w1"]\n[[connections]]\nprotocol = "modem"\nid = "c"\n', "connections[0]"),
        ('[tenants.acme]\nwells = ["w1"]\nextra = 1\n', "tenants.acme.extra"),
        (SITE.replace('tenant = "acme"', 'tenant = "globex"'), "tenant 'globex' is not in [tenants]"),
        (SITE.replace('wells = ["well-01", "well-02"]\ninterval', 'wells = ["well-09"]\ninterval'), "well-09"),
        ("[tenants.acme\n", "not valid TOML"),
    ],
)
def test_a_broken_site_file_names_the_file_the_key_and_the_problem(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "site.toml"
    path.write_text(text)
    with pytest.raises(SiteError) as error:
        load_site(path)
    assert str(path) in str(error.value)
    assert expected in str(error.value)


def test_check_config_says_ok_or_exits_non_zero_with_the_reason(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text(SITE)
    bad.write_text('[tenants.acme]\nwells = ["w:1"]\n')
    ok = subprocess.run([sys.executable, "-m", "app", "check-config", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0
    assert "ok: 1 tenants, 2 wells, 1 connections" in ok.stdout
    broken = subprocess.run([sys.executable, "-m", "app", "check-config", str(bad)], capture_output=True, text=True)
    assert broken.returncode != 0
    assert f"{bad}: tenants.acme.wells[0]" in broken.stderr


def test_ingest_registers_the_wells_publishes_and_stops_cleanly(
    tmp_path: Path, redis_server: RedisServer, redis_url: str
) -> None:
    site = tmp_path / "site.toml"
    site.write_text(SITE)
    env = ingest_env(redis_url, tmp_path / "spool.sqlite3")
    log = (tmp_path / "ingest.log").open("w")
    worker = subprocess.Popen(ingest_command(site), cwd=ROOT, env=env, stderr=log)
    try:
        with redis_server.client() as client:
            deadline = time.monotonic() + 15
            while client.xlen("scada:{acme}:log:well-02") < 20 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.xlen("scada:{acme}:log:well-02") >= 20, "the simulator's readings reach the stream log"
            assert client.smembers("scada:{acme}:wells") == {b"well-01", b"well-02"}
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(10) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        log.close()


def test_ingest_without_redis_says_what_is_missing(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text(SITE)
    env = clean_env()
    result = subprocess.run(
        [sys.executable, "-m", "app", "ingest", "--config", str(site)], env=env, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "WELLSTREAM_REDIS_URL" in result.stderr


MODBUS_SITE = """
[tenants.acme]
wells = ["well-01"]

[[connections]]
protocol = "modbus"
id = "plc"
tenant = "acme"
host = "127.0.0.1"

[[connections.groups]]
interval_s = 1.0
points = [{ table = "holding", address = 0, type = "float32", well = "well-01", tag = "p" }]
"""


def test_a_modbus_connection_is_checked_against_the_tenants_wells(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(MODBUS_SITE)
    assert [c.id for c in load_site(path).connections] == ["plc"]
    path.write_text(MODBUS_SITE.replace('well = "well-01"', 'well = "well-99"'))
    with pytest.raises(SiteError, match="well-99"):
        load_site(path)
    path.write_text(MODBUS_SITE.replace('type = "float32"', 'type = "float16"'))
    with pytest.raises(SiteError, match=r"connections\[0\]\.groups\[0\]\.points\[0\]\.type"):
        load_site(path)


def example_site(directory: Path) -> Site:
    """config/site.toml with every commented TOML line uncommented: one example of each protocol."""
    toml_line = re.compile(r"^(\[|[a-z_]+ = |  \{|\]$|(points|tags|nodes) = \[)")
    lines = []
    for line in (ROOT / "config" / "site.toml").read_text().splitlines():
        body = line.removeprefix("# ")
        lines.append(body if line.startswith("# ") and toml_line.match(body) else line)
    path = directory / "all.toml"
    path.write_text("\n".join(lines) + "\n")
    return load_site(path)


def test_the_commented_protocol_examples_in_the_site_file_are_valid_too(tmp_path: Path) -> None:
    site = example_site(tmp_path)
    assert sorted({c.protocol for c in site.connections}) == ["modbus", "mqtt", "opcua", "simulator"]
