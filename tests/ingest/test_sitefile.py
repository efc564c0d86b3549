"""The site file and `wellstream ingest`, as real processes against a real redis-server."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.adapters.modbus import ModbusConnection
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
        ('[tenants.acme]\nwells = ["w*"]\n', "tenant 'acme', well 'w*': String should match"),
        ("[tenants.acme]\nwells = []\n", "tenant 'acme': wells: List should have at least 1 item"),
        ('[tenants.acme]\nwells = ["w1"]\n[[connections]]\nprotocol = "modem"\nid = "c"\n', "connection 'c' (modem): "),
        ('[tenants.acme]\nwells = ["w1"]\nextra = 1\n', "tenant 'acme': extra: Extra inputs"),
        ('[tenants."ac me"]\nwells = ["w1"]\n', "tenant 'ac me': String should match"),
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
    assert f"{bad}: tenant 'acme', well 'w:1': " in broken.stderr


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
    with pytest.raises(SiteError, match=r"connection 'plc' \(modbus\), point well-01/p: type: "):
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
    assert sorted({c.protocol for c in site.connections}) == ["modbus", "mqtt", "opcua", "simulator", "sparkplug"]


TENANT = '[tenants.acme]\nwells = ["well-01", "well-02"]\n'


def modbus_connection(*points: str, settings: str = "") -> str:
    """A [[connections]] table: Modbus device pad-7-plc of acme, one group of `points` (inline tables)."""
    return f"""
[[connections]]
protocol = "modbus"
id = "pad-7-plc"
tenant = "acme"
host = "127.0.0.1"
{settings}
[[connections.groups]]
interval_s = 1.0
points = [{", ".join(points)}]
"""


def holding(address: int, tag: str = "tubing_pressure", well: str = "well-01", extra: str = "") -> str:
    return f'{{ table = "holding", address = {address}, well = "{well}", tag = "{tag}"{extra} }}'


def mqtt_connection(*tags: str) -> str:
    return f"""
[[connections]]
protocol = "mqtt"
id = "field-mqtt"
tenant = "acme"
host = "127.0.0.1"
tags = [{", ".join(tags)}]
"""


OPCUA_CONNECTION = """
[[connections]]
protocol = "opcua"
id = "pad-7-opcua"
tenant = "acme"
endpoint = "opc.tcp://127.0.0.1:4840/"
nodes = [{ node_id = "ns=2;s=Well1.Pressure", well = "well-01", tag = "pressure", deadband = -1 }]
"""

SIMULATOR_CONNECTION = """
[[connections]]
protocol = "simulator"
id = "acme-sim"
tenant = "acme"
wells = ["well-01"]
"""


def problems(directory: Path, text: str) -> list[str]:
    """The lines of the SiteError `text` raises, each checked to start with the file and then cut to the rest."""
    path = directory / "site.toml"
    path.write_text(text)
    with pytest.raises(SiteError) as error:
        load_site(path)
    lines = str(error.value).splitlines()
    assert all(line.startswith(f"{path}: ") for line in lines), lines
    return [line.removeprefix(f"{path}: ") for line in lines]


def test_an_error_names_the_connection_by_id_and_the_point_by_well_and_tag(tmp_path: Path) -> None:
    text = (
        TENANT
        + modbus_connection(holding(0, "casing_pressure"), holding(65536))
        + mqtt_connection('{ topic = "pads/7/flow", well = "well-01", tag = "flow", deadband = -1 }')
        + OPCUA_CONNECTION
    )

    assert problems(tmp_path, text) == [
        "connection 'pad-7-plc' (modbus), point well-01/tubing_pressure: address: Input should be less than 65536",
        "connection 'field-mqtt' (mqtt), tag well-01/flow: deadband: Input should be greater than or equal to 0",
        "connection 'pad-7-opcua' (opcua), node well-01/pressure: deadband: Input should be greater than or equal to 0",
    ]


def test_an_entry_without_an_id_or_a_well_and_tag_is_named_by_its_index(tmp_path: Path) -> None:
    no_id = modbus_connection(holding(65536)).replace('id = "pad-7-plc"\n', "")
    no_tag = modbus_connection(holding(1).replace(', tag = "tubing_pressure"', ""))

    assert problems(tmp_path, TENANT + no_id) == [
        "connections[0].id: Field required",
        "connections[0].groups[0], point well-01/tubing_pressure: address: Input should be less than 65536",
    ]
    assert problems(tmp_path, TENANT + no_tag) == [
        "connection 'pad-7-plc' (modbus): groups[0].points[0].tag: Field required",
    ]


def test_a_tag_fed_by_two_connections_is_refused_naming_both(tmp_path: Path) -> None:
    text = TENANT + modbus_connection(holding(0), holding(2, "flow_rate", "well-02")) + SIMULATOR_CONNECTION

    assert problems(tmp_path, text) == [
        "tenant 'acme': tag well-01/tubing_pressure is fed by connection 'pad-7-plc' (modbus)"
        " and connection 'acme-sim' (simulator): a tag takes one source",
    ]


def test_a_tag_fed_by_two_points_of_one_connection_is_refused(tmp_path: Path) -> None:
    tag = '{ topic = "pads/7/TOPIC", well = "well-02", tag = "flow" }'
    text = TENANT + mqtt_connection(tag.replace("TOPIC", "a"), tag.replace("TOPIC", "b"))

    assert problems(tmp_path, text) == [
        "tenant 'acme': tag well-02/flow is fed by 2 points of connection 'field-mqtt' (mqtt): a tag takes one source",
    ]


def test_the_same_well_and_tag_in_two_tenants_are_two_tags(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    globex = SIMULATOR_CONNECTION.replace('"acme-sim"', '"globex-sim"').replace('"acme"', '"globex"')
    path.write_text(TENANT + '[tenants.globex]\nwells = ["well-01"]\n' + SIMULATOR_CONNECTION + globex)

    assert [c.id for c in load_site(path).connections] == ["acme-sim", "globex-sim"]


def test_a_modicon_address_is_refused_unless_the_connection_sets_address_offset(tmp_path: Path) -> None:
    points = (holding(40001), '{ table = "input", address = 39999, well = "well-01", tag = "temperature" }')

    assert problems(tmp_path, TENANT + modbus_connection(*points)) == [
        "connection 'pad-7-plc' (modbus): point well-01/tubing_pressure: address 40001 looks like Modicon notation"
        " (40001 = holding register 0): write the zero-based address 0, or set address_offset on the connection"
        " if the device documents offset addresses (0 if 40001 really is zero-based)",
        "connection 'pad-7-plc' (modbus): point well-01/temperature: address 39999 looks like Modicon notation"
        " (39999 = input register 9998): write the zero-based address 9998, or set address_offset on the connection"
        " if the device documents offset addresses (0 if 39999 really is zero-based)",
    ]


@pytest.mark.parametrize(
    "point",
    [
        holding(39999),  # input registers' range, not holding's
        holding(50000),
        '{ table = "coil", address = 40001, well = "well-01", tag = "pump_running" }',
        '{ table = "input", address = 40001, well = "well-01", tag = "temperature" }',
    ],
)
def test_an_address_outside_its_tables_modicon_range_needs_no_offset(tmp_path: Path, point: str) -> None:
    path = tmp_path / "site.toml"
    path.write_text(TENANT + modbus_connection(point))

    assert load_site(path).connections[0].id == "pad-7-plc"


@pytest.mark.parametrize(("offset", "effective"), [(-40001, 0), (0, 40001)])
def test_with_address_offset_set_a_modicon_looking_address_is_read_at_address_plus_offset(
    tmp_path: Path, offset: int, effective: int
) -> None:
    path = tmp_path / "site.toml"
    path.write_text(TENANT + modbus_connection(holding(40001), settings=f"address_offset = {offset}"))

    (connection,) = load_site(path).connections
    assert isinstance(connection, ModbusConnection)
    (point,) = connection.groups[0].points
    assert point.address + connection.address_offset == effective


@pytest.mark.parametrize(
    ("point", "settings", "problem"),
    [
        (holding(40000), "address_offset = -40001", "holding address 40000 + address_offset -40001 reads register -1"),
        (holding(65535, extra=', type = "float32"'), "", "holding address 65535 reads registers 65535..65536"),
        (holding(65500, extra=', type = "float64"'), "address_offset = 100", "reads registers 65600..65603"),
        ('{ table = "coil", address = 65535, well = "well-01", tag = "tubing_pressure" }', "address_offset = 1",
         "coil address 65535 + address_offset 1 reads coil 65536"),
    ],
)  # fmt: skip
def test_a_point_whose_registers_fall_outside_0_to_65535_is_refused(
    tmp_path: Path, point: str, settings: str, problem: str
) -> None:
    (line,) = problems(tmp_path, TENANT + modbus_connection(point, settings=settings))

    assert line.startswith("connection 'pad-7-plc' (modbus): point well-01/tubing_pressure: ")
    assert line.endswith(f"{problem}, outside 0..65535")


def alarmed(alarms: str) -> str:
    return TENANT + modbus_connection(holding(0, extra=f", alarms = {{ {alarms} }}"))


def test_a_points_alarms_are_read_from_the_site_file(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(alarmed('hihi = { value = 100, priority = "critical" }, hi = 90, deadband = 2, on_delay_s = 5'))

    (connection,) = load_site(path).connections
    assert isinstance(connection, ModbusConnection)
    alarms = connection.groups[0].points[0].alarms
    assert alarms is not None
    assert [(s.kind, s.priority, s.setpoint) for s in alarms.specs()] == [
        ("HIHI", "critical", 100.0),
        ("HI", "medium", 90.0),
        ("COMMS", "high", None),
    ]


@pytest.mark.parametrize(
    ("alarms", "problem"),
    [
        ("hi = 120, hihi = 100", "alarms: hi 120 is above hihi 100: limits rise lolo < lo < hi < hihi"),
        (
            "hi = 95, hihi = 100, deadband = 5",
            "alarms: the deadband of hihi (5) must be smaller than the gap between hi 95 and hihi 100 (5)",
        ),
        ("hi = { value = 1, on_delay_s = -1 }", "alarms.hi.on_delay_s: Input should be greater than or equal to 0"),
        ("hi = nan", "alarms.hi.value: Input should be a finite number"),
        ('comms = "urgent"', "alarms.comms: comms is true, false or a priority: critical, high, medium or low"),
    ],
)
def test_check_config_refuses_bad_alarm_limits_naming_the_point(tmp_path: Path, alarms: str, problem: str) -> None:
    lines = problems(tmp_path, alarmed(alarms))

    assert lines == [f"connection 'pad-7-plc' (modbus), point well-01/tubing_pressure: {problem}"]


def test_every_protocols_points_take_alarms(tmp_path: Path) -> None:
    bad = ", alarms = { lo = 5, lolo = 6 }"
    mqtt = mqtt_connection(f'{{ topic = "pads/7/flow", well = "well-02", tag = "flow"{bad} }}')
    opcua = OPCUA_CONNECTION.replace("deadband = -1", bad.removeprefix(", "))

    assert problems(tmp_path, TENANT + mqtt + opcua) == [
        "connection 'field-mqtt' (mqtt), tag well-02/flow: alarms: lolo 6 is above lo 5:"
        " limits rise lolo < lo < hi < hihi",
        "connection 'pad-7-opcua' (opcua), node well-01/pressure: alarms: lolo 6 is above lo 5:"
        " limits rise lolo < lo < hi < hihi",
    ]


def test_check_config_refuses_bad_alarm_limits(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(alarmed("hi = 120, hihi = 100"))

    broken = subprocess.run([sys.executable, "-m", "app", "check-config", str(bad)], capture_output=True, text=True)

    assert broken.returncode != 0
    assert f"{bad}: connection 'pad-7-plc' (modbus), point well-01/tubing_pressure: alarms: hi 120" in broken.stderr
