"""`python -m app` as a real subprocess: minting tokens, and the demo the README tells people to try."""

from __future__ import annotations

import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import anyio
import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey

from app.auth.keys import SharedSecret
from app.auth.tokens import TokenVerifier
from app.errors import AuthError
from app.models import Principal
from tests.conftest import ROOT, clean_env

CURL_PREFIX = "  try: curl -N"


@pytest.fixture
def cli_secret() -> str:
    return secrets.token_urlsafe(32)


def verify(secret: str, token: str) -> Principal:
    return anyio.run(TokenVerifier(SharedSecret(secret)).verify, token)


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_token_prints_one_verifiable_jwt(cli_secret: str) -> None:
    result = run_cli(
        "token", "--tenant", "acme", "--wells", "well-01,well-02", "--ttl", "60",
        env=clean_env(WELLSTREAM_JWT_SECRET=cli_secret),
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    token = lines[0]
    assert token.count(".") == 2
    principal = verify(cli_secret, token)
    assert principal.tenant == "acme"
    assert principal.wells == frozenset({"well-01", "well-02"})
    assert principal.subject == "dev"
    assert "stream:read" in principal.scopes
    assert 0 < principal.expires_at - time.time() <= 60


def test_token_without_wells_allows_every_well(cli_secret: str) -> None:
    result = run_cli("token", "--tenant", "globex", env=clean_env(WELLSTREAM_JWT_SECRET=cli_secret))

    assert result.returncode == 0, result.stderr
    principal = verify(cli_secret, result.stdout.strip())
    assert principal.tenant == "globex"
    assert principal.wells is None


def test_token_is_not_valid_under_another_secret(cli_secret: str) -> None:
    result = run_cli("token", "--tenant", "acme", env=clean_env(WELLSTREAM_JWT_SECRET=cli_secret))
    assert result.returncode == 0, result.stderr

    with pytest.raises(AuthError, match="signature"):
        verify(secrets.token_urlsafe(32), result.stdout.strip())


@pytest.mark.parametrize(
    "args",
    [
        ("--tenant", "bad*id"),
        ("--tenant", "acme:globex"),
        ("--tenant", "acme", "--wells", "well-01,we ll"),
        ("--tenant", "acme", "--wells", "well-01,w?"),
    ],
)
def test_token_refuses_bad_ids(cli_secret: str, args: tuple[str, ...]) -> None:
    result = run_cli("token", *args, env=clean_env(WELLSTREAM_JWT_SECRET=cli_secret))

    assert result.returncode != 0
    assert result.stdout == ""
    assert "not a valid id" in result.stderr or "not valid ids" in result.stderr


def test_token_without_a_secret_fails_with_a_message() -> None:
    result = run_cli("token", "--tenant", "acme", env=clean_env())

    assert result.returncode != 0
    assert result.stdout == ""
    assert "WELLSTREAM_JWT_SECRET" in result.stderr


def test_serve_without_any_key_exits_naming_the_options() -> None:
    result = run_cli("serve", "--port", str(free_port()), env=clean_env())

    assert result.returncode != 0
    assert "no token key configured" in result.stderr
    assert "auth.public_key_file" in result.stderr


def test_serve_with_a_public_key_and_no_audience_refuses_to_start(tmp_path: Path) -> None:
    pem = tmp_path / "public.pem"
    pem.write_bytes(ECKey.generate_key("P-256").as_pem(private=False))
    env = clean_env(WELLSTREAM_AUTH__PUBLIC_KEY_FILE=str(pem))
    result = run_cli("serve", "--port", str(free_port()), env=env)

    assert result.returncode != 0
    assert "auth.audience is not set" in result.stderr


def test_serve_with_only_a_public_key_and_an_audience_starts(tmp_path: Path) -> None:
    # No WELLSTREAM_JWT_SECRET: a public key is enough (it used to demand the secret anyway).
    key = ECKey.generate_key("P-256")
    pem = tmp_path / "public.pem"
    pem.write_bytes(key.as_pem(private=False))
    port = free_port()
    env = clean_env(WELLSTREAM_AUTH__PUBLIC_KEY_FILE=str(pem), WELLSTREAM_AUTH__AUDIENCE="wellstream")
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        now = int(time.time())
        claims = {"sub": "svc", "tenant_id": "acme", "aud": "wellstream", "scope": "stream:read", "exp": now + 60}
        token = jwt.encode({"alg": "ES256"}, claims, key, algorithms=["ES256"])
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, "serve exited"
            try:
                response = httpx.get(
                    f"http://127.0.0.1:{port}/tenants/acme/wells", headers={"Authorization": f"Bearer {token}"}
                )
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "serve did not answer"
                time.sleep(0.1)
        assert response.status_code == 200, response.text
    finally:
        process.terminate()
        process.wait(10)


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _wait_for_line(lines: queue.Queue[str | None], prefix: str, timeout_s: float) -> tuple[str, list[str]]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            pytest.fail(f"demo exited before printing {prefix!r}; stdout so far: {seen}")
        seen.append(line)
        if line.startswith(prefix):
            return line.rstrip("\n"), seen
    pytest.fail(f"no line starting with {prefix!r} within {timeout_s} s; stdout so far: {seen}")


@pytest.fixture
def demo(tmp_path: Path, cli_secret: str) -> Iterator[tuple[subprocess.Popen[str], queue.Queue[str | None], int]]:
    """`python -m app demo` on a free port; always stopped, stdout drained by a thread."""
    port = free_port()
    stderr_path = tmp_path / "demo.stderr"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "demo", "--port", str(port), "--interval", "0.2"],
            cwd=ROOT,
            env=clean_env(WELLSTREAM_JWT_SECRET=cli_secret),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert process.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    pump = threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True)
    pump.start()
    try:
        yield process, lines, port
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        pump.join(5)
        process.stdout.close()


def test_demo_serves_the_curl_example_it_prints(
    demo: tuple[subprocess.Popen[str], queue.Queue[str | None], int], tmp_path: Path
) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.fail("curl is not installed: the demo test runs the exact curl command the demo prints")
    process, lines, port = demo

    line, banner = _wait_for_line(lines, CURL_PREFIX, timeout_s=15)
    command = line.strip().removeprefix("try: ")
    assert command.startswith("curl -N ")
    assert f"http://127.0.0.1:{port}/tenants/acme/wells/well-01/stream" in command
    assert any(banner_line.startswith("  dashboard: ") for banner_line in banner)

    result = subprocess.run(["bash", "-c", f"{command} --max-time 3"], capture_output=True, timeout=30, check=False)

    output = result.stdout.decode()
    # curl exits 28 when --max-time ends the (endless) stream; anything else is a real failure
    assert result.returncode in (0, 28), result.stderr.decode()
    assert "event: snapshot" in output
    readings = [chunk for chunk in output.split("\n\n") if "event: reading" in chunk and '"tenantId":"acme"' in chunk]
    assert readings, output[:2000]
    assert '"tenantId":"globex"' not in output

    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail("demo did not exit within 10 s of SIGTERM")
    assert code == 0, (tmp_path / "demo.stderr").read_text()


CHECKED_SITE = """
[tenants.acme]
wells = ["well-01"]

[[connections]]
protocol = "modbus"
id = "pad-7-plc"
tenant = "acme"
host = "127.0.0.1"

[[connections.groups]]
interval_s = 1.0
points = [
  { table = "holding", address = 0, well = "well-01", tag = "casing_pressure" },
  { table = "holding", address = ADDRESS, well = "well-01", tag = "tubing_pressure" },
]

[[connections]]
protocol = "mqtt"
id = "field-mqtt"
tenant = "acme"
host = "127.0.0.1"
tags = [{ topic = "pads/7/flow", well = "well-01", tag = "flow", deadband = DEADBAND }]
"""


def test_check_config_names_the_connection_and_the_point_of_each_problem(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(CHECKED_SITE.replace("ADDRESS", "65536").replace("DEADBAND", "-1"))

    result = run_cli("check-config", str(path), env=clean_env())

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"wellstream: {path}: connection 'pad-7-plc' (modbus), point well-01/tubing_pressure: address: "
        "Input should be less than 65536",
        f"{path}: connection 'field-mqtt' (mqtt), tag well-01/flow: deadband: "
        "Input should be greater than or equal to 0",
    ]


def test_check_config_refuses_a_modicon_address_until_the_connection_sets_address_offset(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    modicon = CHECKED_SITE.replace("ADDRESS", "40002").replace("DEADBAND", "0")
    path.write_text(modicon)

    refused = run_cli("check-config", str(path), env=clean_env())
    path.write_text(modicon.replace('host = "127.0.0.1"\n', 'host = "127.0.0.1"\naddress_offset = 0\n', 1))
    accepted = run_cli("check-config", str(path), env=clean_env())

    assert refused.returncode == 1
    assert refused.stderr.startswith(
        f"wellstream: {path}: connection 'pad-7-plc' (modbus): point well-01/tubing_pressure: address 40002 looks like"
        " Modicon notation (40002 = holding register 1): write the zero-based address 1, or set address_offset"
    )
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout == f"{path}: ok: 1 tenants, 1 wells, 2 connections\n"
