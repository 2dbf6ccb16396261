"""Following the jobs on each upstream until they end, one loop per upstream.

An upstream with a timed queue (`timed_queue`) is asked when a task's end is due by the run
times measured there, within a budget of one call per X2V_POLL_INTERVAL (FollowPlan); any other
at the steady pace. Each look at its tasks moves the jobs' states on in the store: running,
finished (collected), failed, cancelled there, or forgotten (the upstream restarted: queued
again, same id, seed and parameters). A job waiting too long in a node's queue is cancelled
there first, and moved only if it had not started, so a job never runs on two nodes at once.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..notify import wait_set
from ..store import SUBMITTED, Job
from ..upstream.base import RemoteState, RemoteStatus, Unavailable, UpstreamError
from .collect import Collector
from .health import Health
from .state import Context, UpstreamState
from .submit import Submitter, submit_request, task_id_for

log = logging.getLogger("x2v_gateway.dispatch")

HEALTH_INTERVAL = 5.0
# Following a node (see FollowPlan): the gap between status calls around an expected end, and
# the longest silence while it runs a job of ours (a node that restarted mid-job is noticed
# within this).
FOLLOW_DENSE = 0.1
FOLLOW_QUIET = HEALTH_INTERVAL
# How long after the earliest expected end the node is first asked: the estimate is a lower
# bound, often exact, and a look a moment later usually finds the end in one call.
FOLLOW_MARGIN = 0.05


class Follower:
    """The follow loop of each upstream: health first, then its jobs' statuses."""

    def __init__(self, ctx: Context, health: Health, submitter: Submitter, collector: Collector) -> None:
        self.ctx = ctx
        self.health = health
        self.submitter = submitter
        self.collector = collector

    async def loop(self, state: UpstreamState) -> None:
        while self.ctx.running and not state.removed:
            state.plan.fresh = False
            try:
                await self._follow_once(state)
            except Exception:
                log.exception("following %s failed; trying again", state.name)
            state.plan.round_at = time.monotonic()
            await self._follow_pause(state)
        if state.removed:
            await state.upstream.aclose()

    async def _follow_pause(self, state: UpstreamState) -> None:
        """Wait until the node is due to be asked again; a job sent there meanwhile may bring
        that moment closer (it starts at once on an idle node)."""
        plan = state.plan
        while (wait := self._next_follow(state) - time.monotonic()) > 0:
            plan.poke.clear()
            if not await wait_set(plan.poke, wait):
                return

    def _next_follow(self, state: UpstreamState) -> float:
        """When to ask the node about its jobs next (monotonic)."""
        plan, now = state.plan, time.monotonic()
        poll_interval = self.ctx.poll_interval
        slow = plan.round_at + poll_interval
        if not state.upstream.capabilities.timed_queue or state.up is not True:
            # An upstream that runs its own pool's queue tells no start time; a node that is
            # down is asked at the steady pace (its circuit decides whether a request goes out).
            return slow
        if state.strays:
            # It owes cancels and gets nothing new until they are sent: as soon as the budget allows.
            return plan.allowed_at(now)
        dense = plan.round_at + min(FOLLOW_DENSE, poll_interval)
        if plan.ends:
            due = max(min(plan.ends.values()) + FOLLOW_MARGIN, dense)
            due = min(due, plan.round_at + max(poll_interval, FOLLOW_QUIET))
        else:
            due = slow  # idle, or busy with something of unknown length
        if plan.fresh and plan.spare(now):
            # A job just went there: whether it runs or waits (its place in the node's queue
            # is its ETA) is worth a look now, if the budget still covers the next end.
            due = dense
        return max(due, plan.allowed_at(now))

    def _expect_ends(
        self, state: UpstreamState, running: list[Job], listed_before: float | None,
        freed: float | None, now: float, wall: float,
    ) -> None:
        """From the jobs the node's list shows running: when each began, at the earliest, and so
        when it may end. A job seen running for the first time began after it was sent, after
        the previous look at the list (it was not running then), and, on a node that runs one
        task at a time, after the end of the one that just finished (`freed`: its start plus
        the node's own measure of its run). That last bound keeps the estimate as tight as the
        first job's, sent to an idle node, however rarely the node is asked."""
        plan = state.plan
        starts: dict[str, float] = {}
        for job in running:
            start = plan.starts.get(job.id)
            if start is None:
                start = now - (wall - job.submitted_at) if job.submitted_at else now
                for bound in (listed_before, freed if state.capacity == 1 else None):
                    if bound is not None:
                        start = max(start, bound)
            starts[job.id] = start
        plan.starts = starts
        plan.ends = {
            job.id: starts[job.id] + quickest
            for job in running if (quickest := self.ctx.timings.quickest(state.name, job.task)) is not None
        }

    async def _follow_once(self, state: UpstreamState) -> None:
        ctx = self.ctx
        if state.up is False:
            await self.health.rescue(state)
        now = time.monotonic()
        if now < state.retry_at:
            return  # circuit open
        if state.up is not True or not state.ready or state.strays:
            # Just started, coming back, or owing cancels: the status route first, cheaply.
            await self.health.check(state)
            if state.up is not True:
                return
        upstream = state.upstream
        active, cancels = await ctx.store.read(
            lambda r: (r.active(upstream.name, ctx.replica), r.cancel_pending())
        )
        jobs = [j for j in active if j.id not in ctx.submitting]
        # Only this replica's: another one's may still be on its way to the node.
        pending_cancels = [j for j in cancels if j.upstream == upstream.name and j.replica == ctx.replica]
        if not jobs and not pending_cancels:
            self.health.set_load(state, busy=False, queued=0)
            state.plan.starts, state.plan.ends = {}, {}
            if now - state.last_health >= HEALTH_INTERVAL:
                await self.health.check(state)
            return
        for job in pending_cancels:
            ctx.spawn(self.submitter.send_cancel(job))
        if jobs:
            await self._follow_jobs(state, jobs)

    async def _follow_jobs(self, state: UpstreamState, jobs: list[Job]) -> None:
        ctx = self.ctx
        upstream = state.upstream
        # A task id unknown to the gateway: the gateway died between sending the job to an
        # upstream that picks its own ids and recording the answer. Look for it before resending.
        for job in [j for j in jobs if not j.upstream_task_id]:
            request = await submit_request(ctx, job, task_id_for(job), files=False)
            found = await ctx.call(state, "find", lambda: upstream.find_task(request))
            if found:
                await ctx.store.set_upstream_task_id(job.id, found)
                job.upstream_task_id = found
            elif time.time() - (job.submitted_at or 0) >= ctx.reconcile_grace:
                await ctx.store.requeue(job.id, f"{upstream.name} has no record of it; sending it again")
                ctx.notifier.changed(job.id)
            # Otherwise not yet: the upstream may still be reading a large body it will accept
            # (a timed-out answer says nothing about that). Look again next tick.
        jobs = [j for j in jobs if j.upstream_task_id]
        if not jobs:
            return
        plan = state.plan
        listed_before, asked = plan.listed_at, time.monotonic()
        plan.spend(asked)
        try:
            statuses = await ctx.call(
                state, "poll", lambda: upstream.poll([j.upstream_task_id for j in jobs])
            )
        except Unavailable as exc:
            # Why did it fail? One status request tells a dead process (refused) from a slow one.
            health = await ctx.call(state, "health", upstream.health)
            self.health.record_down(
                state, str(exc) if health.reachable else (health.detail or str(exc)),
                gone=not health.reachable and health.gone,
            )
            log.warning("%s: %s", upstream.name, exc)
            if state.up is False:
                await self.health.rescue(state)
            return
        plan.listed_at = asked
        if state.up is not True:
            await self.health.record_up(state)
        else:
            state.record_ok()

        now, wall = time.monotonic(), time.time()
        seen_running: list[Job] = []
        freed: float | None = None  # the latest a task of ours that finished there ended, at least
        queue_updates: dict[str, dict[str, Any] | None] = {}
        running = [j for j in jobs if (s := statuses.get(j.upstream_task_id)) and s.state is RemoteState.RUNNING]
        queued = 0
        for job in jobs:
            status = statuses.get(job.upstream_task_id)
            if job.id in ctx.submitting:
                continue
            if status is None:
                # Forgotten: the node restarted. Same id, seed and parameters go out again.
                if await ctx.store.requeue(
                    job.id, f"{upstream.name} no longer knows the task (restarted?); sending it again"
                ):
                    # The count of unclear submissions stays: a node that answers every submit
                    # with a 500 (and so never has the task) must not get the job forever.
                    ctx.metrics.jobs_moved.labels(upstream.name, "forgotten").inc()
                    state.freed.append(now)
                    ctx.notifier.changed(job.id)
                    ctx.wake()
                continue
            if status.state is RemoteState.CANCELLED and job.id in ctx.cancel_ignored:
                status = RemoteStatus(RemoteState.RUNNING)  # started before our cancel landed
            if status.state is RemoteState.QUEUED:
                queued += 1
                info = self._queue_info(state, job, status, running, wall)
                if _changed_enough(job.queue_info, info):
                    queue_updates[job.id] = info
                if await self._past_start_deadline(state, job, status, wall):
                    continue
            elif status.state is RemoteState.RUNNING:
                seen_running.append(job)
                if job.state == SUBMITTED and await ctx.store.mark_running(job.id):
                    job.started_at = wall
                    ctx.notifier.changed(job.id)
                info = self._queue_info(state, job, status, running, wall)
                if _changed_enough(job.queue_info, info):
                    queue_updates[job.id] = info
            elif status.state is RemoteState.SUCCEEDED:
                if job.state == SUBMITTED:
                    # It started and ended between two looks: its timeline still says it ran,
                    # from when the node says it began.
                    started = wall - status.ran_seconds if status.ran_seconds else None
                    if await ctx.store.mark_running(job.id, started):
                        job.started_at = started or wall
                began = state.plan.starts.get(job.id)
                if began is not None and status.ran_seconds:
                    freed = max(freed or 0.0, began + status.ran_seconds)
                if job.id not in ctx.collecting:
                    if job.id not in ctx.cancel_ignored:
                        # The node's own measure when it gives one: ours also holds the time
                        # until the start and the end were seen.
                        ran = status.ran_seconds or (wall - job.started_at if job.started_at else 0.0)
                        ctx.timings.record(upstream.name, job.task, ran)
                    state.freed.append(now)
                    ctx.collecting[job.id] = upstream.name
                    ctx.spawn(self.collector.collect(job, state))
                    ctx.wake()
            elif status.state is RemoteState.FAILED:
                if await ctx.store.fail(job.id, f"{upstream.name}: {status.error or 'task failed'}"):
                    ctx.metrics.jobs_finished.labels("failed").inc()
                    state.freed.append(now)
                    ctx.notifier.changed(job.id)
                    ctx.wake()
            elif status.state is RemoteState.CANCELLED:
                # Nobody here asked (the job would already be final): stopped on the upstream.
                if await ctx.store.cancel(job.id, f"cancelled on {upstream.name}", tell_upstream=False):
                    ctx.metrics.jobs_finished.labels("cancelled").inc()
                    state.freed.append(now)
                    ctx.notifier.changed(job.id)
                    ctx.wake()
        self.health.set_load(state, busy=bool(running), queued=queued)
        self._expect_ends(state, seen_running, listed_before, freed, now, wall)
        if queue_updates:
            await ctx.store.set_queue_info(queue_updates)
            for job_id in queue_updates:
                ctx.notifier.changed(job_id)

    def _queue_info(
        self, state: UpstreamState, job: Job, status: RemoteStatus, running: list[Job], wall: float
    ) -> dict[str, Any] | None:
        """Where the job is in the node's queue and, from measured run times, when it should
        start and how long it should run (the upstream's own figures win when it has any)."""
        timings = self.ctx.timings
        info: dict[str, Any] = {}
        if status.queue_position is not None:
            info["position"] = status.queue_position
        typical = timings.typical(state.name, job.task)
        if status.pending_seconds is not None:
            info["pending_seconds"] = status.pending_seconds
        elif typical is not None and status.state is RemoteState.QUEUED:
            ahead = max(0, (status.queue_position or 1) - 1)
            left = 0.0
            for other in running[: state.capacity]:
                other_typical = timings.typical(state.name, other.task) or typical
                elapsed = wall - (other.started_at or wall)
                left += max(0.0, other_typical - elapsed)
                ahead -= 1
            info["pending_seconds"] = round((left + max(0, ahead) * typical) / state.capacity, 1)
        if status.running_seconds is not None:
            info["running_seconds"] = status.running_seconds
        elif typical is not None:
            info["running_seconds"] = round(typical, 1)
        if status.progress is not None:
            info["progress"] = round(status.progress, 3)  # shown as the job's `progress`
        return info or None

    async def _past_start_deadline(
        self, state: UpstreamState, job: Job, status: RemoteStatus, wall: float
    ) -> bool:
        """Move a job that has waited in the node's queue too long; True if it was moved.

        The deadline is X2V_START_DEADLINE, or twice what the work ahead of it should take by
        the node's measured times, whichever is longer (a node of ten-minute jobs is not slow).
        """
        ctx = self.ctx
        upstream = state.upstream
        if not upstream.capabilities.timed_queue or not job.submitted_at or job.pinned:
            return False  # an upstream's own pool runs its own queue; a pinned job has nowhere to go
        ahead = max(1, (status.queue_position or 2) - 1)
        typical = ctx.timings.typical(state.name, job.task) or 0.0
        deadline = max(ctx.start_deadline, 2 * ahead * typical / state.capacity)
        waited = wall - job.submitted_at
        if waited < deadline:
            return False
        try:
            await ctx.call(state, "cancel", lambda: upstream.cancel(job.upstream_task_id))
            started = await ctx.call(state, "health", upstream.current_task) == job.upstream_task_id
        except UpstreamError:
            return False  # try again next tick
        if started:
            # It started between the status read and the cancel, which does not stop a running
            # task: it finishes here, and the node's `cancelled` for it is not the last word.
            ctx.cancel_ignored.add(job.id)
            return False
        if await ctx.store.move(
            job.id, state.name, f"not started on {state.name} after {waited:.0f} s; sending it"
            " elsewhere", stray=False,
        ):
            ctx.metrics.jobs_moved.labels(state.name, "start_deadline").inc()
            log.warning("job %s: not started on %s after %.0f s, moved", job.id, state.name, waited)
            ctx.notifier.changed(job.id)
            ctx.wake()
        return True


def _changed_enough(old: dict[str, Any] | None, new: dict[str, Any] | None) -> bool:
    """Whether queue info is worth a write: position or run time changed, or the wait estimate
    drifted by more than 10 % (or 2 s). A countdown rewritten every poll would cost a write per
    job per node per second."""
    if (old is None) != (new is None):
        return True
    if old is None or new is None:
        return False
    for key in set(old) | set(new):
        a, b = old.get(key), new.get(key)
        if key == "pending_seconds" and a is not None and b is not None:
            if abs(a - b) > max(2.0, 0.1 * max(a, b)):
                return True
        elif a != b:
            return True
    return False
