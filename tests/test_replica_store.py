"""The store's side of several replicas: two stores on one real SQLite file, and on one real
PostgreSQL database, as two gateway processes have (each its own connections and threads): the
contract dispatch/replicas.py relies on, whichever the backend."""

from __future__ import annotations

import asyncio
import time

import pytest

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
        # ra was only slow: its lease is gone, and it learns it must stop.
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
