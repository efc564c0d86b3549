"""A primary, its replica and three Redis Sentinels on loopback, for failover tests.

Sentinels run as `redis-server <conf> --sentinel` (the same binary): one down-after of 1 s and a
quorum of 2, so a killed primary is replaced in a few seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from tests.conftest import RedisServer, free_port, stop_process

SERVICE = "wellstream"


def _wait(what: str, check: object, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():  # type: ignore[operator]
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s} s")
        time.sleep(0.05)


class SentinelGroup:
    """`with SentinelGroup(tmp) as group:` a primary, a replica and three sentinels watching them."""

    def __init__(self, workdir: Path, sentinel_password: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is needed: run `make test`, which installs it")
        self._binary = binary
        self.workdir = workdir
        for name in ("primary", "replica"):
            (workdir / name).mkdir(parents=True, exist_ok=True)
        self.primary = RedisServer(workdir / "primary")
        self.replica: RedisServer | None = None
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinel_password = sentinel_password  # the sentinels' own requirepass, and among themselves
        self._sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports) + f"/{SERVICE}"

    def __enter__(self) -> SentinelGroup:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self) -> None:
        self.primary.start()
        with self.primary.client() as client:
            client.config_set("repl-diskless-sync-delay", 0)  # the first sync at once, not after 5 s
        self.replica = RedisServer(self.workdir / "replica", replica_of=self.primary.port)
        self.replica.start()
        self.wait_replicated()
        for index, port in enumerate(self.sentinel_ports):
            conf = self.workdir / f"sentinel-{index}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.workdir}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
            )
            if self.sentinel_password is not None:
                password = self.sentinel_password
                with conf.open("a") as extra:
                    extra.write(f"requirepass {password}\nsentinel sentinel-pass {password}\n")
            command = [self._binary, str(conf), "--sentinel"]
            self._sentinels.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        # A failover needs a majority of sentinels that know each other and the replica.
        _wait("sentinels that know each other and the replica", self._sentinels_ready, 20)

    def _sentinels_ready(self) -> bool:
        for port in self.sentinel_ports:
            with self._sentinel(port) as sentinel:
                master = sentinel.sentinel_master(SERVICE)
                if int(master["num-other-sentinels"]) < 2 or int(master["num-slaves"]) < 1:
                    return False
        return True

    def _sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=1, password=self.sentinel_password)

    def primary_port(self) -> int:
        """Where the sentinels say the primary is now."""
        with self._sentinel(self.sentinel_ports[0]) as sentinel:
            _, port = sentinel.sentinel_get_master_addr_by_name(SERVICE)
        return int(port)

    def wait_replicated(self, timeout_s: float = 10) -> None:
        """Until the replica has acknowledged everything the primary sent it."""

        def caught_up() -> bool:
            with self.primary.client() as client:
                info = client.info("replication")
            replica = info.get("slave0", {})
            return bool(replica.get("state") == "online" and replica.get("offset") == info["master_repl_offset"])

        _wait("the replica caught up", caught_up, timeout_s)

    def wait_failed_over(self, timeout_s: float = 30) -> int:
        """After the primary was killed: until the sentinels name the replica primary; its port."""
        assert self.replica is not None
        replica = self.replica.port
        _wait("the sentinels promoted the replica", lambda: self.primary_port() == replica, timeout_s)
        return replica

    def stop(self) -> None:
        for process in self._sentinels:
            stop_process(process)
        if self.replica is not None:
            self.replica.stop()
        self.primary.stop()
