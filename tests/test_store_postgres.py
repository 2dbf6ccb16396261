"""What only the PostgreSQL store has to get right: several processes writing at once.

Its behaviours shared with SQLite are tested on both backends (test_store.py, test_schedule.py,
test_replica_store.py, test_queue_position.py); here, what a second writer makes possible.
"""

from __future__ import annotations

import asyncio
import random
import threading

import psycopg

from x2v_gateway.store import JobStore


def test_replicas_starting_at_once_on_a_new_database_make_its_schema_once(pg_cluster):
    url = pg_cluster.new_database(empty=True)
    errors: list[str] = []

    def open_store() -> None:
        try:
            JobStore(url).close()
        except Exception as exc:  # reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=open_store) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with psycopg.connect(url) as conn:
        names = [name for (name,) in conn.execute("SELECT name FROM x2v_migrations")]
    assert len(names) == len(set(names)) > 5


def test_a_reader_following_job_events_by_id_misses_none_while_two_replicas_write(pg_cluster):
    # The event streams, the webhooks' cursor and the replicas' change feed read "the events
    # after the last id I saw". With writers committing in another order than they took ids,
    # an event could land below a cursor already past it, and never be read.
    url = pg_cluster.new_database()
    a, b, reader = JobStore(url), JobStore(url), JobStore(url)
    seen: list[int] = []
    done = threading.Event()

    def follow() -> None:
        cursor = 0
        while True:
            finished = done.is_set()  # read before the last look, so it sees every commit
            events = reader.read_blocking(lambda r: r.events_after(cursor, limit=1000))
            seen.extend(e["id"] for e in events)
            cursor = events[-1]["id"] if events else cursor
            if finished and not events:
                return

    async def write(store: JobStore, rng: random.Random) -> None:
        for i in range(60):
            job, _ = await store.create_job(task="t2v", params={"prompt": str(i)}, inputs={}, owner=rng.choice("xyz"))
            if await store.claim(job.id, "n1", job.id):
                await (store.mark_running(job.id) if rng.random() < 0.5 else store.cancel(job.id))

    async def both() -> None:
        await asyncio.gather(*(write(s, random.Random(n)) for n, s in enumerate((a, b, a, b))))

    follower = threading.Thread(target=follow)
    follower.start()
    try:
        asyncio.run(both())
    finally:
        done.set()
        follower.join(timeout=60)
        for store in (a, b):
            store.close()
    every = reader.read_blocking(lambda r: r.events_after(0, limit=100_000))
    reader.close()
    assert len(every) >= 4 * 60 * 2
    assert seen == [e["id"] for e in every]  # each once, in order, none skipped
