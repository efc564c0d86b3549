"""TokenVerifier end to end: real keys, real signatures, every source, and every way a token can be wrong."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from joserfc import jws, jwt
from joserfc.jwk import ECKey, Key, OctKey, RSAKey

from app.auth.keys import JWKSFile, KeySource, PublicKeyFile, SharedSecret, TokenHeader
from app.auth.tokens import MAX_TOKEN_BYTES, TokenVerifier, mint_token, principal_from_claims
from app.errors import AuthError
from app.models import Principal
from app.settings import AuthSettings
from tests.auth.test_keys import SECRET, FakeClock, ec_key, public_jwks, rsa_key, serve_jwks

pytestmark = pytest.mark.anyio

ISSUER = "https://idp.example/"
AUDIENCE = "wellstream"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "alice",
        "tenant_id": "acme",
        "wells": ["w1", "w2"],
        "scope": "stream:read",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 600,
    }
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not None}


def sign(key: Key, alg: str, body: dict[str, Any], kid: str | None = None, **header: Any) -> str:
    protected: dict[str, Any] = {"alg": alg, **header}
    if kid is not None:
        protected["kid"] = kid
    return jwt.encode(protected, body, key, algorithms=[alg])


def hs256(body: dict[str, Any], secret: str = SECRET) -> str:
    return sign(OctKey.import_key(secret), "HS256", body)


def verifier(source: KeySource, **options: Any) -> TokenVerifier:
    return TokenVerifier(source, **{"issuer": ISSUER, "audience": AUDIENCE, "leeway_s": 30, **options})


async def refused(verifier: TokenVerifier, token: str) -> str:
    """The reason a token is refused; checks it is a 401 that does not echo the token."""
    with pytest.raises(AuthError) as caught:
        await verifier.verify(token)
    error = caught.value
    assert type(error) is AuthError
    assert error.status == 401
    for part in {token, *token.split(".")}:
        assert len(part) < 6 or part not in str(error)
    return error.reason


@contextlib.asynccontextmanager
async def source_of(kind: str, key: RSAKey | ECKey, tmp_path: Path) -> AsyncIterator[KeySource]:
    """The public half of `key` served by each kind of asymmetric source."""
    if kind == "pem":
        path = tmp_path / "public.pem"
        path.write_bytes(key.as_pem(private=False))
        yield PublicKeyFile(path)
    elif kind == "jwks-file":
        path = tmp_path / "jwks.json"
        path.write_text(json.dumps(public_jwks(key)))
        yield JWKSFile(path)
    else:
        async with serve_jwks(tmp_path) as server:
            server.publish(key)
            yield server.endpoint()


ASYMMETRIC = [("RS256", rsa_key), ("ES256", ec_key)]
KINDS = ["pem", "jwks-file", "jwks-url"]


# --- tokens that are accepted ---


async def test_hs256_token_gives_its_principal() -> None:
    body = claims(jti="t-1")
    principal = await verifier(SharedSecret(SECRET)).verify(hs256(body))
    assert principal == Principal(
        subject="alice",
        tenant="acme",
        wells=frozenset({"w1", "w2"}),
        scopes=frozenset({"stream:read"}),
        expires_at=body["exp"],
        token_id="t-1",
        issued_at=body["iat"],
    )
    assert principal.expires_at > time.time()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("alg", "make_key"), ASYMMETRIC, ids=["RS256", "ES256"])
async def test_asymmetric_token_is_accepted_from_every_source(
    tmp_path: Path, kind: str, alg: str, make_key: Any
) -> None:
    with anyio.fail_after(10):
        key = make_key("k1")
        async with source_of(kind, key, tmp_path) as source:
            principal = await verifier(source).verify(sign(key, alg, claims(), kid="k1"))
            assert (principal.subject, principal.tenant) == ("alice", "acme")


async def test_mint_token_round_trips_through_from_settings() -> None:
    token = mint_token(SECRET, "globex", "bob", ["w9"], ttl_s=60)
    principal = await TokenVerifier.from_settings(AuthSettings(), SECRET).verify(token)
    assert (principal.subject, principal.tenant, principal.wells) == ("bob", "globex", frozenset({"w9"}))


async def test_within_leeway_is_accepted() -> None:
    now = int(time.time())
    token = hs256(claims(exp=now - 10, nbf=now + 10, iat=now + 10))
    assert (await verifier(SharedSecret(SECRET), leeway_s=30).verify(token)).tenant == "acme"


async def test_an_audience_list_containing_ours_is_accepted() -> None:
    token = hs256(claims(aud=["other-service", AUDIENCE]))
    assert (await verifier(SharedSecret(SECRET)).verify(token)).tenant == "acme"


async def test_camel_case_tenant_and_no_wells_or_scope() -> None:
    token = hs256(claims(tenant_id=None, tenantId="globex", wells=None, scope=None))
    principal = await verifier(SharedSecret(SECRET)).verify(token)
    assert (principal.tenant, principal.wells, principal.subject, principal.scopes) == (
        "globex",
        None,
        "alice",
        frozenset(),
    )


@pytest.mark.parametrize("subject", [None, ""])
async def test_a_token_without_a_subject_is_refused(subject: str | None) -> None:
    # Limits and audit lines are per subject: a shared fallback would let one caller lock out all the others.
    assert await refused(verifier(SharedSecret(SECRET)), hs256(claims(sub=subject))) == "missing claim sub"


async def test_iss_and_aud_are_not_required_when_not_configured() -> None:
    token = hs256(claims(iss=None, aud=None))
    assert (await TokenVerifier(SharedSecret(SECRET)).verify(token)).tenant == "acme"


# --- time ---


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"exp": -100}, "token expired"),
        ({"exp": None}, "missing claim exp"),
        ({"nbf": 100}, "token not yet valid"),
        ({"iat": 3600}, "invalid claim iat"),
    ],
    ids=["expired", "missing-exp", "nbf-in-the-future", "issued-in-the-future"],
)
async def test_time_claims_are_enforced_beyond_the_leeway(overrides: dict[str, Any], reason: str) -> None:
    now = int(time.time())
    times = {name: now + delta if delta is not None else None for name, delta in overrides.items()}
    token = hs256(claims(**times))
    assert await refused(verifier(SharedSecret(SECRET), leeway_s=30), token) == reason


# --- signature, issuer, audience ---


async def test_a_wrong_signature_is_refused() -> None:
    token = hs256(claims(), secret="another-secret-that-is-also-32-bytes")
    assert await refused(verifier(SharedSecret(SECRET)), token) == "bad signature"


@pytest.mark.parametrize(("alg", "make_key"), ASYMMETRIC, ids=["RS256", "ES256"])
async def test_a_token_signed_by_another_key_with_the_same_kid_is_refused(
    tmp_path: Path, alg: str, make_key: Any
) -> None:
    async with source_of("jwks-file", make_key("k1"), tmp_path) as source:
        token = sign(make_key("impostor"), alg, claims(), kid="k1")
        assert await refused(verifier(source), token) == "bad signature"


async def test_a_tampered_payload_is_refused() -> None:
    header, _, signature = hs256(claims()).split(".")
    payload = b64(json.dumps(claims(tenant_id="globex")).encode())
    assert await refused(verifier(SharedSecret(SECRET)), f"{header}.{payload}.{signature}") == "bad signature"


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"iss": "https://evil.example/"}, "invalid claim iss"),
        ({"iss": None}, "missing claim iss"),
        ({"aud": "other-service"}, "invalid claim aud"),
        ({"aud": ["a", "b"]}, "invalid claim aud"),
        ({"aud": None}, "missing claim aud"),
    ],
)
async def test_wrong_or_missing_issuer_and_audience_are_refused(overrides: dict[str, Any], reason: str) -> None:
    assert await refused(verifier(SharedSecret(SECRET)), hs256(claims(**overrides))) == reason


# --- algorithms ---


def alg_none_token() -> str:
    """Hand-crafted, as an attacker would: `base64url({"alg":"none"}).base64url(claims).` with no signature."""
    return b64(b'{"alg":"none"}') + "." + b64(json.dumps(claims()).encode()) + "."


@pytest.mark.parametrize("kind", ["secret", *KINDS])
async def test_alg_none_is_always_refused(tmp_path: Path, kind: str) -> None:
    with anyio.fail_after(10):
        if kind == "secret":
            assert await refused(verifier(SharedSecret(SECRET)), alg_none_token()) == "algorithm not allowed"
            return
        async with source_of(kind, rsa_key("k1"), tmp_path) as source:
            assert await refused(verifier(source), alg_none_token()) == "algorithm not allowed"
            for header in ({"alg": "none", "kid": "k1"}, {"alg": "None"}, {"alg": "NONE", "kid": "k1"}):
                token = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims()).encode())}."
                assert await refused(verifier(source), token) == "algorithm not allowed"


@pytest.mark.parametrize("kind", ["pem", "jwks-file"])
async def test_hs256_signed_with_the_public_key_pem_is_refused(tmp_path: Path, kind: str) -> None:
    """The algorithm confusion attack: the attacker knows the public key and uses it as an HMAC secret."""
    async with source_of(kind, rsa_key("k1"), tmp_path) as source:
        public_pem = rsa_key("k1").as_pem(private=False)
        for secret in (public_pem, public_pem.strip(), json.dumps(public_jwks(rsa_key("k1"))["keys"][0]).encode()):
            head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
            body = b64(json.dumps(claims()).encode())
            mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
            assert await refused(verifier(source), f"{head}.{body}.{b64(mac)}") == "algorithm not allowed"


async def test_an_asymmetric_token_is_refused_by_a_shared_secret() -> None:
    token = sign(rsa_key("k1"), "RS256", claims(), kid="k1")
    assert await refused(verifier(SharedSecret(SECRET)), token) == "algorithm not allowed"


async def test_an_algorithm_that_does_not_match_the_key_type_is_refused(tmp_path: Path) -> None:
    """The key decides the algorithm: an ES256 token naming an RSA key's kid never gets to RS256 checks."""
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(public_jwks(rsa_key("rsa"), ec_key("ec"))))
    token = sign(ec_key("ec"), "ES256", claims(), kid="rsa")
    assert await refused(verifier(JWKSFile(path)), token) == "algorithm not allowed"
    unrestricted = RSAKey.import_key(rsa_key("rsa").as_pem(private=True))  # rsa_key("rsa") may only sign RS256
    ps256 = jwt.encode({"alg": "PS256", "kid": "rsa"}, claims(), unrestricted, algorithms=["PS256"])
    assert await refused(verifier(JWKSFile(path)), ps256) == "algorithm not allowed"


async def test_unknown_kid_is_refused_after_exactly_one_refetch(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        async with serve_jwks(tmp_path) as server:
            server.publish(rsa_key("k1"))
            clock = FakeClock()
            check = verifier(server.endpoint(clock, min_refresh_s=10))
            await check.verify(sign(rsa_key("k1"), "RS256", claims(), kid="k1"))
            clock.now += 10
            forged = sign(rsa_key("k2"), "RS256", claims(), kid="k2")
            assert await refused(check, forged) == "unknown key id"
            assert server.fetches == 2
            assert await refused(check, sign(rsa_key("k3"), "RS256", claims(), kid="k3")) == "unknown key id"
            assert server.fetches == 2


async def test_a_token_without_kid_is_refused_when_the_set_has_several_keys(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(public_jwks(rsa_key("k1"), rsa_key("k2"))))
    token = sign(rsa_key("k1"), "RS256", claims())
    assert await refused(verifier(JWKSFile(path)), token) == "token has no key id"


async def test_header_parameters_pointing_at_keys_are_ignored(tmp_path: Path) -> None:
    """An embedded `jwk` or a `jku` (the attacker's own key) must not be used to verify the token."""
    attacker = ec_key("attacker")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(public_jwks(ec_key("k1"))))
    token = sign(
        attacker, "ES256", claims(), kid="k1", jwk=attacker.as_dict(private=False), jku="https://evil.example/"
    )
    assert await refused(verifier(JWKSFile(path)), token) == "bad signature"


# --- malformed input ---


def header_token(header: str) -> str:
    return f"{b64(header.encode())}.{b64(json.dumps(claims()).encode())}.{b64(b'sig')}"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b",
        "a.b.c.d.e",
        "....",
        "é.a.b",
        "!!!.a.b",
        "a+b/.c.d",
        "a.b.c",
        header_token("[1, 2]"),
        header_token('"HS256"'),
        header_token('{"kid": "x"}'),
        header_token('{"alg": 5}'),
        header_token('{"alg": "HS256", "kid": 5}'),
        header_token('{"alg": "HS256", "kid": ""}'),
        header_token('{"alg": "HS256", "alg": "none"}'),
        header_token('{"alg": "HS256", "x": NaN}'),
        header_token("[" * 600 + "]" * 600),
        b64(b"\xff\xfe\x00") + ".e30.c2ln",
    ],
)
async def test_malformed_tokens_are_refused(token: str) -> None:
    assert await refused(verifier(SharedSecret(SECRET)), token) == "malformed token"


async def test_an_oversized_token_is_refused_before_parsing() -> None:
    token = hs256(claims(padding="x" * MAX_TOKEN_BYTES))
    assert await refused(verifier(SharedSecret(SECRET)), token) == "token too large"


async def test_headers_we_do_not_implement_are_refused() -> None:
    for extra in ({"crit": ["exp"]}, {"b64": False, "crit": ["b64"]}):
        token = header_token(json.dumps({"alg": "HS256", **extra}))
        assert await refused(verifier(SharedSecret(SECRET)), token) == "unsupported token header"


@pytest.mark.parametrize("token", [None, b"a.b.c", 42])
async def test_a_token_that_is_not_a_string_is_refused(token: Any) -> None:
    with pytest.raises(AuthError, match="malformed token"):
        await verifier(SharedSecret(SECRET)).verify(token)


# --- claims ---


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"tenant_id": "a*b"}, "token claim tenant_id must be a valid id"),
        ({"tenant_id": "acme:x"}, "token claim tenant_id must be a valid id"),
        ({"tenant_id": 7}, "token claim tenant_id must be a valid id"),
        ({"tenant_id": None}, "missing claim tenant_id"),
        ({"tenantId": "globex"}, "token claims tenant_id and tenantId disagree"),
        ({"wells": "w1"}, "token claim wells must be a list of well ids"),
        ({"wells": ["w1", "w*"]}, "token claim wells must be a list of well ids"),
        ({"wells": [1]}, "token claim wells must be a list of well ids"),
        ({"exp": "9999999999"}, "token claim exp must be a NumericDate"),
        ({"exp": True}, "token claim exp must be a NumericDate"),
        ({"exp": 2**41}, "token claim exp must be a NumericDate"),
        ({"exp": 10**400}, "token claim exp must be a NumericDate"),
        ({"nbf": "0"}, "token claim nbf must be a NumericDate"),
        ({"iat": -1}, "token claim iat must be a NumericDate"),
        ({"sub": 5}, "invalid claim sub"),
        ({"sub": "x" * 300}, "token claims are not valid"),
        ({"scope": ["stream:read"]}, "token claim scope must be a string"),
    ],
)
async def test_claims_of_the_wrong_type_or_range_are_refused(overrides: dict[str, Any], reason: str) -> None:
    assert await refused(verifier(SharedSecret(SECRET)), hs256(claims(**overrides))) == reason


async def test_a_payload_with_duplicate_members_or_nan_is_refused() -> None:
    key = OctKey.import_key(SECRET)
    body = json.dumps(claims())[:-1]
    for payload in (body + ', "tenant_id": "globex"}', body + ', "x": NaN}'):
        token = jws.serialize_compact({"alg": "HS256"}, payload.encode(), key, algorithms=["HS256"])
        assert await refused(verifier(SharedSecret(SECRET)), token) == "invalid token: invalid_payload"


def test_principal_from_claims_validates_on_its_own() -> None:
    assert principal_from_claims({"sub": "a", "tenant_id": "acme", "exp": 2_000_000_000}).tenant == "acme"
    with pytest.raises(AuthError, match="exp"):
        principal_from_claims({"sub": "a", "tenant_id": "acme"})
    with pytest.raises(AuthError, match="exp"):
        principal_from_claims({"sub": "a", "tenant_id": "acme", "exp": float("nan")})
    with pytest.raises(AuthError, match="sub"):
        principal_from_claims({"tenant_id": "acme", "exp": 2_000_000_000})


# --- nothing but AuthError escapes ---


class BrokenSource:
    async def key_for(self, header: TokenHeader) -> tuple[Key, list[str]]:
        raise RuntimeError("a bug in a key source")


async def test_an_unexpected_error_fails_closed_as_auth_error(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="app.auth.tokens"):
        assert await refused(verifier(BrokenSource()), hs256(claims())) == "token verification failed"
    assert "unexpected RuntimeError" in caplog.text


async def test_asymmetric_keys_without_an_audience_refuse_to_start_unless_allowed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pem = tmp_path / "public.pem"
    pem.write_bytes(ec_key("k1").as_pem(private=False))
    with pytest.raises(ValueError, match=r"auth\.audience is not set"):
        TokenVerifier.from_settings(AuthSettings(public_key_file=pem), None)
    TokenVerifier.from_settings(AuthSettings(public_key_file=pem, allow_any_audience=True), None)
    assert "auth.audience is not set" in caplog.text
    caplog.clear()
    TokenVerifier.from_settings(AuthSettings(public_key_file=pem, audience=AUDIENCE), None)
    TokenVerifier.from_settings(AuthSettings(), SECRET)
    assert "auth.audience" not in caplog.text
