"""The scheduler in-process: the real Dispatcher on a real store (a SQLite file, a PostgreSQL
database), in-memory upstreams.

Fast (no process, no HTTP): who goes first (priority, then fairness between keys and batches,
then age), where a job goes (task types, pins, the node expected to finish first), and that no
node ever holds more than its slots while the dispatcher's loops run.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from memory_upstream import MemoryUpstream
from x2v_gateway.blobs import BlobStore
from x2v_gateway.dispatch import Dispatcher, Notifier
from x2v_gateway.dispatch.timings import Timings
from x2v_gateway.metrics import Metrics
from x2v_gateway.store import JobStore
from x2v_gateway.upstream.base import Capabilities

pytestmark = pytest.mark.anyio


@pytest.fixture
def store(store_location):
    # Each test once on SQLite, once on PostgreSQL (conftest.py, store_location).
    store = JobStore(store_location)
    yield store
    store.close()


def make_dispatcher(store: JobStore, tmp_path: Path, *nodes: MemoryUpstream, poll: float = 1.0) -> Dispatcher:
    return Dispatcher(store, BlobStore(tmp_path / "blobs"), list(nodes), Notifier(), Metrics(),
                      poll_interval=poll)


async def queue(store: JobStore, n: int = 1, *, task: str = "t2v", owner: str | None = None,
                batch: str | None = None, priority: int = 0, pinned: str | None = None) -> list[str]:
    ids = []
    for i in range(n):
        job, _ = await store.create_job(task=task, params={"prompt": f"p{i}"}, inputs={},
                                        priority=priority, batch_id=batch, owner=owner, pinned=pinned)
        ids.append(job.id)
    return ids


async def planned(dispatcher: Dispatcher) -> list[tuple[str, str]]:
    return [(job.id, state.name) for job, state in await dispatcher.plan()]


async def run_until(dispatcher: Dispatcher, done: Callable[[], bool], within: float, failure: str,
                    then: float = 0.0) -> None:
    """The dispatcher's loops running until `done()`, which must come within `within` seconds,
    and `then` seconds more."""
    await dispatcher.start()
    try:
        deadline = time.monotonic() + within
        while not done():
            assert time.monotonic() < deadline, failure
            await asyncio.sleep(0.01)
        await asyncio.sleep(then)
    finally:
        await dispatcher.stop()


async def test_a_big_batch_starves_neither_another_batch_nor_a_colleagues_job(store, tmp_path):
    big = await queue(store, 200, owner="alice", batch="big")
    small = await queue(store, 2, owner="alice", batch="small")
    colleague = await queue(store, 1, owner="bob")
    dispatcher = make_dispatcher(store, tmp_path, MemoryUpstream("a", slots=4))
    chosen = [job_id for job_id, _ in await planned(dispatcher)]
    assert colleague[0] in chosen
    assert small[0] in chosen
    assert set(chosen) - set(colleague) - set(small) <= set(big)
    assert len(chosen) == 4


async def test_higher_priority_first_then_the_oldest(store, tmp_path):
    old = await queue(store, 3, owner="alice")
    urgent = await queue(store, 1, owner="alice", priority=5)
    dispatcher = make_dispatcher(store, tmp_path, MemoryUpstream("a", slots=2))
    assert [job_id for job_id, _ in await planned(dispatcher)] == [urgent[0], old[0]]


async def test_jobs_in_flight_count_against_their_node_their_owner_and_their_batch(store, tmp_path):
    # In flight: two of alice's batch b1 fill node a; one of bob's is on node b.
    in_flight = await queue(store, 2, owner="alice", batch="b1") + await queue(store, 1, owner="bob")
    for job_id, node in zip(in_flight, ["a", "a", "b"], strict=True):
        assert await store.claim(job_id, node, job_id)
    b1 = await queue(store, 1, owner="alice", batch="b1")
    b2 = await queue(store, 1, owner="alice", batch="b2")
    bob = await queue(store, 1, owner="bob")
    carol = await queue(store, 1, owner="carol")
    # What a round reads of them: counts per batch, the rows of given nodes, which ids are in flight.
    assert await store.read(lambda r: r.inflight_by_batch()) == {("alice", "b1"): 2, ("bob", ""): 1}
    assert sorted(row.id for row in await store.read(lambda r: r.inflight_on(["a", "gone"]))) == sorted(in_flight[:2])
    assert await store.read(lambda r: r.inflight_among([in_flight[2], b1[0], "jnothere"])) == {in_flight[2]}
    dispatcher = make_dispatcher(store, tmp_path, MemoryUpstream("a", slots=2), MemoryUpstream("b", slots=4))
    # Node a is full. Carol has nothing in flight, bob one, alice two; of alice's batches, b2
    # has none and b1 two, so b1 waits for the fourth slot.
    assert await planned(dispatcher) == [(carol[0], "b"), (bob[0], "b"), (b2[0], "b")]


async def test_a_job_goes_to_the_node_expected_to_finish_it_first(store, tmp_path):
    jobs = await queue(store, 2)
    dispatcher = make_dispatcher(store, tmp_path, MemoryUpstream("slow", slots=2), MemoryUpstream("fast", slots=2))
    dispatcher.timings.record("slow", "t2v", 20.0)
    dispatcher.timings.record("fast", "t2v", 2.0)
    # The second job too: behind the first on the fast node it ends at 4 s, not 20.
    assert await planned(dispatcher) == [(jobs[0], "fast"), (jobs[1], "fast")]


async def test_without_run_times_the_emptiest_node_wins(store, tmp_path):
    await queue(store, 2)
    dispatcher = make_dispatcher(store, tmp_path, MemoryUpstream("a", slots=2), MemoryUpstream("b", slots=2))
    assert sorted(name for _, name in await planned(dispatcher)) == ["a", "b"]


async def test_a_job_goes_only_to_a_node_that_runs_its_task_type(store, tmp_path):
    t2v = await queue(store, 2, task="t2v")
    s2v = await queue(store, 2, task="s2v")
    await queue(store, 1, task="i2v")  # nobody runs it: it waits
    dispatcher = make_dispatcher(
        store, tmp_path, MemoryUpstream("t", tasks=frozenset({"t2v"}), slots=4),
        MemoryUpstream("s", tasks=frozenset({"s2v"}), slots=4),
    )
    assert sorted(await planned(dispatcher)) == sorted(
        [(t2v[0], "t"), (t2v[1], "t"), (s2v[0], "s"), (s2v[1], "s")]
    )


async def test_a_pinned_job_waits_for_its_node_and_lets_others_pass(store, tmp_path):
    pinned = await queue(store, 1, pinned="b")
    others = await queue(store, 2)
    a, b = MemoryUpstream("a", slots=2), MemoryUpstream("b", slots=1)
    dispatcher = make_dispatcher(store, tmp_path, a, b)
    dispatcher.states["b"].drained = True  # gets nothing new
    assert await planned(dispatcher) == [(others[0], "a"), (others[1], "a")]
    dispatcher.states["b"].drained = False
    assert (pinned[0], "b") in await planned(dispatcher)


async def test_a_slot_kept_for_an_arriving_upload_is_not_planned_and_never_jumps_the_queue(store, tmp_path):
    node = MemoryUpstream("a", slots=1, capabilities=Capabilities(chooses_task_id=True, forwards_uploads=True))
    dispatcher = make_dispatcher(store, tmp_path, node)
    dispatcher.states["a"].up = True
    state = await dispatcher.reserve_for_upload("t2v", None, None)
    assert state is not None and state.name == "a"
    await queue(store, 1)
    assert await planned(dispatcher) == []  # its only slot is kept
    assert await dispatcher.reservation_blocks(state)
    dispatcher.unreserve(state)
    assert len(await planned(dispatcher)) == 1
    # A queued job that could take the slot: an upload does not get it first.
    assert await dispatcher.reserve_for_upload("t2v", None, None) is None


async def test_a_round_placed_in_pieces_places_what_it_would_at_once(store, tmp_path, monkeypatch):
    for owner, batch, n, task in (("alice", "b1", 12, "t2v"), ("alice", "b2", 5, "s2v"), ("bob", None, 6, "t2v"),
                                  ("carol", "c", 4, "s2v")):
        await queue(store, n, owner=owner, batch=batch, task=task)
    await queue(store, 2, owner="bob", priority=5)
    await queue(store, 1, owner="carol", pinned="n2")

    def nodes() -> list[MemoryUpstream]:
        return [MemoryUpstream("n0", slots=3), MemoryUpstream("n1", tasks=frozenset({"t2v"}), slots=4),
                MemoryUpstream("n2", slots=2)]

    def timed(dispatcher: Dispatcher) -> Dispatcher:
        for node, seconds in (("n0", 4.0), ("n1", 2.0), ("n2", 7.0)):
            for task in ("t2v", "s2v"):
                dispatcher.timings.record(node, task, seconds)
        return dispatcher

    at_once = await planned(timed(make_dispatcher(store, tmp_path, *nodes())))
    assert len(at_once) == 9  # every slot
    monkeypatch.setattr("x2v_gateway.dispatch.schedule.PIECE", 2)
    dispatcher = timed(make_dispatcher(store, tmp_path, *nodes()))
    pieces = [await planned(dispatcher) for _ in range(5)]
    assert [len(piece) for piece in pieces] == [2, 2, 2, 2, 1]
    assert [placed for piece in pieces for placed in piece] == at_once
    assert dispatcher._ctx.woken.is_set()  # each piece but the last woke the dispatcher for the next
    # The round is done: the next one starts afresh, and, nothing having been sent, places the same.
    assert await planned(dispatcher) == at_once[:2]


async def test_a_start_in_pieces_fills_every_slot_at_once_fairly_and_sends_no_job_twice(store, tmp_path, monkeypatch):
    monkeypatch.setattr("x2v_gateway.dispatch.schedule.PIECE", 3)
    nodes = [MemoryUpstream(f"n{i}", slots=2, seconds=30) for i in range(5)]
    alice = await queue(store, 25, owner="alice", batch="b1")
    bob = await queue(store, 5, owner="bob")
    dispatcher = make_dispatcher(store, tmp_path, *nodes, poll=10.0)
    # Four pieces, one after the other: not one round per 10 s poll.
    await run_until(dispatcher, lambda: sum(len(n.log) for n in nodes) >= 10, 5,
                    "the start's pieces did not fill every slot", then=0.2)
    sent = [job_id for n in nodes for job_id in n.jobs]
    assert all(n.most_held == n.slots for n in nodes)
    assert len(sent) == len(set(sent)) == 10
    # Fair across the pieces as in one round: bob's 5 went out beside alice's batch.
    assert set(bob) <= set(sent) and len(set(sent) & set(alice)) == 5


async def test_live_run_never_exceeds_slots_and_serves_owners_in_turn(store, tmp_path):
    nodes = [MemoryUpstream(f"n{i}", slots=2, seconds=0.02) for i in range(3)]
    alice = await queue(store, 30, owner="alice", batch="b1")
    bob = await queue(store, 6, owner="bob")
    dispatcher = make_dispatcher(store, tmp_path, *nodes, poll=0.02)
    await run_until(dispatcher, lambda: sum(len(n.log) for n in nodes) >= 36 and not any(n.held() for n in nodes),
                    20, "the jobs did not all run")
    assert all(n.most_held <= n.slots for n in nodes)
    runs = Counter(job_id for n in nodes for job_id in n.jobs)
    assert set(runs) == set(alice + bob) and set(runs.values()) == {1}
    # Bob's 6 jobs do not wait behind alice's batch of 30: all of them go out in the first half.
    order = sorted((t.arrived, t.job_id) for n in nodes for t in n.log)
    first_half = {job_id for _, job_id in order[:18]}
    assert set(bob) <= first_half
    assert all(n.log for n in nodes)


async def test_a_key_at_its_cap_on_jobs_at_once_waits_while_others_go(store, tmp_path):
    await store.create_key({"id": "capped", "name": "capped", "key_hash": "h" * 64, "prefix": "x",
                            "admin": False, "daily_quota": None, "max_concurrent": 1,
                            "rate_per_min": None, "source": "test"}, "test")
    capped = await queue(store, 3, owner="capped")
    free = await queue(store, 3, owner="free")
    dispatcher = make_dispatcher(store, tmp_path, MemoryUpstream("a", slots=4))
    chosen = [job_id for job_id, _ in await planned(dispatcher)]
    assert sorted(chosen) == sorted([capped[0], *free])


class _CountedReads:
    """A store's reads, each call counted by name."""

    def __init__(self, reads) -> None:
        self.reads, self.calls = reads, Counter()

    def __getattr__(self, name: str):
        self.calls[name] += 1
        return getattr(self.reads, name)


async def test_queued_jobs_wait_estimates_read_the_jobs_in_flight_once_a_second_and_count_down(
    store, tmp_path, monkeypatch,
):
    from x2v_gateway.dispatch import schedule

    # The scheduler's clocks, moved by the test: three estimates read one after another on a
    # busy machine (PostgreSQL under a parallel suite) would otherwise each count down a little.
    class Clock:
        mono, wall = 1000.0, time.time()

        def monotonic(self) -> float:
            return self.mono

        def time(self) -> float:
            return self.wall

    clock = Clock()
    monkeypatch.setattr(schedule, "time", clock)
    on_a, on_b = await queue(store, 2), await queue(store, 2)
    waiting = await queue(store, 3)
    for job_id in on_a:
        assert await store.claim(job_id, "a", job_id)
    for job_id in on_b:
        assert await store.claim(job_id, "b", job_id)
    assert await store.mark_running(on_a[0], started_at=clock.wall - 4)
    dispatcher = make_dispatcher(store, tmp_path, MemoryUpstream("a", slots=2), MemoryUpstream("b", slots=2))
    dispatcher.timings.record("a", "t2v", 10.0)
    dispatcher.timings.record("b", "t2v", 20.0)
    monkeypatch.setattr(schedule, "ESTIMATE_FRESH", 0.3)

    def estimates() -> tuple[list[float], Counter]:
        def read(r):
            counted = _CountedReads(r)
            jobs = r.jobs_by_id(waiting)
            return [dispatcher.estimate(counted, job, r.queue_position(job)) for job in jobs], counted.calls
        found, calls = store.read_blocking(read)
        assert {e["running_seconds"] for e in found} == {15.0}  # the median of every node's runs
        return [e["pending_seconds"] for e in found], calls

    # Node a starts the next job first: 6 s left of its running one, then 10 s of the one waiting
    # there. Then the queue moves at 1/10 + 1/20 jobs a second.
    pending, calls = estimates()
    assert pending == pytest.approx([16.0, 16.0 + 1 / 0.15, 16.0 + 2 / 0.15], abs=0.051)  # rounded to 0.1 s
    assert calls["inflight"] == 1  # for three queued jobs
    assert await store.succeed(on_a[0], "ab" * 32, {"duration": 4.0})
    clock.mono += 0.1
    pending, calls = estimates()
    assert calls["inflight"] == 0 and pending[0] == pytest.approx(15.9)  # within the 0.3 s: counted down
    clock.mono += 0.3
    clock.wall += 0.4
    pending, calls = estimates()
    assert calls["inflight"] == 1 and pending[0] == pytest.approx(10.0)  # read again


async def test_a_node_with_nothing_in_flight_lets_the_first_queued_job_start_now(store, tmp_path):
    busy = await queue(store, 2)
    waiting = await queue(store, 1)
    for job_id in busy:
        assert await store.claim(job_id, "busy", job_id)
    dispatcher = make_dispatcher(store, tmp_path, MemoryUpstream("busy", slots=2), MemoryUpstream("idle", slots=1))
    dispatcher.timings.record("busy", "t2v", 10.0)
    dispatcher.timings.record("idle", "t2v", 10.0)

    def read(r):
        counted = _CountedReads(r)
        job = r.get(waiting[0])
        return dispatcher.estimate(counted, job, r.queue_position(job)), counted.calls

    estimate, calls = store.read_blocking(read)
    assert estimate == {"pending_seconds": 0.0, "running_seconds": 10.0}
    assert calls["inflight"] == 0  # the counts per node told it


def test_run_times_give_each_node_its_median_and_a_node_without_any_the_median_of_all():
    timings = Timings()
    timings.load([("a", "t2v", 10.0), ("a", "t2v", 30.0), ("a", "t2v", 20.0), ("b", "t2v", 100.0)])
    assert timings.typical("a", "t2v") == 20.0 and timings.typical("b", "t2v") == 100.0
    assert timings.typical("c", "t2v") == timings.typical("", "t2v") == 25.0  # of 10, 20, 30, 100
    assert timings.typical("a", "s2v") is None
    timings.record("b", "t2v", 50.0)  # a new run moves its node's median and everyone's
    assert timings.typical("b", "t2v") == 75.0 and timings.typical("", "t2v") == 30.0
    assert timings.typicals({"a": ["t2v", "s2v"], "c": ["t2v"]}) == {
        "a": {"t2v": 20.0, "s2v": None}, "c": {"t2v": 30.0},
    }


async def test_a_nodes_series_are_made_with_it_and_go_with_it(store, tmp_path):
    """Made when the node is added (so that they are alive when `serve` settles the heap, and
    show 0 until used), removed with it."""
    dispatcher = make_dispatcher(store, tmp_path, MemoryUpstream("a"), MemoryUpstream("b"))
    shown = (await dispatcher.metrics.render({})).decode()
    for operation in ("health", "poll", "submit", "result"):
        assert f'x2v_upstream_request_seconds_count{{operation="{operation}",upstream="a"}} 0.0' in shown
    assert 'x2v_dispatch_lag_seconds_count{upstream="a"} 0.0' in shown
    assert 'x2v_submissions_total{upstream="a"} 0.0' in shown
    # Series only use makes: a rarer call's latency, an error by kind, a job moved off it.
    metrics = dispatcher.metrics
    metrics.upstream_latency.labels("a", "cancel").observe(0.01)
    metrics.upstream_errors.labels("a", "poll", "Unavailable").inc()
    metrics.jobs_moved.labels("a", "node_down").inc()
    metrics.jobs_moved.labels("b", "node_down").inc()
    assert 'x2v_jobs_moved_total{reason="node_down",upstream="a"} 1.0' in (await metrics.render({})).decode()
    dispatcher.remove_upstream("a")
    shown = (await dispatcher.metrics.render({})).decode()
    assert 'upstream="a"' not in shown and 'upstream="b"' in shown
