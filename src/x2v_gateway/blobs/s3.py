"""Blobs in an S3-compatible bucket (`X2V_BLOBS=s3://bucket/prefix`): `<prefix>/<ab>/<sha256>`.

Through obstore (Rust's `object_store`): signing, hashing the payload and moving the bytes all
happen outside the Python interpreter, so a gigabyte going up or down costs the event loop only
the hand-offs. A file is uploaded from its temporary copy on local disk, where it was hashed and
checked, in parts of `PART_BYTES`, `PARTS_AT_ONCE` at a time: the memory it takes is bounded
whatever the file's size. Before a file is uploaded, a HEAD asks whether those bytes are
kept already (content addressing: one portrait used by 100 jobs is one object).

No error from here carries the secret key: obstore's messages name the request (method, URL,
status), and the credentials are given to the client only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import obstore
from obstore.exceptions import BaseError
from obstore.store import S3Store

from ..settings import S3Config
from .base import BlobStore, BlobStoreUnavailable, StoredBlob, check_sha

log = logging.getLogger(__name__)

# Multipart upload: parts of 8 MiB, one in flight. S3 wants parts of at least 5 MiB and at most
# 10,000 of them: 8 MiB parts carry objects up to 78 GiB. Measured with a 1 GB file into SeaweedFS
# on loopback (obstore in a process of its own): one part at a time peaked at 71 MiB RSS whatever
# the file's size and took 15.9 s; four at a time peaked at 87 MiB for 128 MB and 112 MiB for 1 GB
# (growing with the file), and took 21.4 s.
PART_BYTES = 8 * 1024 * 1024
PARTS_AT_ONCE = 1
# Keys per DeleteObjects request (S3's own limit).
_DELETE_BATCH = 1000


class S3BlobStore(BlobStore):
    def __init__(self, config: S3Config, tmp_dir: Path) -> None:
        super().__init__(tmp_dir)
        self.config = config
        options: dict[str, Any] = {"region": config.region}
        if config.endpoint:
            options["endpoint"] = config.endpoint
        if config.access_key_id:
            options["access_key_id"] = config.access_key_id
            options["secret_access_key"] = config.secret_access_key
        self._s3 = S3Store(
            config.bucket, prefix=config.prefix or None, **options,
            client_options={
                "allow_http": config.endpoint.startswith("http://"),
                "connect_timeout": "5s", "timeout": "120s",
            },
            # A few quick retries of what is safe to repeat (5xx, dropped connections): a request
            # waiting on a bucket that is down holds a client, or a job's submission, meanwhile.
            retry_config={
                "max_retries": 3, "retry_timeout": timedelta(seconds=30),
                "backoff": {"init_backoff": timedelta(milliseconds=100),
                            "max_backoff": timedelta(seconds=2), "base": 2},
            },
        )

    def describe(self) -> str:
        where = f" at {self.config.endpoint}" if self.config.endpoint else ""
        return f"s3://{self.config.bucket}/{self.config.prefix}{where}"

    @staticmethod
    def key(sha256: str) -> str:
        return f"{check_sha(sha256)[:2]}/{sha256}"

    async def _keep(self, tmp: Path, sha256: str, size: int) -> None:
        try:
            if await self.open(sha256) is None:
                await _call("upload", obstore.put_async(
                    self._s3, self.key(sha256), tmp, chunk_size=PART_BYTES, max_concurrency=PARTS_AT_ONCE,
                ))
        finally:
            # Freeing a gigabyte's extents takes ext4 a noticeable moment: not on the event loop.
            self.writer_thread.submit(tmp.unlink, missing_ok=True)

    async def open(self, sha256: str) -> StoredBlob | None:
        try:
            meta = await _call("look up", obstore.head_async(self._s3, self.key(sha256)))
        except FileNotFoundError:
            return None
        return StoredBlob(sha256, meta["size"], meta["last_modified"].timestamp(), self)

    async def _read(self, sha256: str, start: int, length: int, chunk_size: int) -> AsyncIterator[bytes]:
        if length <= 0:
            return
        result = await _call("read", obstore.get_async(
            self._s3, self.key(sha256), options={"range": (start, start + length)},
        ))
        async for piece in result.stream(min_chunk_size=chunk_size):
            yield bytes(piece)

    async def delete(self, shas: Iterable[str]) -> None:
        keys = [self.key(sha) for sha in shas]
        for i in range(0, len(keys), _DELETE_BATCH):
            await _call("delete", obstore.delete_async(self._s3, keys[i:i + _DELETE_BATCH]))

    async def download_url(self, sha256: str, filename: str, media_type: str) -> str | None:
        if self.config.presign_minutes <= 0:
            return None
        return await _call("sign", obstore.sign_async(
            self._s3, "GET", self.key(sha256), timedelta(minutes=self.config.presign_minutes),
        ))

    async def check(self) -> None:
        """One cheap request at start-up: are the bucket and the credentials right?"""
        try:
            await _call("look up", obstore.head_async(self._s3, "x2v-gateway-check"))
        except FileNotFoundError:
            pass  # the answer a reachable bucket with working credentials gives


async def _call(what: str, request: Any) -> Any:
    """Await an obstore request; its failures (not a missing object) as BlobStoreUnavailable."""
    try:
        return await request
    except FileNotFoundError:
        raise
    except (BaseError, OSError, asyncio.TimeoutError) as exc:
        detail = f"the S3 blob store could not {what} a file: {_short(exc)}"
        log.warning("%s", detail)
        raise BlobStoreUnavailable(detail) from None


def _short(exc: BaseException) -> str:
    """The first line of an obstore error (its later lines are a debug dump of the request)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"
