"""`wellstream serve --hypercorn-config` from config/hypercorn.toml with a `wellstream dev-cert` certificate:
HTTP/2 over TLS (many streams on one connection), and HTTP/1.1 and h2c on the cleartext port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest

from app.gateway.devcert import DevCert
from app.streams.redis import connect_redis
from tests.conftest import ROOT, free_port, gateway_env
from tests.deploy.processes import CONFIG, Gateway, gateway, render
from tests.factories import make_reading
from tests.sse_client import SSEReader

pytestmark = pytest.mark.anyio

WELLS = [f"h2-{n:02d}" for n in range(50)]


@contextlib.asynccontextmanager
async def tls_gateway(
    secret: str, redis_url: str, dev_cert: DevCert, workdir: Path
) -> AsyncIterator[tuple[str, str, Gateway]]:
    """A gateway serving config/hypercorn.toml (ports and certificate swapped): (https URL, http URL, process)."""
    tls_port, plain_port = free_port(), free_port()
    toml = workdir / "hypercorn.toml"
    replacements = {
        "127.0.0.1:8443": f"127.0.0.1:{tls_port}",
        "127.0.0.1:8000": f"127.0.0.1:{plain_port}",
        '"certs/server.pem"': json.dumps(str(dev_cert.cert)),
        '"certs/server.key"': json.dumps(str(dev_cert.key)),
    }
    toml.write_text(render(CONFIG / "hypercorn.toml", replacements))
    env = gateway_env(secret, redis_url, WELLSTREAM_WELLS=json.dumps({"acme": WELLS}))
    env["WELLSTREAM_STREAM__SHUTDOWN_GRACE_S"] = "1"
    plain = f"http://127.0.0.1:{plain_port}"
    async with gateway(["--hypercorn-config", str(toml)], env, plain + "/readyz") as process:
        yield f"https://127.0.0.1:{tls_port}", plain, process


def established_connections(port: int) -> int:
    """Client-side TCP connections to `port`, as the kernel counts them."""
    listing = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( dport = :{port} )"], capture_output=True, text=True, check=True
    ).stdout
    return len(listing.splitlines())


async def test_fifty_streams_of_fifty_wells_flow_over_one_tls_connection(
    secret: str, token, redis_url: str, dev_cert: DevCert, tls_context: ssl.SSLContext, tmp_path
) -> None:
    headers = {"Authorization": f"Bearer {token('acme')}"}
    with anyio.fail_after(60):
        async with (
            tls_gateway(secret, redis_url, dev_cert, tmp_path) as (https, _, served),
            httpx.AsyncClient(base_url=https, http2=True, verify=tls_context, timeout=20) as client,
            connect_redis(redis_url) as publisher,
            contextlib.AsyncExitStack() as stack,
        ):
            responses = [
                await stack.enter_async_context(
                    client.stream("GET", f"/tenants/acme/wells/{well}/stream", headers=headers)
                )
                for well in WELLS
            ]
            assert {(r.status_code, r.http_version) for r in responses} == {(200, "HTTP/2")}
            assert established_connections(httpx.URL(https).port or 443) == 1
            readers = [SSEReader(response) for response in responses]
            for reader in readers:
                await reader.next_event("snapshot")
            ids = await publisher.log.publish([make_reading(float(n), well=well) for n, well in enumerate(WELLS)])
            events = await asyncio.gather(*(reader.next_event("reading") for reader in readers))
            # SIGTERM: every stream on the connection ends with a goodbye, and the process exits,
            # even though this client, unlike a browser, leaves the TLS connection open: the
            # bound is below the 30 s a gateway would wait for the client's close_notify.
            served.process.send_signal(signal.SIGTERM)
            with anyio.fail_after(20):
                endings = await asyncio.gather(*(reader.collect() for reader in readers))
                assert await served.process.wait() == 0
    assert [(event.json()["wellId"], event.json()["value"]) for event in events] == [
        (well, float(n)) for n, well in enumerate(WELLS)
    ]
    assert [event.id for event in events] == [str(stream_id) for stream_id in ids]
    assert all(blocks[-1].retry is not None and "shutting down" in " ".join(blocks[-1].comments) for blocks in endings)


async def test_the_cleartext_port_speaks_http1_and_h2c(secret: str, token, redis_url: str, dev_cert: DevCert, tmp_path):
    headers = {"Authorization": f"Bearer {token('acme')}"}
    path = f"/tenants/acme/wells/{WELLS[0]}/stream"
    with anyio.fail_after(30):
        async with (
            tls_gateway(secret, redis_url, dev_cert, tmp_path) as (_, plain, _),
            httpx.AsyncClient(base_url=plain, timeout=10) as h1,
            httpx.AsyncClient(base_url=plain, http1=False, http2=True, timeout=10) as h2c,
            h1.stream("GET", path, headers=headers) as over_h1,
            h2c.stream("GET", path, headers=headers) as over_h2c,
        ):
            assert (over_h1.status_code, over_h1.http_version) == (200, "HTTP/1.1")
            assert (over_h2c.status_code, over_h2c.http_version) == (200, "HTTP/2")
            for response in (over_h1, over_h2c):
                assert (await SSEReader(response).next_event("snapshot")).json()["wellId"] == WELLS[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hypercorn-config", "no/such.toml"], "existing file"),
        (["--server", "uvicorn", "--hypercorn-config", "config/hypercorn.toml"], "--server hypercorn"),
    ],
)
def test_serve_refuses_a_hypercorn_config_it_cannot_use(secret: str, args: list[str], message: str) -> None:
    env = gateway_env(secret, "")
    result = subprocess.run(
        [sys.executable, "-m", "app", "serve", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    assert message in result.stderr


def test_dev_cert_writes_a_ca_a_server_certificate_and_a_private_key_only_its_owner_reads(tmp_path) -> None:
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-m", "app", "dev-cert", "--dir", str(tmp_path)], cwd=ROOT, env=env, check=True)
    assert (tmp_path / "server.key").stat().st_mode & 0o777 == 0o600
    assert not any("PRIVATE KEY" in (tmp_path / name).read_text() for name in ("ca.pem", "server.pem"))
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    context.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")  # the key matches the certificate
