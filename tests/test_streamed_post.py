"""A forwarded upload's connection to its node (upstream/streamed_post.py) against nodes that
misbehave at the socket level: one that stops reading, one that answers in pieces."""

from __future__ import annotations

import asyncio
import time

from x2v_gateway.upstream.base import SubmitRequest
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
