"""All configuration, loaded once: environment (`WELLSTREAM_*`) over an optional TOML file.

Nothing else reads os.environ. Nested groups use `__`, e.g. `WELLSTREAM_STREAM__HEARTBEAT_S=5`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork, SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from app.models import Identifier

DEFAULT_CONFIG_FILE = Path("config/wellstream.toml")


class HistorySettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_len: int = Field(10_000, ge=10, description="stream entries kept per well (approximate on Redis)")
    max_age_s: float = Field(24 * 3600, ge=0, description="entries older than this are trimmed; 0 keeps by length only")
    replay_page: int = Field(500, ge=1, le=10_000, description="entries read per history round trip on resume")


class StreamSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    heartbeat_s: float = Field(15, gt=0, description="comment line after this much silence")
    retry_ms: int = Field(2000, ge=100, description="EventSource reconnect delay sent in the first frame")
    shutdown_retry_spread_ms: int = Field(5000, ge=0, description="on shutdown, retry is jittered over this window")
    queue_size: int = Field(1024, ge=8, description="frames queued per stream before it is ended as slow")
    send_timeout_s: float = Field(10, gt=0, description="a send stuck this long ends the stream")
    stall_s: float = Field(
        5, gt=0, description="a reading queued this long and not sent ends the stream (it resumes): never silent"
    )
    shutdown_grace_s: float = Field(3, ge=0, description="time streams get to say goodbye on SIGTERM")
    max_age_s: float | None = Field(
        None, gt=0, description="end streams after 75-100 % of this (jittered) so load rebalances; None: never"
    )


class RedisSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    cluster: bool = Field(
        False, description="redis_url names any one node of a Redis Cluster (sharded Pub/Sub; slot moves followed)"
    )
    min_replicas_ack: int | None = Field(
        None, ge=0, description="replicas that must have a published batch before it counts as stored; None: 1 if any"
    )
    max_connections: int = Field(
        32, ge=1, le=10_000, description="pooled command connections per process; a burst of opens waits its turn"
    )
    sentinel_password: SecretStr | None = Field(
        None, description="the Redis Sentinels' own password (their requirepass); the primary's is in the URL"
    )
    pool_timeout_s: float = Field(
        10, gt=0, description="a command waits this long, in turn, for a pooled connection; then a stream open gets 503"
    )
    timeout_s: float = Field(5, gt=0, description="bound on every Redis command and connect (a frozen Redis)")
    ping_interval_s: float = Field(
        5, gt=0, description="live feed health check; three missed pongs and it reconnects and fills the gap"
    )


class SpoolSettings(BaseModel):
    """The ingest worker's local spool for batches Redis could not take (app/spool.py)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(True, description="off: a failed batch is retried in memory and adapters wait")
    path: Path = Field(Path("var/spool/ingest.sqlite3"), description="SQLite file; one per worker (locked)")
    max_bytes: int = Field(512 * 2**20, ge=2**16, description="payload bound; when full the OLDEST batches go")
    max_readings: int | None = Field(None, ge=1, description="optional bound in readings, same policy")
    synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL", description="FULL: acknowledged = on disk; NORMAL: survives SIGKILL, not a power cut"
    )
    publish_timeout_s: float = Field(5, gt=0, description="a publish unanswered this long is spooled")
    drain_on_exit_s: float = Field(5, ge=0, description="on SIGTERM, time to drain the spool while Redis answers")


def _loopback() -> list[IPv4Network | IPv6Network]:
    return [IPv4Network("127.0.0.0/8"), IPv6Network("::1/128")]


class ServerSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    gc_threshold: tuple[int, int, int] | None = Field(
        (100_000, 50, 100),
        description="gc.set_threshold for serve/demo; None keeps Python's (700, 10, 10)",
    )
    gc_freeze: bool = Field(True, description="gc.freeze() once started, so start-up objects are never rescanned")
    access_log: bool = Field(True, description="one JSON line per non-stream request (no query strings, no headers)")
    max_body_bytes: int = Field(
        16_384, ge=0, description="largest request body on any route; past it 413, and the rest is never read"
    )
    metrics_allow: list[IPvAnyNetwork] = Field(
        default_factory=_loopback,
        description="peers that may read /metrics (it names tenants); others get 404",
    )
    granian_http2: bool = Field(False, description="--server granian also speaks HTTP/2 (h2c); costs memory per stream")
    # A peer that vanished without a FIN (power cut, NAT dropped the flow): TCP keepalive finds it
    # on an idle connection, TCP_USER_TIMEOUT on one with unacknowledged data (a stream's heartbeat).
    # Set on the listening sockets; Linux copies them to every accepted connection.
    tcp_keepalive: bool = Field(True, description="SO_KEEPALIVE and the TCP_* options below on served connections")
    tcp_keepalive_idle_s: int = Field(30, ge=1, le=32767, description="idle time before the first keepalive probe")
    tcp_keepalive_interval_s: int = Field(10, ge=1, le=32767, description="between unanswered keepalive probes")
    tcp_keepalive_count: int = Field(3, ge=1, le=127, description="unanswered probes before the connection is dropped")
    tcp_user_timeout_s: float = Field(
        60, ge=0, description="data unacknowledged this long drops the connection (TCP_USER_TIMEOUT; 0 = kernel's)"
    )
    # What a connection may hold before it has asked anything (app/gateway/sockets.py): every one is
    # a file descriptor, and the stream limits above only start counting once a request is parsed.
    request_head_timeout_s: float = Field(
        10, gt=0, description="a new connection's TLS handshake and first request head must arrive within this"
    )
    keep_alive_s: float = Field(
        75, gt=0, description="idle time allowed between requests; above nginx's upstream keepalive_timeout (60 s)"
    )
    connections_per_address: int | None = Field(
        512, ge=1, description="open connections one peer address may hold; more are reset at accept; null: no cap"
    )
    connection_cap_exempt: list[IPvAnyNetwork] = Field(
        default_factory=_loopback,
        description="peers never capped (a proxy in front carries many clients); auth.trusted_proxies are too",
    )


class LimitSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    streams_per_subject: int = Field(50, ge=1, description="concurrent streams of one token subject (429)")
    streams_per_tenant: int = Field(5000, ge=1, description="concurrent streams of one tenant, all gateways (429)")
    streams_per_process: int = Field(15000, ge=1, description="open streams in this gateway (503, try another)")
    connects_per_s: float = Field(5, gt=0, description="connection attempts per client address and per subject")
    connect_burst: int = Field(30, ge=1, description="token bucket size for connection attempts")
    wells_per_stream: int = Field(2000, ge=1, description="wells one stream of many wells may carry (400 beyond)")
    auth_failures_per_s: float = Field(1, gt=0, description="failed authentications per client address, any route")
    auth_failure_burst: int = Field(20, ge=1, description="failed authentications before an address must slow down")


class AuthSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    jwt_secret: SecretStr | None = Field(None, description="HS256 shared secret (development)")
    public_key_file: Path | None = Field(None, description="PEM public key: RS256 (RSA) or ES256 (P-256)")
    jwks_file: Path | None = Field(None, description="a JWKS document on disk")
    jwks_url: str | None = Field(None, description="https URL of a JWKS, cached, refreshed on an unknown kid")
    jwks_ca_file: Path | None = Field(None, description="CA bundle for jwks_url (default: the system's)")
    jwks_cache_s: float = Field(300, gt=0, description="how long a fetched JWKS is trusted")
    jwks_min_refresh_s: float = Field(10, ge=0, description="at most one refetch per this interval (unknown kids)")
    issuer: str | None = None
    audience: str | None = None
    allow_any_audience: bool = Field(
        False,
        description="accept tokens without our audience when a public key or JWKS verifies (else: refuse to start)",
    )
    read_scope: str | None = Field(
        "stream:read",
        pattern=r"^([\x21\x23-\x5b\x5d-\x7e]{1,128})?$",
        description="the scope every request's token needs (every route reads); empty or null: no check",
    )
    leeway_s: int = Field(30, ge=0, le=300)
    allow_query_token: bool = Field(False, description="accept ?access_token= (puts tokens in URLs and logs)")
    cookie_name: str = Field("wellstream_session", pattern=r"^[A-Za-z0-9_]{1,64}$")
    ticket_ttl_s: int = Field(60, ge=5, le=600, description="life of a single-use stream ticket")
    cors_origins: list[str] = Field(default_factory=list, description="dashboard origins allowed cross-origin")
    trusted_proxies: list[str] = Field(
        default_factory=list, description="proxy addresses whose X-Forwarded-For names the client (nginx, Caddy)"
    )
    limits: LimitSettings = LimitSettings()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="WELLSTREAM_", env_nested_delimiter="__", extra="forbid", frozen=True, toml_file=None
    )

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    redis_url: str | None = Field(
        None,
        description="redis://… or redis+sentinel://host:port,…/<service>[/<db>]; unset: the embedded memory broker",
    )
    # The flat variable the README documents; it takes precedence over auth.jwt_secret.
    jwt_secret: SecretStr | None = None
    history: HistorySettings = HistorySettings()
    redis: RedisSettings = RedisSettings()
    stream: StreamSettings = StreamSettings()
    server: ServerSettings = ServerSettings()
    auth: AuthSettings = AuthSettings()
    spool: SpoolSettings = SpoolSettings()
    # The configured registry of wells per tenant (the site config feeds it); ingestion adds
    # the wells it sees. A stream for a well in neither is a 404.
    wells: dict[Identifier, list[Identifier]] = Field(default_factory=dict)
    static_dir: Path = Path(__file__).resolve().parent.parent / "static"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = Path(os.environ.get("WELLSTREAM_CONFIG_FILE", DEFAULT_CONFIG_FILE))
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if config_file.is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    @property
    def secret(self) -> str | None:
        chosen = self.jwt_secret or self.auth.jwt_secret
        return chosen.get_secret_value() if chosen else None


def environment() -> Mapping[str, str]:
    """The process environment, for credentials a site file names by variable (never stores)."""
    return os.environ
