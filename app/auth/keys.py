"""Where token verification keys come from: a shared secret, a PEM file, a JWKS file or a JWKS URL.

Security contract, the same for every source:

- The algorithm a key may verify comes from the key's own type, never from the token header:
  a shared secret verifies HS256, an RSA key RS256, an EC P-256 key ES256. Nothing else is ever allowed,
  so `alg: none` is impossible and an HS256 token can never be checked against a public key (the
  "algorithm confusion" attack): with an asymmetric source configured, no HMAC key exists at all.
- Keys come only from configuration. Header parameters that point at keys (`jku`, `jwk`, `x5u`, `x5c`)
  are never looked at; only `alg` and `kid` are (see TokenHeader).
- In a JWKS, only RSA (>= 2048 bits) and EC P-256 keys meant for signatures are used (`use` absent or
  "sig", `key_ops` absent or containing "verify", `alg` absent or equal to the one the type implies).
  Only public members are imported, even if the document carries private ones.
- A token whose `kid` is not in the set is refused; a token without a `kid` only verifies against a set
  of exactly one key.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import anyio
import httpx
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc.jwk import ECKey, Key, OctKey, RSAKey

from app.errors import AuthError
from app.settings import AuthSettings

logger = logging.getLogger(__name__)

MIN_SECRET_BYTES = 32  # RFC 7518 section 3.2: an HS256 key MUST be at least as long as the hash output
MIN_RSA_BITS = 2048
JWKS_MAX_BYTES = 512 * 1024
ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "ES256"})

DictKey = dict[str, str | list[str]]  # joserfc's type for a JWK as a dict


@dataclass(frozen=True, slots=True)
class TokenHeader:
    """The only two header parameters key selection may look at, already type-checked.

    `alg` is what the token claims; a source never trusts it to pick an algorithm, only to refuse early.
    """

    alg: str
    kid: str | None = None


class KeySource(Protocol):
    """Gives the key to verify a token with, and the algorithms that key may verify.

    The algorithms depend only on the key (its type), never on the header. Raises AuthError(401) when
    no configured key may verify this token (unknown `kid`, missing `kid` with several keys).
    Never raises anything else: fetch failures are logged and the last good keys kept.
    """

    async def key_for(self, header: TokenHeader) -> tuple[Key, list[str]]: ...


class SharedSecret:
    """An HS256 shared secret (development, or a single trusted token issuer)."""

    def __init__(self, secret: str) -> None:
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"the JWT secret must be at least {MIN_SECRET_BYTES} bytes long for HS256")
        self._key = OctKey.import_key(secret)

    async def key_for(self, header: TokenHeader) -> tuple[Key, list[str]]:
        return self._key, ["HS256"]


class PublicKeyFile:
    """One PEM public key read at start-up: RSA (RS256) or EC P-256 (ES256). The token's `kid` is ignored."""

    def __init__(self, path: Path) -> None:
        origin = f"public key file {path}"
        data = _read(path, origin)
        try:
            public = serialization.load_pem_public_key(data)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ValueError(f"{origin}: not a PEM public key (-----BEGIN PUBLIC KEY-----)") from exc
        self._key, self._algorithm = _import_public(public, origin)

    async def key_for(self, header: TokenHeader) -> tuple[Key, list[str]]:
        return self._key, [self._algorithm]


@dataclass(frozen=True, slots=True)
class _Entry:
    kid: str | None
    key: RSAKey | ECKey
    algorithm: str


class _KeyTable:
    """Usable keys of one JWKS document, by kid. A kid published twice is ambiguous and dropped."""

    def __init__(self, entries: list[_Entry], origin: str) -> None:
        self._entries = entries
        self._by_kid: dict[str, _Entry] = {}
        duplicated: set[str] = set()
        for entry in entries:
            if entry.kid is None:
                continue
            if entry.kid in self._by_kid:
                duplicated.add(entry.kid)
            self._by_kid[entry.kid] = entry
        for kid in duplicated:
            logger.warning("%s: kid %.64r is published more than once; its keys are not used", origin, kid)
            del self._by_kid[kid]

    def __len__(self) -> int:
        return len(self._entries)

    def find(self, kid: str | None) -> _Entry | None:
        if kid is None:
            return self._entries[0] if len(self._entries) == 1 else None
        return self._by_kid.get(kid)

    def key_for(self, header: TokenHeader) -> tuple[Key, list[str]]:
        entry = self.find(header.kid)
        if entry is None:
            raise AuthError("token has no key id" if header.kid is None else "unknown key id")
        return entry.key, [entry.algorithm]


class JWKSFile:
    """A JWKS document read once at start-up. Refuses to start if it holds no usable signing key."""

    def __init__(self, path: Path) -> None:
        origin = f"JWKS file {path}"
        try:
            document = json.loads(_read(path, origin))
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"{origin}: not JSON") from exc
        self._table = _KeyTable(_parse_jwks(document, origin), origin)
        if not self._table:
            raise ValueError(f"{origin}: no usable signing key (RSA for RS256 or EC P-256 for ES256)")

    async def key_for(self, header: TokenHeader) -> tuple[Key, list[str]]:
        if header.alg not in ASYMMETRIC_ALGORITHMS:
            raise AuthError("algorithm not allowed")
        return self._table.key_for(header)


class JWKSEndpoint:
    """A JWKS fetched over https, cached, and refetched when a token names a kid it does not hold.

    Contract:
        - Only https:// URLs; the server certificate is verified against `ca_file` or the system's CAs.
        - The set is trusted for `cache_s`; a token with an unknown `kid` triggers one refetch.
        - Fetch attempts, for whatever reason, are at most one per `min_refresh_s`, so a flood of
          tokens with random kids cannot make us hammer the identity provider.
        - Concurrent refreshes are coalesced: tasks that waited while another one fetched use its result.
        - A failed fetch (network, TLS, status, size, not a JWKS) logs a warning and keeps the last good
          set. A well-formed set is taken as published, even if it no longer holds a key we can use.
        - A fetch runs shielded from the cancellation of the request that started it, bounded by `timeout_s`.
    """

    def __init__(
        self,
        url: str,
        *,
        ca_file: Path | None = None,
        cache_s: float = 300,
        min_refresh_s: float = 10,
        timeout_s: float = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"jwks_url must be an https:// URL with a host, not scheme {parts.scheme!r}")
        try:
            self._ssl = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"jwks_ca_file {ca_file}: not a readable PEM CA bundle") from exc
        self._url = url
        self._shown = redacted_url(url)
        self._cache_s = cache_s
        self._min_refresh_s = min_refresh_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._table = _KeyTable([], self._shown)
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._attempts = 0
        self._lock = anyio.Lock()

    @property
    def url(self) -> str:
        return self._url

    async def key_for(self, header: TokenHeader) -> tuple[Key, list[str]]:
        if header.alg not in ASYMMETRIC_ALGORITHMS:
            # Refused before any lookup: a token we could never accept must not cause a fetch.
            raise AuthError("algorithm not allowed")
        if self._fetched_at is None or self._clock() - self._fetched_at >= self._cache_s:
            await self.refresh()
        if header.kid is not None and self._table.find(header.kid) is None:
            await self.refresh()
        return self._table.key_for(header)

    async def refresh(self) -> None:
        """Fetch the set now, unless another task just did or the last attempt is under min_refresh_s old."""
        seen = self._attempts
        async with self._lock:
            if self._attempts != seen:
                return
            now = self._clock()
            if self._attempted_at is not None and now - self._attempted_at < self._min_refresh_s:
                return
            self._attempted_at = now
            self._attempts += 1
            with anyio.CancelScope(shield=True):
                await self._fetch_and_swap()

    async def _fetch_and_swap(self) -> None:
        try:
            with anyio.fail_after(self._timeout_s):
                entries = _parse_jwks(json.loads(await self._download()), self._shown)
        except Exception as exc:  # every failure of the fetch means the same: keep the last good set
            logger.warning(
                "JWKS %s: fetch failed (%s: %s); keeping the %d keys of the last good set",
                self._shown,
                type(exc).__name__,
                str(exc).replace(self._url, self._shown),
                len(self._table),
            )
            return
        self._table = _KeyTable(entries, self._shown)
        self._fetched_at = self._clock()
        if entries:
            logger.info("JWKS %s: %d signing keys loaded", self._shown, len(entries))
        else:
            logger.warning(
                "JWKS %s: the published set has no usable signing key; every token will be refused", self._shown
            )

    async def _download(self) -> bytes:
        async with (
            httpx.AsyncClient(verify=self._ssl, timeout=self._timeout_s, follow_redirects=False) as client,
            client.stream("GET", self._url, headers={"accept": "application/json"}) as response,
        ):
            if response.status_code != 200:
                raise ValueError(f"HTTP status {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > JWKS_MAX_BYTES:
                    raise ValueError(f"document larger than {JWKS_MAX_BYTES} bytes")
            return bytes(body)


def redacted_url(url: str) -> str:
    """The URL for logs: credentials in its user part or query (some IdPs put a key there) left out."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = f"{host}:{parts.port}" if parts.port else host
    userinfo = "***@" if parts.username or parts.password else ""
    query = "?***" if parts.query else ""
    return f"{parts.scheme}://{userinfo}{netloc}{parts.path}{query}"


def key_source_from_settings(auth: AuthSettings, secret: str | None) -> KeySource:
    """The configured key source, first of: jwks_url, jwks_file, public_key_file, secret.

    Raises ValueError if none is configured or the chosen one cannot be loaded (start-up error).
    """
    configured = [
        name
        for name, value in (
            ("auth.jwks_url", auth.jwks_url),
            ("auth.jwks_file", auth.jwks_file),
            ("auth.public_key_file", auth.public_key_file),
            ("the JWT secret", secret),
        )
        if value
    ]
    if not configured:
        raise ValueError(
            "no token key configured: set auth.jwks_url, auth.jwks_file, auth.public_key_file or WELLSTREAM_JWT_SECRET"
        )
    if len(configured) > 1:
        logger.warning("token keys: using %s; ignoring %s", configured[0], ", ".join(configured[1:]))
    if auth.jwks_url:
        return JWKSEndpoint(
            auth.jwks_url,
            ca_file=auth.jwks_ca_file,
            cache_s=auth.jwks_cache_s,
            min_refresh_s=auth.jwks_min_refresh_s,
        )
    if auth.jwks_file:
        return JWKSFile(auth.jwks_file)
    if auth.public_key_file:
        return PublicKeyFile(auth.public_key_file)
    assert secret is not None  # one of the four is set
    return SharedSecret(secret)


def _parse_jwks(document: object, origin: str) -> list[_Entry]:
    """The usable signing keys of a JWKS document; keys we cannot or must not use are skipped and logged.

    Raises ValueError if the document is not a JWKS at all (an object with a `keys` list).
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError(f"{origin}: not a JWKS (no keys list)")
    entries: list[_Entry] = []
    for index, jwk in enumerate(document["keys"]):
        try:
            entry = _import_jwk(jwk)
        except _NotForUs as exc:
            logger.info("%s: key %d not used: %s", origin, index, exc)
        except Exception as exc:  # a broken key is skipped, whatever the library raises for it
            logger.warning("%s: key %d skipped, it is malformed (%s)", origin, index, type(exc).__name__)
        else:
            entries.append(entry)
    return entries


class _NotForUs(Exception):
    """A well-formed key we must not use for token signatures."""


def _import_jwk(jwk: object) -> _Entry:
    if not isinstance(jwk, dict):
        raise ValueError("not an object")
    use, key_ops, alg, kid = jwk.get("use"), jwk.get("key_ops"), jwk.get("alg"), jwk.get("kid")
    if use is not None and use != "sig":
        raise _NotForUs(f"use is {use!r:.20}")
    if key_ops is not None and not (isinstance(key_ops, list) and "verify" in key_ops):
        raise _NotForUs("key_ops does not contain verify")
    kty, crv = jwk.get("kty"), jwk.get("crv")
    members: tuple[str, ...]
    if kty == "RSA":
        algorithm, members = "RS256", ("kty", "n", "e")
    elif kty == "EC" and crv == "P-256":
        algorithm, members = "ES256", ("kty", "crv", "x", "y")
    else:
        raise _NotForUs(f"key type {kty!r:.20} {crv!r:.20} is not RSA or EC P-256")
    if alg is not None and alg != algorithm:
        raise _NotForUs(f"alg {alg!r:.20} does not match its key type ({algorithm})")
    if kid is not None and not (isinstance(kid, str) and 0 < len(kid) <= 256):
        raise ValueError("kid is not a short string")
    public = _public_members(jwk, members)
    if algorithm == "RS256":
        # Checked before joserfc sees the key: it only warns about short RSA keys.
        if _b64url_uint_bits(public["n"]) < MIN_RSA_BITS:
            raise _NotForUs(f"RSA key shorter than {MIN_RSA_BITS} bits")
        return _Entry(kid, RSAKey.import_key(public), algorithm)
    return _Entry(kid, ECKey.import_key(public), algorithm)


def _public_members(jwk: Mapping[str, object], names: tuple[str, ...]) -> DictKey:
    public: DictKey = {}
    for name in names:
        value = jwk.get(name)
        if not isinstance(value, str):
            raise ValueError(f"member {name} is not a string")
        public[name] = value
    return public


def _b64url_uint_bits(value: str | list[str]) -> int:
    if not isinstance(value, str):
        raise ValueError("not a base64url string")
    raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    return int.from_bytes(raw, "big").bit_length()


def _import_public(public: object, origin: str) -> tuple[RSAKey | ECKey, str]:
    spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if isinstance(public, rsa.RSAPublicKey):
        if public.key_size < MIN_RSA_BITS:
            raise ValueError(f"{origin}: RSA key of {public.key_size} bits; at least {MIN_RSA_BITS} are required")
        return RSAKey.import_key(public.public_bytes(*spki)), "RS256"
    if isinstance(public, ec.EllipticCurvePublicKey):
        if not isinstance(public.curve, ec.SECP256R1):
            raise ValueError(f"{origin}: EC curve {public.curve.name} is not supported; use P-256 (ES256)")
        return ECKey.import_key(public.public_bytes(*spki)), "ES256"
    raise ValueError(f"{origin}: {type(public).__name__} is not supported; use RSA (RS256) or EC P-256 (ES256)")


def _read(path: Path, origin: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{origin}: cannot be read ({exc.strerror or type(exc).__name__})") from exc
