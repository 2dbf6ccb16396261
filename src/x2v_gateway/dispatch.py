"""The dispatcher: sends queued jobs to upstreams with room, follows them, keeps their videos.

The store is the only truth. Nothing here holds a job only in memory: each loop reads the rows it
acts on and writes every change before the next step, so a gateway killed at any point resumes
from the store. Restart needs no special path: unfinished jobs are simply followed again, and an
upstream that no longer knows one (404 after it restarted) gets it again, same seed and same
parameters. A submission is recorded before it is sent, and never repeated blindly: when the
outcome is unknown, the upstream is asked about the task first. A cancel stays owed in the store
until the upstream has been told; one that races the submission goes out once the answer names
the task, so a job cancelled meanwhile never leaves its task running there.

Many nodes: each gets jobs up to its slots (capacity + look-ahead), so its GPU starts the next job
the moment one ends while the rest of the queue stays here, free to go anywhere. Which job goes
next is fair: highest priority first, then the owner with the fewest jobs in flight, then that
owner's batch with the fewest, then the oldest. Which node gets it: the one expected to finish it
first, from the run times measured per node and task type. Nodes are watched through their status
routes only, asked when a task's end is due by those same run times, within a budget of one call
per X2V_POLL_INTERVAL (FollowPlan). A node whose port refuses connections has lost its tasks: they
are queued again at once. A node that only stops answering may still be running them, so its jobs
move after the start-by deadline; the tasks left there are cancelled when it answers again,
before it gets anything new. A job waiting too long in a live node's queue is cancelled there
first, and moved only if it had not started, so a job never runs on two nodes at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import statistics
import time
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .blobs import BlobStore
from .metrics import Metrics
from .checker import CHECKER
from .store import QUEUED, RUNNING, SUBMITTED, Inflight, Job, JobStore, Lane, Reads
from .upstream.base import (
    AmbiguousSubmit,
    Backpressure,
    Rejected,
    RemoteState,
    RemoteStatus,
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
# Run times kept per node and task type; their median is the node's typical time.
TIMINGS_KEPT = 20
# Jobs of one lane looked at per dispatch round for one that fits a free node (pinned jobs).
LANE_SCAN = 32
# Following a node (see FollowPlan): status calls it may get in quick succession around an
# expected end, the gap between them then, and the longest silence while it runs a job of ours
# (a node that restarted mid-job is noticed within this).
FOLLOW_BURST = 4.0
FOLLOW_DENSE = 0.1
FOLLOW_QUIET = HEALTH_INTERVAL
# How long after the earliest expected end the node is first asked: the estimate is a lower
# bound, often exact, and a look a moment later usually finds the end in one call.
FOLLOW_MARGIN = 0.05


class Notifier:
    """Wakes whoever waits on a job (`?wait=`), and streams job changes to subscribers (SSE)."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._subscribers: set[asyncio.Queue[str]] = set()
        # Wall time of the last change: a page rendered before it, whose stream connects after
        # it, missed that change (the dashboard's jobs list asks).
        self.changed_at = 0.0

    def changed(self, job_id: str) -> None:
        self.changed_at = time.time()
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


class Timings:
    """Measured run times per node and task type: what ETAs and routing are computed from."""

    def __init__(self) -> None:
        self._runs: dict[tuple[str, str], deque[float]] = {}
        self._typical: dict[tuple[str, str], float | None] = {}

    def record(self, node: str, task: str, seconds: float) -> None:
        if seconds <= 0:
            return
        self._runs.setdefault((node, task), deque(maxlen=TIMINGS_KEPT)).append(seconds)
        self._typical.pop((node, task), None)
        self._typical.pop(("", task), None)

    def typical(self, node: str, task: str) -> float | None:
        """The median run time of this task type on this node; else on any node; else None."""
        for key in ((node, task), ("", task)):
            if key not in self._typical:
                if key[0]:
                    runs = list(self._runs.get(key, ()))
                else:
                    runs = [s for (_, t), d in self._runs.items() if t == task for s in d]
                self._typical[key] = statistics.median(runs) if runs else None
            if self._typical[key] is not None:
                return self._typical[key]
        return None

    def quickest(self, node: str, task: str) -> float | None:
        """The shortest recent run of this task type on this node (else on any node), or None:
        the earliest a run of it can be expected to end, for whoever waits for that end."""
        runs = self._runs.get((node, task)) or [
            s for (_, t), d in self._runs.items() if t == task for s in d
        ]
        return min(runs) if runs else None

    def recent(self, node: str) -> dict[str, list[float]]:
        return {task: list(runs) for (n, task), runs in self._runs.items() if n == node and runs}

    def forget(self, node: str) -> None:
        for key in [k for k in self._runs if k[0] == node]:
            del self._runs[key]
        self._typical.clear()


@dataclass
class FollowPlan:
    """When a self-hosted node is asked about its jobs next, within a budget of status calls.

    A fixed tick sees a finished task half a tick late on average, and asks all through a run
    for nothing. The gateway knows when each running task began (within one look at the node's
    list) and how long that kind of task takes there: it stays quiet until the earliest end a
    run can have, then asks every FOLLOW_DENSE until the end is seen. A token bucket holds the
    node to one status call per X2V_POLL_INTERVAL on average (FOLLOW_BURST at most in a row),
    however wrong the estimates are: a run longer than expected is then followed at the old pace.
    """

    rate: float  # status calls per second, on average
    tokens: float = 1.0
    refilled: float = field(default_factory=time.monotonic)
    round_at: float = 0.0  # when the last follow round ended (monotonic)
    listed_at: float | None = None  # when the last task list that was answered was asked for
    # Job id -> the earliest its run may have begun / may end (monotonic), for jobs of ours the
    # node runs (or, just sent to an idle node, is about to).
    starts: dict[str, float] = field(default_factory=dict)
    ends: dict[str, float] = field(default_factory=dict)
    poke: asyncio.Event = field(default_factory=asyncio.Event)  # a job was sent there
    fresh: bool = False  # a job was sent there since the last round

    def spend(self, now: float) -> None:
        self._refill(now)
        self.tokens -= 1

    def allowed_at(self, now: float) -> float:
        """The earliest moment the budget allows the next status call."""
        self._refill(now)
        return now if self.tokens >= 1 else now + (1 - self.tokens) / self.rate

    def spare(self, now: float) -> bool:
        """Whether a call now would still leave one for the next expected end."""
        self._refill(now)
        return self.tokens >= 2

    def _refill(self, now: float) -> None:
        self.tokens = min(FOLLOW_BURST, self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now


@dataclass
class UpstreamState:
    """What the gateway knows of one upstream's health right now."""

    upstream: Upstream
    capacity: int = 1  # tasks it runs at once; slots = capacity + look-ahead
    drained: bool = False  # finishes what it has, gets nothing new
    # Task types known: fixed by settings, or read from the node's metadata. Until then it gets
    # nothing (a talking-head node must not receive a text-to-video job).
    ready: bool = True
    learn_tasks: bool = False
    model: str | None = None
    up: bool | None = None  # None: not asked yet
    failures: int = 0
    retry_at: float = 0.0  # circuit open: no request before this (monotonic)
    busy_until: float = 0.0  # back-pressure: no submission before this (monotonic)
    last_error: str | None = None
    last_health: float = 0.0
    down_since: float | None = None  # monotonic
    gone: bool = False  # its port refused connections: whatever it held in memory is lost
    strays: bool = False  # tasks to cancel there before it may get new work
    removed: bool = False
    busy: bool = False
    queue_depth: int = 0
    # When slots were seen freed (monotonic), for the dispatch-lag metric.
    freed: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    plan: FollowPlan = field(default_factory=lambda: FollowPlan(rate=1.0))

    @property
    def name(self) -> str:
        return self.upstream.name

    def accepting(self, now: float) -> bool:
        return (
            self.up is not False and self.ready and not self.drained and not self.removed
            and not self.strays and now >= self.retry_at and now >= self.busy_until
        )

    def record_ok(self) -> None:
        self.up, self.failures, self.retry_at, self.last_error = True, 0, 0.0, None
        self.down_since, self.gone = None, False

    def record_failure(self, error: str, *, gone: bool = False) -> None:
        # Exponential cooldown (1, 2, 4 ... 60 s): a dead node costs one request per cooldown.
        # With tasks to cancel there it is asked every few seconds: the sooner it is back, the
        # less chance one of them starts.
        self.failures += 1
        self.last_error = error
        if self.failures >= 2 or gone:
            self.up = False
            if self.down_since is None:
                self.down_since = time.monotonic()
        self.gone = self.gone or gone
        cap = 5.0 if self.strays else 60.0
        self.retry_at = time.monotonic() + min(cap, 2.0 ** (self.failures - 1))

    @property
    def status(self) -> str:
        """up | down | unknown | draining, as `GET /api/v1/nodes` shows it."""
        if self.up is False:
            return "down"
        if self.drained:
            return "draining"
        return {True: "up", None: "unknown"}[self.up]


def task_id_for(job: Job) -> str:
    """The task id asked of the upstream: the job id, plus the run for user retries.

    A retry needs a fresh id because the node may still remember the failed run under the old
    one (and would answer 503 "already exists"). Resubmissions after a node forgot the task keep
    the same id, so an earlier attempt that did land is found instead of duplicated.
    """
    return job.id if job.run == 0 else f"{job.id}-r{job.run}"


@dataclass
class _LaneCursor:
    """One lane's queued jobs as a dispatch round reads them, a few at a time."""

    lane: Lane
    after: int
    jobs: deque[Job] = field(default_factory=deque)
    exhausted: bool = False
    looked_at: int = 0


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
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.notifier = notifier
        self.metrics = metrics
        self.poll_interval = poll_interval
        self.retention_hours = retention_hours
        self.start_deadline = start_deadline
        self.reconcile_grace = reconcile_grace
        self.states: dict[str, UpstreamState] = {}
        self.timings = Timings()
        self._wake = asyncio.Event()
        # Held while free slots are counted and filled: by a dispatch round, by an upload's
        # reservation.
        self._planning = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._submitting: set[str] = set()
        # Jobs whose stop request is on its way upstream (one at a time per job).
        self._cancelling: set[str] = set()
        # Jobs handed to a submit task but not yet claimed in the store, per upstream: the store's
        # in-flight count does not see them yet.
        self._unclaimed: Counter[str] = Counter()
        # Job id -> upstream, while its finished video is being copied: the node is done with it,
        # so its slot is free although the store still says running.
        self._collecting: dict[str, str] = {}
        # Jobs whose cancel (start-by deadline) landed just after they started: cancel does not
        # stop a running task, so they stay where they are and their `cancelled` is not final.
        self._cancel_ignored: set[str] = set()
        self._ambiguous: Counter[str] = Counter()
        self._result_failures: Counter[str] = Counter()
        self._running = False
        for upstream in upstreams:
            self.add_upstream(upstream)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._running = True
        for node, task, seconds in reversed(await self.store.recent_run_times()):
            self.timings.record(node, task, seconds)
        await self._release_orphans()
        for state in self.states.values():
            state.strays = bool(await self.store.stray_tasks(state.name))
            self.spawn(self._follow_loop(state))
        self.spawn(self._dispatch_loop())
        self.spawn(self._retention_loop())
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

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run `coro` in the background until it ends or the dispatcher stops."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, state: UpstreamState, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        """Time an upstream call and count its failures by kind."""
        started = time.perf_counter()
        try:
            return await call()
        except UpstreamError as exc:
            self.metrics.upstream_errors.labels(state.name, operation, type(exc).__name__).inc()
            raise
        finally:
            self.metrics.upstream_latency.labels(state.name, operation).observe(
                time.perf_counter() - started
            )

    async def _release_orphans(self) -> None:
        """Jobs left on an upstream that is no longer configured go back to the queue."""
        for row in await self.store.inflight():
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
        self.metrics.node_slots.labels(upstream.name).set(0 if drained else upstream.slots)
        if self._running:
            # It may owe cancels from an earlier life: its follow loop looks before anything else.
            state.strays = True
            self.spawn(self._follow_loop(state))
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
            if job.cancel_pending:
                self.spawn(self._send_cancel(job))
            self.wake()  # a slot may be free now
        return job

    async def retry(self, job_id: str) -> Job | None:
        """Run a failed or cancelled job again. On the hosted cloud, as the same upstream task
        (its resume: no new submission, no second task in the account) when the cloud can."""
        job = await self.store.get(job_id)
        if job is not None and job.cancel_pending and job_id not in self._submitting:
            # What the cancelled run left upstream is stopped first (found, if its id was never
            # learned): a new run must not leave it running, and a resume needs its id.
            await self._send_cancel(job)
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
                    await self._call(state, "cancel", lambda: upstream.cancel(task_id))
                    await self.store.cancel_sent(job_id)
                resumed = await self._call(state, "resume", lambda: upstream.resume(task_id))
            except UpstreamError as exc:
                log.info("job %s: not resumed on %s (%s); queueing it again", job_id, upstream.name, exc)
            if resumed and await self.store.resume(job_id, upstream.name, task_id):
                self._ambiguous.pop(job_id, None)
                self._result_failures.pop(job_id, None)
                self._cancel_ignored.discard(job_id)
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
        while self._running:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            self._wake.clear()
            try:
                await self._dispatch_once()
            except Exception:
                log.exception("dispatch round failed; trying again")

    async def _dispatch_once(self) -> None:
        async with self._planning:
            started = time.perf_counter()
            plan = await self.plan()
            self.metrics.dispatch_round.observe(time.perf_counter() - started)
            for job, state in plan:
                self._submitting.add(job.id)
                self._unclaimed[state.name] += 1
                self.spawn(self._submit(job, state))

    async def reserve_for_upload(self, task: str, pinned: str | None, owner: str | None) -> UpstreamState | None:
        """A free slot on a node for a job whose upload is still arriving, or None.

        Only an upstream that forwards uploads, is up, runs `task`, has a slot free and no queued job that
        could take it: a job forwarded while it arrives never jumps the queue. Keys with a cap on
        jobs at once go through the queue, which enforces it. The slot stays taken until the job
        is handed over with `submit_reserved` or the slot is given back with `unreserve`.
        """
        async with self._planning:  # a dispatch round and a reservation never count the same slot
            if owner is not None and owner in await self.store.concurrency_limits():
                return None
            now = time.monotonic()
            taken = await self._slots_taken()
            queued_tasks = await self._queued_tasks()
            for state in sorted(self.states.values(), key=lambda s: taken[s.name]):
                upstream = state.upstream
                if (
                    not upstream.capabilities.forwards_uploads or state.up is not True or not state.accepting(now)
                    or task not in upstream.tasks or pinned not in (None, upstream.name)
                    or taken[state.name] >= upstream.slots or queued_tasks & upstream.tasks
                ):
                    continue
                self._unclaimed[state.name] += 1
                return state
            return None

    async def reservation_blocks(self, state: UpstreamState) -> bool:
        """Whether a queued job waits for a slot on `state` that an arriving upload holds."""
        if (await self._slots_taken())[state.name] < state.upstream.slots:
            return False  # it has another free slot
        return bool(await self._queued_tasks() & state.upstream.tasks)

    async def _slots_taken(self) -> Counter[str]:
        """Per upstream: its jobs in flight, and those handed to a submit task or kept for an
        arriving upload that the store does not count yet."""
        # Counted before the read: a job claimed meanwhile is then counted twice (a slot left
        # free for a round), never missed (a node given more than its slots).
        unclaimed = self._unclaimed.copy()
        return Counter(row.upstream for row in await self.store.inflight()) + unclaimed

    async def _queued_tasks(self) -> set[str]:
        """The task types of the jobs waiting in the queue."""
        tasks = sorted(set().union(*(s.upstream.tasks for s in self.states.values())))
        return {lane.task for lane in await self.store.queue_lanes(tasks)}

    def unreserve(self, state: UpstreamState) -> None:
        self._unclaimed[state.name] -= 1
        self.wake()

    async def submit_reserved(
        self, job: Job, state: UpstreamState, send: Callable[[SubmitRequest], Awaitable[str]]
    ) -> None:
        """Hand a new job to the node whose slot `reserve_for_upload` kept for it; `send` makes
        the attempt (recorded first, as for every submission)."""
        self._submitting.add(job.id)
        await self._submit(job, state, send)

    async def plan(self) -> list[tuple[Job, UpstreamState]]:
        """Which queued jobs go to which nodes now: every free slot, fairly, fastest node first.

        Reads the store only, off the event loop: the in-flight jobs (a few columns each), the
        queue's lanes (one index seek per lane), and the first jobs of the lanes it takes from.
        """
        now, wall = time.monotonic(), time.time()
        # What this process holds in memory is taken before the store is read: a job claimed
        # meanwhile is then counted twice (its slot stays free a round), never missed.
        unclaimed, submitting = self._unclaimed.copy(), set(self._submitting)
        collecting = dict(self._collecting)

        def reads(r: Reads) -> tuple[list[Inflight], dict[str, int], list[Job]]:
            inflight, limits = r.inflight(), r.concurrency_limits()
            claimed = {row.id for row in inflight}
            pending = [r.get(job_id) for job_id in submitting - claimed] if limits else []
            return inflight, limits, [j for j in pending if j is not None]

        inflight, limits, pending = await self.store.read(reads)
        on_node: dict[str, list[Inflight]] = defaultdict(list)
        owner_load: Counter[str] = Counter()
        lane_load: Counter[tuple[str, str]] = Counter()
        for row in inflight:
            on_node[row.upstream].append(row)
            owner_load[row.owner] += 1
            lane_load[(row.owner, row.batch)] += 1
        # API keys with a cap on jobs at once (`keys create --max-concurrent`): at the cap, the
        # key's lanes are passed over and its jobs wait queued. Jobs handed to a submit task but
        # not yet claimed in the store count too, so two rounds cannot both fill the cap.
        for job in pending:
            if job.state == QUEUED:
                owner_load[job.owner or ""] += 1
        # A job whose video is being copied has left its node: its slot is free. Only while the
        # store still counts it in flight, though; once it is marked done it is in neither.
        in_flight = {row.id for row in inflight}
        finishing = Counter(n for job_id, n in collecting.items() if job_id in in_flight)
        free: dict[str, int] = {}
        for name, state in self.states.items():
            if state.accepting(now):
                used = len(on_node.get(name, ())) + unclaimed[name] - finishing[name]
                if state.upstream.slots - used > 0:
                    free[name] = state.upstream.slots - used
        if not free:
            return []
        wanted = sorted(set().union(*(self.states[n].upstream.tasks for n in free)))
        lanes = await self.store.queue_lanes(wanted)
        free = {name: n for name, n in free.items() if name in self.states}  # none removed meanwhile
        if not lanes:
            for name in free:
                self.states[name].freed.clear()  # nothing waited: no lag to count
            return []

        # Nodes, per task type, by when a job sent now would be finished there.
        backlog = {n: self._backlog(n, on_node.get(n, ()), wall) for n in free}
        version: Counter[str] = Counter()
        nodes_for: dict[str, list[tuple[float, int, str, int]]] = defaultdict(list)

        def offer(name: str) -> None:
            state = self.states[name]
            for task in state.upstream.tasks:
                finish = backlog[name] + self._duration(name, task) / state.capacity
                heapq.heappush(nodes_for[task], (finish, len(on_node.get(name, ())), name, version[name]))

        for name in free:
            offer(name)

        def best_node(task: str) -> str | None:
            heap = nodes_for.get(task, [])
            while heap:
                _, _, name, seen = heap[0]
                if seen == version[name] and free.get(name, 0) > 0:
                    return name
                heapq.heappop(heap)
            return None

        def lane_key(c: _LaneCursor) -> tuple[int, int, int, int]:
            lane = c.lane
            return (-lane.priority, owner_load[lane.owner], lane_load[(lane.owner, lane.batch)], lane.head_seq)

        total_free = sum(free.values())
        cursors = [_LaneCursor(lane, lane.head_seq - 1) for lane in lanes]
        heap = [(lane_key(c), i) for i, c in enumerate(cursors)]
        heapq.heapify(heap)
        plan: list[tuple[Job, UpstreamState]] = []
        while heap and total_free > 0:
            key, i = heapq.heappop(heap)
            cursor = cursors[i]
            if key != lane_key(cursor):
                heapq.heappush(heap, (lane_key(cursor), i))  # its owner got a job meanwhile
                continue
            cap = limits.get(cursor.lane.owner)
            if cap is not None and owner_load[cursor.lane.owner] >= cap:
                continue  # its owner has as many jobs running as its key allows
            fit = await self._next_fit(cursor, free, best_node, total_free)
            if fit is None:
                continue  # nothing of this lane fits a free node this round
            job, name = fit
            state = self.states.get(name)
            if state is None:
                continue  # removed while the lane was read
            plan.append((job, state))
            free[name] -= 1
            total_free -= 1
            owner_load[cursor.lane.owner] += 1
            lane_load[(cursor.lane.owner, cursor.lane.batch)] += 1
            backlog[name] += self._duration(name, job.task) / state.capacity
            version[name] += 1
            if free[name] > 0:
                offer(name)
            if state.freed:
                self.metrics.dispatch_lag.labels(name).observe(now - state.freed.popleft())
            heapq.heappush(heap, (lane_key(cursor), i))
        for name, n in free.items():
            if n > 0 and name in self.states:
                self.states[name].freed.clear()
        return plan

    async def _next_fit(
        self,
        cursor: _LaneCursor,
        free: dict[str, int],
        best_node: Callable[[str], str | None],
        total_free: int,
    ) -> tuple[Job, str] | None:
        """The lane's next job that a free node can take, and that node."""
        while cursor.looked_at < LANE_SCAN:
            if not cursor.jobs:
                if cursor.exhausted:
                    return None
                batch = await self.store.lane_jobs(cursor.lane, cursor.after, min(LANE_SCAN, total_free + 4))
                if not batch:
                    cursor.exhausted = True
                    return None
                cursor.after = batch[-1].seq
                cursor.jobs.extend(batch)
            job = cursor.jobs.popleft()
            cursor.looked_at += 1
            if job.id in self._submitting:
                continue
            if job.pinned is not None:
                state = self.states.get(job.pinned)
                if free.get(job.pinned, 0) > 0 and state and job.task in state.upstream.tasks:
                    cursor.looked_at = 0
                    return job, job.pinned
                continue  # its node is busy: the rest of the lane may still go elsewhere
            name = best_node(job.task)
            if name is None:
                return None  # no free node runs this task type
            cursor.looked_at = 0
            return job, name
        return None

    def _duration(self, node: str, task: str) -> float:
        # Unknown everywhere: every node looks the same, and the emptiest one wins.
        return self.timings.typical(node, task) or 1.0

    def _backlog(self, node: str, jobs: Iterable[Inflight], wall: float) -> float:
        """Seconds of work a node has before it could start something new."""
        capacity = self.states[node].capacity
        total = 0.0
        for row in jobs:
            if row.id in self._collecting:
                continue
            duration = self._duration(node, row.task)
            if row.state == RUNNING and row.started_at:
                duration = max(0.0, duration - (wall - row.started_at))
            total += duration
        return total / capacity

    def estimate(self, job: Job, position: int | None, inflight: Iterable[Inflight]) -> dict[str, float] | None:
        """For a job still in the gateway's queue: expected seconds until it starts and its run
        time, from the measured run times (None before anything was measured). The caller reads
        its queue `position` and the jobs in flight (`store.inflight()`), off the loop."""
        rates = 0.0
        starts = []
        wall = time.time()
        by_node: dict[str, list[Inflight]] = defaultdict(list)
        for row in inflight:
            by_node[row.upstream].append(row)
        for name, state in self.states.items():
            if job.task not in state.upstream.tasks or state.up is False or state.drained:
                continue
            typical = self.timings.typical(name, job.task)
            if typical is None:
                continue
            rates += state.capacity / typical
            starts.append(self._backlog(name, by_node.get(name, ()), wall))
        if not rates or position is None:
            return None
        run = self.timings.typical("", job.task) or 0.0
        return {"pending_seconds": round(min(starts) + (position - 1) / rates, 1),
                "running_seconds": round(run, 1)}

    async def _request(self, job: Job, task_id: str) -> SubmitRequest:
        params = dict(job.params)
        inputs = {role: self.blobs.path(sha) for role, sha in job.inputs.items()}
        blobs = await self.store.read(lambda r: {sha: r.blob(sha) for sha in job.inputs.values()})
        filenames = {}
        for role, sha in job.inputs.items():
            blob = blobs[sha]
            filenames[role] = f"{role}.{blob['kind'] if blob else 'bin'}"
        return SubmitRequest(
            job_id=job.id, task_id=task_id, task=job.task, params=params, inputs=inputs,
            filenames=filenames,
        )

    async def _submit(
        self, job: Job, state: UpstreamState,
        send: Callable[[SubmitRequest], Awaitable[str]] | None = None,
    ) -> None:
        upstream = state.upstream
        send = send or upstream.submit
        task_id = task_id_for(job)
        # The upstream's id of the task this attempt may have created; None while unknown.
        landed: str | None = None
        reached = False  # whether the upstream may have the task
        try:
            claimed_id = task_id if upstream.capabilities.chooses_task_id else None
            try:
                claimed = await self.store.claim(job.id, upstream.name, claimed_id)
            finally:
                self._unclaimed[upstream.name] -= 1
            if not claimed:
                return  # cancelled between the read and now
            self.notifier.changed(job.id)
            request = await self._request(job, task_id)
            sending = time.monotonic()
            try:
                remote_id = await self._call(state, "submit", lambda: send(request))
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
                reached, landed = True, claimed_id
                self._ambiguous[job.id] += 1
                log.warning("job %s: %s; will check before sending again", job.id, exc)
                if self._ambiguous[job.id] >= MAX_AMBIGUOUS_SUBMITS:
                    await self.store.fail(job.id, f"submission kept failing: {exc}")
            else:
                reached, landed = True, remote_id
                self._ambiguous.pop(job.id, None)
                self.metrics.submissions.labels(upstream.name).inc()
                if remote_id != claimed_id:
                    await self.store.set_upstream_task_id(job.id, remote_id, run=job.run)
                log.info("job %s sent to %s as %s", job.id, upstream.name, remote_id)
                self._expect_start(state, job, sending)
        finally:
            self._submitting.discard(job.id)
            self.notifier.changed(job.id)
            self.wake()
        await self._after_submit(job, state, reached, landed)

    async def _after_submit(
        self, job: Job, state: UpstreamState, reached: bool, landed: str | None
    ) -> None:
        """Settle what the user did while the submission was in flight, now its answer is in.

        A cancel could not be sent meanwhile (the task id, or whether the upstream has the
        task at all, was not known): it is sent now, or dropped if nothing reached the
        upstream. A retry started a new run: this attempt's task belongs to no job any more.
        """
        now = await self.store.get(job.id)
        if now is None:
            return
        if now.run != job.run:
            if reached and landed:
                # Recorded first, so that neither a failed request nor a crash leaves it running.
                await self.store.add_stray(state.name, landed, job.id)
                try:
                    await self._call(state, "cancel", lambda: state.upstream.cancel(landed))
                except UpstreamError:
                    state.strays = True  # cancelled before the upstream gets anything new
                else:
                    await self.store.drop_stray(state.name, landed)
                    log.info("job %s: task %s, of its run before the retry, cancelled on %s",
                             job.id, landed, state.name)
            return
        if now.cancel_pending:
            if reached:
                await self._send_cancel(now)
            else:
                await self.store.cancel_sent(job.id)  # the upstream has nothing to stop

    # -- follow ---------------------------------------------------------------------------------

    async def _follow_loop(self, state: UpstreamState) -> None:
        while self._running and not state.removed:
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
            try:
                await asyncio.wait_for(plan.poke.wait(), wait)
            except TimeoutError:
                return

    def _next_follow(self, state: UpstreamState) -> float:
        """When to ask the node about its jobs next (monotonic)."""
        plan, now = state.plan, time.monotonic()
        slow = plan.round_at + self.poll_interval
        if not state.upstream.capabilities.timed_queue or state.up is not True:
            # An upstream that runs its own pool's queue tells no start time; a node that is
            # down is asked at the steady pace (its circuit decides whether a request goes out).
            return slow
        dense = plan.round_at + min(FOLLOW_DENSE, self.poll_interval)
        if plan.ends:
            due = max(min(plan.ends.values()) + FOLLOW_MARGIN, dense)
            due = min(due, plan.round_at + max(self.poll_interval, FOLLOW_QUIET))
        else:
            due = slow  # idle, or busy with something of unknown length
        if plan.fresh and plan.spare(now):
            # A job just went there: whether it runs or waits (its place in the node's queue
            # is its ETA) is worth a look now, if the budget still covers the next end.
            due = dense
        return max(due, plan.allowed_at(now))

    def _expect_start(self, state: UpstreamState, job: Job, sending: float) -> None:
        """A job just reached a node: where nothing of ours runs or waits, it starts right away
        (no later than the answer came), and its end can be waited for from now."""
        plan = state.plan
        quickest = self.timings.quickest(state.name, job.task)
        if quickest is not None and not plan.starts and not state.queue_depth:
            plan.ends.setdefault(job.id, sending + quickest)
        plan.fresh = True
        plan.poke.set()

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
            for job in running if (quickest := self.timings.quickest(state.name, job.task)) is not None
        }

    async def _follow_once(self, state: UpstreamState) -> None:
        if state.up is False:
            await self._rescue(state)
        now = time.monotonic()
        if now < state.retry_at:
            return  # circuit open
        if state.up is not True or not state.ready or state.strays:
            # Just started, coming back, or owing cancels: the status route first, cheaply.
            await self._check_health(state)
            if state.up is not True:
                return
        upstream = state.upstream
        active, cancels = await self.store.read(lambda r: (r.active(upstream.name), r.cancel_pending()))
        jobs = [j for j in active if j.id not in self._submitting]
        pending_cancels = [j for j in cancels if j.upstream == upstream.name]
        if not jobs and not pending_cancels:
            self._set_load(state, busy=False, queued=0)
            state.plan.starts, state.plan.ends = {}, {}
            if now - state.last_health >= HEALTH_INTERVAL:
                await self._check_health(state)
            return
        for job in pending_cancels:
            self.spawn(self._send_cancel(job))
        if jobs:
            await self._follow_jobs(state, jobs)

    async def _check_health(self, state: UpstreamState) -> None:
        state.last_health = time.monotonic()
        state.plan.spend(state.last_health)
        health = await self._call(state, "health", state.upstream.health)
        if not health.reachable:
            self._record_down(state, health.detail or "unreachable", gone=health.gone)
            return
        await self._record_up(state)
        if health.active is not None and not await self.store.active(state.name):
            # Someone else's tasks (a script talking to the node directly) keep it busy too.
            self._set_load(state, busy=health.active > 0, queued=0)

    def _record_down(self, state: UpstreamState, detail: str, *, gone: bool = False) -> None:
        was_up = state.up
        state.record_failure(detail, gone=gone)
        self.metrics.upstream_up.labels(state.name).set(0 if state.up is False else 1)
        if state.up is False and was_up is not False:
            log.warning("%s is down (%s)", state.name, detail)

    async def _record_up(self, state: UpstreamState) -> None:
        """The node answered: close the circuit, learn its task types, cancel stray tasks."""
        was_up = state.up
        state.record_ok()
        self.metrics.upstream_up.labels(state.name).set(1)
        if was_up is False:
            log.info("%s answers again", state.name)
        if state.learn_tasks and (not state.ready or was_up is False):
            await self._learn_tasks(state)
        if state.strays:
            await self._cancel_strays(state)
        if state.accepting(time.monotonic()):
            self.wake()

    async def _learn_tasks(self, state: UpstreamState) -> None:
        # A restarted node may serve another model now, so this is read again after downtime.
        try:
            state.model = await self._call(state, "metadata", state.upstream.learn_model)
        except UpstreamError as exc:
            log.warning("%s: metadata not read (%s); it gets no job until it is", state.name, exc)
            return
        state.ready = True
        log.info("%s runs %s (%s)", state.name, state.model, ", ".join(sorted(state.upstream.tasks)) or "nothing the gateway sends")

    async def _cancel_strays(self, state: UpstreamState) -> None:
        """Cancel the tasks of jobs moved away while this node could not be told."""
        for task_id in await self.store.stray_tasks(state.name):
            try:
                await self._call(state, "cancel", lambda: state.upstream.cancel(task_id))
            except UpstreamError as exc:
                log.info("%s: stray task %s not cancelled yet (%s)", state.name, task_id, exc)
                return
            await self.store.drop_stray(state.name, task_id)
            log.info("%s: cancelled task %s, whose job was moved to another node", state.name, task_id)
        # One may have been added meanwhile (a retried job's attempt that landed late).
        state.strays = bool(await self.store.stray_tasks(state.name))

    async def _rescue(self, state: UpstreamState) -> None:
        """Move jobs off a node that is down: at once when its port refuses connections (the
        process is gone, and its tasks with it), else once it has been silent for the start-by
        deadline. A silent node may still be running them (a network fault, a stuck status
        route), and a job must not run twice at once: the wait is the price of that."""
        if not state.upstream.capabilities.tasks_die_with_it:
            # Its tasks outlive an outage of ours or its own: moving them would lose their
            # place in its queue, and could make a second task of one job.
            return
        long_down = (
            state.down_since is not None
            and time.monotonic() - state.down_since >= self.start_deadline
        )
        if not (state.gone or long_down):
            return
        moved = 0
        for job in await self.store.active(state.name):
            if job.id in self._submitting or job.id in self._collecting:
                continue
            why = (
                "stopped accepting connections" if state.gone
                else f"has not answered for {self.start_deadline:.0f} s"
            )
            if await self.store.move(job.id, state.name, f"{state.name} {why}; sending it elsewhere", stray=True):
                moved += 1
                state.strays = True
                self.metrics.jobs_moved.labels(state.name, "node_down").inc()
                self.notifier.changed(job.id)
        if moved:
            log.warning("%s is down: %d job(s) moved to the queue", state.name, moved)
            self.wake()

    async def _follow_jobs(self, state: UpstreamState, jobs: list[Job]) -> None:
        upstream = state.upstream
        # A task id unknown to the gateway: the gateway died between sending the job to an
        # upstream that picks its own ids and recording the answer. Look for it before resending.
        for job in [j for j in jobs if not j.upstream_task_id]:
            request = await self._request(job, task_id_for(job))
            found = await self._call(state, "find", lambda: upstream.find_task(request))
            if found:
                await self.store.set_upstream_task_id(job.id, found)
                job.upstream_task_id = found
            elif time.time() - (job.submitted_at or 0) >= self.reconcile_grace:
                await self.store.requeue(job.id, f"{upstream.name} has no record of it; sending it again")
                self.notifier.changed(job.id)
            # Otherwise not yet: the upstream may still be reading a large body it will accept
            # (a timed-out answer says nothing about that). Look again next tick.
        jobs = [j for j in jobs if j.upstream_task_id]
        if not jobs:
            return
        plan = state.plan
        listed_before, asked = plan.listed_at, time.monotonic()
        plan.spend(asked)
        try:
            statuses = await self._call(
                state, "poll", lambda: upstream.poll([j.upstream_task_id for j in jobs])
            )
        except Unavailable as exc:
            # Why did it fail? One status request tells a dead process (refused) from a slow one.
            health = await self._call(state, "health", upstream.health)
            self._record_down(
                state, str(exc) if health.reachable else (health.detail or str(exc)),
                gone=not health.reachable and health.gone,
            )
            log.warning("%s: %s", upstream.name, exc)
            if state.up is False:
                await self._rescue(state)
            return
        plan.listed_at = asked
        if state.up is not True:
            await self._record_up(state)
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
            if job.id in self._submitting:
                continue
            if status is None:
                # Forgotten: the node restarted. Same id, seed and parameters go out again.
                if await self.store.requeue(
                    job.id, f"{upstream.name} no longer knows the task (restarted?); sending it again"
                ):
                    # The count of unclear submissions stays: a node that answers every submit
                    # with a 500 (and so never has the task) must not get the job forever.
                    self.metrics.jobs_moved.labels(upstream.name, "forgotten").inc()
                    state.freed.append(now)
                    self.notifier.changed(job.id)
                    self.wake()
                continue
            if status.state is RemoteState.CANCELLED and job.id in self._cancel_ignored:
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
                if job.state == SUBMITTED and await self.store.mark_running(job.id):
                    job.started_at = wall
                    self.notifier.changed(job.id)
                info = self._queue_info(state, job, status, running, wall)
                if _changed_enough(job.queue_info, info):
                    queue_updates[job.id] = info
            elif status.state is RemoteState.SUCCEEDED:
                if job.state == SUBMITTED:
                    # It started and ended between two looks: its timeline still says it ran,
                    # from when the node says it began.
                    started = wall - status.ran_seconds if status.ran_seconds else None
                    if await self.store.mark_running(job.id, started):
                        job.started_at = started or wall
                began = state.plan.starts.get(job.id)
                if began is not None and status.ran_seconds:
                    freed = max(freed or 0.0, began + status.ran_seconds)
                if job.id not in self._collecting:
                    if job.id not in self._cancel_ignored:
                        # The node's own measure when it gives one: ours also holds the time
                        # until the start and the end were seen.
                        ran = status.ran_seconds or (wall - job.started_at if job.started_at else 0.0)
                        self.timings.record(upstream.name, job.task, ran)
                    state.freed.append(now)
                    self._collecting[job.id] = upstream.name
                    self.spawn(self._collect(job, state))
                    self.wake()
            elif status.state is RemoteState.FAILED:
                if await self.store.fail(job.id, f"{upstream.name}: {status.error or 'task failed'}"):
                    self.metrics.jobs_finished.labels("failed").inc()
                    state.freed.append(now)
                    self.notifier.changed(job.id)
                    self.wake()
            elif status.state is RemoteState.CANCELLED:
                # Nobody here asked (the job would already be final): stopped on the upstream.
                if await self.store.cancel(job.id, f"cancelled on {upstream.name}", tell_upstream=False):
                    self.metrics.jobs_finished.labels("cancelled").inc()
                    state.freed.append(now)
                    self.notifier.changed(job.id)
                    self.wake()
        self._set_load(state, busy=bool(running), queued=queued)
        self._expect_ends(state, seen_running, listed_before, freed, now, wall)
        if queue_updates:
            await self.store.set_queue_info(queue_updates)
            for job_id in queue_updates:
                self.notifier.changed(job_id)

    def _set_load(self, state: UpstreamState, *, busy: bool, queued: int) -> None:
        state.busy, state.queue_depth = busy, queued
        self.metrics.node_busy.labels(state.name).set(1 if busy else 0)
        self.metrics.node_queue_depth.labels(state.name).set(queued)

    def _queue_info(
        self, state: UpstreamState, job: Job, status: RemoteStatus, running: list[Job], wall: float
    ) -> dict[str, Any] | None:
        """Where the job is in the node's queue and, from measured run times, when it should
        start and how long it should run (the upstream's own figures win when it has any)."""
        info: dict[str, Any] = {}
        if status.queue_position is not None:
            info["position"] = status.queue_position
        typical = self.timings.typical(state.name, job.task)
        if status.pending_seconds is not None:
            info["pending_seconds"] = status.pending_seconds
        elif typical is not None and status.state is RemoteState.QUEUED:
            ahead = max(0, (status.queue_position or 1) - 1)
            left = 0.0
            for other in running[: state.capacity]:
                other_typical = self.timings.typical(state.name, other.task) or typical
                elapsed = wall - (other.started_at or wall)
                left += max(0.0, other_typical - elapsed)
                ahead -= 1
            info["pending_seconds"] = round((left + max(0, ahead) * typical) / state.capacity, 1)
        if status.running_seconds is not None:
            info["running_seconds"] = status.running_seconds
        elif typical is not None:
            info["running_seconds"] = round(typical, 1)
        return info or None

    async def _past_start_deadline(
        self, state: UpstreamState, job: Job, status: RemoteStatus, wall: float
    ) -> bool:
        """Move a job that has waited in the node's queue too long; True if it was moved.

        The deadline is X2V_START_DEADLINE, or twice what the work ahead of it should take by
        the node's measured times, whichever is longer (a node of ten-minute jobs is not slow).
        """
        if not state.upstream.capabilities.timed_queue or not job.submitted_at or job.pinned:
            return False  # an upstream's own pool runs its own queue; a pinned job has nowhere to go
        ahead = max(1, (status.queue_position or 2) - 1)
        typical = self.timings.typical(state.name, job.task) or 0.0
        deadline = max(self.start_deadline, 2 * ahead * typical / state.capacity)
        waited = wall - job.submitted_at
        if waited < deadline:
            return False
        try:
            await self._call(state, "cancel", lambda: state.upstream.cancel(job.upstream_task_id))
            started = await self._call(state, "health", state.upstream.current_task) == job.upstream_task_id
        except UpstreamError:
            return False  # try again next tick
        if started:
            # It started between the status read and the cancel, which does not stop a running
            # task: it finishes here, and the node's `cancelled` for it is not the last word.
            self._cancel_ignored.add(job.id)
            return False
        if await self.store.move(
            job.id, state.name, f"not started on {state.name} after {waited:.0f} s; sending it"
            " elsewhere", stray=False,
        ):
            self.metrics.jobs_moved.labels(state.name, "start_deadline").inc()
            log.warning("job %s: not started on %s after %.0f s, moved", job.id, state.name, waited)
            self.notifier.changed(job.id)
            self.wake()
        return True

    async def _collect(self, job: Job, state: UpstreamState) -> None:
        """Copy a finished video into the blob store, check it plays, then mark the job done."""
        upstream = state.upstream
        dest = self.blobs.tmp_dir / f"result-{job.id}-{uuid.uuid4().hex[:8]}"
        try:
            await self._call(
                state, "result", lambda: upstream.fetch_result(job.upstream_task_id, dest)
            )
            info = await CHECKER.probe_video(dest)
            sha, size = await asyncio.to_thread(self.blobs.adopt, dest)
            await self.store.record_blob(sha, size, "mp4")
            meta = {"size": size, "duration": info.duration, "width": info.width, "height": info.height}
            # Conditional: a job cancelled while its video was downloading stays cancelled.
            if await self.store.succeed(job.id, sha, meta):
                self.metrics.jobs_finished.labels("succeeded").inc()
                log.info("job %s succeeded on %s (%.1f s of video)", job.id, upstream.name, info.duration)
            self._result_failures.pop(job.id, None)
            self._cancel_ignored.discard(job.id)
        except Unavailable as exc:
            if state.gone:
                # The node died with the video on it: run the job again elsewhere.
                if await self.store.move(
                    job.id, upstream.name, f"{upstream.name} stopped accepting connections before"
                    " its result was copied; sending it elsewhere", stray=True,
                ):
                    state.strays = True
                    self.metrics.jobs_moved.labels(upstream.name, "node_down").inc()
            elif state.up is False:
                log.info("job %s: result waits for %s to answer again (%s)", job.id, upstream.name, exc)
            else:
                await self._result_failed(job, exc)
        except (UpstreamError, ValueError) as exc:
            await self._result_failed(job, exc)
        finally:
            dest.unlink(missing_ok=True)
            self._collecting.pop(job.id, None)
            self.notifier.changed(job.id)
            self.wake()

    async def _result_failed(self, job: Job, exc: Exception) -> None:
        self._result_failures[job.id] += 1
        log.warning("job %s: result not collected (%s)", job.id, exc)
        if self._result_failures[job.id] >= MAX_RESULT_FAILURES or isinstance(exc, UnknownTask):
            reason = (
                "the upstream returned a file that is not a playable video"
                if isinstance(exc, ValueError) else f"result could not be fetched: {exc}"
            )
            if await self.store.fail(job.id, reason):
                self.metrics.jobs_finished.labels("failed").inc()

    async def _send_cancel(self, job: Job) -> None:
        """Ask the upstream to stop the task of a job cancelled while it may be there.

        The job's `cancel_pending` stays set in the store until the upstream has been told (or
        certainly has nothing to stop), so neither a submission still in flight nor a gateway
        killed in between leaves a task running: the follow loop calls this again each tick.
        """
        if job.id in self._submitting or job.id in self._cancelling:
            # Its submission is in flight: the task id, or whether the node has the task yet,
            # is known only once it ends, and `_submit` calls this then. (A DELETE sent now
            # to a node still reading the POST answers "do nothing", and the task then runs.)
            return
        self._cancelling.add(job.id)
        try:
            # Read again: the caller's copy may predate a cancel delivered meanwhile (by the
            # submission's own end, or an earlier tick), and the hosted cloud answers a second
            # cancel of a task with 400.
            fresh = await self.store.get(job.id)
            if fresh is not None and fresh.cancel_pending:
                await self._deliver_cancel(fresh)
        finally:
            self._cancelling.discard(job.id)

    async def _deliver_cancel(self, job: Job) -> None:
        state = self.states.get(job.upstream or "")
        if state is None:
            await self.store.cancel_sent(job.id)  # its upstream is no longer configured
            return
        upstream = state.upstream
        task_id = job.upstream_task_id
        try:
            if not task_id:
                # Sent, but the answer never came (lost, or the gateway died waiting for it):
                # the upstream may have the task under an id the gateway never learned.
                request = await self._request(job, task_id_for(job))
                task_id = await self._call(state, "find", lambda: upstream.find_task(request))
                if task_id is None:
                    if time.time() - (job.submitted_at or 0) >= self.reconcile_grace:
                        await self.store.cancel_sent(job.id)  # it never arrived
                    return  # else it may still be reading the body: look again next tick
                await self.store.set_upstream_task_id(job.id, task_id)
            await self._call(state, "cancel", lambda: upstream.cancel(task_id))
        except UpstreamError as exc:
            log.info("job %s: cancel not delivered yet (%s); will retry", job.id, exc)
            return
        await self.store.cancel_sent(job.id)
        log.info("job %s: task %s cancelled on %s", job.id, task_id, upstream.name)

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
