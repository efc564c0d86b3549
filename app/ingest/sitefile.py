"""The site file (TOML): tenants, their wells, and the connections ingestion reads.

Validated with pydantic; every error names the file, then the thing as the file names it (the
tenant, the connection's id, the point's well/tag), then the key and the problem. Credentials
never live in the file: a connection names the environment variables that hold them.
The protocols, and each one's connection model, are app/adapters/registry.py's.
"""

from __future__ import annotations

import tomllib
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails

from app.adapters.registry import PROTOCOLS, ConnectionModel, connection_union
from app.errors import SiteError
from app.models import Identifier

# What one entry of each list of the file is called in an error: `point well-01/tubing_pressure`.
_ENTRY_NOUNS = {"points": "point", "tags": "tag", "nodes": "node", "wells": "well"}


class TenantSite(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    wells: list[Identifier] = Field(min_length=1)


# Built from the registry when this module loads; type checkers see the Protocol every model meets.
if TYPE_CHECKING:
    Connection: TypeAlias = ConnectionModel
else:
    Connection = connection_union()


class Site(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    tenants: dict[Identifier, TenantSite]
    connections: list[Connection] = Field(default_factory=list)

    @model_validator(mode="after")
    def _connections_feed_known_wells(self) -> Site:
        ids = [connection.id for connection in self.connections]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"connection ids must be unique: {', '.join(duplicates)}")
        for connection in self.connections:
            tenant = self.tenants.get(connection.tenant)
            if tenant is None:
                raise ValueError(f"{_named(connection)}: tenant {connection.tenant!r} is not in [tenants]")
            unknown = sorted(set(connection.wells) - set(tenant.wells))
            if unknown:
                raise ValueError(f"{_named(connection)}: wells not listed for {connection.tenant}: {unknown}")
        return self

    @model_validator(mode="after")
    def _one_source_per_tag(self) -> Site:
        """A (tenant, well, tag) fed by two points would interleave two sources in one stream."""
        sources: dict[tuple[str, str, str], list[str]] = {}
        for connection in self.connections:
            for well, tag in connection.feeds():
                sources.setdefault((connection.tenant, well, tag), []).append(_named(connection))
        problems = [
            f"tenant {tenant!r}: tag {well}/{tag} is fed by {_sources(fed_by)}: a tag takes one source"
            for (tenant, well, tag), fed_by in sources.items()
            if len(fed_by) > 1
        ]
        if problems:
            raise ValueError("\n".join(problems))  # one line each (load_site)
        return self

    def registry(self) -> dict[str, list[str]]:
        return {tenant: list(site.wells) for tenant, site in self.tenants.items()}


def _named(connection: ConnectionModel) -> str:
    return f"connection {connection.id!r} ({connection.protocol})"


def _sources(connections: list[str]) -> str:
    """`connection 'a' (modbus) and 2 points of connection 'b' (mqtt)`, in the file's order."""
    counts = Counter(connections)
    parts = [name if counts[name] == 1 else f"{counts[name]} points of {name}" for name in counts]
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def load_site(path: Path) -> Site:
    """Read and validate a site file; raises SiteError naming the file and, for each problem, where it is."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SiteError(f"{path}: cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SiteError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return Site.model_validate(raw)
    except ValidationError as exc:
        problems = [line for error in exc.errors() for line in _problems(path, raw, error)]
        raise SiteError("\n".join(problems)) from exc


def _problems(path: Path, raw: object, error: ErrorDetails) -> list[str]:
    """One line per problem: the file, where in it (`connection 'plc' (modbus), point w1/p: address`), what.

    A validator that finds several problems puts one per line of its message.
    """
    # A validator's own message reads as it was written, without pydantic's "Value error, " prefix.
    cause = error.get("ctx", {}).get("error") if error["type"] == "value_error" else None
    message = str(cause) if cause is not None else error["msg"]
    where = _location(raw, error["loc"])
    prefix = f"{path}: {where}: " if where else f"{path}: "
    return [prefix + line for line in message.splitlines() or [message]]


def _location(raw: object, loc: tuple[int | str, ...]) -> str:
    """`loc` in the file's own names, found by walking the raw TOML along it.

    A tenant is named by its key, a connection by its id (and protocol), a point, tag or node
    by its well/tag, a well by itself; list indexes remain only for entries without those.
    Keys between two named entries (`groups[0]` before a point) are left out: the names suffice.
    """
    names: list[str] = []
    path: list[int | str] = []
    node, key = raw, ""
    for part in loc:
        if part == "[key]":  # a tenant's own name is the problem: the tenant is already named
            continue
        if isinstance(node, Mapping) and part in PROTOCOLS and node.get("protocol") == part:
            continue  # the union's discriminator: the connection's name shows its protocol already
        child = _child(node, part)
        name = _entry_name(key, part, child)
        if name is None:
            path.append(part)
        else:
            if not names and len(path) > 1:  # an unnamed entry above the first named one: keep its index
                names.append(_dotted(path[:-1]))
            names.append(name)
            path = []
        node, key = child, part if isinstance(part, str) else ""
    if path:
        return ", ".join(names) + ": " + _dotted(path) if names else _dotted(path)
    return ", ".join(names)


def _child(node: object, part: int | str) -> object:
    if isinstance(part, str) and isinstance(node, Mapping):
        return node.get(part)
    if isinstance(part, int) and isinstance(node, list) and 0 <= part < len(node):
        return node[part]
    return None


def _entry_name(key: str, part: int | str, entry: object) -> str | None:
    """How the file names `entry`, the `part` of the table or list `key`; None if it has no name."""
    if key == "tenants" and isinstance(part, str):
        return f"tenant {part!r}"
    if not isinstance(part, int):
        return None
    if key == "connections" and isinstance(entry, Mapping) and isinstance(entry.get("id"), str):
        protocol = entry.get("protocol")
        return f"connection {entry['id']!r}" + (f" ({protocol})" if isinstance(protocol, str) else "")
    noun = _ENTRY_NOUNS.get(key)
    if noun is None:
        return None
    if isinstance(entry, Mapping) and isinstance(entry.get("well"), str) and isinstance(entry.get("tag"), str):
        return f"{noun} {entry['well']}/{entry['tag']}"
    if isinstance(entry, str):
        return f"{noun} {entry!r}"
    return None


def _dotted(path: list[int | str]) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).removeprefix(".")
