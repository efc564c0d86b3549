"""A gateway subprocess that can be stopped and started again on the same port, optionally over TLS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import trustme

from tests.conftest import ROOT, free_port, gateway_env, wait_for_status

# Short retry hints keep the restart tests quick; the shutdown still says goodbye first.
FAST_RECONNECTS = {
    "WELLSTREAM_STREAM__RETRY_MS": "300",
    "WELLSTREAM_STREAM__SHUTDOWN_RETRY_SPREAD_MS": "300",
    "WELLSTREAM_STREAM__SHUTDOWN_GRACE_S": "1",
}


def tls_config(directory: Path, port: int) -> Path:
    """A Hypercorn TOML serving TLS on `port` (so Chromium speaks HTTP/2), certificate from a throwaway CA."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    key, chain = directory / "server.key", directory / "server.pem"
    cert.private_key_pem.write_to_path(str(key))
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    toml = directory / "hypercorn.toml"
    # A hundred EventSources share one connection: above Hypercorn's default of 100 streams.
    toml.write_text(
        f'bind = ["127.0.0.1:{port}"]\ncertfile = "{chain}"\nkeyfile = "{key}"\n'
        'alpn_protocols = ["h2", "http/1.1"]\nh2_max_concurrent_streams = 256\n'
    )
    return toml


class Gateway:
    """`python -m app serve` on a fixed port; `stop()` is a SIGTERM (streams get their goodbye)."""

    def __init__(
        self, secret: str, redis_url: str, registry: dict[str, list[str]], tls_dir: Path | None = None
    ) -> None:
        self.port = free_port()
        self.args = ["--port", str(self.port)]
        self.tls = tls_dir is not None
        if tls_dir is not None:
            self.args = ["--hypercorn-config", str(tls_config(tls_dir, self.port))]
        self.env = gateway_env(secret, redis_url, WELLSTREAM_WELLS=json.dumps(registry), **FAST_RECONNECTS)
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
