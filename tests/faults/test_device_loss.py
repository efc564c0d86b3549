"""A lost field device must never look like a steady well (issue 14).

A real pymodbus server, asyncua server and mosquitto, each a process of its own, feed a real
`wellstream ingest` that publishes into Redis, streamed by a real gateway. The peer is killed with
SIGKILL (then started again on the same port) or frozen with SIGSTOP (then SIGCONT): every tag of
the connection must turn BAD `comm_failure` with a null value on an open stream and on /latest
within the connection's comm_timeout_s, and GOOD with its real value once the device is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import anyio
import httpx
import pytest

from tests.conftest import ROOT, ingest_worker, make_settings, running_gateway
from tests.peers.opcua_server import endpoint, node_id
from tests.sse_client import SSEReader

pytestmark = pytest.mark.anyio

Key = tuple[str, str]  # (well, tag)
Reading = dict[str, Any]
Verdict = Callable[[Key, Reading], bool]

WELLS = ["well-01", "well-02"]
# What the device holds for each tag: a tag that is back must carry its real value. Integers, so
# a Modbus register holds them as they are.
VALUES: dict[Key, float] = {
    ("well-01", "tubing_pressure"): 1500.0,
    ("well-01", "casing_pressure"): 800.0,
    ("well-02", "flow_rate"): 420.0,
}
COMM_TIMEOUT_S = 2.0
MQTT_KEEPALIVE_S = 1
# How long a client may take to notice that its peer is gone before comm_timeout_s starts: only a
# frozen MQTT broker needs it, found by the client's keepalive (up to 1.5 x keepalive_s, the README
# says; paho pings after keepalive_s of silence and gives up a keepalive_s later, checked once a
# second, so 1.6-2.1 s were measured at keepalive_s = 1: the slack covers the difference).
NOTICE_S = {("mqtt", "sigstop"): 1.5 * MQTT_KEEPALIVE_S}
# Shared, noisy machines: the verdict's timing is only checked this loosely.
SLACK_S = 3.0
# A device back is read again within the reconnect backoff's cap (5 s) and a connect.
RECOVERY_S = 20.0
PUBLISH_EVERY_S = 0.2  # the MQTT device's period
PEERS = ROOT / "tests" / "peers"

SITE = """
[tenants.acme]
wells = ["well-01", "well-02"]

[[connections]]
id = "device"
tenant = "acme"
comm_timeout_s = {comm_timeout_s}
"""


def modbus_site(port: int) -> str:
    # A request timeout below comm_timeout_s, so a frozen device is found out in time.
    points = ",\n".join(
        f'  {{ table = "holding", address = {address}, well = "{well}", tag = "{tag}" }}'
        for address, (well, tag) in enumerate(VALUES)
    )
    return f"""protocol = "modbus"
host = "127.0.0.1"
port = {port}
timeout_s = 1.0

[[connections.groups]]
interval_s = 0.2
points = [
{points},
]
"""


def opcua_site(port: int) -> str:
    nodes = ",\n".join(
        f'  {{ node_id = "{node_id(f"{well}.{tag}")}", well = "{well}", tag = "{tag}" }}' for well, tag in VALUES
    )
    return f"""protocol = "opcua"
endpoint = "{endpoint(port)}"
sampling_interval_ms = 100
publishing_interval_ms = 100
nodes = [
{nodes},
]
"""


def mqtt_site(port: int) -> str:
    tags = ",\n".join(f'  {{ topic = "{topic(key)}", well = "{key[0]}", tag = "{key[1]}" }}' for key in VALUES)
    return f"""protocol = "mqtt"
host = "127.0.0.1"
port = {port}
keepalive_s = {MQTT_KEEPALIVE_S}
tags = [
{tags},
]
"""


def topic(key: Key) -> str:
    return f"field/{key[0]}/{key[1]}"


def peer_command(protocol: str, port: int, workdir: Path) -> list[str]:
    if protocol == "modbus":
        return [sys.executable, str(PEERS / "modbus_server.py"), str(port), *(str(int(v)) for v in VALUES.values())]
    if protocol == "opcua":
        pairs = [f"{well}.{tag}={value}" for (well, tag), value in VALUES.items()]
        return [sys.executable, str(PEERS / "opcua_server.py"), str(port), *pairs]
    binary = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/sbin/mosquitto") if Path(p).exists()), None
    )
    if binary is None:
        pytest.fail("mosquitto is not installed: run `make test`, which installs it (apt-get install mosquitto)")
    config = workdir / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\npersistence false\nlog_dest stderr\nallow_anonymous true\n")
    return [binary, "-c", str(config)]


SITES: dict[str, Callable[[int], str]] = {"modbus": modbus_site, "opcua": opcua_site, "mqtt": mqtt_site}


def restartable_port() -> int:
    """A free loopback port below the ephemeral range (32768 and up on Linux): while the peer is
    dead, no outgoing connection of another process can take it, so the peer gets it back."""
    for _ in range(100):
        port = random.randrange(20_000, 32_000)
        with socket.socket() as sock:
            try:  # without SO_REUSEADDR: a port with connections still in TIME_WAIT is refused too
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


class Peer:
    """A device's server process on a fixed loopback port: killed, frozen, thawed, started again."""

    def __init__(self, command: list[str], port: int, log: Path) -> None:
        self.command = command
        self.port = port
        self.log = log
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start the process and return once it accepts connections."""
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(*self.command, stdout=log, stderr=log)
        while not await accepts(self.port):
            if self.process.returncode is not None:
                raise RuntimeError(f"{' '.join(self.command)} exited with {self.process.returncode}; see {self.log}")
            await asyncio.sleep(0.05)

    async def lose(self, fault: str) -> float:
        """SIGKILL or SIGSTOP the peer; when it happened (monotonic)."""
        assert self.process is not None
        if fault == "sigstop":
            self.process.send_signal(signal.SIGSTOP)
            return time.monotonic()
        self.process.kill()
        killed_at = time.monotonic()
        await self.process.wait()
        return killed_at

    async def bring_back(self, fault: str) -> float:
        """SIGCONT, or a new process on the same port; when the device answers again (monotonic)."""
        assert self.process is not None
        if fault == "sigstop":
            self.process.send_signal(signal.SIGCONT)
        else:
            await self.start()
        return time.monotonic()

    async def close(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGCONT)  # never leave a stopped process behind, whatever happens next
            self.process.kill()
            await self.process.wait()


async def accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def publish_forever(port: int) -> None:
    """The MQTT device: every tag's value every PUBLISH_EVERY_S, connecting again whenever the broker is lost."""
    while True:
        with contextlib.suppress(aiomqtt.MqttError):
            # A short timeout bounds each wait on a broker that is gone or frozen, a teardown's disconnect too.
            async with aiomqtt.Client("127.0.0.1", port, timeout=1) as device:
                while True:
                    for key, value in VALUES.items():
                        await device.publish(topic(key), str(value).encode(), qos=0)
                    await asyncio.sleep(PUBLISH_EVERY_S)
        await asyncio.sleep(PUBLISH_EVERY_S)


@contextlib.asynccontextmanager
async def device_publishing(protocol: str, port: int) -> AsyncIterator[None]:
    """MQTT's values come from a publisher, the other peers hold their own."""
    if protocol != "mqtt":
        yield
        return
    task = asyncio.create_task(publish_forever(port))
    try:
        yield
    finally:
        task.cancel()
        with anyio.move_on_after(10, shield=True):
            await asyncio.wait([task])


def holds(now: dict[Key, Reading], verdict: Verdict) -> bool:
    return set(now) == set(VALUES) and all(verdict(key, now[key]) for key in VALUES)


def lost(key: Key, reading: Reading) -> bool:
    return (reading["quality"], reading["value"], reading.get("reason")) == ("BAD", None, "comm_failure")


def good(key: Key, reading: Reading) -> bool:
    return (reading["quality"], reading["value"], reading.get("reason")) == ("GOOD", VALUES[key], None)


class StreamView:
    """The latest reading of each tag as an open tenant stream tells it: snapshots, then readings."""

    def __init__(self, events: SSEReader) -> None:
        self._events = events
        self.now: dict[Key, Reading] = {}

    async def until(self, verdict: Verdict) -> tuple[float, dict[Key, Reading]]:
        """Reads the stream until every tag's latest reading meets `verdict`; then (when, readings)."""
        while not holds(self.now, verdict):
            event = await self._events.next_event("snapshot", "reading")
            data = event.json()
            for reading in data["readings"] if event.event == "snapshot" else [data]:
                self.now[(reading["wellId"], reading["tagName"])] = reading
        return time.monotonic(), dict(self.now)


class LatestView:
    """The latest reading of each tag as /latest tells it."""

    def __init__(self, client: httpx.AsyncClient, base: str, headers: dict[str, str]) -> None:
        self._client = client
        self._base = base
        self._headers = headers

    async def now(self) -> dict[Key, Reading]:
        readings: dict[Key, Reading] = {}
        for well in WELLS:
            response = await self._client.get(f"{self._base}/tenants/acme/wells/{well}/latest", headers=self._headers)
            if response.status_code == 200:  # 404 until the worker registered the well
                readings |= {(well, r["tagName"]): r for r in response.json()["readings"]}
        return readings

    async def until(self, verdict: Verdict) -> tuple[float, dict[Key, Reading]]:
        while True:
            now = await self.now()
            if holds(now, verdict):
                return time.monotonic(), now
            await asyncio.sleep(0.05)


async def seen_everywhere(
    stream: StreamView, latest: LatestView, verdict: Verdict, within_s: float, what: str
) -> tuple[tuple[float, dict[Key, Reading]], tuple[float, dict[Key, Reading]]]:
    """(when, readings) of the stream and of /latest, each as soon as every tag meets `verdict`."""
    with anyio.move_on_after(within_s):
        async with asyncio.TaskGroup() as tasks:  # one failing ends the other
            on_stream = tasks.create_task(stream.until(verdict))
            on_latest = tasks.create_task(latest.until(verdict))
        return on_stream.result(), on_latest.result()
    pytest.fail(
        f"{what} not within {within_s} s: the stream says {brief(stream.now)}, /latest {brief(await latest.now())}"
    )


def brief(readings: dict[Key, Reading]) -> dict[Key, tuple[object, ...]]:
    return {key: (r["quality"], r["value"], r.get("reason")) for key, r in readings.items()}


@pytest.mark.parametrize("fault", ["sigkill", "sigstop"])
@pytest.mark.parametrize("protocol", ["modbus", "opcua", "mqtt"])
async def test_every_tag_of_a_lost_device_is_bad_comm_failure_until_the_device_is_back(
    protocol: str, fault: str, tmp_path: Path, redis_url: str, secret: str, token: Callable[[str], str]
) -> None:
    port = restartable_port()
    peer = Peer(peer_command(protocol, port, tmp_path), port, tmp_path / "peer.log")
    site = tmp_path / "site.toml"
    site.write_text(SITE.format(comm_timeout_s=COMM_TIMEOUT_S) + SITES[protocol](port))
    headers = {"Authorization": f"Bearer {token('acme')}"}
    bound_s = NOTICE_S.get((protocol, fault), 0.0) + COMM_TIMEOUT_S + SLACK_S
    try:
        with anyio.fail_after(60):
            await peer.start()
            settings = make_settings(secret, redis_url=redis_url, wells={})
            async with (
                device_publishing(protocol, port),
                running_gateway(settings) as gateway,
                httpx.AsyncClient(timeout=20) as client,
                ingest_worker(site, redis_url, tmp_path),
            ):
                latest = LatestView(client, gateway.url, headers)
                await latest.until(good)
                async with client.stream("GET", f"{gateway.url}/tenants/acme/stream", headers=headers) as response:
                    assert response.status_code == 200
                    stream = StreamView(SSEReader(response))
                    await stream.until(good)

                    lost_at = await peer.lose(fault)
                    # A few seconds past the bound, so a late verdict is reported with its delay.
                    (bad_on_stream, streamed), (bad_on_latest, polled) = await seen_everywhere(
                        stream, latest, lost, bound_s + 5, f"every tag BAD comm_failure after {fault}"
                    )
                    # One verdict per outage, so both show the very same readings (GOOD ones follow
                    # each other too fast for that).
                    assert streamed == polled
                    back_at = await peer.bring_back(fault)
                    (good_on_stream, _), (good_on_latest, _) = await seen_everywhere(
                        stream, latest, good, RECOVERY_S, "every tag GOOD with its value once the device is back"
                    )
    finally:
        await peer.close()

    delays = {"stream": bad_on_stream - lost_at, "/latest": bad_on_latest - lost_at}
    print(
        f"{protocol} {fault}: BAD on the stream {delays['stream']:.2f} s, on /latest {delays['/latest']:.2f} s; "
        f"GOOD again {good_on_stream - back_at:.2f} s / {good_on_latest - back_at:.2f} s after the device was back"
    )
    for where, delay in delays.items():
        # Not before: a device silent for less than comm_timeout_s is not lost (its last answer came
        # at most one poll, state read or message before the fault).
        assert COMM_TIMEOUT_S / 2 <= delay <= bound_s, f"BAD on {where} {delay:.2f} s after {fault}"
