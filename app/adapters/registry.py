"""Every protocol wellstream reads, in one table: its connection model and how to build its adapter.

The site file's `Connection` union, the names its error messages leave out, the wells a
connection feeds and the worker's adapters all come from here, so nothing else lists protocols.
A new protocol is a new file in app/adapters/ (a connection model with a `protocol` Literal,
`id`, `tenant`, `wells` and `feeds()`, and an adapter) and one line in `PROTOCOLS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Protocol, TypeVar, Union, get_args

from pydantic import BaseModel, Field

from app.adapters.base import Adapter
from app.adapters.modbus import ModbusAdapter, ModbusConnection
from app.adapters.mqtt import MqttAdapter, MqttConnection
from app.adapters.opcua import OpcuaAdapter, OpcuaConnection
from app.adapters.simulator import SimulatorAdapter, SimulatorConnection
from app.adapters.sparkplug import SparkplugAdapter, SparkplugConnection
from app.errors import SiteError


class ConnectionModel(Protocol):
    """What every connection of the site file has, whatever its protocol."""

    @property
    def protocol(self) -> str: ...

    @property
    def id(self) -> str: ...

    @property
    def tenant(self) -> str: ...

    @property
    def wells(self) -> list[str]:
        """Every well the connection feeds, in first-seen order."""
        ...

    def feeds(self) -> list[tuple[str, str]]:
        """Every (well, tag) the connection feeds, in the file's order: a tag fed by two points is listed twice."""
        ...


Build = Callable[[ConnectionModel, Mapping[str, str]], Adapter]
C = TypeVar("C", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class AdapterKind:
    """One protocol: `name` (the site file's `protocol = ...`), its connection `model`, and
    `build`, which makes the adapter from a connection and the credentials mapping."""

    name: str
    model: type[BaseModel]
    build: Build


def _kind(model: type[C], build: Callable[[C, Mapping[str, str]], Adapter]) -> AdapterKind:
    """The kind for `model`, named by its `protocol` Literal, so the table cannot disagree with it."""
    names = get_args(model.model_fields["protocol"].annotation)
    if len(names) != 1 or not isinstance(names[0], str):
        raise TypeError(f"{model.__name__}.protocol must be a Literal of one name")

    def checked(connection: ConnectionModel, credentials: Mapping[str, str]) -> Adapter:
        if not isinstance(connection, model):
            raise TypeError(f"a {names[0]} adapter cannot be built from {type(connection).__name__}")
        return build(connection, credentials)

    return AdapterKind(names[0], model, checked)


# The order is the order the site file's error messages list the protocols in.
PROTOCOLS: dict[str, AdapterKind] = {
    kind.name: kind
    for kind in (
        _kind(SimulatorConnection, lambda c, _: SimulatorAdapter.for_connection(c)),
        _kind(ModbusConnection, lambda c, _: ModbusAdapter(c)),
        _kind(MqttConnection, lambda c, credentials: MqttAdapter(c, credentials=credentials)),
        _kind(OpcuaConnection, lambda c, credentials: OpcuaAdapter(c, credentials=credentials)),
        _kind(SparkplugConnection, lambda c, credentials: SparkplugAdapter(c, credentials=credentials)),
    )
}


def connection_union() -> Any:
    """The pydantic type of one site file connection: a union of every model, told apart by `protocol`.

    `Any` because it is built at run time; type checkers see `ConnectionModel` instead.
    """
    models = tuple(kind.model for kind in PROTOCOLS.values())
    return Annotated[Union[models], Field(discriminator="protocol")]  # noqa: UP007 - a tuple needs Union[]


def build_adapter(connection: ConnectionModel, credentials: Mapping[str, str]) -> Adapter:
    """The adapter for one connection; `credentials` holds the variables the connection names."""
    kind = PROTOCOLS.get(connection.protocol)
    if kind is None:
        known = ", ".join(PROTOCOLS)
        raise SiteError(f"connection {connection.id}: unknown protocol {connection.protocol!r} (known: {known})")
    return kind.build(connection, credentials)
