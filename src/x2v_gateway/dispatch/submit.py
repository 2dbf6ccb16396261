"""Sending a job to an upstream, and telling an upstream to stop one.

A submission is recorded (claimed) before it is sent, and never repeated blindly: when the
outcome is unknown, the job stays `submitted` and the follow loop asks the upstream about the
task before anything goes out again. A cancel stays owed in the store until the upstream has
been told; one that races the submission goes out once the answer names the task, so a job
cancelled meanwhile never leaves its task running there.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from ..blobs import BlobStoreUnavailable
from ..store import Job
from ..upstream.base import (
    AmbiguousSubmit,
    Backpressure,
    InputFile,
    Rejected,
    SubmitRequest,
    Unavailable,
    UpstreamError,
)
from .state import Context, UpstreamState

log = logging.getLogger("x2v_gateway.dispatch")

# How many times a job may hit an unclear submission outcome before it fails for good, rather
# than going round forever.
MAX_AMBIGUOUS_SUBMITS = 3


def task_id_for(job: Job) -> str:
    """The task id asked of the upstream: the job id, plus the run for user retries.

    A retry needs a fresh id because the node may still remember the failed run under the old
    one (and would answer 503 "already exists"). Resubmissions after a node forgot the task keep
    the same id, so an earlier attempt that did land is found instead of duplicated.
    """
    return job.id if job.run == 0 else f"{job.id}-r{job.run}"


async def submit_request(ctx: Context, job: Job, task_id: str, *, files: bool = True) -> SubmitRequest:
    """Everything an adapter needs for one attempt of `job`: its parameters and (unless `files`
    is False: to look for a task it may have made) its input files, read from the blob store as
    they are sent. Raises Rejected when an input is no longer kept."""
    params = dict(job.params)
    inputs: dict[str, InputFile] = {}
    blobs = await ctx.store.read(lambda r: {sha: r.blob(sha) for sha in job.inputs.values()})
    filenames = {}
    for role, sha in job.inputs.items():
        blob = blobs[sha]
        filenames[role] = f"{role}.{blob['kind'] if blob else 'bin'}"
        if files:
            stored = await ctx.blobs.open(sha)
            if stored is None:
                raise Rejected(f"its {role} file is no longer stored on the gateway")
            inputs[role] = stored
    return SubmitRequest(
        job_id=job.id, task_id=task_id, task=job.task, params=params, inputs=inputs,
        filenames=filenames,
    )


class Submitter:
    """Submits jobs and delivers owed cancels; counts unclear submissions per job."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._ambiguous: Counter[str] = Counter()
        # Jobs whose stop request is on its way upstream (one at a time per job).
        self._cancelling: set[str] = set()

    def forget(self, job_id: str) -> None:
        """A job runs anew (resumed): its earlier unclear submissions no longer count."""
        self._ambiguous.pop(job_id, None)

    async def submit(
        self, job: Job, state: UpstreamState,
        send: Callable[[SubmitRequest], Awaitable[str]] | None = None,
    ) -> None:
        """Claim `job` for `state` in the store, send it, record the outcome. The caller has put
        it in `ctx.submitting` and, unless a slot was reserved for it, in `ctx.unclaimed`."""
        ctx = self.ctx
        upstream = state.upstream
        send = send or upstream.submit
        task_id = task_id_for(job)
        # The upstream's id of the task this attempt may have created; None while unknown.
        landed: str | None = None
        reached = False  # whether the upstream may have the task
        try:
            claimed_id = task_id if upstream.capabilities.chooses_task_id else None
            try:
                claimed = await ctx.store.claim(
                    job.id, upstream.name, claimed_id, replica=ctx.replica, slots=upstream.slots,
                    off_node=ctx.leaving(upstream.name),
                )
            finally:
                ctx.unclaimed[upstream.name] -= 1
            if not claimed:
                return  # cancelled between the read and now, or its slot taken by another replica
            ctx.notifier.changed(job.id)
            sending = time.monotonic()
            try:
                request = await submit_request(ctx, job, task_id)
                remote_id = await ctx.call(state, "submit", lambda: send(request))
            except Backpressure as exc:
                state.busy_until = time.monotonic() + exc.retry_after
                await ctx.store.requeue(job.id, str(exc), sent=False)
            except Unavailable as exc:
                state.record_failure(str(exc))
                await ctx.store.requeue(job.id, str(exc), sent=False)
            except Rejected as exc:
                await ctx.store.fail(job.id, str(exc))
                ctx.metrics.jobs_finished.labels("failed").inc()
            except BlobStoreUnavailable as exc:
                # Its inputs cannot be read now (a bucket down): nothing was sent.
                log.warning("job %s: not sent, %s", job.id, exc.detail)
                await ctx.store.requeue(job.id, exc.message, sent=False)
            except AmbiguousSubmit as exc:
                # Left as `submitted`: the follow loop asks the upstream whether the task exists
                # and sends it again only if it does not.
                reached, landed = True, claimed_id
                self._ambiguous[job.id] += 1
                log.warning("job %s: %s; will check before sending again", job.id, exc)
                if self._ambiguous[job.id] >= MAX_AMBIGUOUS_SUBMITS:
                    await ctx.store.fail(job.id, f"submission kept failing: {exc}")
            else:
                reached, landed = True, remote_id
                self._ambiguous.pop(job.id, None)
                ctx.metrics.submissions.labels(upstream.name).inc()
                if remote_id != claimed_id:
                    await ctx.store.set_upstream_task_id(job.id, remote_id, run=job.run)
                log.info("job %s sent to %s as %s", job.id, upstream.name, remote_id)
                state.plan.sent(
                    job.id, sending, ctx.timings.quickest(state.name, job.task), idle=not state.queue_depth,
                )
        finally:
            ctx.submitting.discard(job.id)
            ctx.notifier.changed(job.id)
            ctx.wake()
        await self._after_submit(job, state, reached, landed)

    async def _after_submit(
        self, job: Job, state: UpstreamState, reached: bool, landed: str | None
    ) -> None:
        """Settle what the user did while the submission was in flight, now its answer is in.

        A cancel could not be sent meanwhile (the task id, or whether the upstream has the
        task at all, was not known): it is sent now, or dropped if nothing reached the
        upstream. A retry started a new run: this attempt's task belongs to no job any more.
        """
        now = await self.ctx.store.get(job.id)
        if now is None:
            return
        if now.run != job.run:
            if reached and landed:
                # A stray, cancelled at once: the follow loop's next status call may come after
                # the task has run. Recorded first, so that neither a failed request nor a crash
                # leaves it running; if the cancel fails, the follow loop sends it again before
                # the upstream gets anything new.
                await self.ctx.store.add_stray(state.name, landed, job.id)
                try:
                    await self.ctx.call(state, "cancel", lambda: state.upstream.cancel(landed))
                except UpstreamError:
                    state.strays = True
                    state.plan.poke.set()
                else:
                    await self.ctx.store.drop_stray(state.name, landed)
                    log.info("job %s: task %s, of its run before the retry, cancelled on %s",
                             job.id, landed, state.name)
            return
        if now.cancel_pending:
            if reached:
                await self.send_cancel(now)
            else:
                await self.ctx.store.cancel_sent(job.id)  # the upstream has nothing to stop

    async def send_cancel(self, job: Job) -> None:
        """Ask the upstream to stop the task of a job cancelled while it may be there.

        The job's `cancel_pending` stays set in the store until the upstream has been told (or
        certainly has nothing to stop), so neither a submission still in flight nor a gateway
        killed in between leaves a task running: the follow loop calls this again each tick.
        """
        if job.id in self.ctx.submitting or job.id in self._cancelling:
            # Its submission is in flight: the task id, or whether the node has the task yet,
            # is known only once it ends, and `submit` calls this then. (A DELETE sent now
            # to a node still reading the POST answers "do nothing", and the task then runs.)
            return
        self._cancelling.add(job.id)
        try:
            # Read again: the caller's copy may predate a cancel delivered meanwhile (by the
            # submission's own end, or an earlier tick), and the hosted cloud answers a second
            # cancel of a task with 400.
            fresh = await self.ctx.store.get(job.id)
            if fresh is not None and fresh.cancel_pending:
                await self._deliver_cancel(fresh)
        finally:
            self._cancelling.discard(job.id)

    async def _deliver_cancel(self, job: Job) -> None:
        ctx = self.ctx
        state = ctx.states.get(job.upstream or "")
        if state is None:
            await ctx.store.cancel_sent(job.id)  # its upstream is no longer configured
            return
        upstream = state.upstream
        task_id = job.upstream_task_id
        try:
            if not task_id:
                # Sent, but the answer never came (lost, or the gateway died waiting for it):
                # the upstream may have the task under an id the gateway never learned.
                request = await submit_request(ctx, job, task_id_for(job), files=False)
                task_id = await ctx.call(state, "find", lambda: upstream.find_task(request))
                if task_id is None:
                    if time.time() - (job.submitted_at or 0) >= ctx.reconcile_grace:
                        await ctx.store.cancel_sent(job.id)  # it never arrived
                    return  # else it may still be reading the body: look again next tick
                await ctx.store.set_upstream_task_id(job.id, task_id)
            await ctx.call(state, "cancel", lambda: upstream.cancel(task_id))
        except UpstreamError as exc:
            log.info("job %s: cancel not delivered yet (%s); will retry", job.id, exc)
            return
        await ctx.store.cancel_sent(job.id)
        log.info("job %s: task %s cancelled on %s", job.id, task_id, upstream.name)
