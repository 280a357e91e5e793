"""The listening socket of ``slimguard serve``: connections it accepts have Nagle's algorithm off, so no
response waits for the client's delayed ACK (about 40 ms a request on Linux)."""

from __future__ import annotations

import asyncio
import socket

from slimguard.serve.server import bind


def test_accepted_connections_have_tcp_nodelay():
    async def main() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        sock = bind("127.0.0.1", 0)
        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        try:
            _reader, writer = await asyncio.wait_for(asyncio.open_connection(*sock.getsockname()[:2]), 10)
            value = await asyncio.wait_for(accepted, 10)
            writer.close()
            return value
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(main()) != 0
