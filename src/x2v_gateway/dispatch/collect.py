"""Finished results (a video, or an image for image tasks): copied from the upstream into the blob
store and checked before the job is done; removed again once their retention has passed."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter

from ..blobs import BlobStoreUnavailable
from ..checker import CHECKER
from ..posters import keep_poster, poster_tmp
from ..store import Job
from ..tasks import makes
from ..upstream.base import Unavailable, UnknownTask, UpstreamError
from .state import Context, UpstreamState

log = logging.getLogger("x2v_gateway.dispatch")

# How many times a job's result may fail to be fetched or checked before the job fails for
# good, rather than going round forever.
MAX_RESULT_FAILURES = 5


class Collector:
    """Collects the result of each job an upstream reports finished."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._failures: Counter[str] = Counter()

    def forget(self, job_id: str) -> None:
        """A job runs anew (resumed): its earlier failed collections no longer count."""
        self._failures.pop(job_id, None)

    async def collect(self, job: Job, state: UpstreamState) -> None:
        """Copy a finished result into the blob store, check it plays (a video) or decodes (an
        image), then mark the job done. The caller has put the job in `ctx.collecting`."""
        ctx = self.ctx
        upstream = state.upstream
        kind = makes(job.task)
        dest = ctx.blobs.tmp_dir / f"result-{job.id}-{uuid.uuid4().hex[:8]}"
        poster = poster_tmp(ctx.blobs, job.id)
        try:
            await ctx.call(
                state, "result", lambda: upstream.fetch_result(job.upstream_task_id, dest, kind=kind)
            )
            meta: dict[str, object]
            if kind == "image":
                picture = await CHECKER.probe_image(dest, poster=poster)  # a thumbnail: its poster
                meta = {"format": picture.format, "width": picture.width, "height": picture.height}
                said = f"a {picture.width}x{picture.height} {picture.format} image"
            else:
                # The check decodes the first frame: it is kept as the job's poster on the way.
                info = await CHECKER.probe_video(dest, poster=poster)
                meta = {"format": "mp4", "duration": info.duration, "width": info.width, "height": info.height}
                said = f"{info.duration:.1f} s of video"
            sha, size = await ctx.blobs.adopt(dest)
            await ctx.store.record_blob(sha, size, str(meta["format"]))
            meta["size"] = size
            if poster_sha := await keep_poster(ctx.store, ctx.blobs, poster):
                meta["poster"] = poster_sha
            # Conditional: a job cancelled while its result was downloading stays cancelled.
            if await ctx.store.succeed(job.id, sha, meta):
                ctx.metrics.jobs_finished.labels("succeeded").inc()
                log.info("job %s succeeded on %s (%s)", job.id, upstream.name, said)
            self._failures.pop(job.id, None)
            ctx.cancel_ignored.discard(job.id)
        except Unavailable as exc:
            if state.gone:
                # The node died with the video on it: run the job again elsewhere.
                if await ctx.store.move(
                    job.id, upstream.name, f"{upstream.name} stopped accepting connections before"
                    " its result was copied; sending it elsewhere", stray=True,
                ):
                    state.strays = True
                    ctx.metrics.jobs_moved.labels(upstream.name, "node_down").inc()
            elif state.up is False:
                log.info("job %s: result waits for %s to answer again (%s)", job.id, upstream.name, exc)
            else:
                await self._failed(job, exc)
        except (UpstreamError, ValueError) as exc:
            await self._failed(job, exc)
        except BlobStoreUnavailable as exc:
            # Not the job's fault: the video stays on its upstream and is fetched again next time.
            log.warning("job %s: result waits for the blob store (%s)", job.id, exc.detail)
        finally:
            dest.unlink(missing_ok=True)
            poster.unlink(missing_ok=True)
            ctx.collecting.pop(job.id, None)
            ctx.notifier.changed(job.id)
            ctx.wake()

    async def _failed(self, job: Job, exc: Exception) -> None:
        self._failures[job.id] += 1
        log.warning("job %s: result not collected (%s)", job.id, exc)
        if self._failures[job.id] >= MAX_RESULT_FAILURES or isinstance(exc, UnknownTask):
            reason = (
                f"the upstream returned a file that is not {'an image' if makes(job.task) == 'image' else 'a playable video'}"
                if isinstance(exc, ValueError) else f"result could not be fetched: {exc}"
            )
            if await self.ctx.store.fail(job.id, reason):
                self.ctx.metrics.jobs_finished.labels("failed").inc()


class Retention:
    """Deletes the files of jobs finished more than X2V_RETENTION_HOURS ago (0: keeps them)."""

    def __init__(self, ctx: Context, hours: float) -> None:
        self.ctx = ctx
        self.hours = hours

    async def loop(self) -> None:
        while self.ctx.running and self.hours > 0:
            try:
                await self.expire_files()
            except Exception:
                log.exception("retention sweep failed")
            await asyncio.sleep(min(3600.0, self.hours * 3600 / 4))

    async def expire_files(self, now: float | None = None) -> int:
        keep = self.hours * 3600
        doomed = await self.ctx.store.expire_files((now or time.time()) - keep, grace=min(3600.0, keep))
        await self.ctx.blobs.delete(doomed)
        if doomed:
            log.info("retention: removed %d files of jobs finished before the cutoff", len(doomed))
        return len(doomed)
