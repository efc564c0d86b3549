"""Real processes the deployment tests put together: gateways with arguments, nginx, Caddy.

The proxies run from the committed files in config/, with their addresses and certificate paths
swapped for the test's (render() fails if a file no longer has what it swaps, so the test and
the file cannot drift apart).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, stop_process, wait_for_status

CONFIG = ROOT / "config"
# The two gateways the committed proxy files name.
GATEWAY_A, GATEWAY_B = "127.0.0.1:8001", "127.0.0.1:8002"


def render(template: Path, replacements: Mapping[str, str]) -> str:
    text = template.read_text()
    for old, new in replacements.items():
        assert old in text, f"{template.name} no longer contains {old!r}"
        text = text.replace(old, new)
    return text


@dataclass
class Gateway:
    process: asyncio.subprocess.Process


@contextlib.asynccontextmanager
async def gateway(args: list[str], env: Mapping[str, str], ready_url: str) -> AsyncIterator[Gateway]:
    """`python -m app serve <args>`, ready once `ready_url` answers 200; killed if still running at the end."""
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "app", "serve", *args, cwd=ROOT, env=env)
    try:
        await wait_for_status(ready_url, lambda: process.returncode)
        yield Gateway(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@dataclass
class Proxy:
    """A proxy in front of gateways: `http` is its cleartext URL (nginx's only redirects to
    HTTPS), `https` its TLS URL (HTTP/2 or HTTP/1.1, by ALPN)."""

    http: str
    https: str
    process: subprocess.Popen[bytes]
    log: Path


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make test`, which installs it")
    return path


@contextlib.contextmanager
def proxy_process(cmd: list[str], workdir: Path, env: Mapping[str, str], http: int, https: int):
    log = workdir / "proxy.log"
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, cwd=workdir, env=dict(env), stdout=out, stderr=subprocess.STDOUT)
    try:
        yield Proxy(f"http://127.0.0.1:{http}", f"https://127.0.0.1:{https}", process, log)
    finally:
        stop_process(process)


def nginx(workdir: Path, upstreams: tuple[str, str], cert: Path, key: Path):
    http, https = free_port(), free_port()
    conf = workdir / "nginx.conf"
    replacements = {
        GATEWAY_A: upstreams[0],
        GATEWAY_B: upstreams[1],
        "127.0.0.1:8443": f"127.0.0.1:{https}",
        "127.0.0.1:8080": f"127.0.0.1:{http}",
        "$host:8443": f"$host:{https}",
        "../certs/server.pem": str(cert),
        "../certs/server.key": str(key),
    }
    conf.write_text(render(CONFIG / "nginx.conf", replacements))
    cmd = [_binary("nginx"), "-p", str(workdir), "-c", str(conf), "-g", "daemon off;"]
    return proxy_process(cmd, workdir, os.environ, http, https)


def caddy(workdir: Path, upstreams: tuple[str, str], cert: Path, key: Path):
    http, https = free_port(), free_port()
    conf = workdir / "Caddyfile"
    replacements = {
        GATEWAY_A: upstreams[0],
        GATEWAY_B: upstreams[1],
        ":8443": f":{https}",
        ":8080": f":{http}",
        "certs/server.pem": str(cert),
        "certs/server.key": str(key),
    }
    conf.write_text(render(CONFIG / "Caddyfile", replacements))
    # Caddy keeps state under $HOME / XDG dirs: keep it in the test's directory.
    env = dict(os.environ) | {"HOME": str(workdir), "XDG_DATA_HOME": str(workdir), "XDG_CONFIG_HOME": str(workdir)}
    cmd = [_binary("caddy"), "run", "--config", str(conf), "--adapter", "caddyfile"]
    return proxy_process(cmd, workdir, env, http, https)


PROXIES = {"nginx": nginx, "caddy": caddy}
