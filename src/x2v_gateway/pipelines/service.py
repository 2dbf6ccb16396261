"""Pipelines run: accepted, advanced step by step as their jobs finish, joined, cancelled, retried.

The store is the only truth: a pipeline's steps and each step's job are rows, and `advance`
reads them and does what is due, so it can run any number of times (a job's change, the start-up
sweep, a retry) and makes nothing twice. A step's job is made in the transaction that records
it (`JobStore.create_step_job`); a derived input (a clip's last frame) and the joined video are
the same file however often they are made, kept by their content.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import msgspec

from ..auth import Auth, Caller
from ..blobs import BlobStore
from ..checker import CHECKER
from ..inputs import check_free_space, read_limited
from ..jobs import JobService
from ..notify import Notifier
from ..reads import NotFound
from ..schemas import ApiError
from ..settings import Settings
from ..store import IdempotencyConflict, Job, JobStore, Pipeline, PipelineStep, new_pipeline_id
from ..store.pipeline_records import CANCELLED, FAILED, RUNNING, SUCCEEDED
from .media import MediaPool, join_clips, join_timeout, last_frame, split_speech
from .plan import MAX_AUDIO_SECONDS, SCENE_INPUTS, check_scenes, output_size, parse_request, plan_steps

log = logging.getLogger("x2v_gateway.pipelines")
# Seconds between looks at the store for open pipelines this process does not follow: one that
# another replica accepted and stopped following (it died), or one whose jobs' changes this
# process missed (a subscriber's queue full). Those it follows move on with their jobs' changes.
SWEEP_SECONDS = 5.0
# The join's lease beyond the join's own time limit: each clip copied to a local file first
# (from a bucket), the video kept after. Past it, another replica may join the pipeline.
JOIN_LEASE_MARGIN = 120.0
_JOIN_FAILED = "the clips could not be joined"


class PipelineService:
    """Every change to a pipeline, and the loop that moves pipelines on as their jobs finish."""

    def __init__(
        self, settings: Settings, store: JobStore, blobs: BlobStore, jobs: JobService,
        notifier: Notifier, auth: Auth,
    ) -> None:
        self.settings = settings
        self.store = store
        self.blobs = blobs
        self.jobs = jobs
        self.notifier = notifier
        self.auth = auth
        self.media = MediaPool()
        # Job id -> its pipeline, for the pipelines under way: a job's change moves its pipeline
        # on without a read for every other job's change.
        self._steps: dict[str, str] = {}
        # One advance at a time per pipeline; a change meanwhile asks for one more after it.
        self._advancing: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._events: asyncio.Queue[str] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._events = self.notifier.subscribe()
        self._spawn(self._listen())
        # The sweep: a gateway killed mid-pipeline picks each one up where the store says it is,
        # and follows the jobs of those waiting for a retry.
        await self._sweep(everything=True)
        self._spawn(self._sweep_loop())

    async def _sweep(self, *, everything: bool = False) -> None:
        followed = set(self._steps.values())
        for pipeline_id in await self.store.open_pipelines():
            if everything or pipeline_id not in followed:
                self.kick(pipeline_id)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                await self._sweep()
            except Exception:
                log.exception("pipelines: the sweep failed; trying again in %g s", SWEEP_SECONDS)

    async def stop(self) -> None:
        if self._events is not None:
            self.notifier.unsubscribe(self._events)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.media.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _listen(self) -> None:
        assert self._events is not None
        while True:
            job_id = await self._events.get()
            if (pipeline_id := self._steps.get(job_id)) is not None:
                self.kick(pipeline_id)

    def kick(self, pipeline_id: str) -> None:
        """Advance the pipeline soon (once more after the advance under way, if one is)."""
        if pipeline_id in self._advancing:
            self._again.add(pipeline_id)
            return
        self._advancing[pipeline_id] = self._spawn(self._advance_loop(pipeline_id))

    async def _advance_loop(self, pipeline_id: str) -> None:
        try:
            while True:
                self._again.discard(pipeline_id)
                try:
                    await self.advance(pipeline_id)
                except Exception:
                    log.exception("pipeline %s: advancing failed; the next change of one of its jobs tries again",
                                  pipeline_id)
                if pipeline_id not in self._again:
                    return
        finally:
            self._advancing.pop(pipeline_id, None)

    # -- accepting a pipeline -------------------------------------------------------------------

    async def submit(
        self, who: Caller, content_type: str, body: AsyncIterator[bytes], *, size: int | None,
        idempotency_key: str | None = None,
    ) -> tuple[Pipeline, bool]:
        """A pipeline from its JSON document, counted against `who`'s quota as one job per step:
        (pipeline, created). An `idempotency_key` used before gets the pipeline it made."""
        if content_type and not content_type.startswith("application/json"):
            raise ApiError(415, "send a pipeline as application/json", "Content-Type")
        mb = self.settings.max_json_mb
        if size is not None and size > mb * 1024 * 1024:
            raise ApiError(413, f"request body is larger than the {mb} MiB allowed")
        check_free_space(self.blobs, self.settings.min_free_disk_mb * 1024 * 1024, size or 0)
        request = parse_request(await read_limited(body, mb * 1024 * 1024, f"JSON body is larger than the {mb} MiB allowed"))
        # Each key has its own Idempotency-Keys; the request is compared as it was read, not as typed.
        key = f"{who.owner}:{idempotency_key}" if idempotency_key else None
        fingerprint = _fingerprint(request)
        if key is not None and (found := await self.store.pipeline_for_key(key)) is not None:
            if found[1] != fingerprint:
                raise _reused(idempotency_key)
            return await self._made(found[0]), False
        size_wh = output_size(request)
        check_scenes(request, self.jobs.runnable_tasks(), self.jobs.prompt_missing)
        webhook = await self.jobs.webhooks.for_job(
            request.webhook_url, request.webhook_events, who.owner, pipeline=True,
        )
        # A job per scene at least is counted before any input is fetched: a key out of quota
        # costs no download and no split. The steps beyond (speech parts, images) once planned.
        async with self.auth.counting_jobs(who, len(request.scenes)) as count:
            steps = await self._plan(request, who)
            pipeline = Pipeline(
                id=new_pipeline_id(), owner=who.owner, name=request.name, priority=request.priority,
                output={"fps": request.output.fps, "size": size_wh}, steps=steps,
                idempotency_key=key, request_hash=fingerprint,
            )
            async with self.auth.counting_jobs(who, len(steps) - len(request.scenes)) as more:
                try:
                    made_id = await self.store.create_pipeline(pipeline, webhook)
                except IdempotencyConflict:
                    raise _reused(idempotency_key) from None
                if made_id != pipeline.id:  # the same request, sent twice at once: made by the other
                    count.refund()
                    more.refund()
                    return await self._made(made_id), False
        log.info("pipeline %s accepted: %d scenes, %d steps", pipeline.id, len(request.scenes), len(steps))
        self.kick(pipeline.id)
        return await self._made(pipeline.id), True

    async def _plan(self, request: Any, who: Caller) -> list[PipelineStep]:
        """The inputs fetched, checked and kept, the speech split: the pipeline's steps."""
        inputs = []
        for i, scene in enumerate(request.scenes):
            values = {role: getattr(scene, role) for role in SCENE_INPUTS if getattr(scene, role)}
            try:
                inputs.append(await self.jobs.keep_inputs(values, who.owner))
            except ApiError as exc:
                raise ApiError(exc.status, f"scenes[{i}].{exc.message}", f"scenes[{i}].{exc.field or 'inputs'}") from None
        speech = await self._split_speech(request, inputs)
        return plan_steps(request, inputs, speech)

    async def _made(self, pipeline_id: str) -> Pipeline:
        made = await self.store.pipeline(pipeline_id)
        assert made is not None  # pipelines are never deleted
        return made

    async def _split_speech(self, request: Any, inputs: list[dict[str, str]]) -> dict[int, dict[str, Any]]:
        """Each s2v scene's audio measured, and split at its silences where it is longer than a
        node takes (`X2V_SPEECH_PART_SECONDS`); every part kept as a file of its own."""
        speech: dict[int, dict[str, Any]] = {}
        budget = MAX_AUDIO_SECONDS
        for i, scene in enumerate(request.scenes):
            if scene.task != "s2v":
                continue
            work = self.blobs.tmp_dir / f"split-{uuid.uuid4().hex}"
            try:
                try:
                    async with self.blobs.local_path(inputs[i]["audio"]) as audio:
                        found = await self.media.run(
                            split_speech, audio, work, self.settings.speech_part_seconds, budget,
                        )
                except ValueError as exc:
                    raise ApiError(422, f"scenes[{i}].audio {exc} (every scene's audio together:"
                                   f" at most {MAX_AUDIO_SECONDS:g} s)", f"scenes[{i}].audio") from None
                budget -= found["seconds"]
                for part in found["parts"]:
                    if part[2] is not None:
                        sha, size = await self.blobs.adopt(Path(part[2]))
                        await self.store.record_blob(sha, size, "wav")
                        part[2] = sha
                speech[i] = found
            finally:
                await asyncio.to_thread(shutil.rmtree, work, True)
        return speech

    # -- moving a pipeline on -------------------------------------------------------------------

    async def advance(self, pipeline_id: str) -> None:
        """Do what is due: make the jobs of steps whose inputs are ready, note a failed step,
        join the clips once every step succeeded. Idempotent."""
        pipeline, jobs = await self._read(pipeline_id)
        if pipeline is None or pipeline.finished:
            self._forget(pipeline, jobs)
            return
        if pipeline.state == FAILED and (pipeline.error or "").startswith(_JOIN_FAILED):
            return  # its clips are there and could not be joined: joining again would fail again
        for job_id in jobs:
            self._steps[job_id] = pipeline_id
        broken = [(s, jobs[s.job_id]) for s in pipeline.steps
                  if s.job_id and jobs[s.job_id].state in ("failed", "cancelled")]
        if broken:
            step, job = broken[0]
            error = f"steps[{step.n}] (scenes[{step.scene}]) {job.state}: {job.error or 'no reason given'}"
            if pipeline.state != FAILED or pipeline.error != error:
                await self.store.set_pipeline_state(pipeline_id, FAILED, error, only_from=(RUNNING, FAILED))
                self.notifier.changed(pipeline_id)
        elif pipeline.state == FAILED:
            # Its failed step was retried: under way again.
            await self.store.set_pipeline_state(pipeline_id, RUNNING, only_from=(FAILED,))
            self.notifier.changed(pipeline_id)
        for step in pipeline.steps:
            if step.job_id is None and self._ready(step, pipeline, jobs):
                await self._start_step(pipeline, step, jobs)
        if not broken and all(s.job_id and jobs[s.job_id].state == "succeeded" for s in pipeline.steps):
            await self._join(pipeline, jobs)

    async def _read(self, pipeline_id: str) -> tuple[Pipeline | None, dict[str, Job]]:
        def read(r: Any) -> tuple[Pipeline | None, dict[str, Job]]:
            pipeline = r.pipeline(pipeline_id)
            if pipeline is None:
                return None, {}
            return pipeline, {job.id: job for job in r.jobs_by_id([s.job_id for s in pipeline.steps if s.job_id])}

        return await self.store.read(read)

    def _forget(self, pipeline: Pipeline | None, jobs: dict[str, Job]) -> None:
        for job_id in jobs:
            self._steps.pop(job_id, None)

    @staticmethod
    def _ready(step: PipelineStep, pipeline: Pipeline, jobs: dict[str, Job]) -> bool:
        for need in step.needs.values():
            earlier = pipeline.steps[need["step"]]
            if earlier.job_id is None or jobs[earlier.job_id].state != "succeeded":
                return False
        return True

    async def _start_step(self, pipeline: Pipeline, step: PipelineStep, jobs: dict[str, Job]) -> None:
        inputs = dict(step.inputs)
        for role, need in step.needs.items():
            earlier = jobs[pipeline.steps[need["step"]].job_id or ""]
            try:
                inputs[role] = await self._derive(earlier, need["take"])
            except (ValueError, FileNotFoundError) as exc:
                # The earlier step's output is gone (expired, purged) or unreadable: the step
                # cannot start, and the pipeline says why instead of waiting for ever.
                error = f"steps[{step.n}] could not take its {role} from steps[{need['step']}]: {exc}"
                log.warning("pipeline %s: %s", pipeline.id, error)
                await self.store.set_pipeline_state(pipeline.id, FAILED, error, only_from=(RUNNING, FAILED))
                self.notifier.changed(pipeline.id)
                return
        job = await self.jobs.submit_step(
            pipeline.id, step.n, task=step.task, params=step.params, inputs=inputs,
            priority=pipeline.priority, owner=pipeline.owner,
        )
        if job is not None:
            self._steps[job.id] = pipeline.id
            jobs[job.id] = job
            step.job_id = job.id

    async def _derive(self, job: Job, take: str) -> str:
        """What a finished step gives a later one: its result, or its clip's last frame."""
        assert job.result_sha is not None
        if job.files_expired or not await self.blobs.exists(job.result_sha):
            # Deleted by retention (X2V_RETENTION_HOURS) or a purge while the step waited (a
            # pipeline failed for days, then retried): nothing can make it again but a new run.
            raise FileNotFoundError("its output was deleted (expired or purged); submit the pipeline again")
        if take == "output":
            return job.result_sha
        dest = self.blobs.tmp_dir / f"frame-{job.id}-{uuid.uuid4().hex[:8]}.png"
        try:
            async with self.blobs.local_path(job.result_sha) as video:
                await self.media.run(last_frame, video, dest)
            sha, size = await self.blobs.adopt(dest)
        finally:
            dest.unlink(missing_ok=True)
        await self.store.record_blob(sha, size, "png")
        return sha

    async def _join(self, pipeline: Pipeline, jobs: dict[str, Job]) -> None:
        """Every clip in order into one MP4, kept as the pipeline's video; by one replica (a
        lease on the pipeline's row: the others, which see every step done too, leave it)."""
        clips = [{"seconds": s.seconds or 0.0} for s in pipeline.steps if s.kind == "clip"]
        lease = join_timeout(clips, pipeline.output.get("size")) + JOIN_LEASE_MARGIN
        # Claimed as this replica: one that dies mid-join leaves it once its replica lease ends.
        if not await self.store.claim_join(pipeline.id, self.jobs.dispatcher.replicas.id, time.time() + lease):
            # Its jobs are forgotten here, so that the sweep looks at it again: if the holder
            # dies (or was this gateway's previous life, killed mid-join), its claim ends with
            # its lease, and nothing else would move a pipeline whose jobs are all done.
            log.debug("pipeline %s: another replica joins it", pipeline.id)
            self._forget(pipeline, jobs)
            return
        dest = self.blobs.tmp_dir / f"pipeline-{pipeline.id}-{uuid.uuid4().hex[:8]}.mp4"
        try:
            # FFmpeg reads files: each clip and its audio as a local file (a copy while the join
            # runs, where the blob store is a bucket).
            async with AsyncExitStack() as local:
                parts = []
                for step in pipeline.steps:
                    if step.kind != "clip":
                        continue
                    job = jobs[step.job_id or ""]
                    video = await local.enter_async_context(self.blobs.local_path(job.result_sha or ""))
                    audio = await local.enter_async_context(self.blobs.local_path(step.audio["sha256"])) \
                        if step.audio else None
                    parts.append({
                        "video": str(video), "seconds": step.seconds, "audio": str(audio) if audio else None,
                        "offset": step.audio["offset"] if step.audio else 0.0,
                    })
                log.info("pipeline %s: joining %d clips", pipeline.id, len(parts))
                info = await self.media.run(
                    join_clips, parts, dest, pipeline.output["fps"], pipeline.output.get("size"),
                    timeout=join_timeout(parts, pipeline.output.get("size")),
                )
            await CHECKER.probe_video(dest)
            sha, size = await self.blobs.adopt(dest)
        except (ValueError, FileNotFoundError) as exc:
            log.warning("pipeline %s: the clips could not be joined (%s)", pipeline.id, exc)
            await self.store.set_pipeline_state(
                pipeline.id, FAILED, f"{_JOIN_FAILED}: {exc}", only_from=(RUNNING,),
            )
            self.notifier.changed(pipeline.id)
            return
        finally:
            dest.unlink(missing_ok=True)
        await self.store.record_blob(sha, size, "mp4")
        if await self.store.finish_pipeline(pipeline.id, sha, {"size": size, **info}):
            log.info("pipeline %s succeeded (%.1f s of video)", pipeline.id, info["seconds"])
        self._forget(pipeline, jobs)
        self.notifier.changed(pipeline.id)

    # -- a user's changes -----------------------------------------------------------------------

    async def find(self, pipeline_id: str, who: Caller) -> Pipeline:
        """The pipeline, if this caller may see it."""
        pipeline = await self.store.pipeline(pipeline_id)
        if pipeline is None or not who.may_touch(pipeline.owner):
            raise NotFound("pipeline", pipeline_id)
        return pipeline

    async def cancel(self, pipeline_id: str, who: Caller) -> Pipeline:
        """Cancel: no step starts any more, and the steps' unfinished jobs are cancelled. Final."""
        await self.find(pipeline_id, who)
        # A step's job made by an advance running meanwhile is either committed before this (and
        # cancelled below) or refused by the store once the pipeline is cancelled.
        if await self.store.set_pipeline_state(pipeline_id, CANCELLED, "cancelled by user", only_from=(RUNNING, FAILED)):
            log.info("pipeline %s cancelled by %s", pipeline_id, who.label)
        pipeline = await self.find(pipeline_id, who)
        for step in pipeline.steps:
            if step.job_id:
                job = await self.store.get(step.job_id)
                if job is not None and not job.finished:
                    await self.jobs.cancel(step.job_id, who)
        self.notifier.changed(pipeline_id)
        return await self.find(pipeline_id, who)

    async def retry_step(self, pipeline_id: str, n: int, who: Caller) -> Pipeline:
        """Run one failed or cancelled step again (its job, as it was); the steps that succeeded stay."""
        pipeline = await self.find(pipeline_id, who)
        if pipeline.state in (SUCCEEDED, CANCELLED):
            raise ApiError(409, f"this pipeline is {pipeline.state}; only a running or failed one's steps can be retried", "state")
        if not 0 <= n < len(pipeline.steps):
            raise ApiError(404, f"this pipeline has steps 0 to {len(pipeline.steps) - 1}", "n")
        step = pipeline.steps[n]
        if step.job_id is None:
            raise ApiError(409, "this step has not started yet: it waits for an earlier one", "state")
        await self.jobs.retry(step.job_id, who)
        self.kick(pipeline_id)
        return await self.find(pipeline_id, who)


def _fingerprint(request: Any) -> str:
    """The request as it was read, hashed; without webhook fields it does not set, so that a
    request without a webhook keeps the fingerprint it had before pipelines had webhooks."""
    fields = msgspec.to_builtins(request)
    for name in ("webhook_url", "webhook_events"):
        if fields.get(name) is None:
            fields.pop(name, None)
    return hashlib.sha256(msgspec.json.encode(fields)).hexdigest()


def _reused(idempotency_key: str | None) -> ApiError:
    return ApiError(409, "this Idempotency-Key was already used for a different pipeline", "Idempotency-Key")
