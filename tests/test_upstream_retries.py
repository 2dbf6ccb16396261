"""A node's reads are tried again after a failure, three tries in all, and nothing more.

The first try runs outside tenacity (`retried`): a gateway following 500 nodes makes 500 of
these reads a second, and the routine ones reuse one built request each.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from x2v_gateway.upstream.base import Unavailable, retried
from x2v_gateway.upstream.selfhosted import SelfHostedNode

pytestmark = pytest.mark.anyio

TASK = {"task_id": "t1", "status": "processing", "start_time": None, "end_time": None,
        "error": None, "error_type": "", "save_result_path": "t1"}


class FlakyList:
    """A node whose task list answers 500 to its first `failures` requests, as the real server
    does for a request it cannot serve, then the list."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.requests: list[str] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head.split(b" ", 2)[1].decode())
                if len(self.requests) <= self.failures:
                    code, body = b"500 Internal Server Error", b"Internal Server Error"
                else:
                    code, body = b"200 OK", json.dumps({"t1": TASK}).encode()
                writer.write(b"HTTP/1.1 %s\r\ncontent-length: %d\r\n\r\n%s" % (code, len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


async def polled(failures: int, polls: int = 1) -> tuple[list, FlakyList]:
    double = FlakyList(failures)
    server = await asyncio.start_server(double.serve, "127.0.0.1", 0)
    node = SelfHostedNode("n1", f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", timeout=5.0)
    try:
        results = await asyncio.gather(*(node.poll(["t1"]) for _ in range(polls)), return_exceptions=True)
    finally:
        await node.aclose()
        server.close()
        await server.wait_closed()
    return results, double


async def test_a_list_that_fails_twice_is_read_on_the_third_try():
    [statuses], double = await polled(failures=2)
    assert statuses["t1"].state == "running"
    assert double.requests == ["/v1/tasks/"] * 3


async def test_a_list_that_fails_three_times_makes_the_node_unavailable():
    [failure], double = await polled(failures=3)
    assert isinstance(failure, Unavailable)
    assert "answered 500" in str(failure)
    assert double.requests == ["/v1/tasks/"] * 3


async def test_the_reused_list_request_serves_concurrent_polls():
    results, double = await polled(failures=0, polls=20)
    assert [r["t1"].state for r in results] == ["running"] * 20
    assert double.requests == ["/v1/tasks/"] * 20


async def test_retried_tries_again_only_on_the_failure_named():
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise Unavailable("not yet")
        return "done"

    assert await retried(flaky, Unavailable, attempts=3) == "done"
    assert calls == 3

    calls = 0
    with pytest.raises(Unavailable):
        await retried(flaky, Unavailable, attempts=2)
    assert calls == 2

    async def broken() -> str:
        nonlocal calls
        calls += 1
        raise ValueError("not worth another try")

    calls = 0
    with pytest.raises(ValueError):
        await retried(broken, Unavailable, attempts=3)
    assert calls == 1
