"""The dispatcher: sends queued jobs to upstreams with room, follows them, keeps their videos.

The store is the only truth. Nothing here holds a job only in memory: each loop reads the rows it
acts on and writes every change before the next step, so a gateway killed at any point resumes
from the store. Restart needs no special path: unfinished jobs are simply followed again, and an
upstream that no longer knows one (404 after it restarted) gets it again, same seed and same
parameters. A submission is recorded before it is sent, and never repeated blindly: when the
outcome is unknown, the upstream is asked about the task first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .blobs import BlobStore
from .metrics import Metrics
from .render import probe_video
from .store import QUEUED, SUBMITTED, Job, JobStore
from .upstream.base import (
    AmbiguousSubmit,
    Backpressure,
    Rejected,
    RemoteState,
    SubmitRequest,
    Unavailable,
    UnknownTask,
    Upstream,
    UpstreamError,
)

log = logging.getLogger("x2v_gateway.dispatch")
T = TypeVar("T")

# How many times a job may hit an unclear submission outcome or a broken result before it fails
# for good, rather than going round forever.
MAX_AMBIGUOUS_SUBMITS = 3
MAX_RESULT_FAILURES = 5
HEALTH_INTERVAL = 5.0


class Notifier:
    """Wakes whoever waits on a job (`?wait=`), and streams job changes to subscribers (SSE)."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._subscribers: set[asyncio.Queue[str]] = set()

    def changed(self, job_id: str) -> None:
        for event in self._waiters.get(job_id, ()):
            event.set()
        for queue in self._subscribers:
            if queue.qsize() < 10_000:  # a stalled subscriber must not grow without bound
                queue.put_nowait(job_id)

    async def wait(self, job_id: str, timeout: float) -> None:
        event = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(event)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[job_id]

    def subscribe(self) -> asyncio.Queue[str]:
        queue: asyncio.Queue[str] = asyncio.Queue()
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[str]) -> None:
        self._subscribers.discard(queue)


@dataclass
class UpstreamState:
    """What the gateway knows of one upstream's health right now."""

    upstream: Upstream
    up: bool | None = None  # None: not asked yet
    failures: int = 0
    retry_at: float = 0.0  # circuit open: no request before this (monotonic)
    busy_until: float = 0.0  # back-pressure: no submission before this (monotonic)
    last_error: str | None = None
    last_health: float = 0.0
    durations: list[float] = field(default_factory=list)

    def accepting(self, now: float) -> bool:
        return self.up is not False and now >= self.retry_at and now >= self.busy_until

    def record_ok(self) -> None:
        self.up, self.failures, self.retry_at, self.last_error = True, 0, 0.0, None

    def record_failure(self, error: str) -> None:
        # Exponential cooldown (1, 2, 4 ... 60 s): a dead node costs one request per cooldown.
        self.failures += 1
        self.last_error = error
        if self.failures >= 2:
            self.up = False
        self.retry_at = time.monotonic() + min(60.0, 2.0 ** (self.failures - 1))


def task_id_for(job: Job) -> str:
    """The task id asked of the upstream: the job id, plus the run for user retries.

    A retry needs a fresh id because the node may still remember the failed run under the old
    one (and would answer 503 "already exists"). Resubmissions after a node forgot the task keep
    the same id, so an earlier attempt that did land is found instead of duplicated.
    """
    return job.id if job.run == 0 else f"{job.id}-r{job.run}"


class Dispatcher:
    def __init__(
        self,
        store: JobStore,
        blobs: BlobStore,
        upstreams: list[Upstream],
        notifier: Notifier,
        metrics: Metrics,
        *,
        poll_interval: float = 1.0,
        retention_hours: float = 0.0,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.notifier = notifier
        self.metrics = metrics
        self.poll_interval = poll_interval
        self.retention_hours = retention_hours
        self.states = {u.name: UpstreamState(u) for u in upstreams}
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._submitting: set[str] = set()
        # Jobs handed to a submit task but not yet claimed in the store, per upstream: the store's
        # in-flight count does not see them yet.
        self._unclaimed: Counter[str] = Counter()
        self._collecting: set[str] = set()
        self._ambiguous: Counter[str] = Counter()
        self._result_failures: Counter[str] = Counter()
        self._running = False

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._running = True
        self._spawn(self._dispatch_loop())
        for state in self.states.values():
            self._spawn(self._follow_loop(state))
        self._spawn(self._retention_loop())
        self.wake()

    async def stop(self) -> None:
        self._running = False
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for state in self.states.values():
            await state.upstream.aclose()

    def wake(self) -> None:
        self._wake.set()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, state: UpstreamState, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        """Time an upstream call and count its failures by kind."""
        started = time.perf_counter()
        try:
            return await call()
        except UpstreamError as exc:
            self.metrics.upstream_errors.labels(state.upstream.name, operation, type(exc).__name__).inc()
            raise
        finally:
            self.metrics.upstream_latency.labels(state.upstream.name, operation).observe(
                time.perf_counter() - started
            )

    # -- user actions ---------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> Job | None:
        job = await self.store.cancel(job_id)
        if job is not None:
            self.notifier.changed(job_id)
            if job.cancel_pending:
                self._spawn(self._send_cancel(job))
            self.wake()  # a slot may be free now
        return job

    async def retry(self, job_id: str) -> Job | None:
        job = await self.store.retry(job_id)
        if job is not None:
            self.notifier.changed(job_id)
            self.wake()
        return job

    # -- dispatch -------------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while self._running:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            self._wake.clear()
            try:
                await self._dispatch_once()
            except Exception:
                log.exception("dispatch round failed; trying again")

    async def _dispatch_once(self) -> None:
        now = time.monotonic()
        inflight = self.store.inflight_counts()
        free = {
            name: state.upstream.slots - inflight.get(name, 0) - self._unclaimed[name]
            for name, state in self.states.items()
            if state.accepting(now)
        }
        free = {name: n for name, n in free.items() if n > 0}
        if not free:
            return
        # Read a little more than there is room for, so a few jobs that fit nowhere right now
        # (pinned to a busy upstream, a task type no free node runs) do not block the rest.
        for job in self.store.queued(limit=sum(free.values()) * 4 + 20):
            candidates = [
                name for name, n in free.items()
                if n > 0
                and job.task in self.states[name].upstream.tasks
                and job.pinned in (None, name)
            ]
            if not candidates or job.id in self._submitting:
                continue
            name = max(candidates, key=lambda c: free[c])
            free[name] -= 1
            self._submitting.add(job.id)
            self._unclaimed[name] += 1
            self._spawn(self._submit(job, self.states[name]))
            if not any(free.values()):
                break

    def _request(self, job: Job, task_id: str) -> SubmitRequest:
        params = dict(job.params)
        inputs = {role: self.blobs.path(sha) for role, sha in job.inputs.items()}
        filenames = {}
        for role, sha in job.inputs.items():
            blob = self.store.blob(sha)
            filenames[role] = f"{role}.{blob['kind'] if blob else 'bin'}"
        return SubmitRequest(
            job_id=job.id, task_id=task_id, task=job.task, params=params, inputs=inputs,
            filenames=filenames,
        )

    async def _submit(self, job: Job, state: UpstreamState) -> None:
        upstream = state.upstream
        task_id = task_id_for(job)
        try:
            claimed_id = task_id if getattr(upstream, "chooses_task_id", False) else None
            try:
                claimed = await self.store.claim(job.id, upstream.name, claimed_id)
            finally:
                self._unclaimed[upstream.name] -= 1
            if not claimed:
                return  # cancelled between the read and now
            self.notifier.changed(job.id)
            request = self._request(job, task_id)
            try:
                remote_id = await self._call(state, "submit", lambda: upstream.submit(request))
            except Backpressure as exc:
                state.busy_until = time.monotonic() + exc.retry_after
                await self.store.requeue(job.id, str(exc), sent=False)
            except Unavailable as exc:
                state.record_failure(str(exc))
                await self.store.requeue(job.id, str(exc), sent=False)
            except Rejected as exc:
                await self.store.fail(job.id, str(exc))
                self.metrics.jobs_finished.labels("failed").inc()
            except AmbiguousSubmit as exc:
                # Left as `submitted`: the follow loop asks the upstream whether the task exists
                # and sends it again only if it does not.
                self._ambiguous[job.id] += 1
                log.warning("job %s: %s; will check before sending again", job.id, exc)
                if self._ambiguous[job.id] >= MAX_AMBIGUOUS_SUBMITS:
                    await self.store.fail(job.id, f"submission kept failing: {exc}")
            else:
                self.metrics.submissions.labels(upstream.name).inc()
                if remote_id != claimed_id:
                    await self.store.set_upstream_task_id(job.id, remote_id)
                log.info("job %s sent to %s as %s", job.id, upstream.name, remote_id)
        finally:
            self._submitting.discard(job.id)
            self.notifier.changed(job.id)
            self.wake()

    # -- follow ---------------------------------------------------------------------------------

    async def _follow_loop(self, state: UpstreamState) -> None:
        while self._running:
            try:
                await self._follow_once(state)
            except Exception:
                log.exception("following %s failed; trying again", state.upstream.name)
            await asyncio.sleep(self.poll_interval)

    async def _follow_once(self, state: UpstreamState) -> None:
        now = time.monotonic()
        if now < state.retry_at:
            return  # circuit open
        upstream = state.upstream
        jobs = [j for j in self.store.active(upstream.name) if j.id not in self._submitting]
        pending_cancels = [j for j in self.store.cancel_pending() if j.upstream == upstream.name]
        if not jobs and not pending_cancels:
            if now - state.last_health >= HEALTH_INTERVAL or state.up is None:
                await self._check_health(state)
            return
        for job in pending_cancels:
            self._spawn(self._send_cancel(job))
        if jobs:
            await self._follow_jobs(state, jobs)

    async def _check_health(self, state: UpstreamState) -> None:
        state.last_health = time.monotonic()
        health = await self._call(state, "health", state.upstream.health)
        was_up = state.up
        if health.reachable:
            state.record_ok()
        else:
            state.record_failure(health.detail or "unreachable")
        self.metrics.upstream_up.labels(state.upstream.name).set(1 if state.up else 0)
        if state.up and not was_up:
            self.wake()

    async def _follow_jobs(self, state: UpstreamState, jobs: list[Job]) -> None:
        upstream = state.upstream
        # A task id unknown to the gateway: the gateway died between sending the job to an
        # upstream that picks its own ids and recording the answer. Look for it before resending.
        for job in [j for j in jobs if not j.upstream_task_id]:
            request = self._request(job, task_id_for(job))
            found = await self._call(state, "find", lambda: upstream.find_task(request))
            if found:
                await self.store.set_upstream_task_id(job.id, found)
                job.upstream_task_id = found
            else:
                await self.store.requeue(job.id, f"{upstream.name} has no record of it; sending it again")
                self.notifier.changed(job.id)
        jobs = [j for j in jobs if j.upstream_task_id]
        if not jobs:
            return
        try:
            statuses = await self._call(
                state, "poll", lambda: upstream.poll([j.upstream_task_id for j in jobs])
            )
        except Unavailable as exc:
            state.record_failure(str(exc))
            self.metrics.upstream_up.labels(upstream.name).set(0 if state.up is False else 1)
            log.warning("%s: %s", upstream.name, exc)
            return
        if state.up is not True:
            self.wake()
        state.record_ok()
        self.metrics.upstream_up.labels(upstream.name).set(1)

        queue_updates: dict[str, dict[str, Any] | None] = {}
        for job in jobs:
            status = statuses.get(job.upstream_task_id)
            if job.id in self._submitting:
                continue
            if status is None:
                # Forgotten: the node restarted. Same id, seed and parameters go out again.
                if await self.store.requeue(
                    job.id, f"{upstream.name} no longer knows the task (restarted?); sending it again"
                ):
                    self._ambiguous.pop(job.id, None)
                    self.notifier.changed(job.id)
                    self.wake()
                continue
            if status.state is RemoteState.QUEUED:
                info = {k: v for k, v in (
                    ("position", status.queue_position),
                    ("pending_seconds", status.pending_seconds),
                    ("running_seconds", status.running_seconds),
                ) if v is not None} or None
                if info != job.queue_info:
                    queue_updates[job.id] = info
            elif status.state is RemoteState.RUNNING:
                if job.state == SUBMITTED and await self.store.mark_running(job.id):
                    self.notifier.changed(job.id)
                if status.running_seconds is not None:
                    info = {"running_seconds": status.running_seconds}
                    if info != job.queue_info:
                        queue_updates[job.id] = info
            elif status.state is RemoteState.SUCCEEDED:
                if job.id not in self._collecting:
                    self._collecting.add(job.id)
                    self._spawn(self._collect(job, state))
            elif status.state is RemoteState.FAILED:
                if await self.store.fail(job.id, f"{upstream.name}: {status.error or 'task failed'}"):
                    self.metrics.jobs_finished.labels("failed").inc()
                    self.notifier.changed(job.id)
                    self.wake()
            elif status.state is RemoteState.CANCELLED:
                # Nobody here asked (the job would already be final): stopped on the upstream.
                if await self.store.cancel(job.id, f"cancelled on {upstream.name}", tell_upstream=False):
                    self.metrics.jobs_finished.labels("cancelled").inc()
                    self.notifier.changed(job.id)
                    self.wake()
        if queue_updates:
            await self.store.set_queue_info(queue_updates)
            for job_id in queue_updates:
                self.notifier.changed(job_id)

    async def _collect(self, job: Job, state: UpstreamState) -> None:
        """Copy a finished video into the blob store, check it plays, then mark the job done."""
        upstream = state.upstream
        dest = self.blobs.tmp_dir / f"result-{job.id}-{uuid.uuid4().hex[:8]}"
        try:
            await self._call(
                state, "result", lambda: upstream.fetch_result(job.upstream_task_id, dest)
            )
            info = await asyncio.to_thread(probe_video, dest)
            sha, size = await asyncio.to_thread(self.blobs.adopt, dest)
            await self.store.record_blob(sha, size, "mp4")
            meta = {"size": size, "duration": info.duration, "width": info.width, "height": info.height}
            # Conditional: a job cancelled while its video was downloading stays cancelled.
            if await self.store.succeed(job.id, sha, meta):
                self.metrics.jobs_finished.labels("succeeded").inc()
                if job.started_at:
                    state.durations = (state.durations + [time.time() - job.started_at])[-50:]
                log.info("job %s succeeded (%.1f s of video)", job.id, info.duration)
            self._result_failures.pop(job.id, None)
        except (UpstreamError, ValueError) as exc:
            self._result_failures[job.id] += 1
            log.warning("job %s: result not collected (%s)", job.id, exc)
            if self._result_failures[job.id] >= MAX_RESULT_FAILURES or isinstance(exc, UnknownTask):
                reason = (
                    "the upstream returned a file that is not a playable video"
                    if isinstance(exc, ValueError) else f"result could not be fetched: {exc}"
                )
                if await self.store.fail(job.id, reason):
                    self.metrics.jobs_finished.labels("failed").inc()
        finally:
            dest.unlink(missing_ok=True)
            self._collecting.discard(job.id)
            self.notifier.changed(job.id)
            self.wake()

    async def _send_cancel(self, job: Job) -> None:
        state = self.states.get(job.upstream or "")
        if state is None or not job.upstream_task_id:
            await self.store.cancel_sent(job.id)  # nothing upstream can be told
            return
        try:
            await self._call(state, "cancel", lambda: state.upstream.cancel(job.upstream_task_id))
        except UpstreamError as exc:
            log.info("job %s: cancel not delivered yet (%s); will retry", job.id, exc)
            return
        await self.store.cancel_sent(job.id)

    # -- retention ------------------------------------------------------------------------------

    async def _retention_loop(self) -> None:
        while self._running and self.retention_hours > 0:
            try:
                await self.expire_files()
            except Exception:
                log.exception("retention sweep failed")
            await asyncio.sleep(min(3600.0, self.retention_hours * 3600 / 4))

    async def expire_files(self, now: float | None = None) -> int:
        keep = self.retention_hours * 3600
        doomed = await self.store.expire_files((now or time.time()) - keep, grace=min(3600.0, keep))
        for sha in doomed:
            self.blobs.delete(sha)
        if doomed:
            log.info("retention: removed %d files of jobs finished before the cutoff", len(doomed))
        return len(doomed)
