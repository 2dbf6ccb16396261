"""uvicorn's httptools protocol, without copying every request body twice.

uvicorn appends each piece of a request body that httptools hands it to a bytearray, and gives
the app `bytes(bytearray)`: two copies of every byte before the app sees it. For a 1 GB upload
that is 2 GB of memmove on the one event loop that also hashes, stores and forwards the upload,
and it made forwarding measurably slower than posting straight to the node (docs/benchmarks.md).
Here the pieces are kept as httptools gave them, and joined only when several arrived between
two `receive()` calls; a lone piece reaches the app as the very bytes object httptools made.
"""

from __future__ import annotations

from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _Pieces(list[bytes]):
    """A request body's pending pieces, standing in for uvicorn's bytearray until the app's
    next `receive()`, which turns it into one bytes object with `bytes(...)`."""

    size = 0

    def __bytes__(self) -> bytes:
        return self[0] if len(self) == 1 else b"".join(self)


class BodyPiecesProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` whose request bodies reach the app without the two extra copies."""

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if (self.parser.should_upgrade() and self._should_upgrade()) or cycle.response_complete:
            return
        pieces = cycle.body
        if not isinstance(pieces, _Pieces):  # a fresh bytearray: the app took what came before
            pieces = cycle.body = _Pieces([bytes(pieces)] if pieces else [])
        pieces.append(body)
        pieces.size += len(body)
        if pieces.size > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        cycle.message_event.set()
