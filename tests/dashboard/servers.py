"""A gateway subprocess that can be stopped and started again on the same port, optionally over TLS
(config/hypercorn.toml, HTTP/2)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from app.gateway.devcert import write_dev_cert
from tests.conftest import ROOT, free_port, gateway_env, wait_for_status
from tests.deploy.processes import CONFIG, render

# Short retry hints keep the restart tests quick; the shutdown still says goodbye first.
FAST_RECONNECTS = {
    "WELLSTREAM_STREAM__RETRY_MS": "300",
    "WELLSTREAM_STREAM__SHUTDOWN_RETRY_SPREAD_MS": "300",
    "WELLSTREAM_STREAM__SHUTDOWN_GRACE_S": "1",
}


def tls_config(directory: Path, port: int) -> Path:
    """config/hypercorn.toml as committed, with its ports and a `wellstream dev-cert` certificate
    swapped in: h2 and HTTP/1.1 over TLS on `port` (so Chromium speaks HTTP/2)."""
    cert = write_dev_cert(directory / "certs", ["127.0.0.1", "localhost"])
    replacements = {
        "127.0.0.1:8443": f"127.0.0.1:{port}",
        "127.0.0.1:8000": f"127.0.0.1:{free_port()}",
        '"certs/server.pem"': json.dumps(str(cert.cert)),
        '"certs/server.key"': json.dumps(str(cert.key)),
    }
    toml = directory / "hypercorn.toml"
    toml.write_text(render(CONFIG / "hypercorn.toml", replacements))
    return toml


class Gateway:
    """`python -m app serve` on a fixed port; `stop()` is a SIGTERM (streams get their goodbye).

    With `tls_dir`, `serve --hypercorn-config` with config/hypercorn.toml (see tls_config). The
    tests' roomy limits apply unless `roomy_limits` is false (then the gateway's defaults do);
    `env` adds or overrides settings.
    """

    def __init__(
        self,
        secret: str,
        redis_url: str,
        registry: dict[str, list[str]],
        tls_dir: Path | None = None,
        *,
        roomy_limits: bool = True,
        **env: str,
    ) -> None:
        self.port = free_port()
        self.args = ["--port", str(self.port)]
        self.tls = tls_dir is not None
        if tls_dir is not None:
            self.args = ["--hypercorn-config", str(tls_config(tls_dir, self.port))]
        self.env = gateway_env(secret, redis_url, WELLSTREAM_WELLS=json.dumps(registry), **FAST_RECONNECTS)
        if not roomy_limits:
            self.env = {key: value for key, value in self.env.items() if "__LIMITS__" not in key}
        self.env |= env
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    async def start(self) -> None:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "app", "serve", *self.args, "--log-level", "WARNING", cwd=ROOT, env=self.env
        )
        self.process = process
        await wait_for_status(self.url + "/readyz", lambda: process.returncode, verify=False)

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Gateway]:
        try:
            await self.start()
            yield self
        finally:
            await self.stop()
