"""The gateway's uvicorn protocol hands request bodies to the app uncopied, and unchanged."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import threading

import uvicorn

from servers import free_port
from x2v_gateway.http_protocol import BodyPiecesProtocol


async def slow_reader(scope, receive, send) -> None:
    """Reads the body slowly, so pieces pile up between two receive() calls."""
    if scope["type"] != "http":
        return
    digest, messages, kinds = hashlib.sha256(), 0, set()
    more = True
    while more:
        await asyncio.sleep(0.005)
        message = await receive()
        digest.update(message["body"])
        kinds.add(type(message["body"]).__name__)
        messages += 1
        more = message.get("more_body", False)
    body = json.dumps({"sha256": digest.hexdigest(), "messages": messages, "kinds": sorted(kinds)}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def test_request_body_reaches_the_app_whole_and_in_order_as_bytes(tmp_path):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(slow_reader, host="127.0.0.1", port=port,
                                           http=BodyPiecesProtocol, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            threading.Event().wait(0.01)
        payload = os.urandom(6 * 1024 * 1024)
        writes = [payload[i:i + 4096] for i in range(0, len(payload), 4096)]
        for framing in ("content-length", "chunked"):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.putrequest("POST", "/")
            if framing == "chunked":
                conn.putheader("Transfer-Encoding", "chunked")
            else:
                conn.putheader("Content-Length", str(len(payload)))
            conn.endheaders()
            for piece in writes:
                conn.send(b"%x\r\n%s\r\n" % (len(piece), piece) if framing == "chunked" else piece)
            if framing == "chunked":
                conn.send(b"0\r\n\r\n")
            response = conn.getresponse()
            result = json.loads(response.read())
            conn.close()
            assert response.status == 200
            assert result["sha256"] == hashlib.sha256(payload).hexdigest(), framing
            assert result["kinds"] == ["bytes"]  # what ASGI promises, joined or not
            # The slow reader got the body in fewer messages than it was written in: pieces
            # that arrived meanwhile were joined, not lost or reordered.
            assert 1 < result["messages"] < len(writes)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
