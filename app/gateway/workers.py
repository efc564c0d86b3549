"""`wellstream serve --workers N`: N gateway processes on one port, under one supervisor.

Each worker is an ordinary `wellstream serve` process (the same arguments, one worker), so it runs
exactly what a single gateway runs, on any of the three servers: its own hub and Redis live feed,
its own SIGTERM drain (app/gateway/server.py). The servers' own worker modes were not used:
Hypercorn's `serve()` ignores `workers`, and the process managers of `hypercorn -w`, `uvicorn
--workers` and granian's workers each stop their workers their own way (cut after a timeout, or
killed), which would bypass that drain; and each is different, where this is one code path.

Sharing the port: every worker binds host:port itself with SO_REUSEPORT, and the kernel spreads
new connections over their listeners (by a hash of the addresses and ports). The supervisor binds
nothing. A socket bound once and inherited by the workers was the other way, but the supervisor's
copy would then keep the port listening after every worker stopped accepting on SIGTERM: a proxy's
next attempt would sit in an accept queue nobody reads instead of being refused and retried on
another gateway. Linux lets only sockets of the same user join a port this way; `preflight` checks
the port is free before the first worker starts, so two units (or a unit and a stray gateway) never
split one port between them unnoticed.

Lifecycle, as an operator sees it:

- SIGTERM or SIGINT: forwarded to every worker; each drains its own streams (a goodbye with a
  jittered retry) and exits. The supervisor exits once all have: 0 if every worker exited 0, else 1.
  A worker still running `stream.shutdown_grace_s` + KILL_AFTER_S later is killed.
- A worker that exits with an error within STARTUP_S of its first start: a configuration or port
  problem that a restart would not cure. The supervisor stops the others and exits with its code.
- Any other exit of a worker (a crash, a kill, the OOM killer): logged as an error, and the worker
  started again after a backoff (0.5 s, doubling to 30 s, from the start once it has run a minute),
  so a dead worker never leaves the unit at part of its capacity for long or unnoticed.
- The supervisor killed outright (SIGKILL): each worker gets SIGTERM from the kernel
  (PR_SET_PDEATHSIG, `die_with`) and drains, instead of holding the port as an orphan.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from app.backoff import Backoff
from app.gateway.server import ServerName, hypercorn_config
from app.settings import Settings

logger = logging.getLogger(__name__)

STARTUP_S = 5.0  # an error exit sooner than this after a worker's first start stops the unit
STABLE_S = 60.0  # a worker that ran this long restarts from the first backoff step
RESTART_FIRST_S, RESTART_CAP_S = 0.5, 30.0
KILL_AFTER_S = 10.0  # beyond the grace period: each worker's own drain ends well within it
PR_SET_PDEATHSIG = 1


def worker_count(value: str) -> int:
    """`--workers`: a number, or `auto` for the cores this process may run on (its CPU affinity,
    which taskset, cpusets and container CPU pinning narrow; a CPU quota does not)."""
    if value == "auto":
        return len(os.sched_getaffinity(0))
    count = int(value)
    if count < 1:
        raise ValueError("--workers must be at least 1")
    return count


@dataclass(frozen=True)
class ServeOptions:
    """What each worker is started with: the `serve` command line, less `--workers`."""

    host: str
    port: int
    server: ServerName
    log_level: str
    hypercorn_toml: Path | None = None
    metrics_port: int = 0  # worker i serves its /metrics on metrics_port + i (0: none)

    def command(self, index: int) -> list[str]:
        command = [sys.executable, "-m", "app", "serve", "--host", self.host, "--port", str(self.port)]
        command += ["--server", self.server, "--log-level", self.log_level]
        command += ["--worker-index", str(index), "--supervisor-pid", str(os.getpid())]
        if self.hypercorn_toml is not None:
            command += ["--hypercorn-config", str(self.hypercorn_toml.resolve())]
        if self.metrics_port:
            command += ["--metrics-port", str(self.metrics_port + index)]
        return command


def preflight(settings: Settings, options: ServeOptions) -> None:
    """Refuse (ValueError, saying why) what several workers cannot do, before any of them starts."""
    if not settings.redis_url:
        raise ValueError("--workers needs WELLSTREAM_REDIS_URL: each worker's memory broker would be its own")
    for host, port in listen_addresses(settings, options):
        if port == 0:
            raise ValueError("--workers needs a fixed port: port 0 would give each worker a port of its own")
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            # SO_REUSEADDR as the workers have it: connections of an earlier run in TIME-WAIT are no conflict.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def listen_addresses(settings: Settings, options: ServeOptions) -> list[tuple[str, int]]:
    """The TCP addresses the workers will listen on: --host/--port, or the Hypercorn file's binds."""
    if options.hypercorn_toml is None:
        return [(options.host, options.port)]
    config = hypercorn_config(settings, options.host, options.port, options.hypercorn_toml)
    binds = [*config.bind, *config.insecure_bind] if config.ssl_enabled else list(config.bind)
    addresses = []
    for bind in binds:
        if bind.startswith(("unix:", "fd://")):
            # Each worker would replace the one Unix socket file, or share one descriptor it cannot
            # close alone: only TCP binds can be shared with SO_REUSEPORT.
            raise ValueError(f"--workers needs TCP binds in --hypercorn-config, not {bind!r}")
        host, _, port = bind.replace("[", "").replace("]", "").rpartition(":")
        addresses.append((host, int(port)) if host and port.isdigit() else (bind, 8000))  # Hypercorn's default
    return addresses


def die_with(supervisor_pid: int) -> bool:
    """In a worker: SIGTERM from the kernel when the supervisor dies, so an orphan drains and exits
    instead of holding the port. False if the supervisor is already gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        logger.warning("cannot ask for SIGTERM on the supervisor's death: errno %d", ctypes.get_errno())
    return os.getppid() == supervisor_pid  # else it died before the request above could cover it


def supervise(settings: Settings, options: ServeOptions, count: int) -> int:
    """Run `count` workers until SIGTERM or SIGINT; the exit code for the supervisor."""
    kill_after_s = settings.stream.shutdown_grace_s + KILL_AFTER_S
    return asyncio.run(Supervisor([options.command(index) for index in range(count)], kill_after_s).run())


class Supervisor:
    """Starts one process per command, keeps each running, and stops them all on SIGTERM/SIGINT.

    The rules are the module's. Used from one event loop; `run` installs its signal handlers.
    """

    def __init__(self, commands: list[list[str]], kill_after_s: float) -> None:
        self._commands = commands
        self._kill_after_s = kill_after_s
        self._running: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = asyncio.Event()
        self._signal = signal.SIGTERM
        self._failed_start: int | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, sig)
        logger.info("supervisor %d: starting %d workers", os.getpid(), len(self._commands))
        codes = await asyncio.gather(*(self._keep(index) for index in range(len(self._commands))))
        if self._failed_start is not None:
            return self._failed_start
        failed = [index for index, code in enumerate(codes) if code != 0]
        if failed:
            logger.error("workers %s did not exit cleanly", failed)
        logger.info("supervisor %d: every worker has exited", os.getpid())
        return 1 if failed else 0

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Pass `sig` on to every worker (each drains), and kill what still runs after the deadline."""
        if not self._stopping.is_set():
            logger.info("%s: stopping %d workers", sig.name, len(self._running))
            self._signal = sig
            self._stopping.set()
            asyncio.get_running_loop().call_later(self._kill_after_s, self._kill_all)
        for process in self._running.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)

    async def _keep(self, index: int) -> int:
        """Run worker `index` until the stop, starting it again whenever it exits before; its last exit code."""
        backoff = Backoff(RESTART_FIRST_S, RESTART_CAP_S)
        first = True
        while True:
            started = time.monotonic()
            process = await asyncio.create_subprocess_exec(*self._commands[index], stdin=asyncio.subprocess.DEVNULL)
            self._running[index] = process
            logger.info("worker %d started: pid %d", index, process.pid)
            if self._stopping.is_set():  # the stop came while it was being started
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(self._signal)
            code = await process.wait()
            del self._running[index]
            ran_s = time.monotonic() - started
            if self._stopping.is_set():
                log = logger.info if code == 0 else logger.error
                log("worker %d (pid %d) %s", index, process.pid, exit_status(code))
                return code
            if first and code > 0 and ran_s < STARTUP_S:
                logger.error("worker %d (pid %d) failed to start: %s; stopping", index, process.pid, exit_status(code))
                self._failed_start = code
                self.stop()
                return code
            first = False
            if ran_s >= STABLE_S:
                backoff.reset()
            delay = backoff.next()
            logger.error(
                "worker %d (pid %d) %s after %.1f s; starting it again in %.1f s",
                index,
                process.pid,
                exit_status(code),
                ran_s,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return code or 1  # it died on its own, and was not running when the stop came

    def _kill_all(self) -> None:
        for index, process in self._running.items():
            logger.error(
                "worker %d (pid %d) still running %.0f s after the stop: killing it",
                index,
                process.pid,
                self._kill_after_s,
            )
            with contextlib.suppress(ProcessLookupError):
                process.kill()


def exit_status(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"
