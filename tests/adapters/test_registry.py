"""The protocol registry: the one list the site file, check-config and the worker take protocols from."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict

from app.adapters.modbus import ModbusAdapter, ModbusConnection
from app.adapters.mqtt import MqttAdapter
from app.adapters.opcua import OpcuaAdapter
from app.adapters.registry import PROTOCOLS, build_adapter
from app.adapters.simulator import SimulatorAdapter
from app.adapters.sparkplug import SparkplugAdapter
from app.errors import SiteError
from app.ingest.sitefile import Site
from app.ingest.worker import adapters_for
from tests.ingest.test_sitefile import example_site


def union_members() -> set[type]:
    """The models of the site file's `connections` union, read off the Site model itself."""
    (connection,) = typing.get_args(Site.model_fields["connections"].annotation)
    union = typing.get_args(connection)[0]  # Annotated[Union[...], discriminator]
    return set(typing.get_args(union))


def test_the_site_files_union_is_the_registry() -> None:
    assert list(PROTOCOLS) == ["simulator", "modbus", "mqtt", "opcua", "sparkplug"]
    assert union_members() == {kind.model for kind in PROTOCOLS.values()}


def test_every_protocol_loads_from_the_site_file_and_builds_its_adapter(tmp_path: Path) -> None:
    site = example_site(tmp_path)
    expected = {
        "simulator": SimulatorAdapter,
        "modbus": ModbusAdapter,
        "mqtt": MqttAdapter,
        "opcua": OpcuaAdapter,
        "sparkplug": SparkplugAdapter,
    }
    assert {c.protocol for c in site.connections} == set(PROTOCOLS) == set(expected)

    adapters = adapters_for(site, {})

    for connection, adapter in zip(site.connections, adapters, strict=True):
        assert isinstance(connection, PROTOCOLS[connection.protocol].model)
        assert type(adapter) is expected[connection.protocol]
        assert (adapter.name, adapter.errors) == (connection.id, 0)
        assert connection.wells, f"{connection.id} feeds wells"


def test_a_modbus_connection_knows_its_wells_in_first_seen_order() -> None:
    points = [{"table": "coil", "address": n, "well": well, "tag": "t"} for n, well in enumerate(["w2", "w1", "w2"])]
    connection = ModbusConnection.model_validate(
        {
            "protocol": "modbus",
            "id": "plc",
            "tenant": "acme",
            "host": "plc",
            "groups": [{"interval_s": 1, "points": points}],
        }
    )
    assert connection.wells == ["w2", "w1"]


class ModemConnection(BaseModel):
    """A connection of a protocol no adapter speaks."""

    model_config = ConfigDict(frozen=True)

    protocol: Literal["modem"] = "modem"
    id: str = "pump-9"
    tenant: str = "acme"
    wells: list[str] = ["w1"]

    def feeds(self) -> list[tuple[str, str]]:
        return [("w1", "t")]


def test_building_an_adapter_for_an_unknown_protocol_names_the_connection() -> None:
    with pytest.raises(SiteError, match=r"connection pump-9: unknown protocol 'modem' \(known: simulator, modbus"):
        build_adapter(ModemConnection(), {})


def test_check_config_refuses_an_unknown_protocol_and_names_the_known_ones(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(
        '[tenants.acme]\nwells = ["w1"]\n\n'
        '[[connections]]\nprotocol = "simulator"\nid = "sim"\ntenant = "acme"\nwells = ["w1"]\n\n'
        '[[connections]]\nprotocol = "modem"\nid = "pump-9"\ntenant = "acme"\n'
    )

    result = subprocess.run([sys.executable, "-m", "app", "check-config", str(path)], capture_output=True, text=True)

    assert result.returncode != 0
    assert f"{path}: connection 'pump-9' (modem): " in result.stderr
    assert "'modem'" in result.stderr
    assert ", ".join(f"'{name}'" for name in PROTOCOLS) in result.stderr
