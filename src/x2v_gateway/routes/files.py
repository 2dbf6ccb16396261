"""Files over HTTP: a video or an input file, streamed from the blob store (off the event loop,
or by ranged GETs from a bucket) with `Range` support, or a redirect to a presigned URL."""

from __future__ import annotations

import re

from litestar import Response
from litestar.response import Stream

from ..blobs import BlobStore, StoredBlob
from ..schemas import ApiError


async def blob_file(
    blobs: BlobStore, sha256: str, range_header: str | None, *, media_type: str, filename: str, gone: str,
    disposition: str = "inline",
) -> Response:
    """A kept blob as a download (410 saying `gone` when it is no longer kept): a redirect to a
    presigned URL where the store gives one (`X2V_S3_PRESIGN_MINUTES`), else served here."""
    blob = await blobs.open(sha256)
    if blob is None:
        raise ApiError(410, gone)
    if url := await blobs.download_url(sha256, filename, media_type):
        # A presigned URL expires: no cache may keep the redirect longer than it works. (A plain
        # Response: Litestar's Redirect refuses the routes' video and audio media types.)
        return Response(content=b"", status_code=302, headers={"location": url, "cache-control": "no-store"})
    return ranged_file(blob, range_header, media_type=media_type, filename=filename, disposition=disposition)


# At most 18 digits a side: a longer number is past any file, and `int()` refuses 4300+ digits.
# A Range that does not match is ignored (the whole file), as RFC 9110 allows.
_RANGE = re.compile(r"^bytes=(\d{0,18})-(\d{0,18})$", re.ASCII)


def ranged_file(
    blob: StoredBlob, range_header: str | None, *, media_type: str, filename: str, disposition: str = "inline",
) -> Response:
    """A file response that honours a single `Range: bytes=a-b`, so a browser can seek."""
    size = blob.size
    headers = {
        "accept-ranges": "bytes",
        "content-disposition": f'{disposition}; filename="{filename}"',
    }
    match = _RANGE.match(range_header.strip()) if range_header else None
    if not match or match.groups() == ("", ""):
        headers["content-length"] = str(size)
        return Stream(blob.chunks(), media_type=media_type, headers=headers)
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
        blob.chunks(start=start, length=end - start + 1), media_type=media_type, headers=headers,
        status_code=206,
    )
