"""A peer that vanished without a FIN: every server's accepted connections carry TCP keepalive and
TCP_USER_TIMEOUT, read back from the gateway process's own socket (pidfd_getfd), not from ours."""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from tests.conftest import gateway_process

pytestmark = pytest.mark.anyio

SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture

# Not the defaults, so the test sees the settings reach the socket.
OPTIONS = {"IDLE_S": "41", "INTERVAL_S": "7", "COUNT": "5"}


@contextlib.contextmanager
def socket_of(pid: int, local_port: int, peer_port: int) -> Iterator[socket.socket]:
    """A duplicate of the socket process `pid` holds for 127.0.0.1:local_port <-> 127.0.0.1:peer_port."""
    inode = _inode(pid, local_port, peer_port)
    fd_dir = Path(f"/proc/{pid}/fd")
    target = next(int(fd.name) for fd in fd_dir.iterdir() if os.readlink(fd) == f"socket:[{inode}]")
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        duplicate = libc.syscall(SYS_PIDFD_GETFD, pidfd, target, 0)
        if duplicate < 0:
            raise OSError(ctypes.get_errno(), "pidfd_getfd")
    finally:
        os.close(pidfd)
    with socket.socket(fileno=duplicate) as sock:
        yield sock


def _inode(pid: int, local_port: int, peer_port: int) -> str:
    """The socket inode from /proc/<pid>/net/tcp (addresses in hex, little-endian 127.0.0.1)."""
    local, peer = f"0100007F:{local_port:04X}", f"0100007F:{peer_port:04X}"
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == peer:
            return fields[9]
    raise LookupError(f"no connection {local} <-> {peer}")


def options(sock: socket.socket) -> dict[str, int]:
    return {
        "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        "idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        "interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        "count": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        "user_timeout_ms": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
    }


def ss_timers(local_port: int, peer_port: int) -> str:
    query = f"( sport = :{local_port} and dport = :{peer_port} )"
    return subprocess.run(["ss", "-Htno", "state", "established", query], capture_output=True, text=True).stdout


@pytest.mark.parametrize("server", ["hypercorn", "uvicorn", "granian"])
async def test_accepted_connections_carry_keepalive_and_user_timeout(secret: str, server: str) -> None:
    env = {f"WELLSTREAM_SERVER__TCP_KEEPALIVE_{key}": value for key, value in OPTIONS.items()}
    env["WELLSTREAM_SERVER__TCP_USER_TIMEOUT_S"] = "45"
    with anyio.fail_after(30):
        async with gateway_process(secret, server, **env) as gateway:
            port = int(gateway.url.rsplit(":", 1)[1])
            # A kept-alive HTTP/1.1 connection: the server holds it open after answering.
            with socket.create_connection(("127.0.0.1", port)) as client:
                client.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert client.recv(4096).startswith(b"HTTP/1.1 200")
                peer_port = client.getsockname()[1]
                with socket_of(gateway.process.pid, port, peer_port) as served:
                    assert options(served) == {
                        "keepalive": 1,
                        "idle": 41,
                        "interval": 7,
                        "count": 5,
                        "user_timeout_ms": 45_000,
                    }
                # What an operator sees: the kernel's keepalive timer on the gateway's side.
                assert "timer:(keepalive," in ss_timers(port, peer_port)


async def test_keepalive_can_be_turned_off(secret: str) -> None:
    with anyio.fail_after(30):
        async with gateway_process(secret, WELLSTREAM_SERVER__TCP_KEEPALIVE="false") as gateway:
            port = int(gateway.url.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port)) as client:
                client.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert client.recv(4096).startswith(b"HTTP/1.1 200")
                with socket_of(gateway.process.pid, port, client.getsockname()[1]) as served:
                    assert served.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
