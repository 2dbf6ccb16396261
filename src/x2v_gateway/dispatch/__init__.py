"""The dispatcher: sends queued jobs to upstreams with room, follows them, keeps their videos.

The store is the only truth. Nothing here holds a job only in memory: each loop reads the rows it
acts on and writes every change before the next step, so a gateway killed at any point resumes
from the store. Restart needs no special path: unfinished jobs are simply followed again, and an
upstream that no longer knows one (404 after it restarted) gets it again, same seed and same
parameters.

The parts, each in its module: `schedule` (which job goes where, fairly, and ETAs), `submit`
(sending jobs, delivering cancels), `follow` (one loop per upstream: its jobs' statuses),
`health` (circuits, strays, moving jobs off dead nodes), `collect` (results, retention). They
share a `state.Context`; the `Dispatcher` composes them and is what the rest of the gateway calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..blobs import BlobStore
from ..metrics import Metrics
from ..notify import Notifier, wait_set
from ..store import QUEUED, Job, JobStore, QueuedJob, Reads
from ..upstream.base import SubmitRequest, Upstream, UpstreamError
from .collect import Collector, Retention
from .follow import Follower
from .health import Health
from .replicas import Replicas, default_replica_id
from .schedule import Scheduler
from .state import FOLLOW_BURST, Context, FollowPlan, UpstreamState
from .submit import Submitter, task_id_for
from .timings import Timings

__all__ = [
    "FOLLOW_BURST", "Dispatcher", "Notifier", "Timings", "UpstreamState", "task_id_for",
]

log = logging.getLogger("x2v_gateway.dispatch")


# The upstream calls every node gets (the operations `Context.call` times): their series are
# made with the node.
NODE_OPERATIONS = ("health", "poll", "submit", "result")


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
        start_deadline: float = 300.0,
        reconcile_grace: float = 60.0,
        replica_id: str | None = None,
        replica_lease: float = 6.0,
    ) -> None:
        self._ctx = ctx = Context(
            store, blobs, notifier, metrics, poll_interval=poll_interval,
            start_deadline=start_deadline, reconcile_grace=reconcile_grace,
            replica=replica_id or default_replica_id(),
        )
        self.store, self.blobs, self.notifier, self.metrics = store, blobs, notifier, metrics
        self.poll_interval = poll_interval
        self.states: dict[str, UpstreamState] = ctx.states
        self.timings: Timings = ctx.timings
        self._scheduler = Scheduler(ctx)
        self._submitter = Submitter(ctx)
        self._collector = Collector(ctx)
        self._retention = Retention(ctx, retention_hours)
        self._follower = Follower(ctx, Health(ctx), self._submitter, self._collector)
        self.replicas = Replicas(ctx, replica_lease, self._submitter.send_cancel)
        # Held while free slots are counted and filled: by a dispatch round, by an upload's
        # reservation.
        self._planning = asyncio.Lock()
        for upstream in upstreams:
            self.add_upstream(upstream)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        ctx = self._ctx
        ctx.running = True
        self.timings.load(reversed(await self.store.recent_run_times()))
        await self.replicas.start()
        await self._release_orphans()
        for state in list(self.states.values()):
            state.strays = bool(await self.store.stray_tasks(state.name))
            self.spawn(self._follower.loop(state))
        self.spawn(self._dispatch_loop())
        self.spawn(self._retention.loop())
        self.wake()

    async def stop(self) -> None:
        ctx = self._ctx
        ctx.running = False
        for task in list(ctx.tasks):
            task.cancel()
        await asyncio.gather(*ctx.tasks, return_exceptions=True)
        with contextlib.suppress(Exception):  # a store already unreachable: the lease runs out
            await self.replicas.stop()
        for state in list(self.states.values()):
            await state.upstream.aclose()

    def wake(self) -> None:
        self._ctx.wake()

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run `coro` in the background until it ends or the dispatcher stops."""
        self._ctx.spawn(coro)

    async def _release_orphans(self) -> None:
        """Jobs left on an upstream that is no longer configured go back to the queue."""
        for row in await self.store.active(replica=self._ctx.replica):
            if row.upstream not in self.states:
                if await self.store.move(
                    row.id, row.upstream, f"{row.upstream} is no longer configured; sending it"
                    " elsewhere", stray=False,
                ):
                    self.notifier.changed(row.id)

    # -- the registry's calls -------------------------------------------------------------------

    def add_upstream(
        self,
        upstream: Upstream,
        *,
        capacity: int = 1,
        drained: bool = False,
        learn_tasks: bool = False,
    ) -> UpstreamState:
        """Start using an upstream (at start, or added at run time)."""
        state = UpstreamState(
            upstream, capacity=capacity, drained=drained, learn_tasks=learn_tasks,
            ready=not learn_tasks, plan=FollowPlan(rate=1.0 / self.poll_interval),
        )
        self.states[upstream.name] = state
        self.metrics.add_upstream(upstream.name, NODE_OPERATIONS)
        self.metrics.node_slots.labels(upstream.name).set(0 if drained else upstream.slots)
        if self._ctx.running:
            # It may owe cancels from an earlier life: its follow loop looks before anything else.
            state.strays = True
            self.spawn(self._follower.loop(state))
            self.wake()
        return state

    def set_drained(self, name: str, drained: bool) -> None:
        state = self.states[name]
        state.drained = drained
        self.metrics.node_slots.labels(name).set(0 if drained else state.upstream.slots)
        self.wake()

    def remove_upstream(self, name: str) -> None:
        """Stop using an upstream; its follow loop ends and closes its connections."""
        state = self.states.pop(name)
        state.removed = True
        self.timings.forget(name)
        self.metrics.forget_upstream(name)

    # -- user actions ---------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> Job | None:
        job = await self.store.cancel(job_id)
        if job is not None:
            self.notifier.changed(job_id)
            if job.cancel_pending and job.replica in (None, self._ctx.replica):
                # Another replica's job: its follow loop delivers the stop request (it alone
                # knows whether the submission is still in flight).
                self.spawn(self._submitter.send_cancel(job))
            self.wake()  # a slot may be free now
        return job

    async def retry(self, job_id: str) -> Job | None:
        """Run a failed or cancelled job again. Where the upstream resumes tasks (the hosted
        cloud), as the same upstream task (no new submission, no second task in the account)
        when it can."""
        ctx = self._ctx
        job = await self.store.get(job_id)
        if (
            job is not None and job.cancel_pending and job_id not in ctx.submitting
            and job.replica in (None, ctx.replica)  # else its replica sends it (store.retry: a stray)
        ):
            # What the cancelled run left upstream is stopped first (found, if its id was never
            # learned): a new run must not leave it running, and a resume needs its id.
            await self._submitter.send_cancel(job)
            job = await self.store.get(job_id)
        state = self.states.get(job.upstream or "") if job is not None else None
        resumed = False
        if (
            job is not None and state is not None and state.upstream.capabilities.resumes
            and job.upstream_task_id and job.state in ("failed", "cancelled") and not job.files_expired
        ):
            upstream, task_id = state.upstream, job.upstream_task_id
            try:
                if job.cancel_pending:
                    # The stop request must land first, or it would stop the resumed task.
                    await ctx.call(state, "cancel", lambda: upstream.cancel(task_id))
                    await self.store.cancel_sent(job_id)
                resumed = await ctx.call(state, "resume", lambda: upstream.resume(task_id))
            except UpstreamError as exc:
                log.info("job %s: not resumed on %s (%s); queueing it again", job_id, upstream.name, exc)
            if resumed and await self.store.resume(job_id, upstream.name, task_id):
                self._submitter.forget(job_id)
                self._collector.forget(job_id)
                ctx.cancel_ignored.discard(job_id)
                log.info("job %s resumed on %s as task %s", job_id, upstream.name, task_id)
        # Not resumed (a self-hosted node, a task the cloud cannot resume): a new run from the queue.
        owed = self.states.get(job.upstream or "") if job is not None and job.cancel_pending else None
        job = await self.store.get(job_id) if resumed else await self.store.retry(job_id)
        if owed is not None and not resumed:
            # The old run's stop request, not delivered yet, became a stray task there (see
            # store.retry): cancelled before that upstream gets anything new.
            owed.strays = True
        if job is not None:
            self.notifier.changed(job_id)
            self.wake()
        return job

    # -- dispatch -------------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        ctx = self._ctx
        while ctx.running:
            await wait_set(ctx.woken, self.poll_interval)
            ctx.woken.clear()
            try:
                await self._dispatch_once()
            except Exception:
                log.exception("dispatch round failed; trying again")

    async def _dispatch_once(self) -> None:
        ctx = self._ctx
        if not ctx.running:
            return  # stopping, or this replica's lease was taken over
        async with self._planning:
            started = time.perf_counter()
            plan = await self.plan()
            self.metrics.dispatch_round.observe(time.perf_counter() - started)
            for job, state in plan:
                ctx.submitting.add(job.id)
                ctx.unclaimed[state.name] += 1
        if not plan:
            return
        # The whole rows of the jobs placed (a round weighs a few columns), in one read: a start
        # places 2,000, and a read each cost 2,000 hops to a reader thread.
        ids = [job.id for job, _ in plan]
        jobs: dict[str, Job] = {}
        try:
            jobs = {job.id: job for job in await self.store.read(lambda r: r.jobs_by_id(ids))}
        finally:
            for placed, state in plan:
                job = jobs.get(placed.id)
                if job is None or job.state != QUEUED or not ctx.running:
                    # Cancelled or purged since the round read it (or the read failed, or the
                    # dispatcher is stopping): its slot is free again.
                    ctx.unclaimed[state.name] -= 1
                    ctx.submitting.discard(placed.id)
                else:
                    self.spawn(self._submitter.submit(job, state))

    async def plan(self) -> list[tuple[QueuedJob, UpstreamState]]:
        """Which queued jobs go to which nodes now (see `schedule.Scheduler.plan`)."""
        return await self._scheduler.plan()

    def estimate(self, r: Reads, job: Job, position: int | None) -> dict[str, float] | None:
        """For a job still in the gateway's queue, on a reader thread: expected seconds until it
        starts and its run time (see `schedule.Scheduler.estimate`)."""
        return self._scheduler.estimate(r, job, position)

    # -- uploads forwarded while they arrive (forward.py) ---------------------------------------

    async def reserve_for_upload(self, task: str, pinned: str | None, owner: str | None) -> UpstreamState | None:
        """A free slot for a job whose upload is still arriving, or None (see
        `schedule.Scheduler.reserve_for_upload`)."""
        async with self._planning:  # a dispatch round and a reservation never count the same slot
            return await self._scheduler.reserve_for_upload(task, pinned, owner)

    async def reservation_blocks(self, state: UpstreamState) -> bool:
        """Whether a queued job waits for a slot on `state` that an arriving upload holds."""
        return await self._scheduler.reservation_blocks(state)

    def unreserve(self, state: UpstreamState) -> None:
        self._scheduler.unreserve(state)

    async def submit_reserved(
        self, job: Job, state: UpstreamState, send: Callable[[SubmitRequest], Awaitable[str]]
    ) -> None:
        """Hand a new job to the node whose slot `reserve_for_upload` kept for it; `send` makes
        the attempt (recorded first, as for every submission)."""
        self._ctx.submitting.add(job.id)
        await self._submitter.submit(job, state, send)

    # -- retention ------------------------------------------------------------------------------

    async def expire_files(self, now: float | None = None) -> int:
        return await self._retention.expire_files(now)
