"""Blobs in a local directory (the default): `<root>/<first two hex digits>/<sha256>`."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

from .base import BlobStore, StoredBlob, check_sha


class LocalBlobStore(BlobStore):
    def __init__(self, root: Path) -> None:
        self.root = root
        super().__init__(root / "tmp")

    def path(self, sha256: str) -> Path:
        """Where a blob is (or would be) on disk."""
        return self.root / check_sha(sha256)[:2] / sha256

    def describe(self) -> str:
        return f"the directory {self.root}"

    async def _keep(self, tmp: Path, sha256: str, size: int) -> None:
        dest = self.path(sha256)
        if dest.exists():
            # The same bytes are already stored. Freeing a gigabyte's extents takes ext4 a
            # noticeable moment; nobody needs to wait for it.
            self.writer_thread.submit(tmp.unlink, missing_ok=True)
            return
        dest.parent.mkdir(exist_ok=True)
        os.replace(tmp, dest)

    async def open(self, sha256: str) -> StoredBlob | None:
        try:
            stat = self.path(sha256).stat()
        except FileNotFoundError:
            return None
        return StoredBlob(sha256, stat.st_size, stat.st_mtime, self)

    async def _read(self, sha256: str, start: int, length: int, chunk_size: int) -> AsyncIterator[bytes]:
        with self.path(sha256).open("rb") as handle:
            handle.seek(start)
            remaining = length
            while remaining > 0:
                # Off the event loop: a cold disk must not stall every other request.
                chunk = await asyncio.to_thread(handle.read, min(chunk_size, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
                yield chunk

    @asynccontextmanager
    async def local_path(self, sha256: str) -> AsyncIterator[Path]:
        path = self.path(sha256)
        if not path.is_file():
            raise FileNotFoundError(f"blob {sha256} is not kept")
        yield path

    async def delete(self, shas: Iterable[str]) -> None:
        for sha in shas:
            self.path(sha).unlink(missing_ok=True)
