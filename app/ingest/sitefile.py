"""The site file (TOML): tenants, their wells, and the connections ingestion reads.

Validated with pydantic; every error names the file, the key and the problem. Credentials
never live in the file: a connection names the environment variables that hold them.
The protocols, and each one's connection model, are app/adapters/registry.py's.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.adapters.registry import PROTOCOLS, ConnectionModel, connection_union
from app.errors import SiteError
from app.models import Identifier


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
                raise ValueError(f"connection {connection.id}: tenant {connection.tenant!r} is not in [tenants]")
            unknown = sorted(set(connection.wells) - set(tenant.wells))
            if unknown:
                raise ValueError(f"connection {connection.id}: wells not listed for {connection.tenant}: {unknown}")
        return self

    def registry(self) -> dict[str, list[str]]:
        return {tenant: list(site.wells) for tenant, site in self.tenants.items()}


def load_site(path: Path) -> Site:
    """Read and validate a site file; raises SiteError naming the file and the key."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SiteError(f"{path}: cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SiteError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return Site.model_validate(raw)
    except ValidationError as exc:
        problems = [f"{path}: {_location(error['loc'])}: {error['msg']}" for error in exc.errors()]
        raise SiteError("\n".join(problems)) from exc


def _location(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif part not in PROTOCOLS:  # the discriminator's tag adds nothing for a reader
            parts.append(f".{part}" if parts else part)
    return "".join(parts) or "(top level)"
