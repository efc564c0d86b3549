"""An OPC-UA server in a process of its own, so a test can SIGKILL or SIGSTOP it.

    python tests/peers/opcua_server.py PORT NAME=VALUE [NAME=VALUE ...]

Serves `endpoint(PORT)` without security, with one Double variable per NAME (NodeId
`node_id(NAME)`) holding its VALUE, and prints `ready` on stdout once it listens. The same
command started again on the same port is the same server back.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from asyncua import ua
from asyncua.server.server import Server

NAMESPACE = "urn:wellstream:test:peer"
# A fresh server's first registered namespace (0 is OPC UA's, 1 the server's own): fixed, so a
# client's configuration can name the nodes before the server runs.
NAMESPACE_INDEX = 2


def endpoint(port: int) -> str:
    return f"opc.tcp://127.0.0.1:{port}/wellstream/"


def node_id(name: str) -> str:
    return f"ns={NAMESPACE_INDEX};s={name}"


async def serve(port: int, values: dict[str, float]) -> None:
    server = Server()
    await server.init()
    server.set_endpoint(endpoint(port))
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    idx = await server.register_namespace(NAMESPACE)
    if idx != NAMESPACE_INDEX:
        raise SystemExit(f"namespace index {idx}, not {NAMESPACE_INDEX}: node_id() names the wrong nodes")
    for name, value in values.items():
        await server.nodes.objects.add_variable(
            ua.NodeId(ua.String(name), ua.Int16(idx)),
            ua.QualifiedName(name, idx),
            value,
            varianttype=ua.VariantType.Double,
        )
    await server.start()
    print("ready", flush=True)
    await asyncio.Event().wait()  # until killed: there is no clean stop to test here


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING)  # asyncua's INFO lines say nothing a test needs
    port, *pairs = argv
    values = {name: float(value) for name, _, value in (pair.partition("=") for pair in pairs)}
    asyncio.run(serve(int(port), values))


if __name__ == "__main__":
    main(sys.argv[1:])
