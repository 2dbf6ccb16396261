"""A node's connections of upstream/plain_http.py against nodes that misbehave at the socket
level: a forwarded upload's (a node that stops reading, one that answers in pieces), and the
kept-alive ones of its reads (answers that fail, close, garble, never come or never end; a read
that fails is tried again, three tries in all)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from x2v_gateway.upstream import plain_http
from x2v_gateway.upstream.base import SubmitRequest, Unavailable, retried
from x2v_gateway.upstream.plain_http import KeptGets
from x2v_gateway.upstream.selfhosted import SelfHostedNode


async def _server(handle) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def test_a_node_that_stops_reading_ends_the_forward_after_the_write_timeout():
    """An upload is never held up for good by a node that accepts the connection and then reads
    nothing: once it has taken nothing for the write timeout, forwarding is over (the job then
    goes through the queue), and the client's upload goes on."""
    async def scenario() -> float:
        stalled = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await stalled.wait()
            writer.close()

        server, url = await _server(handle)
        adapter = SelfHostedNode("n1", url, timeout=0.5)
        try:
            upload = adapter.open_form(1024**3, "s2v")
            upload.begin_file("audio", "audio.wav")
            piece = bytes(1024 * 1024)
            started = time.monotonic()
            while not upload.broken:
                assert time.monotonic() - started < 10, "the forward never gave up"
                upload.write(piece)
                await upload.drain()
            await upload.abort()
            return time.monotonic() - started
        finally:
            stalled.set()
            await adapter.aclose()
            server.close()

    assert asyncio.run(asyncio.wait_for(scenario(), 10)) < 5


def test_an_answer_that_arrives_in_pieces_is_read_whole(tmp_path):
    """The node's answer may come in several reads, and chunked: the task is still recognised."""
    image = tmp_path / "image.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(1000))
    seen: list[bytes] = []

    async def scenario() -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            seen.append(await reader.readexactly(length))
            body = b'{"task_id": "node-1", "task_status": "pending", "save_result_path": "job-1"}'
            for piece in (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n",
                          b"transfer-encoding: chunked\r\n\r\n",
                          f"{len(body):x}\r\n".encode() + body[:10], body[10:] + b"\r\n", b"0\r\n\r\n"):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.05)
            writer.close()

        server, url = await _server(handle)
        adapter = SelfHostedNode("n1", url)
        try:
            upload = adapter.open_form(64 * 1024, "i2v")
            upload.begin_file("image", "image.png")
            upload.write(image.read_bytes())
            upload.end_file()
            await upload.drain()
            return await upload.finish(SubmitRequest(
                job_id="job-1", task_id="job-1", task="i2v", params={"prompt": "p", "seed": 1},
                inputs={"image": image}, filenames={"image": "image.png"},
            ))
        finally:
            await adapter.aclose()
            server.close()

    assert asyncio.run(scenario()) == "job-1"
    (form,) = seen  # sent once, on the forwarded connection: not again the ordinary way
    assert image.read_bytes() in form and b'name="save_result_path"\r\n\r\njob-1' in form


# -- a node's reads on kept-alive connections (KeptGets) ----------------------------------------

LIST = b'{"t1": {"task_id": "t1", "status": "pending"}}'


class Node:
    """A node's list route that counts connections and requests; `answer` says what each
    request gets (default: the list, kept alive)."""

    def __init__(self, answer=None) -> None:
        self.connections = 0
        self.targets: list[str] = []
        self.answer = answer or (lambda n: b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(LIST), LIST))

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.targets.append(head.split(b" ", 2)[1].decode())
                reply = self.answer(len(self.targets))
                if reply is None:  # no answer: the connection stays open and silent
                    await asyncio.sleep(3600)
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def reads(node: Node, scenario, base: str = "") -> None:
    async def run() -> None:
        server, url = await _server(node.handle)
        reads = KeptGets(url + base, timeout=httpx.Timeout(0.5), keepalive=2.0)
        try:
            await scenario(reads)
        finally:
            reads.close()
            server.close()

    asyncio.run(asyncio.wait_for(run(), 20))


def test_reads_share_one_connection_under_the_nodes_path():
    node = Node()

    async def scenario(reads: KeptGets) -> None:
        for _ in range(3):
            response = await reads.get("/v1/tasks/")
            assert response.status_code == 200 and response.json()["t1"]["status"] == "pending"
        # Two at once: the second gets a connection of its own, and both are kept.
        await asyncio.gather(reads.get("/v1/tasks/"), reads.get("/v1/service/status"))
        await reads.get("/v1/tasks/")

    reads(node, scenario, base="/gpu0/")
    assert node.targets == ["/gpu0/v1/tasks/"] * 4 + ["/gpu0/v1/service/status", "/gpu0/v1/tasks/"]
    assert node.connections == 2


def test_chunked_answers_follow_one_another_on_one_connection():
    # As a proxy in front of a node may send them: each answer's end is its last chunk.
    chunked = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
               b"%x\r\n%s\r\n0\r\n\r\n" % (len(LIST), LIST))
    node = Node(lambda n: chunked)

    async def scenario(reads: KeptGets) -> None:
        for _ in range(3):
            assert (await reads.get("/v1/tasks/")).json()["t1"]["status"] == "pending"

    reads(node, scenario)
    assert node.connections == 1


# -- an adapter's reads tried again: three tries in all, the first outside tenacity (`retried`) --

TASK = {"task_id": "t1", "status": "processing", "start_time": None, "end_time": None,
        "error": None, "error_type": "", "save_result_path": "t1"}


def polled(failures: int, polls: int = 1) -> tuple[list, Node]:
    """`polls` polls at once of a node whose list answers 500 (as the real server does for a
    request it cannot serve) to its first `failures` requests."""
    listed = json.dumps({"t1": TASK}).encode()
    node = Node(lambda n: b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 21\r\n\r\nInternal Server Error"
                if n <= failures else b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(listed), listed))

    async def run() -> list:
        server, url = await _server(node.handle)
        adapter = SelfHostedNode("n1", url, timeout=5.0)
        try:
            return await asyncio.gather(*(adapter.poll(["t1"]) for _ in range(polls)), return_exceptions=True)
        finally:
            await adapter.aclose()
            server.close()

    return asyncio.run(run()), node


def test_a_list_that_fails_twice_is_read_on_the_third_try():
    [statuses], node = polled(failures=2)
    assert statuses["t1"].state == "running"
    assert node.targets == ["/v1/tasks/"] * 3


def test_a_list_that_fails_three_times_makes_the_node_unavailable():
    [failure], node = polled(failures=3)
    assert isinstance(failure, Unavailable)
    assert "answered 500" in str(failure)
    assert node.targets == ["/v1/tasks/"] * 3


def test_concurrent_polls_each_get_the_list():
    results, node = polled(failures=0, polls=20)
    assert [r["t1"].state for r in results] == ["running"] * 20
    assert node.targets == ["/v1/tasks/"] * 20


def test_retried_tries_again_only_on_the_failure_named():
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise Unavailable("not yet")
        return "done"

    async def broken() -> str:
        nonlocal calls
        calls += 1
        raise ValueError("not worth another try")

    async def scenario() -> None:
        nonlocal calls
        assert await retried(flaky, Unavailable, attempts=3) == "done"
        assert calls == 3

        calls = 0
        with pytest.raises(Unavailable):
            await retried(flaky, Unavailable, attempts=2)
        assert calls == 2

        calls = 0
        with pytest.raises(ValueError):
            await retried(broken, Unavailable, attempts=3)
        assert calls == 1

    asyncio.run(scenario())


def test_a_connection_the_node_closes_or_garbles_is_not_used_again():
    closing = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(LIST), LIST)
    plain = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(LIST), LIST)
    # The first answer says close; the second carries a stray byte after its end.
    node = Node(lambda n: {1: closing, 2: plain + b"x"}.get(n, plain))

    async def scenario(reads: KeptGets) -> None:
        for _ in range(3):
            assert (await reads.get("/v1/tasks/")).json()["t1"]["status"] == "pending"
            await asyncio.sleep(0.05)  # the stray byte arrives while the connection is idle

    reads(node, scenario)
    assert node.connections == 3


def test_a_read_that_gets_no_answer_times_out_and_leaves_no_connection_behind():
    node = Node(lambda n: None if n == 1 else b"HTTP/1.1 503 X\r\ncontent-length: 2\r\n\r\n{}")

    async def scenario(reads: KeptGets) -> None:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await reads.get("/v1/tasks/")
        assert 0.4 < time.monotonic() - started < 2
        assert (await reads.get("/v1/tasks/")).status_code == 503  # on a new connection

    reads(node, scenario)
    assert node.connections == 2


def test_a_read_cancelled_midway_leaves_its_connection_unused():
    node = Node(lambda n: None if n == 1 else b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")

    async def scenario(reads: KeptGets) -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reads.get("/v1/tasks/"), 0.1)
        # Its answer, if it ever came, would be read as this one's: a new connection instead.
        assert (await reads.get("/v1/tasks/")).json() == {}

    reads(node, scenario)
    assert node.connections == 2


def test_an_answer_larger_than_any_task_list_is_refused(monkeypatch):
    monkeypatch.setattr(plain_http, "_MAX_READ", 64 * 1024)
    body = b"[" + b"0," * 50_000 + b"0]"
    node = Node(lambda n: b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))

    async def scenario(reads: KeptGets) -> None:
        with pytest.raises(httpx.RemoteProtocolError, match="too large"):
            await reads.get("/v1/tasks/")

    reads(node, scenario)


def test_a_node_nobody_listens_for_is_a_connect_error_that_says_refused():
    async def scenario() -> None:
        server, url = await _server(Node().handle)
        server.close()
        await server.wait_closed()
        reads = KeptGets(url, timeout=httpx.Timeout(0.5), keepalive=2.0)
        with pytest.raises(httpx.ConnectError) as caught:
            await reads.get("/v1/service/status")
        assert "ConnectionRefusedError" in str(caught.value)
        assert isinstance(caught.value.__context__, ConnectionRefusedError)

    asyncio.run(scenario())


def test_a_new_connection_the_node_closes_at_once_fails_the_read_at_once():
    async def scenario() -> None:
        async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server, url = await _server(close_at_once)
        reads = KeptGets(url, timeout=httpx.Timeout(5.0), keepalive=2.0)
        try:
            started = time.monotonic()
            with pytest.raises(httpx.TransportError):
                await reads.get("/v1/tasks/")
            assert time.monotonic() - started < 1  # not the read timeout
        finally:
            server.close()

    asyncio.run(scenario())


def test_a_task_id_with_a_space_goes_out_percent_encoded():
    node = Node()

    async def scenario(reads: KeptGets) -> None:
        await reads.get("/v1/tasks/a b/status")

    reads(node, scenario)
    assert node.targets == ["/v1/tasks/a%20b/status"]


def test_an_answer_expected_on_a_connection_that_ended_unseen_has_failed():
    # The race the test above can only hope to meet: the loop reads the node's close, or bytes
    # nobody asked for, before the task that opened the connection runs again.
    async def scenario() -> None:
        closed = plain_http._Answer()
        closed.eof_received()
        closed.connection_lost(None)
        with pytest.raises(httpx.RemoteProtocolError, match="closed the connection"):
            await closed.expect()

        garbled = plain_http._Answer()
        garbled.data_received(b"SSH-2.0-OpenSSH_9.6\r\n")
        with pytest.raises(httpx.RemoteProtocolError, match="malformed"):
            await garbled.expect()

    asyncio.run(scenario())


def test_nodes_share_one_tls_context(monkeypatch):
    """Made once for every node's connections (httpx's, through the adapter's client, and ours):
    each costs ~20 ms of CPU, and one per node made 1,000 nodes take 22 s to start."""
    import ssl

    from x2v_gateway.upstream import base
    from x2v_gateway.upstream.selfhosted import SelfHostedNode

    made: list[ssl.SSLContext] = []
    create = ssl.create_default_context

    def counted(*args, **kwargs):
        made.append(create(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(ssl, "create_default_context", counted)
    base.tls_context.cache_clear()
    try:
        nodes = [SelfHostedNode(f"n{i}", f"https://node{i}.example:8000") for i in range(5)]
        assert len(made) == 1
        assert base.tls_context() is made[0]
        for node in nodes:
            asyncio.run(node.aclose())
    finally:
        base.tls_context.cache_clear()
