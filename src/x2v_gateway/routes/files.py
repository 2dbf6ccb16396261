"""Files over HTTP: a video or an input file, streamed off the event loop, with `Range` support."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

from litestar import Response
from litestar.response import Stream


def _stream_file(path: Path, start: int, length: int) -> AsyncIterator[bytes]:
    async def chunks() -> AsyncIterator[bytes]:
        with path.open("rb") as handle:
            handle.seek(start)
            remaining = length
            while remaining > 0:
                # Off the event loop: a cold disk must not stall every other request.
                chunk = await asyncio.to_thread(handle.read, min(256 * 1024, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
                yield chunk

    return chunks()


# At most 18 digits a side: a longer number is past any file, and `int()` refuses 4300+ digits.
# A Range that does not match is ignored (the whole file), as RFC 9110 allows.
_RANGE = re.compile(r"^bytes=(\d{0,18})-(\d{0,18})$", re.ASCII)


def ranged_file(
    path: Path, range_header: str | None, *, media_type: str, filename: str, disposition: str = "inline",
) -> Response:
    """A file response that honours a single `Range: bytes=a-b`, so a browser can seek."""
    size = path.stat().st_size
    headers = {
        "accept-ranges": "bytes",
        "content-disposition": f'{disposition}; filename="{filename}"',
    }
    match = _RANGE.match(range_header.strip()) if range_header else None
    if not match or match.groups() == ("", ""):
        headers["content-length"] = str(size)
        return Stream(_stream_file(path, 0, size), media_type=media_type, headers=headers)
    first, last = match.groups()
    if first == "":  # the last N bytes
        start, end = max(0, size - int(last)), size - 1
    else:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        return Response(
            content=b"", status_code=416, headers={"content-range": f"bytes */{size}"},
            media_type=media_type,
        )
    headers["content-range"] = f"bytes {start}-{end}/{size}"
    headers["content-length"] = str(end - start + 1)
    return Stream(
        _stream_file(path, start, end - start + 1), media_type=media_type, headers=headers,
        status_code=206,
    )
