"""A Modbus TCP device in a process of its own, so a test can SIGKILL or SIGSTOP it.

    python tests/peers/modbus_server.py PORT VALUE [VALUE ...]

Serves unit id 1 on 127.0.0.1:PORT with holding registers 0.. holding the VALUEs (uint16), and
prints `ready` on stdout once it listens. The values are fixed: the same command started again
on the same port is the same device back after a reboot.
"""

from __future__ import annotations

import asyncio
import sys

from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

UNIT_ID = 1


async def serve(port: int, values: list[int]) -> None:
    # Four separate blocks (coils, discrete inputs, holding, input), as the adapter tests use.
    simdata = (
        [SimData(address=0, values=[False] * 16, datatype=DataType.BITS)],
        [SimData(address=0, values=[False] * 16, datatype=DataType.BITS)],
        [SimData(address=0, values=values, datatype=DataType.REGISTERS)],
        [SimData(address=0, values=[0] * 16, datatype=DataType.REGISTERS)],
    )
    server = ModbusTcpServer(SimDevice(id=UNIT_ID, simdata=simdata), address=("127.0.0.1", port))
    await server.serve_forever(background=True)
    print("ready", flush=True)
    await asyncio.Event().wait()  # until killed: there is no clean stop to test here


def main(argv: list[str]) -> None:
    port, *values = (int(arg) for arg in argv)
    asyncio.run(serve(port, values))


if __name__ == "__main__":
    main(sys.argv[1:])
