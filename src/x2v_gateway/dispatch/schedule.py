"""Which queued job goes to which upstream, and when a waiting job should start.

Fair: highest priority first, then the owner with the fewest jobs in flight, then that owner's
batch with the fewest, then the oldest. Fast: the node expected to finish the job first, from
the run times measured per node and task type. Each node gets jobs up to its slots (capacity +
look-ahead), so its GPU starts the next job the moment one ends while the rest of the queue
stays here, free to go anywhere. A slot can also be kept for a job whose upload still arrives
(`reserve_for_upload`), never ahead of a queued job that could take it.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..store import QUEUED, RUNNING, Inflight, Job, Lane, Reads
from .state import Context, UpstreamState

# Jobs of one lane looked at per dispatch round for one that fits a free node (pinned jobs).
LANE_SCAN = 32


@dataclass
class _LaneCursor:
    """One lane's queued jobs as a dispatch round reads them, a few at a time."""

    lane: Lane
    after: int
    jobs: deque[Job] = field(default_factory=deque)
    exhausted: bool = False
    looked_at: int = 0


class Scheduler:
    """Plans dispatch rounds, keeps slots for arriving uploads, estimates queued jobs' starts."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    # -- slots for arriving uploads -------------------------------------------------------------

    async def reserve_for_upload(self, task: str, pinned: str | None, owner: str | None) -> UpstreamState | None:
        """A free slot for a job whose upload is still arriving, or None.

        Only an upstream that forwards uploads, is up, runs `task`, has a slot free and no queued
        job that could take it: a job forwarded while it arrives never jumps the queue. Keys with
        a cap on jobs at once go through the queue, which enforces it. The slot stays taken until
        the job is handed over (`Dispatcher.submit_reserved`) or the slot given back (`unreserve`).
        The caller holds the planning lock: a dispatch round and a reservation never count the
        same slot.
        """
        ctx = self.ctx
        if owner is not None and owner in await ctx.store.concurrency_limits():
            return None
        now = time.monotonic()
        taken = await self._slots_taken()
        queued_tasks = await self._queued_tasks()
        for state in sorted(ctx.states.values(), key=lambda s: taken[s.name]):
            upstream = state.upstream
            if (
                not upstream.capabilities.forwards_uploads or state.up is not True or not state.accepting(now)
                or task not in upstream.tasks or pinned not in (None, upstream.name)
                or taken[state.name] >= upstream.slots or queued_tasks & upstream.tasks
            ):
                continue
            ctx.unclaimed[state.name] += 1
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
        unclaimed = self.ctx.unclaimed.copy()
        return Counter(row.upstream for row in await self.ctx.store.inflight()) + unclaimed

    async def _queued_tasks(self) -> set[str]:
        """The task types of the jobs waiting in the queue."""
        tasks = sorted(set().union(*(s.upstream.tasks for s in self.ctx.states.values())))
        return {lane.task for lane in await self.ctx.store.queue_lanes(tasks)}

    def unreserve(self, state: UpstreamState) -> None:
        self.ctx.unclaimed[state.name] -= 1
        self.ctx.wake()

    # -- dispatch rounds ------------------------------------------------------------------------

    async def plan(self) -> list[tuple[Job, UpstreamState]]:
        """Which queued jobs go to which nodes now: every free slot, fairly, fastest node first.

        Reads the store only, off the event loop: the in-flight jobs (a few columns each), the
        queue's lanes (one index seek per lane), and the first jobs of the lanes it takes from.
        """
        ctx = self.ctx
        now, wall = time.monotonic(), time.time()
        # What this process holds in memory is taken before the store is read: a job claimed
        # meanwhile is then counted twice (its slot stays free a round), never missed.
        unclaimed, submitting = ctx.unclaimed.copy(), set(ctx.submitting)
        collecting = dict(ctx.collecting)

        def reads(r: Reads) -> tuple[list[Inflight], dict[str, int], list[Job]]:
            inflight, limits = r.inflight(), r.concurrency_limits()
            claimed = {row.id for row in inflight}
            pending = [r.get(job_id) for job_id in submitting - claimed] if limits else []
            return inflight, limits, [j for j in pending if j is not None]

        inflight, limits, pending = await ctx.store.read(reads)
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
        for name, state in ctx.states.items():
            if state.accepting(now):
                used = len(on_node.get(name, ())) + unclaimed[name] - finishing[name]
                if state.upstream.slots - used > 0:
                    free[name] = state.upstream.slots - used
        if not free:
            return []
        wanted = sorted(set().union(*(ctx.states[n].upstream.tasks for n in free)))
        lanes = await ctx.store.queue_lanes(wanted)
        free = {name: n for name, n in free.items() if name in ctx.states}  # none removed meanwhile
        if not lanes:
            for name in free:
                ctx.states[name].freed.clear()  # nothing waited: no lag to count
            return []

        # Nodes, per task type, by when a job sent now would be finished there.
        backlog = {n: self._backlog(n, on_node.get(n, ()), wall) for n in free}
        version: Counter[str] = Counter()
        nodes_for: dict[str, list[tuple[float, int, str, int]]] = defaultdict(list)

        def offer(name: str) -> None:
            state = ctx.states[name]
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
            state = ctx.states.get(name)
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
                ctx.metrics.dispatch_lag.labels(name).observe(now - state.freed.popleft())
            heapq.heappush(heap, (lane_key(cursor), i))
        for name, n in free.items():
            if n > 0 and name in ctx.states:
                ctx.states[name].freed.clear()
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
                batch = await self.ctx.store.lane_jobs(cursor.lane, cursor.after, min(LANE_SCAN, total_free + 4))
                if not batch:
                    cursor.exhausted = True
                    return None
                cursor.after = batch[-1].seq
                cursor.jobs.extend(batch)
            job = cursor.jobs.popleft()
            cursor.looked_at += 1
            if job.id in self.ctx.submitting:
                continue
            if job.pinned is not None:
                state = self.ctx.states.get(job.pinned)
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
        return self.ctx.timings.typical(node, task) or 1.0

    def _backlog(self, node: str, jobs: Iterable[Inflight], wall: float) -> float:
        """Seconds of work a node has before it could start something new."""
        capacity = self.ctx.states[node].capacity
        total = 0.0
        for row in jobs:
            if row.id in self.ctx.collecting:
                continue
            duration = self._duration(node, row.task)
            if row.state == RUNNING and row.started_at:
                duration = max(0.0, duration - (wall - row.started_at))
            total += duration
        return total / capacity

    # -- estimates ------------------------------------------------------------------------------

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
        for name, state in self.ctx.states.items():
            if job.task not in state.upstream.tasks or state.up is False or state.drained:
                continue
            typical = self.ctx.timings.typical(name, job.task)
            if typical is None:
                continue
            rates += state.capacity / typical
            starts.append(self._backlog(name, by_node.get(name, ()), wall))
        if not rates or position is None:
            return None
        run = self.ctx.timings.typical("", job.task) or 0.0
        return {"pending_seconds": round(min(starts) + (position - 1) / rates, 1),
                "running_seconds": round(run, 1)}
