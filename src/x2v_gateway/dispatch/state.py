"""What the dispatcher holds in memory: each upstream's health and follow plan, and the jobs it
is working on outside the store, shared by its parts (`Context`).

None of it is truth: the store is. All of it is rebuilt from the store after a restart.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..blobs import BlobStore
from ..metrics import Metrics
from ..notify import Notifier
from ..store import JobStore
from ..upstream.base import Upstream, UpstreamError
from .timings import Timings

T = TypeVar("T")

# Following a node (see FollowPlan): status calls it may get in quick succession around an
# expected end.
FOLLOW_BURST = 4.0


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

    def sent(self, job_id: str, sending: float, quickest: float | None, *, idle: bool) -> None:
        """A job just reached the node: where nothing of ours runs or waits (`idle`), it starts
        right away (no later than the answer came), and its end can be waited for from now."""
        if quickest is not None and not self.starts and idle:
            self.ends.setdefault(job_id, sending + quickest)
        self.fresh = True
        self.poke.set()


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


class Context:
    """What the dispatcher's parts share: the store and blob store, the upstreams, the measured
    run times, the jobs this process works on outside the store, and the means to wake the
    dispatch loop and to run background tasks."""

    def __init__(
        self,
        store: JobStore,
        blobs: BlobStore,
        notifier: Notifier,
        metrics: Metrics,
        *,
        poll_interval: float,
        start_deadline: float,
        reconcile_grace: float,
        replica: str,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.notifier = notifier
        self.metrics = metrics
        self.poll_interval = poll_interval
        self.start_deadline = start_deadline
        self.reconcile_grace = reconcile_grace
        # This gateway replica's id: the jobs it claims name it, and it follows only those
        # (dispatch/replicas.py).
        self.replica = replica
        self.states: dict[str, UpstreamState] = {}
        self.timings = Timings()
        self.running = False
        self.woken = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()
        # Jobs handed to a submit task whose submission has not ended (the store may already
        # count them in flight).
        self.submitting: set[str] = set()
        # Jobs handed to a submit task but not yet claimed in the store, per upstream: the store's
        # in-flight count does not see them yet.
        self.unclaimed: Counter[str] = Counter()
        # Job id -> upstream, while its finished video is being copied: the node is done with it,
        # so its slot is free although the store still says running.
        self.collecting: dict[str, str] = {}
        # Jobs whose cancel (start-by deadline) landed just after they started: cancel does not
        # stop a running task, so they stay where they are and their `cancelled` is not final.
        self.cancel_ignored: set[str] = set()

    def leaving(self, upstream: str) -> list[str]:
        """Jobs on `upstream` whose video is being copied: they hold no slot there any more."""
        return [job_id for job_id, name in self.collecting.items() if name == upstream]

    def wake(self) -> None:
        """A slot may be free, or a job queued: the dispatch loop plans a round now."""
        self.woken.set()

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run `coro` in the background until it ends or the dispatcher stops."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def call(self, state: UpstreamState, operation: str, call: Callable[[], Awaitable[T]]) -> T:
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

