"""The store's side of several replicas: two stores on one real SQLite file, and on one real
PostgreSQL database, as two gateway processes have (each its own connections and threads): the
contract dispatch/replicas.py relies on, whichever the backend. And real Dispatchers on stores
sharing one SQLite file and in-memory nodes."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from pathlib import Path

import pytest

from memory_upstream import MemoryUpstream
from x2v_gateway.blobs import BlobStore
from x2v_gateway.dispatch import Dispatcher, Notifier
from x2v_gateway.metrics import Metrics
from x2v_gateway.store import JobStore


@pytest.fixture
def stores(store_location):
    # Once on one SQLite file, once on one PostgreSQL database (conftest.py, store_location).
    a, b = JobStore(store_location), JobStore(store_location)
    yield a, b
    a.close()
    b.close()


def run(coro):
    return asyncio.run(coro)


async def _queued(store: JobStore, n: int) -> list[str]:
    jobs = [await store.create_job(task="t2v", params={"prompt": f"p{i}"}, inputs={}) for i in range(n)]
    return [job.id for job, _ in jobs]


def test_two_replicas_racing_for_a_node_fill_only_its_slots(stores):
    a, b = stores

    async def race() -> list[bool]:
        await a.join("ra", lease=30)
        await b.join("rb", lease=30)
        ids = await _queued(a, 8)
        claims = [
            (a if i % 2 else b).claim(job_id, "n1", job_id, replica="ra" if i % 2 else "rb", slots=3)
            for i, job_id in enumerate(ids)
        ]
        return await asyncio.gather(*claims)

    assert sum(run(race())) == 3
    assert run(a.inflight_counts()) == {"n1": 3}


def test_a_job_whose_video_is_being_copied_holds_no_slot(stores):
    a, _ = stores

    async def scenario() -> tuple[bool, bool]:
        await a.join("ra", lease=30)
        first, second, third = await _queued(a, 3)
        assert await a.claim(first, "n1", first, replica="ra", slots=1)
        refused = await a.claim(second, "n1", second, replica="ra", slots=1)
        # `first` finished on the node; its replica copies the video: the slot is free.
        taken = await a.claim(third, "n1", third, replica="ra", slots=1, off_node=[first])
        return refused, taken

    assert run(scenario()) == (False, True)


def test_a_replica_whose_lease_runs_out_has_its_jobs_taken_over_once(stores):
    a, b = stores

    async def scenario() -> None:
        await a.join("ra", lease=0.3)
        await b.join("rb", lease=30)
        job_id, cancelled_id, queued_id = await _queued(a, 3)
        assert await a.claim(job_id, "n1", job_id, replica="ra")
        assert await a.claim(cancelled_id, "n1", cancelled_id, replica="ra")
        assert (await a.cancel(cancelled_id)).cancel_pending  # its stop request still owed
        assert await b.heartbeat("rb", 30) == []  # ra is alive: nothing to take
        await asyncio.sleep(0.4)
        taken = await b.heartbeat("rb", 30)
        assert sorted(taken) == sorted([job_id, cancelled_id])  # the queued one was nobody's
        assert (await b.get(job_id)).replica == "rb"
        assert await b.heartbeat("rb", 30) == []  # taken once
        # ra was only slow: its lease is gone, it claims nothing more, and learns it must stop.
        assert not await a.claim(queued_id, "n1", queued_id, replica="ra")
        assert await a.heartbeat("ra", 0.3) is None
        assert [r["id"] for r in await b.replicas()] == ["rb"]

    run(scenario())


def test_a_replica_known_gone_is_taken_over_at_once_and_one_leaving_after_its_grace(stores):
    a, b = stores

    async def scenario() -> None:
        await a.join("ra", lease=30)
        await b.join("rb", lease=30)
        first, second = await _queued(a, 2)
        assert await a.claim(first, "n1", first, replica="ra")
        assert await b.heartbeat("rb", 30, gone=["ra"]) == [first]
        await a.join("ra", lease=30)  # restarted under the same name
        assert await a.claim(second, "n1", second, replica="ra")
        # A replica that stops: its last request may still be in a node's hands for a moment.
        await a.leave("ra", grace=0.3)
        assert await b.heartbeat("rb", 30) == []
        await asyncio.sleep(0.4)
        assert await b.heartbeat("rb", 30) == [second]

    run(scenario())


def test_jobs_of_no_replica_are_adopted_by_the_first_heartbeat(stores):
    a, _ = stores

    async def scenario() -> None:
        (job_id,) = await _queued(a, 1)
        assert await a.claim(job_id, "n1", job_id)  # as a gateway before replicas did
        await a.join("ra", lease=30)
        assert await a.heartbeat("ra", 30) == [job_id]
        assert [j.id for j in await a.active("n1", "ra")] == [job_id]

    run(scenario())


def test_changes_made_through_one_store_are_read_through_the_other(stores):
    a, b = stores

    async def scenario() -> None:
        cursor, changed = await a.changes_since(None)
        assert changed == []
        again, nothing = await a.changes_since(cursor)
        assert (again, nothing) == (cursor, [])
        (job_id,) = await _queued(b, 1)
        await b.cancel(job_id)
        started = time.perf_counter()
        cursor, changed = await a.changes_since(cursor)
        assert changed == [job_id]  # once, though it changed twice
        assert time.perf_counter() - started < 0.05
        assert await a.changes_since(cursor) == (cursor, [])

    run(scenario())


# -- the real Dispatcher, several of them on one file, in-memory nodes shared between them ------


def _dispatcher(tmp_path: Path, store: JobStore, nodes: list[MemoryUpstream], replica: str, lease: float = 6.0) -> Dispatcher:
    return Dispatcher(store, BlobStore(tmp_path / "blobs"), nodes, Notifier(), Metrics(), poll_interval=0.02,
                      replica_id=replica, replica_lease=lease)


def test_three_dispatchers_racing_on_one_file_never_overfill_a_shared_node(tmp_path):
    # Their rounds mostly pick the same jobs and collide on the job, not the slot: the slot race
    # itself is forced in test_two_replicas_racing_for_a_node_fill_only_its_slots.
    nodes = [MemoryUpstream(f"n{i}", slots=2, seconds=0.02) for i in range(3)]
    stores = [JobStore(tmp_path / "gateway.db") for _ in range(3)]

    async def scenario() -> None:
        ids = await _queued(stores[0], 90)
        dispatchers = [_dispatcher(tmp_path, s, nodes, f"r{i}") for i, s in enumerate(stores)]
        for d in dispatchers:
            await d.start()
        try:
            deadline = time.monotonic() + 30
            while sum(len(n.log) for n in nodes) < len(ids) or any(n.held() for n in nodes):
                assert time.monotonic() < deadline, "the jobs did not all run"
                await asyncio.sleep(0.02)
        finally:
            for d in dispatchers:
                await d.stop()
        assert [n.most_held for n in nodes if n.most_held > n.slots] == []
        runs = Counter(job_id for n in nodes for job_id in n.jobs)
        assert set(runs) == set(ids) and set(runs.values()) == {1}
        senders = {job.replica for job in await stores[0].read(lambda r: r.jobs_by_id(ids))}
        assert len(senders) >= 2  # they did share the work

    try:
        run(scenario())
    finally:
        for s in stores:
            s.close()


def test_changes_a_replica_makes_before_the_others_first_see_it_still_reach_them(tmp_path, stores):
    # rb starts and changes a job at once, before ra's next heartbeat has seen rb's lease: ra's
    # watch must start from before rb existed, not from where the log stood when it noticed rb.
    a, b = stores

    async def scenario() -> None:
        dispatcher = _dispatcher(tmp_path, a, [], "ra")
        heard = dispatcher.notifier.subscribe()
        await dispatcher.start()  # its first heartbeat finds it alone
        try:
            await b.join("rb", lease=30)
            (job_id,) = await _queued(b, 1)
            while (await asyncio.wait_for(heard.get(), 5)) != job_id:
                pass
        finally:
            await dispatcher.stop()

    run(scenario())


def test_a_replica_that_finds_its_lease_taken_over_stops_sending(tmp_path, stores):
    a, b = stores
    node = MemoryUpstream("n0", slots=2)  # runs until finished by hand: nothing ends by itself

    async def scenario() -> None:
        dispatcher = _dispatcher(tmp_path, a, [node], "ra", lease=0.3)
        lost = asyncio.Event()
        dispatcher.replicas.on_lost = lost.set
        await dispatcher.start()
        try:
            await b.join("rb", lease=30)
            await asyncio.sleep(0.5)  # ra renews once a second: its 0.3 s lease has run out
            await b.heartbeat("rb", 30)
            await asyncio.wait_for(lost.wait(), 3)
            await _queued(a, 1)
            await asyncio.sleep(0.5)
            assert node.log == []  # it sends nothing more
        finally:
            await dispatcher.stop()

    run(scenario())


def test_a_replica_of_this_host_whose_process_is_gone_is_known_dead_once_silent_for_a_moment():
    import socket
    import subprocess
    import sys

    from x2v_gateway.dispatch.replicas import GONE_AFTER, gone_on_this_host

    host, now, lease = socket.gethostname(), time.time(), 6.0
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # its pid no longer exists
    rows = [
        {"id": f"{host}:{ended.pid}", "expires_at": now - 1.0 - GONE_AFTER + lease},  # silent
        {"id": f"{host}:{ended.pid}0", "expires_at": now + lease},  # renewed just now
        {"id": f"{host}:{os.getppid()}", "expires_at": now - 10},  # alive (this test's parent)
        {"id": f"elsewhere:{ended.pid}", "expires_at": now - 10},  # another host: its lease says
        {"id": "gateway-1", "expires_at": now - 10},  # a name, not a pid: its lease says
    ]
    assert gone_on_this_host(rows, "me", lease, now) == [f"{host}:{ended.pid}"]
