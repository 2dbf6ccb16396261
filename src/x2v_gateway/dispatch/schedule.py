"""Which queued job goes to which upstream, and when a waiting job should start.

Fair: highest priority first, then the owner with the fewest jobs in flight, then that owner's
batch with the fewest, then the oldest. Fast: the node expected to finish the job first, from
the run times measured per node and task type. Each node gets jobs up to its slots (capacity +
look-ahead), so its GPU starts the next job the moment one ends while the rest of the queue
stays here, free to go anywhere. A slot can also be kept for a job whose upload still arrives
(`reserve_for_upload`), never ahead of a queued job that could take it.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from heapq import heapify, heappop, heappushpop, heapreplace

from ..store import QUEUED, RUNNING, Inflight, Job, Lane, QueuedJob, Reads
from .state import Context, UpstreamState

# Jobs of one lane looked at per dispatch round for one that fits a free node (pinned jobs).
LANE_SCAN = 32
# Jobs a dispatch round places per hop to its reader thread. A start with every slot free places
# more (1,000 nodes: 2,000 jobs, 17-29 ms in one hop): the round goes on in pieces, each sent on
# as soon as it is placed, with the event loop free between them.
PIECE = 500
# Seconds a round's rest may wait for its next piece: older, the next round starts afresh.
PIECE_FRESH = 0.5
# Seconds a wait estimate's basis is kept: the jobs in flight are read for it at most this often
# per task type, however often queued jobs are looked at (1,000 nodes: 2,000 rows, 8 ms).
ESTIMATE_FRESH = 1.0


@dataclass(slots=True)
class _LaneCursor:
    """One lane's queued jobs as a dispatch round reads them, a few at a time."""

    lane: Lane
    after: int
    load_key: tuple[str, str]  # (owner, batch): whose jobs in flight count against the lane
    jobs: deque[QueuedJob] = field(default_factory=deque)
    exhausted: bool = False
    looked_at: int = 0
    reads: int = 0


@dataclass
class _Snapshot:
    """What a dispatch round takes from the event loop's side before it runs on a reader thread."""

    states: dict[str, UpstreamState]  # the upstreams accepting jobs now
    unclaimed: Counter[str]
    submitting: set[str]
    collecting: dict[str, str]
    wall: float
    first_read: int = 4  # jobs of a lane read at first: its share of the free slots, or more


class _FairOrder:
    """A round's lanes in the order fairness takes them: highest priority first, then the owner
    with the fewest jobs in flight, then that owner's batch with the fewest, then the oldest.

    A heap of (priority, owner) groups, each a heap of its batches (a batch's lanes, one per
    task type, share its load and go oldest first), both re-keyed lazily (loads only grow, so a
    stale key is never later than the true one). A placement changes one owner's and one
    batch's load: it costs a few heap steps, where one heap of every lane re-keyed each of that
    owner's lanes (2,000 placements over 372 lanes: 96,000 heap pops, 60 % of a round).
    """

    def __init__(self, lanes: list[Lane], owner_load: Counter[str], lane_load: Counter[tuple[str, str]]) -> None:
        self.owner_load, self.lane_load = owner_load, lane_load
        by_group: dict[tuple[int, str], dict[str, list[_LaneCursor]]] = defaultdict(lambda: defaultdict(list))
        for lane in sorted(lanes, key=lambda lane: lane.head_seq):
            cursor = _LaneCursor(lane, lane.head_seq - 1, (lane.owner, lane.batch))
            by_group[(lane.priority, lane.owner)][lane.batch].append(cursor)
        self.batches: list[deque[_LaneCursor]] = []  # each batch's lanes left this round, oldest first
        self.groups: dict[tuple[int, str], list[tuple[int, int, int]]] = {}  # (load, head, batch) heaps
        for group, by_batch in by_group.items():
            self.groups[group] = []
            for cursors in by_batch.values():
                first = cursors[0]
                self.groups[group].append((lane_load[first.load_key], first.lane.head_seq, len(self.batches)))
                self.batches.append(deque(cursors))
            heapify(self.groups[group])
        self.heap = [(self._key(group), group) for group in self.groups]
        heapify(self.heap)

    def _key(self, group: tuple[int, str]) -> tuple[int, int, int, int]:
        batches = self.groups[group]
        while True:
            load, head, b = batches[0]
            current = self.lane_load[self.batches[b][0].load_key]
            if load == current:
                return (-group[0], self.owner_load[group[1]], load, head)
            heapreplace(batches, (current, head, b))

    def pop(self, back: tuple[int, str] | None) -> tuple[tuple[int, str], _LaneCursor] | None:
        """The lane to take from next, with its group. `back`: the group taken from last, which
        goes back into the order first (a group not given back is left out: its owner's lanes
        wait this round). Most often it is still first, and stays out of the heap."""
        heap = self.heap
        item = None if back is None else (self._key(back), back)
        while True:
            if item is not None:
                found = heappushpop(heap, item)
                if found is item:
                    return back, self.batches[self.groups[back][0][2]][0]
            elif heap:
                found = heappop(heap)
            else:
                return None
            key, group = found
            if key[1] == self.owner_load[group[1]]:
                # Its owner got no job since the key was made, so none of its lanes did: current.
                return group, self.batches[self.groups[group][0][2]][0]
            item, back = (self._key(group), group), group

    def drop_lane(self, group: tuple[int, str]) -> tuple[int, str] | None:
        """The group's first lane is done for this round: the group, to go back with the rest,
        or None if it has no lane left."""
        batches = self.groups[group]
        load, _, b = batches[0]
        lanes = self.batches[b]
        lanes.popleft()
        if lanes:
            heapreplace(batches, (load, lanes[0].lane.head_seq, b))  # its next lane, as old as it is
        else:
            heappop(batches)
        return group if batches else None


class _NodeOrder:
    """A round's free nodes, per task type, by when a job sent now would be finished there.

    A heap per task type of (finish, jobs on the node, name, version). An entry goes stale when
    its node gets a job (its version moves on) and is re-keyed when it comes up: a node's finish
    only grows, so a stale entry never comes up later than the true one would. A placement
    costs one heap step, on its own task type's heap; a node's other task types wait for theirs.
    """

    def __init__(self, free: dict[str, int], step: dict[str, dict[str, float]], backlog: dict[str, float],
                 held: dict[str, int]) -> None:
        self.free, self.step, self.backlog, self.held = free, step, backlog, held
        self.version = dict.fromkeys(free, 0)
        self.heaps: dict[str, list[tuple[float, int, str, int]]] = defaultdict(list)
        for name in free:
            for task, seconds in step[name].items():
                self.heaps[task].append((backlog[name] + seconds, held[name], name, 0))
        for heap in self.heaps.values():
            heapify(heap)

    def best(self, task: str) -> str | None:
        """The free node expected to finish a job of `task` first, or None."""
        heap, free, version = self.heaps.get(task), self.free, self.version
        while heap:
            _, jobs_on, name, seen = heap[0]
            if free[name] <= 0:
                heappop(heap)  # full for this round
            elif seen != version[name]:
                heapreplace(heap, (self.backlog[name] + self.step[name][task], jobs_on, name, version[name]))
            else:
                return name
        return None

    def took(self, name: str, task: str) -> None:
        """`name` got a job of `task`."""
        left = self.free[name] = self.free[name] - 1
        seconds = self.step[name][task]
        busy = self.backlog[name] = self.backlog[name] + seconds
        seen = self.version[name] = self.version[name] + 1
        heap = self.heaps[task]
        if heap[0][2] == name:  # the entry `best` gave (a pinned job's node may be anywhere)
            if left > 0:
                heapreplace(heap, (busy + seconds, self.held[name], name, seen))
            else:
                heappop(heap)


class _Round:
    """A dispatch round: what it read, the lanes in their fair order and the free nodes, kept
    between its pieces (`place`). Placing in pieces gives the same plan as placing at once."""

    def __init__(self, snap: _Snapshot, free: dict[str, int], limits: dict[str, int],
                 owner_load: Counter[str], lane_load: Counter[tuple[str, str]],
                 order: _FairOrder | None = None, nodes: _NodeOrder | None = None) -> None:
        self.snap, self.free, self.limits = snap, free, limits
        self.owner_load, self.lane_load = owner_load, lane_load
        self.order, self.nodes = order, nodes
        self.total_free = sum(free.values())
        self.began = time.monotonic()
        self.done = order is None
        self.placed: list[tuple[QueuedJob, UpstreamState]] = []  # its first piece
        self._back: tuple[int, str] | None = None  # the group taken from last, first to go back

    @property
    def idle(self) -> list[UpstreamState]:
        """The nodes left with a free slot (once done)."""
        return [self.snap.states[name] for name, n in self.free.items() if n > 0]

    def place(self, r: Reads, most: int) -> list[tuple[QueuedJob, UpstreamState]]:
        """Up to `most` more jobs placed, on a reader thread; `done` once nothing more fits."""
        order, nodes, owner_load, limits = self.order, self.nodes, self.owner_load, self.limits
        states = self.snap.states
        plan: list[tuple[QueuedJob, UpstreamState]] = []
        if order is None or nodes is None:
            return plan
        back = self._back
        while self.total_free > 0 and len(plan) < most:
            if (taken := order.pop(back)) is None:
                self.done = True
                return plan
            group, cursor = taken
            back = None
            owner = cursor.lane.owner
            if limits and (cap := limits.get(owner)) is not None and owner_load[owner] >= cap:
                continue  # its owner has as many jobs running as its key allows: its lanes wait
            fit = self._next_fit(r, cursor)
            if fit is None:
                back = order.drop_lane(group)  # nothing of this lane fits a free node this round
                continue
            job, name = fit
            plan.append((job, states[name]))
            nodes.took(name, job.task)
            self.total_free -= 1
            owner_load[owner] += 1
            self.lane_load[cursor.load_key] += 1
            back = group
        self._back = back
        self.done = self.total_free <= 0
        return plan

    def _next_fit(self, r: Reads, cursor: _LaneCursor) -> tuple[QueuedJob, str] | None:
        """The lane's next job that a free node can take, and that node: the one expected to
        finish it first."""
        snap, nodes = self.snap, self.nodes
        assert nodes is not None
        while cursor.looked_at < LANE_SCAN:
            if not cursor.jobs:
                if cursor.exhausted:
                    return None
                # Fairness spreads the free slots over the lanes: a lane is read a few jobs at a
                # time, twice as many at each refill, never more than there are free slots.
                cursor.reads += 1
                want = min(LANE_SCAN, self.total_free + 1, snap.first_read << (cursor.reads - 1))
                batch = r.lane_heads(cursor.lane, cursor.after, want)
                if not batch:
                    cursor.exhausted = True
                    return None
                cursor.after = batch[-1].seq
                cursor.jobs.extend(batch)
            job = cursor.jobs.popleft()
            cursor.looked_at += 1
            if job.id in snap.submitting:
                continue
            if job.pinned is not None:
                state = snap.states.get(job.pinned)
                if nodes.free.get(job.pinned, 0) > 0 and state and job.task in state.upstream.tasks:
                    cursor.looked_at = 0
                    return job, job.pinned
                continue  # its node is busy: the rest of the lane may still go elsewhere
            name = nodes.best(job.task)
            if name is None:
                return None  # no free node runs this task type
            cursor.looked_at = 0
            return job, name
        return None


@dataclass(frozen=True, slots=True)
class _WaitBasis:
    """What the wait estimates of one task type's queued jobs start from, and when it was read."""

    at: float  # monotonic
    first_start: float  # seconds until the first node that runs the type could start a job
    rate: float  # jobs of the type the nodes finish per second (0: nothing measured)
    run: float  # a job's typical run time


class Scheduler:
    """Plans dispatch rounds, keeps slots for arriving uploads, estimates queued jobs' starts."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._bases: dict[str, _WaitBasis] = {}  # task type -> its queued jobs' wait basis
        self._going: _Round | None = None  # a round with pieces still to place

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
        return Counter(await self.ctx.store.inflight_counts()) + unclaimed  # counted by the store

    async def _queued_tasks(self) -> set[str]:
        """The task types of the jobs waiting in the queue."""
        tasks = sorted(set().union(*(s.upstream.tasks for s in self.ctx.states.values())))
        return {lane.task for lane in await self.ctx.store.queue_lanes(tasks)}

    def unreserve(self, state: UpstreamState) -> None:
        self.ctx.unclaimed[state.name] -= 1
        self.ctx.wake()

    # -- dispatch rounds ------------------------------------------------------------------------

    async def plan(self) -> list[tuple[QueuedJob, UpstreamState]]:
        """Which queued jobs go to which nodes now: every free slot, fairly, fastest node first.
        Each job in a few columns: its submission reads the whole row.

        A round runs on a reader thread (`_plan_round`): its reads (the jobs in flight counted per
        node and per batch, and read only on the nodes with a free slot; the queue's lanes, one
        index seek per lane; the first jobs of the lanes it takes from, no more than the free
        slots) and the placing. The event loop only takes a snapshot of what this process holds
        in memory and records the outcome. A round with more free slots than `PIECE` goes on
        in pieces: this returns the first, and wakes the dispatcher for the next.
        """
        ctx = self.ctx
        now = time.monotonic()
        going, self._going = self._going, None
        if going is not None and now - going.began <= PIECE_FRESH:
            plan = await ctx.store.read(lambda r: going.place(r, PIECE))
        else:
            # What this process holds in memory is taken before the store is read: a job claimed
            # meanwhile is then counted twice (its slot stays free a round), never missed.
            snapshot = _Snapshot(
                states={name: state for name, state in ctx.states.items() if state.accepting(now)},
                unclaimed=ctx.unclaimed.copy(), submitting=set(ctx.submitting),
                collecting=dict(ctx.collecting), wall=time.time(),
            )
            if not snapshot.states:
                return []
            going = await ctx.store.read(lambda r: self._plan_round(r, snapshot))
            plan = going.placed
        now = time.monotonic()
        # None to a node removed, drained or backing off since the round began: those jobs stay queued.
        plan = [(job, state) for job, state in plan if state.accepting(now)]
        for _, state in plan:
            if state.freed:
                ctx.metrics.dispatch_lag.labels(state.name).observe(now - state.freed.popleft())
        if not going.done:
            self._going = going
            ctx.wake()
        else:
            for state in going.idle:
                state.freed.clear()  # a slot nothing waited for: no lag to count
        return plan

    def _plan_round(self, r: Reads, snap: _Snapshot) -> _Round:
        """A dispatch round begun, on a reader thread, with its first piece placed (`placed`)."""
        # The jobs in flight are counted by the store (per node, per owner and batch), not read
        # row by row: a round runs each time a slot frees, and reading 2,000 rows in flight
        # each time held the interpreter a quarter of the time. Read in this order, so that a
        # job claimed or finished between two reads is counted twice (a slot or a key's place
        # stays free a round), never missed.
        per_node, limits = r.inflight_counts(), r.concurrency_limits()
        asked = snap.collecting.keys() | (snap.submitting if limits else set())
        in_flight = r.inflight_among(asked) if asked else set()
        pending = [r.get(job_id) for job_id in snap.submitting - in_flight] if limits else []
        lane_load: Counter[tuple[str, str]] = Counter(r.inflight_by_batch())
        owner_load: Counter[str] = Counter()
        for (owner, _), n in lane_load.items():
            owner_load[owner] += n
        # API keys with a cap on jobs at once (`keys create --max-concurrent`): at the cap, the
        # key's lanes are passed over and its jobs wait queued. Jobs handed to a submit task but
        # not yet claimed in the store count too, so two rounds cannot both fill the cap.
        for job in pending:
            if job is not None and job.state == QUEUED:
                owner_load[job.owner or ""] += 1
        # A job whose video is being copied has left its node: its slot is free. Only while the
        # store still counts it in flight, though; once it is marked done it is in neither.
        finishing = Counter(n for job_id, n in snap.collecting.items() if job_id in in_flight)
        states = snap.states
        free: dict[str, int] = {}
        for name, state in states.items():
            used = per_node.get(name, 0) + snap.unclaimed.get(name, 0) - finishing.get(name, 0)
            if state.upstream.slots - used > 0:
                free[name] = state.upstream.slots - used
        lanes = r.queue_lanes(sorted(set().union(*(states[n].upstream.tasks for n in free)))) if free else []
        if not lanes:
            return _Round(snap, free, limits, owner_load, lane_load)

        # What a job adds to a free node's backlog, per task type, from its measured run times.
        typical = self.ctx.timings.typicals({n: states[n].upstream.tasks for n in free})
        step = {n: {t: (seconds or 1.0) / states[n].capacity for t, seconds in of_node.items()}
                for n, of_node in typical.items()}
        on_node: dict[str, list[Inflight]] = defaultdict(list)
        if busy := [n for n in free if per_node.get(n)]:
            for row in r.inflight_on(busy):
                on_node[row.upstream].append(row)
        backlog = {n: self._backlog(states[n], on_node[n], snap.wall, snap.collecting) if n in on_node else 0.0
                   for n in free}
        nodes = _NodeOrder(free, step, backlog, {n: per_node.get(n, 0) for n in free})
        # Fairness shares the slots between batches (owner, batch), whatever their task types.
        batches = len({(lane.owner, lane.batch) for lane in lanes})
        snap.first_read = max(2, min(LANE_SCAN, sum(free.values()) // batches + 2))
        going = _Round(snap, free, limits, owner_load, lane_load, _FairOrder(lanes, owner_load, lane_load), nodes)
        going.placed = going.place(r, PIECE)
        return going

    def _duration(self, node: str, task: str) -> float:
        # Unknown everywhere: every node looks the same, and the emptiest one wins.
        return self.ctx.timings.typical(node, task) or 1.0

    def _backlog(self, state: UpstreamState, jobs: Iterable[Inflight], wall: float, collecting: dict[str, str]) -> float:
        """Seconds of work a node has before it could start something new."""
        total = 0.0
        for row in jobs:
            if row.id in collecting:
                continue
            duration = self._duration(state.name, row.task)
            if row.state == RUNNING and row.started_at:
                duration = max(0.0, duration - (wall - row.started_at))
            total += duration
        return total / state.capacity

    # -- estimates ------------------------------------------------------------------------------

    def estimate(self, r: Reads, job: Job, position: int | None) -> dict[str, float] | None:
        """For a job still in the gateway's queue, at its `position` (read by the caller), on a
        reader thread: expected seconds until it starts and its run time, from the measured run
        times (None before anything was measured)."""
        if position is None:
            return None
        now = time.monotonic()
        basis = self._bases.get(job.task)
        if basis is None or now - basis.at > ESTIMATE_FRESH:
            basis = self._bases[job.task] = self._wait_basis(r, job.task, now)
        if not basis.rate:
            return None
        first_start = max(0.0, basis.first_start - (now - basis.at))
        return {"pending_seconds": round(first_start + (position - 1) / basis.rate, 1),
                "running_seconds": round(basis.run, 1)}

    def _wait_basis(self, r: Reads, task: str, now: float) -> _WaitBasis:
        """What every queued job of `task` waits on: how soon the first node that runs it could
        start one, and how many of them the nodes finish per second."""
        timings, rate = self.ctx.timings, 0.0
        able: list[UpstreamState] = []
        for state in list(self.ctx.states.values()):  # a copy: the event loop may add a node meanwhile
            if task not in state.upstream.tasks or state.up is False or state.drained:
                continue
            typical = timings.typical(state.name, task)
            if typical is not None:
                rate += state.capacity / typical
                able.append(state)
        if not able:
            return _WaitBasis(now, 0.0, 0.0, 0.0)
        run = timings.typical("", task) or 0.0
        # A node with nothing in flight could start one now; else each node's rows are summed.
        per_node = r.inflight_counts()
        if any(not per_node.get(state.name) for state in able):
            return _WaitBasis(now, 0.0, rate, run)
        on_node: dict[str, list[Inflight]] = defaultdict(list)
        for row in r.inflight():  # every node's: one seek, where an IN list of 1,000 names costs more
            on_node[row.upstream].append(row)
        wall, collecting = time.time(), self.ctx.collecting
        first_start = min(self._backlog(state, on_node[state.name], wall, collecting) for state in able)
        return _WaitBasis(now, first_start, rate, run)
