"""A real mosquitto for the MQTT and Sparkplug adapter tests (`broker` in tests/adapters/conftest.py)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, stop_process


class MosquittoBroker:
    """A mosquitto subprocess on a free loopback port; can be stopped and started again on that port."""

    def __init__(self, workdir: Path, extra_config: str = "") -> None:
        binary = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/sbin/mosquitto") if Path(p).exists()), None
        )
        if binary is None:
            pytest.fail("mosquitto is not installed: run `make test`, which installs it (apt-get install mosquitto)")
        self.port = free_port()
        self.workdir = workdir
        config = workdir / "mosquitto.conf"
        config.write_text(
            f"listener {self.port} 127.0.0.1\npersistence false\nlog_dest stderr\n"
            + (extra_config or "allow_anonymous true\n")
        )
        self._cmd = [binary, "-c", str(config)]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.workdir / "mosquitto.log").open("ab")
        self.process = subprocess.Popen(self._cmd, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("mosquitto did not start; see " + str(self.workdir / "mosquitto.log")) from None
                time.sleep(0.01)

    def stop(self) -> None:
        stop_process(self.process)
