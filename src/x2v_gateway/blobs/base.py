"""The blob store's interface: every input and result file, stored once by its sha256.

One portrait used by 100 jobs is one blob. Every backend takes files the same way: the bytes go
to a temporary file on local disk while their hash is computed on the fly (`BlobWriter`), are
checked there, and only then are kept under their hash (`BlobStore._keep`): renamed into place on
a local disk, uploaded to an object store. A reader never sees half a blob, and a crash leaves
only a temporary file that the next start removes. Reads go through `StoredBlob.chunks`, so a
download, a batch zip or a submission to a node streams from wherever the blob is.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import mmap
import os
import tempfile
import uuid
from collections import deque
from contextlib import asynccontextmanager
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar


from ..schemas import ApiError


class BlobTooLarge(Exception):
    """More bytes arrived than the caller allowed."""


class BlobStoreUnavailable(ApiError):
    """The blob store did not answer (a bucket down, credentials refused): 503, try again.
    The client is told no more; `detail` (logged) says what failed."""

    def __init__(self, detail: str) -> None:
        super().__init__(503, "the gateway's file store is not answering right now; try again later")
        self.detail = detail


# Bytes per direct write: a multiple of every disk's block size, and one request on a virtio
# disk (max_sectors_kb 4096). Each write costs a thread hand-off and a disk request whatever its
# size: 4 MiB blocks took 0.17 CPU-s less per GiB than 1 MiB ones, for 8 MiB more peak RSS.
_BLOCK = 4 * 1024 * 1024
_AHEAD = 1  # direct writes the writer thread may have queued before `drain` waits


class BlobWriter:
    """Write a blob in chunks; `commit()` gives its sha256 and size, `discard()` drops it.

    Chunks are gathered into 4 MiB blocks, which the store's writer thread hashes and then writes
    bypassing the page cache (O_DIRECT), as object stores do for large objects. Copying a
    gigabyte into page cache costs the event loop the time it needs to take in (and forward) the
    next bytes, and the cache would only hold a file nobody reads soon. The hash is the largest
    single cost of an upload (0.6 CPU-s per GiB with the CPU's SHA instructions); hashlib lets
    go of the interpreter while it hashes a block, so on the writer thread it runs beside the
    loop, which keeps its time for receiving and forwarding. The last partial block goes through
    the page cache; on a filesystem without O_DIRECT (tmpfs), every block does.
    """

    def __init__(self, store: BlobStore, limit: int | None = None) -> None:
        self._store = store
        self._limit = limit
        self._hash = hashlib.sha256()
        self.size = 0
        fd, name = tempfile.mkstemp(dir=store.tmp_dir, prefix="upload-")
        self._tmp = Path(name)
        self._fd = fd
        self._direct: int | None = None  # an O_DIRECT descriptor, opened at the first full block
        self._direct_ok = hasattr(os, "O_DIRECT")
        self._block: mmap.mmap | None = None
        self._filled = 0  # bytes in `_block`
        self._flushed = 0  # bytes handed to direct writes
        self._spare: list[mmap.mmap] = []
        self._writing: deque[tuple[Future[int], mmap.mmap]] = deque()
        self._closed = False

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._limit is not None and self.size > self._limit:
            raise BlobTooLarge(self.size)
        view = memoryview(chunk)
        while view:
            if self._block is None:
                self._block = self._spare.pop() if self._spare else mmap.mmap(-1, _BLOCK)
            n = min(len(view), _BLOCK - self._filled)
            self._block[self._filled:self._filled + n] = view[:n]
            self._filled += n
            view = view[n:]
            if self._filled == _BLOCK:
                self._write_block()

    def _write_block(self) -> None:
        block, self._block, self._filled = self._block, None, 0
        assert block is not None
        if self._direct is None and self._direct_ok:
            try:
                self._direct = os.open(self._tmp, os.O_WRONLY | os.O_DIRECT)
            except OSError:
                self._direct_ok = False
        fd = self._direct if self._direct is not None else self._fd
        offset, self._flushed = self._flushed, self._flushed + _BLOCK
        self._writing.append(
            (self._store.writer_thread.submit(_hash_and_write, self._hash, fd, block, offset), block)
        )

    async def drain(self) -> None:
        """Wait while the disk is more than a few blocks behind; raises its errors."""
        while len(self._writing) > _AHEAD:
            future, block = self._writing.popleft()
            await asyncio.wrap_future(future)
            self._spare.append(block)

    def _settle(self) -> None:
        """Every byte given to `write` is in the file (or its error is raised)."""
        while self._writing:
            future, block = self._writing.popleft()
            future.result()
            self._spare.append(block)
        if self._filled:
            assert self._block is not None
            _hash_and_write(self._hash, self._fd, self._block, self._flushed, self._filled)
            self._flushed += self._filled
            self._spare.append(self._block)
            self._block, self._filled = None, 0

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in (self._fd, self._direct):
            if fd is not None:
                os.close(fd)
        if self._block is not None:
            self._spare.append(self._block)
            self._block, self._filled = None, 0
        for block in self._spare:
            block.close()
        self._spare.clear()

    async def commit(self) -> tuple[str, int]:
        """Keep the bytes under their sha256 (once: the same bytes kept before are not kept
        again); return the sha256 and the size."""
        sha = await asyncio.to_thread(self._finish)
        await self._store._keep(self._tmp, sha, self.size)
        return sha, self.size

    def _finish(self) -> str:
        try:
            self._settle()
        finally:
            self._close()
        return self._hash.hexdigest()

    def discard(self) -> None:
        self._filled = 0
        with contextlib.suppress(Exception):
            self._settle()  # no write left in flight into a file about to go
        self._close()
        self._tmp.unlink(missing_ok=True)

    async def written(self) -> Path:
        """Where the bytes are until commit, once all of them are there (for checks that must
        run before accepting them). The last block is hashed and written on a thread."""
        await asyncio.to_thread(self._settle)
        return self._tmp


def _hash_and_write(digest: hashlib._Hash, fd: int, block: mmap.mmap, offset: int, length: int = _BLOCK) -> int:
    """Add a block to the blob's hash, then write it at `offset`. Blocks reach the one writer
    thread in order, so the hash sees the bytes in order."""
    view = memoryview(block)[:length]
    try:
        digest.update(view)
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
    finally:
        view.release()
    return length


@dataclass(frozen=True, slots=True)
class StoredBlob:
    """A kept blob: its size, when it was kept, and its bytes on demand (`chunks`)."""

    sha256: str
    size: int
    modified: float  # a Unix time
    store: BlobStore

    def chunks(self, chunk_size: int = 256 * 1024, *, start: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        """The bytes from `start` (`length` of them, or to the end), in pieces of exactly
        `chunk_size` but the last (a base64 encoder needs whole multiples of 3)."""
        length = self.size - start if length is None else length
        return _exact(self.store._read(self.sha256, start, length, chunk_size), chunk_size)


async def _exact(pieces: AsyncIterator[bytes], chunk_size: int) -> AsyncIterator[bytes]:
    pending = bytearray()
    async for piece in pieces:
        if not pending and len(piece) == chunk_size:
            yield piece
            continue
        pending += piece
        while len(pending) >= chunk_size:
            yield bytes(pending[:chunk_size])
            del pending[:chunk_size]
    if pending:
        yield bytes(pending)


class BlobStore(ABC):
    """Content-addressed files, kept on a local disk or in an S3-compatible bucket.

    The whole contract between the gateway and a backend. Everything the gateway does with a
    file goes through these calls: taking one in (`writer`, `adopt`), asking for one (`open`,
    `exists`), reading one (`StoredBlob.chunks`, `download_url`) and deleting ones no job needs
    (`delete`). Files being received or checked live in `tmp_dir`, on local disk, whatever the
    backend. `BlobStore(root)` opens a local store there (tests, the default).
    """

    # What `BlobStore(root)` opens (blobs/__init__.py sets it: the local directory).
    default_backend: ClassVar[type[BlobStore]]

    def __new__(cls, *args: Any, **kwargs: Any) -> BlobStore:
        return super().__new__(BlobStore.default_backend if cls is BlobStore else cls)

    def __init__(self, tmp_dir: Path) -> None:
        self.tmp_dir = tmp_dir
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        # Direct writes wait for the disk: they do it in this thread, never on the event loop.
        self.writer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-writer")
        # Leftovers of writes interrupted by a crash: never referenced by any job.
        for leftover in self.tmp_dir.iterdir():
            leftover.unlink(missing_ok=True)

    def writer(self, limit: int | None = None) -> BlobWriter:
        """A new file to write, of at most `limit` bytes."""
        return BlobWriter(self, limit)

    async def adopt(self, path: Path) -> tuple[str, int]:
        """Keep a finished file (a downloaded result) under its hash; return its sha256 and size.
        The file is gone from `path` afterwards."""
        sha, size = await asyncio.to_thread(_hash_file, path)
        await self._keep(path, sha, size)
        return sha, size

    async def exists(self, sha256: str) -> bool:
        return await self.open(sha256) is not None

    @asynccontextmanager
    async def local_path(self, sha256: str) -> AsyncIterator[Path]:
        """The blob as a file on local disk, for tools that read files (PyAV, FFmpeg): a copy in
        `tmp_dir`, deleted afterwards, unless the store keeps it on local disk already. Raises
        FileNotFoundError when it is not kept."""
        blob = await self.open(sha256)
        if blob is None:
            raise FileNotFoundError(f"blob {sha256} is not kept")
        copy = self.tmp_dir / f"copy-{sha256[:16]}-{uuid.uuid4().hex[:8]}"
        try:
            with copy.open("wb") as out:
                async for chunk in blob.chunks(1024 * 1024):
                    await asyncio.to_thread(out.write, chunk)
            yield copy
        finally:
            copy.unlink(missing_ok=True)

    def free_bytes(self) -> int:
        """Free space on the disk of `tmp_dir`, where every file arrives first."""
        stats = os.statvfs(self.tmp_dir)
        return stats.f_bavail * stats.f_frsize

    async def download_url(self, sha256: str, filename: str, media_type: str) -> str | None:
        """A URL a client may fetch the blob from directly (a presigned one), or None: the
        gateway serves it itself."""
        return None

    def describe(self) -> str:
        """Where blobs are kept, for the start-up log (never a secret)."""
        return type(self).__name__

    async def check(self) -> None:
        """At start-up: raise BlobStoreUnavailable if the store cannot be used."""

    async def aclose(self) -> None:
        self.writer_thread.shutdown(wait=False)

    # -- what a backend implements ---------------------------------------------------------------

    @abstractmethod
    async def _keep(self, tmp: Path, sha256: str, size: int) -> None:
        """Keep the finished file `tmp` as blob `sha256`, unless that blob is kept already (the
        same bytes); either way `tmp` is gone (or about to be) afterwards."""

    @abstractmethod
    async def open(self, sha256: str) -> StoredBlob | None:
        """The blob, or None when it is not (or no longer) kept."""

    @abstractmethod
    def _read(self, sha256: str, start: int, length: int, chunk_size: int) -> AsyncIterator[bytes]:
        """`length` bytes from `start`, in pieces of about `chunk_size`."""

    @abstractmethod
    async def delete(self, shas: Iterable[str]) -> None:
        """Delete these blobs (those already gone are no error)."""


def check_sha(sha256: str) -> str:
    if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
        raise ValueError(f"not a sha256: {sha256!r}")
    return sha256


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest(), path.stat().st_size
