"""Poster frames: one still (a JPEG) per finished video, for the dashboard's lists and gallery.

A poster is made once, when the result is checked at collect time: the media checker writes the
frame it decodes anyway (media.probe_video), so it costs no second read of the video. It is kept
in the blob store like any file, and its sha256 in the job's `result_meta["poster"]`, so it goes
with the job's other files (retention, purge). Jobs that finished before posters existed get one
on the first request for it (`Posters.path`), at most POSTER_MAKERS at a time, each once.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from .blobs import BlobStore, StoredBlob
from .checker import CHECKER, MediaError
from .store import Job, JobStore
from .store.memo import Memo
from .tasks import makes

# Backfills at once: each holds a media checker for a fraction of a second; uploads need them too.
POSTER_MAKERS = 2


def poster_tmp(blobs: BlobStore, job_id: str) -> Path:
    """Where the checker writes a poster before it is kept."""
    return blobs.tmp_dir / f"poster-{job_id}-{uuid.uuid4().hex[:8]}.jpg"


async def keep_poster(store: JobStore, blobs: BlobStore, tmp: Path) -> str | None:
    """Move a poster the checker wrote into the blob store: its sha256, or None if none was written."""
    if not tmp.is_file():
        return None
    sha, size = await blobs.adopt(tmp)
    await store.record_blob(sha, size, "jpg")
    return sha


class Posters:
    """The poster of a succeeded job: the one kept, else one made now (once per job)."""

    def __init__(self, store: JobStore, blobs: BlobStore) -> None:
        self.store = store
        self.blobs = blobs
        self._slots = asyncio.Semaphore(POSTER_MAKERS)
        self._making: dict[str, asyncio.Future[StoredBlob | None]] = {}
        # Videos no poster could be made of: asked again, they are not decoded again.
        self._failed: Memo = Memo(10_000)

    async def path(self, job: Job) -> StoredBlob | None:
        """The poster, or None when the job's video gives none."""
        sha = (job.result_meta or {}).get("poster")
        if sha and (kept := await self.blobs.open(sha)) is not None:
            return kept
        if not job.result_sha or self._failed.get(job.result_sha):
            return None
        # Two requests for one poster at once (a gallery opened twice) make it once.
        if (making := self._making.get(job.id)) is None:
            making = self._making[job.id] = asyncio.ensure_future(self._make(job))
            making.add_done_callback(lambda _: self._making.pop(job.id, None))
        return await asyncio.shield(making)

    async def _make(self, job: Job) -> StoredBlob | None:
        assert job.result_sha is not None
        tmp = poster_tmp(self.blobs, job.id)
        async with self._slots:
            try:
                async with self.blobs.local_path(job.result_sha) as video:
                    if makes(job.task) == "image":  # its thumbnail
                        await CHECKER.probe_image(video, job.owner, poster=tmp)
                    else:
                        await CHECKER.probe_video(video, job.owner, poster=tmp)
                sha = await keep_poster(self.store, self.blobs, tmp)
            except (MediaError, ValueError, FileNotFoundError):
                sha = None
            finally:
                tmp.unlink(missing_ok=True)
        if sha is None:
            self._failed.put(job.result_sha, True)
            return None
        await self.store.set_poster(job.id, job.result_sha, sha)
        return await self.blobs.open(sha)
