"""The shared vocabulary: identifiers, readings, stream ids and events.

Everything that crosses a process boundary is validated here once, at ingress, and trusted
inside. Identifiers end up in Redis key and channel names, so the id rule is the security
boundary between tenants: nothing that could act as a glob (`* ? [ ]`) or a separator (`:`)
is ever accepted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_ID_RE = re.compile(ID_PATTERN)
_STREAM_ID_RE = re.compile(r"^(0|[1-9][0-9]{0,19})-(0|[1-9][0-9]{0,19})$")
# Kept verbatim (the device's own precision); anything else ISO-8601 is normalized.
_CANONICAL_TS_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{1,9}Z$")
_UNIT_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,32}$")

Identifier = Annotated[str, Field(pattern=ID_PATTERN)]
Quality = Literal["GOOD", "BAD", "UNCERTAIN"]
# Why a reading is not plainly GOOD (or, for `override`, GOOD with a caveat); the README's contract says each one.
Reason = Literal["comm_failure", "device_error", "out_of_range", "override", "retained", "stale"]
_STATUS_CODE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
SourceProtocol = Literal["opcua", "modbus", "mqtt", "sparkplug", "simulator"]


def is_valid_id(value: str) -> bool:
    """True if `value` may be used as a tenant, well, tag or connection id."""
    return _ID_RE.fullmatch(value) is not None


def _iso_utc(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError("timestamp must carry a timezone")
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond:06d}Z"


def utc_now_iso() -> str:
    """Current time in the wire format (ISO-8601 UTC, microseconds, trailing Z)."""
    return _iso_utc(datetime.now(UTC))


def _normalize_timestamp(value: object) -> str:
    if isinstance(value, datetime):
        return _iso_utc(value)
    if not isinstance(value, str) or len(value) > 40:
        raise ValueError("timestamp must be an ISO-8601 string or a datetime")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(f"timestamp is not ISO-8601: {value!r}") from exc
    if parsed.tzinfo is None:
        raise ValueError("timestamp must be UTC (end in Z)")
    if _CANONICAL_TS_RE.fullmatch(value):
        return value
    return _iso_utc(parsed)


class Reading(BaseModel):
    """One validated measurement of one tag of one well.

    Serialized in camelCase (the wire format dashboards expect). `value` is a finite float, or
    None with quality BAD: NaN, +inf and -inf from a device become exactly that, never broken JSON.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True)

    tenant_id: Identifier
    well_id: Identifier
    tag_name: Identifier
    value: float | None
    quality: Quality
    timestamp: str
    source_protocol: SourceProtocol
    connection_id: Identifier
    unit: str | None = None
    ingested_at: str | None = None
    reason: Reason | None = None
    status_code: str | None = None  # the source's own status name (OPC-UA's, e.g. GoodLocalOverride)

    @model_validator(mode="before")
    @classmethod
    def _bad_without_a_finite_value(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        value = data.get("value")
        if value is None:
            return {**data, "quality": "BAD"}
        if isinstance(value, bool):
            raise ValueError("value must be a number, not a boolean")
        if not isinstance(value, float | int):
            raise ValueError("value must be a number or null")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            return {**data, "value": None, "quality": "BAD"}
        return {**data, "value": number}

    @field_validator("timestamp", "ingested_at", mode="before")
    @classmethod
    def _timestamp(cls, value: object) -> str | None:
        return None if value is None else _normalize_timestamp(value)

    @field_validator("status_code")
    @classmethod
    def _status_code(cls, value: str | None) -> str | None:
        if value is not None and not _STATUS_CODE_RE.fullmatch(value):
            raise ValueError("status_code must be a status name such as GoodLocalOverride")
        return value

    @field_validator("unit")
    @classmethod
    def _unit(cls, value: str | None) -> str | None:
        if value is not None and not _UNIT_RE.fullmatch(value):
            raise ValueError("unit must be 1-32 printable characters")
        return value

    def to_json(self) -> bytes:
        """Compact camelCase JSON; optional fields left out when unset."""
        return orjson.dumps(self.model_dump(by_alias=True, exclude_none=True, mode="json") | {"value": self.value})

    @classmethod
    def from_json(cls, raw: bytes | str) -> Reading:
        return cls.model_validate(orjson.loads(raw))


@dataclass(frozen=True, slots=True, order=True)
class StreamId:
    """A stream entry id, `<milliseconds>-<sequence>`, the same shape for every broker."""

    ms: int
    seq: int

    @classmethod
    def parse(cls, text: str) -> StreamId:
        """Parse an id; raises ValueError on anything that is not exactly `<int>-<int>`."""
        match = _STREAM_ID_RE.fullmatch(text)
        if match is None:
            raise ValueError(f"malformed stream id: {text[:40]!r}")
        ms, seq = int(match.group(1)), int(match.group(2))
        if ms >= 2**64 or seq >= 2**64:
            raise ValueError(f"stream id out of range: {text[:40]!r}")
        return cls(ms, seq)

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"


ZERO_ID = StreamId(0, 0)

_PRODUCER_RE = re.compile(r"[0-9a-f]{8,64}")


@dataclass(frozen=True, slots=True)
class Origin:
    """Who published a batch, and each reading's place in that producer's sequence.

    A broker applies a reading only if its `seq` is above the highest it applied for the
    producer, so a batch sent twice (a reply lost to a timeout, a worker killed between
    publishing a spooled batch and deleting it) lands once. Seqs grow in publish order.
    """

    producer: str
    seqs: tuple[int, ...]

    def __post_init__(self) -> None:
        if not _PRODUCER_RE.fullmatch(self.producer):
            raise ValueError("producer must be 8-64 lowercase hex digits")


@dataclass(frozen=True, slots=True)
class Topic:
    """One well of one tenant: the unit of history, latest values and live fan-out."""

    tenant: str
    well: str

    def __post_init__(self) -> None:
        if not (is_valid_id(self.tenant) and is_valid_id(self.well)):
            raise ValueError("tenant and well ids must match " + ID_PATTERN)

    def __str__(self) -> str:
        return f"{self.tenant}/{self.well}"


@dataclass(frozen=True, slots=True)
class Selection:
    """What one stream carries: wells of one tenant, and optionally only some tags.

    `wells` None: every well of the tenant, including wells registered while the stream is
    open. A per-well stream is a selection of one well. `max_rate` (updates per tag per
    second) asks for the newest values only, conflated, instead of every reading.
    """

    tenant: str
    wells: frozenset[str] | None
    tags: frozenset[str] | None = None
    max_rate: float | None = None

    def __str__(self) -> str:
        if self.wells is None:
            return f"{self.tenant}/*"
        if len(self.wells) == 1:
            return f"{self.tenant}/{next(iter(self.wells))}"
        return f"{self.tenant}/[{len(self.wells)} wells]"


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """A reading as stored: its stream id, its well and tag, and its JSON exactly as published.

    `data` is kept as bytes so that fan-out never re-encodes it.
    """

    id: StreamId
    well: str
    tag: str
    data: bytes
    ts: float = 0.0  # the device timestamp, epoch seconds (0: unknown), for the latency histogram


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The latest reading of every tag of a well and the id of the newest entry in its log."""

    topic: Topic
    last_id: StreamId
    readings: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WellRead:
    """One well in an atomic read of a tenant's logs.

    `events`: entries after the asked id, oldest first (at most the count asked for).
    `complete`: `events` hold every entry up to the read's clock. `truncated`: some entries
    after the asked id are gone (trimmed), so the well needs a reset and a snapshot instead.
    `latest`: tag -> reading JSON, for a snapshot read and for a truncated well (else None).
    """

    events: list[StreamEvent]
    complete: bool
    truncated: bool
    latest: dict[str, bytes] | None


@dataclass(frozen=True, slots=True)
class TenantRead:
    """Several wells of one tenant read in one atomic step, at the tenant's clock `clock`.

    Every id of a tenant comes from one clock, so `clock` is a point in the tenant's total order:
    each entry at or below it is in `wells` (or trimmed: `truncated`), each entry above it is newer.
    """

    clock: StreamId
    wells: dict[str, WellRead]


@dataclass(frozen=True, slots=True)
class History:
    """A page of entries after a given id.

    `truncated`: some of the asked-for entries are gone. `cursor`: the id to ask after for the
    next page (past entries that were skipped as unreadable). `more`: the page was full.
    """

    events: list[StreamEvent]
    truncated: bool
    cursor: StreamId
    more: bool


class Principal(BaseModel):
    """Who is asking, from verified token claims."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    subject: str = Field(min_length=1, max_length=256)
    tenant: Identifier
    wells: frozenset[Identifier] | None = None
    scopes: frozenset[str] = frozenset()
    expires_at: float
    # What revocation matches on (app/auth/revocation.py): the token's `jti` and `iat`, and the
    # session (the SHA-256 of its cookie) when the request came with one.
    token_id: str | None = Field(None, max_length=256)
    issued_at: float | None = None
    session: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")

    def may_see(self, well: str) -> bool:
        return self.wells is None or well in self.wells
