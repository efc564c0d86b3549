"""A real six-node Redis Cluster on loopback (three primaries, three replicas) for tests, and the
faults to throw at it: a slot moved to another primary with its keys, a primary killed -9.

The cluster's helpers are synchronous and block while they wait for it to settle; an async test
that must keep reading meanwhile (a subscriber watching a failover) runs them with
`await asyncio.to_thread(cluster.kill_primary, port)`. `ssubscribed` and `pushes` are the async
side: a raw SSUBSCRIBEd connection to one node, as a sharded live feed holds it.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.asyncio.connection import Connection
from redis.crc import key_slot

NODE_TIMEOUT_MS = 2000
HOST = "127.0.0.1"
BUS_OFFSET = 10_000  # a node's cluster bus listens on its port + 10000, so ports stay below 55536
# Below Linux's ephemeral range (32768+), so outgoing connections rarely hold them; a bus port
# (30000-40000) may be taken, which cluster_ports checks.
PORT_RANGE = (20_000, 30_000)


class ClusterError(RuntimeError):
    """The cluster did not start or settle in time."""


@dataclass(frozen=True, slots=True)
class NodeView:
    """One line of CLUSTER NODES: a node as some node sees it."""

    node_id: str
    port: int
    flags: frozenset[str]
    primary_id: str | None  # the primary it replicates, for a replica
    slots: tuple[tuple[int, int], ...]  # owned ranges, inclusive; migration markers left out

    @property
    def is_primary(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return "fail" in self.flags or "fail?" in self.flags

    def owns(self, slot: int) -> bool:
        return any(first <= slot <= last for first, last in self.slots)


def parse_nodes(text: str) -> list[NodeView]:
    views = []
    for line in text.splitlines():
        if not line.strip():
            continue
        node_id, address, flags, primary, _ping, _pong, _epoch, _link, *slots = line.split()
        port = int(address.split("@", 1)[0].rsplit(":", 1)[1])
        ranges = []
        for entry in slots:
            if entry.startswith("["):  # "[slot->-id]" / "[slot-<-id]": an open migration, not ownership
                continue
            first, _, last = entry.partition("-")
            ranges.append((int(first), int(last or first)))
        views.append(
            NodeView(node_id, port, frozenset(flags.split(",")), None if primary == "-" else primary, tuple(ranges))
        )
    return views


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def cluster_ports(count: int) -> list[int]:
    """`count` ports whose bus port (port + 10000) is free too; random, so parallel runs rarely meet.

    Another process may still take one before redis-server binds it: the start then fails and
    is tried again with new ports.
    """
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(*PORT_RANGE)
        if port not in ports and _bindable(port) and _bindable(port + BUS_OFFSET):
            ports.append(port)
    return ports


def wait_for(what: str, check: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> None:
    """Poll `check` (errors count as not yet) until it holds; ClusterError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            if check():
                return
        except (redis.RedisError, OSError) as exc:
            last_error = exc
        if time.monotonic() > deadline:
            why = f" (last error: {last_error})" if last_error else ""
            raise ClusterError(f"{what}: not within {timeout_s} s{why}")
        time.sleep(interval_s)


class NodeProcess:
    """One redis-server in cluster mode, its nodes.conf and log in its own directory."""

    def __init__(self, binary: str, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self._cmd = [binary, "--port", str(port), "--bind", HOST, "--dir", str(workdir)]
        self._cmd += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        self._cmd += ["--cluster-node-timeout", str(NODE_TIMEOUT_MS)]
        self._cmd += ["--appendonly", "no", "--save", "", "--logfile", "redis.log"]
        # A primary waits 5 s (the default) for more replicas before a diskless full sync; here
        # there is never more than one, and that wait would be most of the fixture's start.
        self._cmd += ["--repl-diskless-sync-delay", "0"]

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start (or restart: same port and nodes.conf, so it rejoins as the node it was)."""
        self.process = subprocess.Popen(self._cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_ready(self, timeout_s: float = 10) -> None:
        def answers() -> bool:
            if not self.alive:
                raise ClusterError(f"redis-server on port {self.port} exited (see {self.workdir}/redis.log)")
            with self.client(timeout_s=0.5) as client:
                return bool(client.ping())

        wait_for(f"redis-server on port {self.port}", answers, timeout_s, interval_s=0.02)

    def client(self, timeout_s: float = 5) -> redis.Redis:
        """A plain (non-cluster) client of this node alone: commands for its slots, and admin."""
        return redis.Redis(host=HOST, port=self.port, socket_timeout=timeout_s, decode_responses=True)

    def kill(self) -> None:
        """SIGKILL: no goodbye to the cluster, the bus sockets reset by the kernel."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class LocalCluster:
    """Six redis-servers made one cluster by `redis-cli --cluster create --cluster-replicas 1`."""

    def __init__(self, workdir: Path, size: int = 6, replicas: int = 1, attempts: int = 3) -> None:
        binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if binary is None or cli is None:
            raise ClusterError("redis-server and redis-cli are needed: run `make test`, which installs them")
        self._binary, self._cli = binary, cli
        self.workdir = workdir
        self.size, self.replicas, self._attempts = size, replicas, attempts
        self.nodes: list[NodeProcess] = []
        self.started_in_s = 0.0
        self._failovers: dict[int, tuple[int, set[int]]] = {}  # killed primary's port -> (a slot, its replicas)

    # -- lifecycle

    def start(self) -> None:
        began = time.monotonic()
        for attempt in range(1, self._attempts + 1):
            try:
                self._start_once(attempt)
                break
            except BaseException:
                self.stop()  # nothing of a failed attempt is left running
                if attempt == self._attempts:
                    raise
        self.started_in_s = time.monotonic() - began

    def _start_once(self, attempt: int) -> None:
        self.nodes = []
        for port in cluster_ports(self.size):
            workdir = self.workdir / f"try{attempt}-{port}"
            workdir.mkdir(parents=True)
            node = NodeProcess(self._binary, port, workdir)
            self.nodes.append(node)
            node.start()
        for node in self.nodes:
            node.wait_ready()
        create = [self._cli, "--cluster", "create", *(f"{HOST}:{node.port}" for node in self.nodes)]
        create += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
        done = subprocess.run(create, capture_output=True, timeout=60, check=False)
        if done.returncode != 0:
            raise ClusterError(f"redis-cli --cluster create failed: {done.stdout.decode()} {done.stderr.decode()}")
        self.wait_healthy(timeout_s=30)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- what the cluster looks like

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes if node.alive]

    @property
    def startup_url(self) -> str:
        """A URL for `RedisCluster.from_url`: any live node; the client discovers the others."""
        return f"redis://{HOST}:{self.ports[0]}"

    def node(self, port: int) -> NodeProcess:
        return next(node for node in self.nodes if node.port == port)

    def view(self, port: int | None = None) -> list[NodeView]:
        """CLUSTER NODES as the node on `port` (default: any live one) sees it."""
        with self.node(port if port is not None else self.ports[0]).client() as client:
            return parse_nodes(str(client.execute_command("CLUSTER", "NODES")))

    def primaries(self) -> list[NodeView]:
        return [view for view in self.view() if view.is_primary and not view.failed and view.slots]

    def owner(self, slot: int, port: int | None = None) -> NodeView:
        """The primary serving `slot`, as the node on `port` sees it."""
        return next(view for view in self.view(port) if view.is_primary and view.owns(slot))

    def owner_of(self, key: str | bytes) -> NodeView:
        return self.owner(key_slot(key.encode() if isinstance(key, str) else key))

    def replicas_of(self, primary: NodeView) -> list[NodeView]:
        return [view for view in self.view() if view.primary_id == primary.node_id]

    def flushall(self) -> None:
        for view in self.primaries():
            with self.node(view.port).client() as client:
                client.flushall()

    # -- health

    def _healthy(self) -> bool:
        live = [node for node in self.nodes if node.alive]
        layouts = set()
        for node in live:
            with node.client(timeout_s=1) as client:
                info = str(client.execute_command("CLUSTER", "INFO"))
                fields = dict(line.split(":", 1) for line in info.split() if ":" in line)
                if fields.get("cluster_state") != "ok" or fields.get("cluster_slots_ok") != "16384":
                    return False
                views = parse_nodes(str(client.execute_command("CLUSTER", "NODES")))
                if len(views) != len(self.nodes):  # every node has met every other one
                    return False
                if any(view.failed for view in views if view.port in self.ports):  # a restarted node, not yet cleared
                    return False
                me = next(view for view in views if "myself" in view.flags)
                if not me.is_primary:
                    replication = client.info("replication")
                    if replication.get("master_link_status") != "up" or replication.get("master_sync_in_progress"):
                        return False
                # Only nodes that are up count: a killed one's entry keeps its last flags.
                layouts.add(
                    frozenset((v.port, v.is_primary, v.slots, v.primary_id) for v in views if v.port in self.ports)
                )
        return len(layouts) == 1  # every live node sees the same primaries, replicas and slots

    def wait_healthy(self, timeout_s: float = 20) -> None:
        """Until every live node says cluster_state:ok, they all agree on who serves which slot and
        replicates whom, and every replica of a live node has synced."""
        wait_for("cluster healthy", self._healthy, timeout_s)

    def heal(self, timeout_s: float = 30) -> None:
        """Restart any killed node (it rejoins, as a replica if its slots were taken over) and wait until healthy."""
        for node in self.nodes:
            if not node.alive:
                node.start()
                node.wait_ready()
        self.wait_healthy(timeout_s)

    # -- faults

    def migrate_slot(self, key: str | bytes, to_port: int | None = None, timeout_s: float = 10) -> tuple[int, int]:
        """Move the slot of `key`, with its keys, from its primary to another one (`to_port`, or
        the next primary); returns (source port, target port) once every live node agrees.

        The documented resharding steps: IMPORTING on the target, MIGRATING on the source, MIGRATE
        the keys in batches, then SETSLOT NODE on the target, the source and every other primary
        (replicas refuse SETSLOT; they follow their primary).
        """
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        source = self.owner(slot)
        primaries = self.primaries()
        if to_port is None:
            others = [view for view in primaries if view.port != source.port]
            target = others[0]
        else:
            target = next(view for view in primaries if view.port == to_port)
        if target.port == source.port:
            raise ValueError(f"slot {slot} is already on {target.port}")
        with self.node(source.port).client() as src, self.node(target.port).client() as dst:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                src.execute_command("MIGRATE", HOST, target.port, "", 0, 5000, "KEYS", *keys)
            dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
        for view in primaries:
            if view.port not in (source.port, target.port):
                with self.node(view.port).client() as other:
                    other.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)

        def everyone_agrees() -> bool:
            return all(self.owner(slot, port).port == target.port for port in self.ports)

        wait_for(f"slot {slot} on {target.port} everywhere", everyone_agrees, timeout_s)
        return source.port, target.port

    def wait_replicated(self, port: int, timeout_s: float = 10) -> None:
        """Until every replica of the primary on `port` has acknowledged all it was sent (offsets equal)."""

        def caught_up() -> bool:
            with self.node(port).client() as client:
                info = client.info("replication")
            offset = info["master_repl_offset"]
            replicas = [value for key, value in info.items() if key.startswith("slave") and isinstance(value, dict)]
            return bool(replicas) and all(replica["offset"] == offset for replica in replicas)

        wait_for(f"the replicas of {port} caught up", caught_up, timeout_s, interval_s=0.01)

    def kill_primary(self, port: int, timeout_s: float = 15) -> int:
        """kill -9 the primary on `port`; returns the port of the replica that took over, once the
        surviving nodes say cluster_state:ok and agree on it."""
        self.kill_primary_now(port)
        return self.wait_promoted(port, timeout_s)

    def kill_primary_now(self, port: int) -> None:
        """kill -9 the primary on `port` and return at once (`wait_promoted` waits for its successor)."""
        self._failover_of(port)
        self.node(port).kill()

    def wait_promoted(self, port: int, timeout_s: float = 15) -> int:
        """After the primary on `port` was killed: the port of the replica that took over, once
        the surviving nodes say cluster_state:ok and agree on it."""
        slot, replicas = self._failovers[port]
        promoted: list[int] = []

        def replica_promoted() -> bool:
            owner = self.owner(slot)
            if owner.port not in replicas:
                return False
            promoted.append(owner.port)
            return self._healthy()

        wait_for(f"a replica of {port} promoted", replica_promoted, timeout_s, interval_s=0.1)
        return promoted[-1]

    def _failover_of(self, port: int) -> None:
        """Note, while the primary on `port` is alive, one of its slots and its replicas."""
        primary = next(view for view in self.view() if view.port == port)
        if not primary.is_primary:
            raise ValueError(f"{port} is not a primary")
        replicas = {view.port for view in self.replicas_of(primary)}
        if not replicas:
            raise ClusterError(f"primary {port} has no replica to promote")
        self._failovers[port] = (primary.slots[0][0], replicas)


async def ssubscribed(port: int, channel: str, protocol: int = 2) -> Connection:
    """A raw connection to one node, SSUBSCRIBEd to `channel` (confirmed), as a sharded live feed
    would hold it; read its pushes with `read_response(push_request=True)`."""
    conn = Connection(host=HOST, port=port, protocol=protocol, socket_timeout=5)
    await conn.connect()  # type: ignore[no-untyped-call]
    await conn.send_command("SSUBSCRIBE", channel)
    reply = await conn.read_response(push_request=True)
    if reply != [b"ssubscribe", channel.encode(), 1]:
        await conn.disconnect()
        raise ClusterError(f"SSUBSCRIBE {channel} on {port}: {reply!r}")
    return conn


async def pushes(conn: Connection, quiet_s: float = 0.3) -> list[Any]:
    """Every push that arrives until the connection has been quiet for `quiet_s`."""
    found = []
    while (push := await conn.read_response(timeout=quiet_s, push_request=True)) is not None:
        found.append(push)
    return found
