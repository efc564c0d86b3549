"""Key sources: PEM and JWKS loading rules, and a JWKS fetched from a real HTTPS server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypercorn.asyncio import serve
from hypercorn.config import Config
from joserfc.jwk import ECKey, KeySet, OctKey, RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.auth.keys import (
    JWKSEndpoint,
    JWKSFile,
    PublicKeyFile,
    SharedSecret,
    TokenHeader,
    key_source_from_settings,
    redacted_url,
)
from app.errors import AuthError
from app.settings import AuthSettings
from tests.conftest import free_port

pytestmark = pytest.mark.anyio

SECRET = "a-test-secret-that-is-32-bytes-long!"


@functools.cache
def rsa_key(kid: str) -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig", "alg": "RS256"})


@functools.cache
def ec_key(kid: str) -> ECKey:
    return ECKey.generate_key("P-256", parameters={"kid": kid, "use": "sig", "alg": "ES256"})


def public_jwks(*keys: RSAKey | ECKey) -> dict[str, Any]:
    return dict(KeySet(list(keys)).as_dict(private=False))


def b64uint(number: int) -> str:
    return base64.urlsafe_b64encode(number.to_bytes((number.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()


def write_pem(path: Path, key: object) -> Path:
    assert isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey)
    path.write_bytes(key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


class FakeClock:
    """The monotonic clock JWKSEndpoint reads, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class JWKSServer:
    """A JWKS served over HTTPS by Hypercorn, with a trustme certificate; counts the fetches."""

    url: str
    ca_file: Path
    document: dict[str, Any] = field(default_factory=lambda: {"keys": []})
    fetches: int = 0
    failure: str | None = None  # "status", "not-json", "too-large"
    delay_s: float = 0

    def publish(self, *keys: RSAKey | ECKey) -> None:
        self.document = public_jwks(*keys)

    def endpoint(self, clock: FakeClock | None = None, **options: Any) -> JWKSEndpoint:
        return JWKSEndpoint(self.url, ca_file=self.ca_file, clock=clock or FakeClock(), **options)

    async def handle(self, request: Request) -> Response:
        self.fetches += 1
        if self.delay_s:
            await anyio.sleep(self.delay_s)
        if self.failure == "status":
            return Response("oops", status_code=500)
        if self.failure == "not-json":
            return Response("<html>captive portal</html>", media_type="text/html")
        if self.failure == "too-large":
            return Response(b" " * (600 * 1024) + b"{}", media_type="application/json")
        return Response(json.dumps(self.document), media_type="application/json")


@contextlib.asynccontextmanager
async def serve_jwks(tmp_path: Path) -> AsyncIterator[JWKSServer]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_pem.write_to_path(str(key_file))
    for index, pem in enumerate(cert.cert_chain_pems):
        pem.write_to_path(str(cert_file), append=index > 0)
    port = free_port()
    server = JWKSServer(f"https://127.0.0.1:{port}/jwks.json", ca_file)
    app = Starlette(routes=[Route("/jwks.json", server.handle), Route("/health", lambda _: Response("ok"))])
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.certfile, config.keyfile = str(cert_file), str(key_file)
    config.errorlog = None
    config.graceful_timeout = 1
    stop = asyncio.Event()
    task = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    try:
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(ca_file))) as client:
            while True:
                if task.done():
                    task.result()
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"https://127.0.0.1:{port}/health")).status_code == 200:
                        break
                await asyncio.sleep(0.01)
        yield server
    finally:
        stop.set()
        await task


# --- shared secret and PEM files ---


async def test_shared_secret_verifies_hs256_only() -> None:
    key, algorithms = await SharedSecret(SECRET).key_for(TokenHeader("HS256"))
    assert isinstance(key, OctKey)
    assert algorithms == ["HS256"]


def test_shared_secret_shorter_than_32_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        SharedSecret("x" * 31)


@pytest.mark.parametrize(
    ("private", "algorithm"),
    [
        (lambda: rsa.generate_private_key(65537, 2048), "RS256"),
        (lambda: ec.generate_private_key(ec.SECP256R1()), "ES256"),
    ],
    ids=["rsa", "ec-p256"],
)
async def test_pem_public_key_gets_the_algorithm_of_its_type(tmp_path: Path, private: Any, algorithm: str) -> None:
    source = PublicKeyFile(write_pem(tmp_path / "key.pem", private().public_key()))
    # The token's alg and kid change nothing: the key decides.
    key, algorithms = await source.key_for(TokenHeader("HS256", "whatever"))
    assert algorithms == [algorithm]
    assert not key.is_private


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda: ec.generate_private_key(ec.SECP384R1()).public_key(), "secp384r1 is not supported"),
        (lambda: ed25519.Ed25519PrivateKey.generate().public_key(), "is not supported"),
        (lambda: rsa.generate_private_key(65537, 1024).public_key(), "1024 bits"),
        (
            lambda: ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            "not a PEM public key",
        ),
        (lambda: b"not a key at all", "not a PEM public key"),
        (lambda: None, "cannot be read"),
    ],
    ids=["ec-p384", "ed25519", "rsa-1024", "private-key", "garbage", "missing"],
)
def test_pem_anything_else_is_refused_at_load_naming_the_file(tmp_path: Path, content: Any, message: str) -> None:
    path = tmp_path / "odd-key.pem"
    value = content()
    if isinstance(value, bytes):
        path.write_bytes(value)
    elif value is not None:
        write_pem(path, value)
    with pytest.raises(ValueError, match=message) as caught:
        PublicKeyFile(path)
    assert str(path) in str(caught.value)


# --- JWKS documents ---


async def test_jwks_file_uses_only_signing_keys_of_supported_types(tmp_path: Path) -> None:
    weak = rsa.generate_private_key(65537, 1024).public_key().public_numbers()
    keys: list[object] = [
        rsa_key("good-rsa").as_dict(private=True),  # private members are dropped, the key is used
        ec_key("good-ec").as_dict(),
        {**rsa_key("enc").as_dict(), "kid": "enc", "use": "enc"},
        {**rsa_key("ps").as_dict(), "kid": "ps", "alg": "PS256"},
        {**rsa_key("ops").as_dict(), "kid": "ops", "key_ops": ["encrypt"]},
        {**ECKey.generate_key("P-384").as_dict(), "kid": "p384"},
        {**OctKey.generate_key(256).as_dict(private=True), "kid": "oct"},
        {"kty": "RSA", "kid": "weak", "n": b64uint(weak.n), "e": b64uint(weak.e)},
        {"kty": "RSA", "kid": "broken", "n": "!!!", "e": "AQAB"},
        {"kty": "EC", "crv": "P-256", "kid": "off-curve", "x": ec_key("good-ec").as_dict()["x"], "y": "AAAA"},
        "not an object",
    ]
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    source = JWKSFile(path)
    key, algorithms = await source.key_for(TokenHeader("RS256", "good-rsa"))
    assert algorithms == ["RS256"]
    assert not key.is_private
    assert (await source.key_for(TokenHeader("ES256", "good-ec")))[1] == ["ES256"]
    for kid in ("enc", "ps", "ops", "p384", "oct", "weak", "broken", "off-curve"):
        with pytest.raises(AuthError, match="unknown key id"):
            await source.key_for(TokenHeader("RS256", kid))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not JSON"),
        ('{"kid": "x"}', "not a JWKS"),
        ('[{"keys": []}]', "not a JWKS"),
        ('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "no usable signing key"),
    ],
)
def test_jwks_file_without_usable_keys_is_refused_at_load(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as caught:
        JWKSFile(path)
    assert str(path) in str(caught.value)


async def test_a_token_without_kid_needs_a_set_of_exactly_one_key(tmp_path: Path) -> None:
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    one.write_text(json.dumps(public_jwks(rsa_key("r1"))))
    two.write_text(json.dumps(public_jwks(rsa_key("r1"), ec_key("e1"))))
    assert (await JWKSFile(one).key_for(TokenHeader("RS256")))[1] == ["RS256"]
    with pytest.raises(AuthError, match="token has no key id"):
        await JWKSFile(two).key_for(TokenHeader("RS256"))


async def test_a_kid_published_twice_is_not_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "jwks.json"
    twin = {**rsa_key("r2").as_dict(), "kid": "r1"}
    path.write_text(json.dumps({"keys": [*public_jwks(rsa_key("r1"), ec_key("e1"))["keys"], twin]}))
    source = JWKSFile(path)
    with pytest.raises(AuthError, match="unknown key id"):
        await source.key_for(TokenHeader("RS256", "r1"))
    assert (await source.key_for(TokenHeader("ES256", "e1")))[1] == ["ES256"]
    assert "more than once" in caplog.text


async def test_jwks_sources_refuse_symmetric_and_none_algorithms_before_lookup(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(public_jwks(rsa_key("r1"))))
    for alg in ("HS256", "none", "PS256"):
        with pytest.raises(AuthError, match="algorithm not allowed"):
            await JWKSFile(path).key_for(TokenHeader(alg, "r1"))


# --- JWKS over HTTPS ---


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1/jwks.json", "ftp://idp.example/jwks.json", "file:///etc/jwks.json", "https:///jwks"]
)
def test_jwks_url_must_be_https(url: str) -> None:
    with pytest.raises(ValueError, match="https://"):
        JWKSEndpoint(url)


def test_jwks_ca_file_must_be_readable(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="jwks_ca_file"):
        JWKSEndpoint("https://idp.example/jwks.json", ca_file=tmp_path / "missing.pem")


async def test_endpoint_fetches_once_then_serves_from_cache_until_it_expires(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        async with serve_jwks(tmp_path) as server:
            server.publish(rsa_key("r1"), ec_key("e1"))
            clock = FakeClock()
            source = server.endpoint(clock, cache_s=300, min_refresh_s=10)
            for _ in range(3):
                assert (await source.key_for(TokenHeader("RS256", "r1")))[1] == ["RS256"]
                assert (await source.key_for(TokenHeader("ES256", "e1")))[1] == ["ES256"]
            assert server.fetches == 1
            clock.now += 301
            await source.key_for(TokenHeader("RS256", "r1"))
            assert server.fetches == 2


async def test_unknown_kid_refetches_once_then_is_refused_and_more_unknown_kids_do_not_refetch(
    tmp_path: Path,
) -> None:
    with anyio.fail_after(10):
        async with serve_jwks(tmp_path) as server:
            server.publish(rsa_key("r1"))
            clock = FakeClock()
            source = server.endpoint(clock, min_refresh_s=10)
            await source.key_for(TokenHeader("RS256", "r1"))
            assert server.fetches == 1
            clock.now += 11
            with pytest.raises(AuthError, match="unknown key id"):
                await source.key_for(TokenHeader("RS256", "random-1"))
            assert server.fetches == 2
            clock.now += 5  # still within min_refresh_s of the last fetch
            for number in range(20):
                with pytest.raises(AuthError, match="unknown key id"):
                    await source.key_for(TokenHeader("RS256", f"random-{number}"))
            assert server.fetches == 2
            assert (await source.key_for(TokenHeader("RS256", "r1")))[1] == ["RS256"]


async def test_a_key_rotated_in_at_the_url_is_picked_up_by_the_refresh(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        async with serve_jwks(tmp_path) as server:
            server.publish(rsa_key("old"))
            clock = FakeClock()
            source = server.endpoint(clock, min_refresh_s=10)
            await source.key_for(TokenHeader("RS256", "old"))
            server.publish(rsa_key("old"), ec_key("new"))
            clock.now += 10
            key, algorithms = await source.key_for(TokenHeader("ES256", "new"))
            assert algorithms == ["ES256"]
            assert key.as_dict()["x"] == ec_key("new").as_dict()["x"]
            assert server.fetches == 2
            # And a key retired at the URL is gone after the next refresh.
            server.publish(ec_key("new"))
            clock.now += 301
            with pytest.raises(AuthError, match="unknown key id"):
                await source.key_for(TokenHeader("RS256", "old"))


@pytest.mark.parametrize("failure", ["status", "not-json", "too-large"])
async def test_a_failed_fetch_keeps_the_last_good_set(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    with anyio.fail_after(10):
        async with serve_jwks(tmp_path) as server:
            server.publish(rsa_key("r1"))
            clock = FakeClock()
            source = server.endpoint(clock, cache_s=300, min_refresh_s=10)
            await source.key_for(TokenHeader("RS256", "r1"))
            server.failure = failure
            clock.now += 301
            with caplog.at_level(logging.WARNING, logger="app.auth.keys"):
                assert (await source.key_for(TokenHeader("RS256", "r1")))[1] == ["RS256"]
            assert server.fetches == 2
            assert "fetch failed" in caplog.text
            assert "keeping the 1 keys" in caplog.text
            # The set is still stale, but attempts stay at most one per min_refresh_s.
            for _ in range(5):
                await source.key_for(TokenHeader("RS256", "r1"))
            assert server.fetches == 2
            server.failure = None
            clock.now += 10
            await source.key_for(TokenHeader("RS256", "r1"))
            assert server.fetches == 3
            clock.now += 10
            await source.key_for(TokenHeader("RS256", "r1"))
            assert server.fetches == 3  # fresh again


async def test_credentials_in_the_jwks_url_never_reach_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(10):
        async with serve_jwks(tmp_path) as server:
            server.publish(rsa_key("r1"))
            url = server.url.replace("https://", "https://reader:pw-s3cret@") + "?api_key=k-s3cret"
            with caplog.at_level(logging.INFO, logger="app.auth.keys"):
                await JWKSEndpoint(url, ca_file=server.ca_file, clock=FakeClock()).key_for(TokenHeader("RS256", "r1"))
                server.failure = "status"
                with pytest.raises(AuthError):
                    await JWKSEndpoint(url, ca_file=server.ca_file, clock=FakeClock()).key_for(
                        TokenHeader("RS256", "r1")
                    )
            assert "signing keys loaded" in caplog.text
            assert "fetch failed" in caplog.text
            assert "https://***@127.0.0.1:" in caplog.text
            assert "s3cret" not in caplog.text


def test_redacted_url_keeps_what_finds_the_server() -> None:
    assert redacted_url("https://u:p@idp.example:8443/a/jwks?k=v") == "https://***@idp.example:8443/a/jwks?***"
    assert redacted_url("https://idp.example/jwks.json") == "https://idp.example/jwks.json"
    assert redacted_url("https://[::1]:9/j") == "https://[::1]:9/j"


async def test_concurrent_refreshes_are_coalesced_into_one_fetch(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        async with serve_jwks(tmp_path) as server:
            server.publish(rsa_key("r1"))
            server.delay_s = 0.3
            source = server.endpoint(min_refresh_s=0)
            results: list[list[str]] = []

            async def verify_one() -> None:
                results.append((await source.key_for(TokenHeader("RS256", "r1")))[1])

            async with anyio.create_task_group() as group:
                for _ in range(25):
                    group.start_soon(verify_one)
            assert results == [["RS256"]] * 25
            assert server.fetches == 1


async def test_a_fetch_outlives_the_cancelled_request_that_started_it(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        async with serve_jwks(tmp_path) as server:
            server.publish(rsa_key("r1"))
            server.delay_s = 0.3
            source = server.endpoint(min_refresh_s=10)
            # Without the shield, the cancelled fetch would leave no keys, and min_refresh_s would keep
            # the next request from fetching: every token refused for 10 s.
            with anyio.move_on_after(0.05):
                await source.key_for(TokenHeader("RS256", "r1"))
            assert (await source.key_for(TokenHeader("RS256", "r1")))[1] == ["RS256"]
            assert server.fetches == 1


async def test_the_server_certificate_is_verified(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with anyio.fail_after(10):
        async with serve_jwks(tmp_path) as server:
            server.publish(rsa_key("r1"))
            source = JWKSEndpoint(server.url, clock=FakeClock())  # system CAs: trustme's CA is not among them
            with pytest.raises(AuthError, match="unknown key id"):
                await source.key_for(TokenHeader("RS256", "r1"))
            assert server.fetches == 0
            assert "fetch failed (ConnectError" in caplog.text


async def test_the_endpoint_never_fetches_for_a_token_it_could_not_accept(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        async with serve_jwks(tmp_path) as server:
            source = server.endpoint()
            for alg in ("HS256", "none", "RS512"):
                with pytest.raises(AuthError, match="algorithm not allowed"):
                    await source.key_for(TokenHeader(alg, "r1"))
            assert server.fetches == 0


# --- choosing a source from settings ---


def test_key_source_from_settings_prefers_url_then_file_then_pem_then_secret(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(public_jwks(rsa_key("r1"))))
    pem = write_pem(tmp_path / "key.pem", ec.generate_private_key(ec.SECP256R1()).public_key())
    everything = AuthSettings(jwks_url="https://idp.example/jwks.json", jwks_file=jwks, public_key_file=pem)
    assert isinstance(key_source_from_settings(everything, SECRET), JWKSEndpoint)
    no_url = everything.model_copy(update={"jwks_url": None})
    assert isinstance(key_source_from_settings(no_url, SECRET), JWKSFile)
    pem_only = no_url.model_copy(update={"jwks_file": None})
    assert isinstance(key_source_from_settings(pem_only, SECRET), PublicKeyFile)
    assert isinstance(key_source_from_settings(AuthSettings(), SECRET), SharedSecret)
    with pytest.raises(ValueError, match="no token key configured"):
        key_source_from_settings(AuthSettings(), None)


def test_key_source_from_settings_refuses_a_plain_http_jwks_url() -> None:
    auth = AuthSettings(jwks_url="http://idp.example/jwks.json")
    with pytest.raises(ValueError, match="https://"):
        key_source_from_settings(auth, None)
