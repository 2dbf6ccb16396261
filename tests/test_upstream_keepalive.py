"""A pooled connection to an upstream is not reused once its server may be closing it.

uvicorn, which both LightX2V servers run on, closes a connection idle for 5 s. A request sent on
it at that moment fails with a ReadError; for a submit that is an interrupted submission, which
the gateway must reconcile (a minute) before it may send the job again. A fresh-clone CI run met
exactly that: a batch's first submit went out 5.3 s after the gateway's last request to the cloud.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from x2v_gateway.upstream.base import UPSTREAM_KEEPALIVE
from x2v_gateway.upstream.selfhosted import SelfHostedNode

pytestmark = pytest.mark.anyio

STATUS = b'{"service_status": "idle", "task_id": null, "pending_tasks": 0}'


async def test_a_request_after_an_idle_pause_goes_on_a_fresh_connection():
    # A server whose keep-alive ends just after ours: a request that arrives on a connection idle
    # longer than that is met by the close, unanswered, as uvicorn's timer would meet it.
    closes_after = UPSTREAM_KEEPALIVE + 0.5
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        idle_since = time.monotonic()
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                if time.monotonic() - idle_since > closes_after:
                    return
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(STATUS), STATUS))
                await writer.drain()
                idle_since = time.monotonic()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    node = SelfHostedNode("n1", f"http://127.0.0.1:{port}", timeout=5.0)
    try:
        assert (await node.health()).reachable
        assert (await node.health()).reachable  # at once: the same connection
        assert connections == 1
        await asyncio.sleep(closes_after + 0.3)
        after_pause = await node.health()
        assert after_pause.reachable, after_pause.detail
        assert connections == 2
    finally:
        await node.aclose()
        server.close()
        await server.wait_closed()
