"""Whether an upstream answers, and what happens to its jobs when it does not.

An upstream is watched through its status route only. One whose tasks die with its process
(`tasks_die_with_it`) and whose port refuses connections has lost them: its jobs are queued
again at once. One that only stops answering may still be running them, so its jobs move after
the start-by deadline; the tasks left there (strays) are cancelled when it answers again,
before it gets anything new.
"""

from __future__ import annotations

import logging
import time

from ..upstream.base import UpstreamError
from .state import Context, UpstreamState

log = logging.getLogger("x2v_gateway.dispatch")


class Health:
    """Keeps each upstream's circuit, learns its task types, cancels its strays, moves its jobs."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def check(self, state: UpstreamState) -> None:
        """Ask the upstream's status route (one call of its follow budget)."""
        state.last_health = time.monotonic()
        state.plan.spend(state.last_health)
        health = await self.ctx.call(state, "health", state.upstream.health)
        if not health.reachable:
            self.record_down(state, health.detail or "unreachable", gone=health.gone)
            return
        await self.record_up(state)
        if health.active is not None and not await self.ctx.store.active(state.name):
            # Someone else's tasks (a script talking to the node directly) keep it busy too.
            self.set_load(state, busy=health.active > 0, queued=0)

    def set_load(self, state: UpstreamState, *, busy: bool, queued: int) -> None:
        state.busy, state.queue_depth = busy, queued
        self.ctx.metrics.node_busy.labels(state.name).set(1 if busy else 0)
        self.ctx.metrics.node_queue_depth.labels(state.name).set(queued)

    def record_down(self, state: UpstreamState, detail: str, *, gone: bool = False) -> None:
        was_up = state.up
        state.record_failure(detail, gone=gone)
        self.ctx.metrics.upstream_up.labels(state.name).set(0 if state.up is False else 1)
        if state.up is False and was_up is not False:
            log.warning("%s is down (%s)", state.name, detail)

    async def record_up(self, state: UpstreamState) -> None:
        """The node answered: close the circuit, learn its task types, cancel stray tasks."""
        was_up = state.up
        state.record_ok()
        self.ctx.metrics.upstream_up.labels(state.name).set(1)
        if was_up is False:
            log.info("%s answers again", state.name)
        if state.learn_tasks and (not state.ready or was_up is False):
            await self._learn_tasks(state)
        if was_up is False and not state.strays:
            # Back from an outage: another replica may have moved its jobs off it meanwhile,
            # leaving tasks there that must be cancelled before it gets anything new.
            state.strays = bool(await self.ctx.store.stray_tasks(state.name))
        if state.strays:
            await self._cancel_strays(state)
        if state.accepting(time.monotonic()):
            self.ctx.wake()

    async def _learn_tasks(self, state: UpstreamState) -> None:
        # A restarted node may serve another model now, so this is read again after downtime.
        try:
            state.model = await self.ctx.call(state, "metadata", state.upstream.learn_model)
        except UpstreamError as exc:
            log.warning("%s: metadata not read (%s); it gets no job until it is", state.name, exc)
            return
        state.ready = True
        log.info("%s runs %s (%s)", state.name, state.model, ", ".join(sorted(state.upstream.tasks)) or "nothing the gateway sends")

    async def _cancel_strays(self, state: UpstreamState) -> None:
        """Cancel the tasks left there by jobs that were moved away or retried meanwhile."""
        store = self.ctx.store
        for task_id in await store.stray_tasks(state.name):
            try:
                await self.ctx.call(state, "cancel", lambda: state.upstream.cancel(task_id))
            except UpstreamError as exc:
                log.info("%s: stray task %s not cancelled yet (%s)", state.name, task_id, exc)
                return
            await store.drop_stray(state.name, task_id)
            log.info("%s: cancelled task %s, whose job was moved to another node or retried", state.name, task_id)
        # One may have been added meanwhile (a retried job's attempt that landed late).
        state.strays = bool(await store.stray_tasks(state.name))

    async def rescue(self, state: UpstreamState) -> None:
        """Move jobs off a node that is down: at once when its port refuses connections (the
        process is gone, and its tasks with it), else once it has been silent for the start-by
        deadline. A silent node may still be running them (a network fault, a stuck status
        route), and a job must not run twice at once: the wait is the price of that."""
        ctx = self.ctx
        if not state.upstream.capabilities.tasks_die_with_it:
            # Its tasks outlive an outage of ours or its own: moving them would lose their
            # place in its queue, and could make a second task of one job.
            return
        long_down = (
            state.down_since is not None
            and time.monotonic() - state.down_since >= ctx.start_deadline
        )
        if not (state.gone or long_down):
            return
        moved = 0
        for job in await ctx.store.active(state.name, ctx.replica):
            if job.id in ctx.submitting or job.id in ctx.collecting:
                continue
            why = (
                "stopped accepting connections" if state.gone
                else f"has not answered for {ctx.start_deadline:.0f} s"
            )
            if await ctx.store.move(job.id, state.name, f"{state.name} {why}; sending it elsewhere", stray=True):
                moved += 1
                state.strays = True
                ctx.metrics.jobs_moved.labels(state.name, "node_down").inc()
                ctx.notifier.changed(job.id)
        if moved:
            log.warning("%s is down: %d job(s) moved to the queue", state.name, moved)
            ctx.wake()
