"""HTTP/1.1 to a node on plain asyncio connections, where httpx costs too much per call.

A forwarded upload (`StreamedPost`, used by `selfhosted.FormUpload`) sends a gigabyte in pieces
of a few hundred KiB as the client's body arrives. Through httpx every piece went through its
request-body iterator, httpcore, h11 and anyio's stream (a cancel scope and a deadline per
write): about 40 µs of the event loop per piece, 0.18 CPU-s per GiB, as much as the kernel's own
send of those bytes. Here a batch of pieces is one `writelines` (one writev) on the transport.

A node's reads (`KeptGets`: its task list, its status) come once a second from each busy node's
follow loop. Read through httpx and tenacity, a task list cost 0.64 ms of CPU (httpcore, h11,
anyio's cancel scopes, building the request); here, on a kept-alive connection, 0.11 ms: at 500
nodes, a quarter of a core.

Answers are read with httptools. Only what these exchanges need: no redirects, no proxies, no
compression.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import SplitResult, quote, urlsplit

import httptools
import httpx

from .base import tls_context

# Bytes the transport may hold unsent before `send` waits for the node to take them: as much
# as the two 1 MiB batches the httpx body queue held, so peak memory stays where it was.
_HIGH_WATER = 2 * 1024 * 1024
# Largest answer read: a submission's answer is a small JSON object.
_MAX_ANSWER = 1024 * 1024
# Largest answer to a read: a node's task list (it keeps up to 1,000 tasks) with error texts.
_MAX_READ = 32 * 1024 * 1024
# Idle connections kept per node: its reads seldom overlap (the follow loop's, a cancel's).
_KEPT = 4
# What a request target keeps as it is (RFC 3986's path characters; `%`: already encoded).
_SAFE = "/%!$&'()*+,;=:@~"


class _Answer(asyncio.Protocol):
    """The connection's side that reads the node's answers and paces the writes."""

    def __init__(self, limit: int = _MAX_ANSWER) -> None:
        self.answer: asyncio.Future[httpx.Response] = asyncio.get_running_loop().create_future()
        self.usable = True  # for another exchange, once this one is answered
        self._limit = limit
        self._resumed: asyncio.Future[None] | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = bytearray()

    def expect(self) -> asyncio.Future[httpx.Response]:
        """The next answer on a kept-alive connection (the parser reads one after another).

        A new connection may have ended already: the loop can read the node's close (or bytes
        nobody asked for) before the task that opened it runs again. The answer has then failed,
        with that error, rather than waiting for the read timeout."""
        previous = self.answer
        ended = previous.exception() if previous.done() and not previous.cancelled() else None
        self.answer = asyncio.get_running_loop().create_future()
        self._headers, self._body = [], bytearray()
        if not self.usable:
            self.answer.set_exception(ended or httpx.ReadError("the connection ended before the request"))
        return self.answer

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.answer.done():
            self.usable = False  # bytes nobody asked for: this connection's framing is lost
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._end(httpx.RemoteProtocolError(f"malformed answer: {exc}"))

    def eof_received(self) -> bool:
        self._end(httpx.RemoteProtocolError("the node closed the connection before answering"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(httpx.ReadError(f"connection lost: {exc}" if exc else "connection lost"))
        self.resume_writing()

    def pause_writing(self) -> None:
        if self._resumed is None:
            self._resumed = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._resumed is not None:
            if not self._resumed.done():
                self._resumed.set_result(None)
            self._resumed = None

    @property
    def paused(self) -> bool:
        return self._resumed is not None

    async def writable(self) -> None:
        if self._resumed is not None:
            await asyncio.shield(self._resumed)

    # -- httptools callbacks --------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self._body += body
        if len(self._body) > self._limit:
            self._end(httpx.RemoteProtocolError("the node's answer is too large"))

    def on_message_complete(self) -> None:
        self.usable = self.usable and self._parser.should_keep_alive()
        if not self.answer.done():
            self.answer.set_result(httpx.Response(
                self._parser.get_status_code(), headers=self._headers, content=bytes(self._body),
            ))

    def _end(self, exc: Exception) -> None:
        self.usable = False
        if not self.answer.done():
            self.answer.set_exception(exc)


class StreamedPost:
    """`POST url` with a body of exactly `length` bytes, written batch by batch with `send`.

    `answer` completes when the node has answered, and fails when the connection could not be
    made (`httpx.ConnectError`: nothing was sent) or broke (another `httpx.TransportError`),
    which may happen before the body's end. These are httpx's errors, as the adapter expects.
    """

    def __init__(self, url: str, headers: dict[str, str], length: int, *, timeout: httpx.Timeout) -> None:
        self._url = urlsplit(url)
        self._timeout = timeout
        self._head = _request_head("POST", self._url, {
            **headers, "content-length": str(length), "connection": "close",
        })
        self._transport: asyncio.Transport | None = None
        self._protocol: _Answer | None = None
        self._connected = asyncio.Event()
        self.answer: asyncio.Task[httpx.Response] = asyncio.ensure_future(self._exchange())

    async def _exchange(self) -> httpx.Response:
        try:
            transport, protocol = await _open(self._url, _Answer, self._timeout.connect)
        except (OSError, TimeoutError) as exc:
            raise httpx.ConnectError(f"{type(exc).__name__}: {exc}") from None
        transport.set_write_buffer_limits(high=_HIGH_WATER)
        transport.write(self._head)
        self._transport, self._protocol = transport, protocol
        self._connected.set()
        try:
            return await protocol.answer
        finally:
            transport.close()

    async def send(self, pieces: list[bytes]) -> bool:
        """Write `pieces`, then wait while the node is more than a few MiB behind. False when
        the exchange is over (the node answered, or the connection failed): nothing written."""
        if not self._connected.is_set():
            await self._until(self._connected.wait())
        # The protocol knows a lost connection one loop iteration before `answer` does.
        if self.answer.done() or self._protocol is None or self._protocol.answer.done():
            return False
        assert self._transport is not None
        self._transport.writelines(pieces)
        if self._protocol.paused and not await self._until(self._protocol.writable(), self._timeout.write):
            if not self.answer.done():  # the node took nothing for the write timeout: give up
                self._transport.abort()
        return True

    async def _until(self, waiting: Awaitable[Any], timeout: float | None = None) -> bool:
        """Wait for `waiting`, unless the exchange ends or `timeout` passes first (False)."""
        task = asyncio.ensure_future(waiting)
        try:
            await asyncio.wait({task, self.answer}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            return task.done()
        finally:
            task.cancel()

    async def response(self) -> httpx.Response:
        """The node's answer, once the whole body was sent (at most the read timeout after)."""
        async with asyncio.timeout(self._timeout.read):
            return await self.answer

    async def abort(self) -> None:
        """Drop the connection, unanswered."""
        self.answer.cancel()
        if self._transport is not None:
            self._transport.abort()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.answer


class KeptGets:
    """GETs to one node on kept-alive connections, one exchange at a time on each.

    A connection idle for `keepalive` seconds is not used again: the node's uvicorn closes one
    idle for 5 s, and a request that meets the close fails (base.UPSTREAM_KEEPALIVE says more).
    Failures are httpx's (`ConnectError`, `ReadTimeout`, `ReadError`...), as the adapter expects.
    """

    def __init__(self, base_url: str, *, timeout: httpx.Timeout, keepalive: float) -> None:
        self._base = base_url.rstrip("/")
        self._url = urlsplit(self._base)
        self._timeout = timeout
        self._keepalive = keepalive
        self._idle: list[tuple[float, asyncio.Transport, _Answer]] = []  # most recent last

    async def get(self, path: str) -> httpx.Response:
        transport, protocol = self._kept() or await self._connect()
        answer = protocol.expect()
        if not answer.done():
            transport.write(_request_head("GET", urlsplit(self._base + path), {"accept": "application/json"}))
        try:
            async with asyncio.timeout(self._timeout.read):
                response = await answer
        except TimeoutError:
            transport.abort()
            raise httpx.ReadTimeout(f"no answer in {self._timeout.read} s") from None
        except BaseException:  # a broken answer, or the caller cancelled: the connection is spent
            transport.abort()
            raise
        if protocol.usable and len(self._idle) < _KEPT:
            self._idle.append((time.monotonic(), transport, protocol))
        else:
            transport.close()
        return response

    def _kept(self) -> tuple[asyncio.Transport, _Answer] | None:
        now = time.monotonic()
        while self._idle:
            since, transport, protocol = self._idle.pop()
            if protocol.usable and not transport.is_closing() and now - since < self._keepalive:
                return transport, protocol
            transport.close()
        return None

    async def _connect(self) -> tuple[asyncio.Transport, _Answer]:
        try:
            return await _open(self._url, lambda: _Answer(_MAX_READ), self._timeout.connect)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"no connection in {self._timeout.connect} s") from None
        except OSError as exc:
            raise httpx.ConnectError(f"{type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        for _, transport, _ in self._idle:
            transport.close()
        self._idle.clear()


async def _open(
    url: SplitResult, protocol: Callable[[], _Answer], timeout: float | None,
) -> tuple[asyncio.Transport, _Answer]:
    """A connection to `url`'s host (TLS for https), made within `timeout` seconds."""
    secure = url.scheme == "https"
    async with asyncio.timeout(timeout):
        return await asyncio.get_running_loop().create_connection(
            protocol, url.hostname, url.port or (443 if secure else 80), ssl=tls_context() if secure else None,
        )


def _request_head(method: str, url: SplitResult, headers: dict[str, str]) -> bytes:
    # Percent-encoded as httpx would: a task id a node chose may hold a space.
    target = quote(url.path or "/", safe=_SAFE)
    if url.query:
        target += "?" + quote(url.query, safe=_SAFE + "?")
    host = url.netloc.rsplit("@", 1)[-1]
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}",
             *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
