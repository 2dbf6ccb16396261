"""A queued job's place in the queue (shown on every GET of it): right after every kind of
change, and read with work that does not grow with the length of the queue."""

from __future__ import annotations

import random
import time

import pytest
from history import steps
from pg_cluster import raw_sql
from test_store import run, store  # noqa: F401 (store: the fixture, on both backends)

from x2v_gateway.store import JobStore
from x2v_gateway.store.sqlite import SqliteReads


def counted_positions(on: JobStore, ids: list[str]) -> dict[str, int]:
    """Positions by their definition: queued jobs of higher priority, or of the same priority
    and older, plus one (for the queued jobs among `ids`)."""
    return dict(raw_sql(
        on,
        "SELECT j.id, 1 + (SELECT count(*) FROM jobs q WHERE q.state = 'queued' AND (q.priority > j.priority"
        " OR (q.priority = j.priority AND q.seq < j.seq))) FROM jobs j"
        f" WHERE j.state = 'queued' AND j.id IN ({', '.join('?' * len(ids))})",
        tuple(ids),
    ))


def test_queue_position_is_right_after_every_kind_of_change(store):
    rng = random.Random(7)
    ids = [run(store.create_job(task="t2v", params={"prompt": str(i)}, inputs={}, priority=rng.choice((0, 0, 1, 5))))[0].id
           for i in range(300)]
    # Jobs spread over many blocks of seqs, as in a store with history between them.
    raw_sql(store, 
        "INSERT INTO jobs (seq, id, task, state, params, inputs, created_at, updated_at)"
        " VALUES ((SELECT max(seq) FROM jobs) + 5000, 'jgap', 't2v', 'succeeded', '{}', '{}', 0, 0)"
    )
    ids += [run(store.create_job(task="t2v", params={"prompt": f"late {i}"}, inputs={}))[0].id for i in range(50)]
    for job_id in rng.sample(ids, 120):
        action = rng.choice(("claim", "requeue", "cancel", "retry", "finish", "priority", "delete"))
        job = run(store.get(job_id))
        if action == "claim" and job.state == "queued":
            run(store.claim(job_id, "n1", job_id))
        elif action == "requeue" and job.state == "submitted":
            run(store.requeue(job_id, "node forgot"))
        elif action == "cancel" and job.state in ("queued", "submitted"):
            run(store.cancel(job_id))
        elif action == "retry" and job.state == "cancelled":
            run(store.retry(job_id))
        elif action == "finish" and job.state == "submitted":
            run(store.mark_running(job_id))
            run(store.succeed(job_id, "0" * 64, {}))
        elif action == "priority":
            raw_sql(store, "UPDATE jobs SET priority = ? WHERE id = ?", (rng.randint(0, 9), job_id))
        elif action == "delete":
            raw_sql(store, "DELETE FROM jobs WHERE id = ?", (job_id,))
        sample = rng.sample(ids, 20)
        shown = store.read_blocking(lambda r: {
            job.id: position for job in map(r.get, sample)
            if job is not None and (position := r.queue_position(job)) is not None
        })
        assert shown == counted_positions(store, sample), action
        # A page of jobs (the list pages) gets the same places, a short page (a count per job)
        # and a long one (one ranking of the whole queue) alike.
        for size in (20, 120):
            page = store.read_blocking(lambda r: r.jobs_by_id(rng.sample(ids, size)))
            assert run(store.queue_positions(page)) == counted_positions(store, [j.id for j in page])


@pytest.fixture
def sqlite_store(tmp_path):
    s = JobStore(tmp_path / "gateway.db")
    yield s
    s.close()


def test_queue_position_costs_the_same_at_the_end_of_a_long_queue(sqlite_store):
    """SQLite's own instruction count (a progress handler), not a clock: the last of 20,000
    queued jobs costs no more to place than the last of 2,000 (counting the jobs ahead of it
    one by one cost ten times more). PostgreSQL runs the same SQL on the same triggers' blocks
    (test_store_plans_postgres.py checks its plans)."""
    conn = sqlite_store._conn()
    now = time.time()

    def last_position_cost(total: int) -> int:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO jobs (id, task, state, params, inputs, created_at, updated_at)"
            " VALUES (?, 't2v', 'queued', '{}', '{}', ?, ?)",
            ((f"j{total}-{i}", now, now) for i in range(total)),
        )
        conn.execute("COMMIT")
        reads = SqliteReads(conn)
        last = reads.get(f"j{total}-{total - 1}")
        position, cost = steps(conn, lambda: reads.queue_position(last))
        assert position == counted_positions(sqlite_store, [last.id])[last.id]
        conn.execute("DELETE FROM jobs")
        return cost

    short, long = last_position_cost(2000), last_position_cost(20000)
    assert long < 2 * short + 50, (short, long)


def test_a_list_page_of_the_newest_queued_jobs_costs_the_same_however_long_the_queue(sqlite_store):
    """The list pages place every queued job they show: the newest 50 of 20,000 queued cost no
    more than the newest 50 of 2,000 (ranking the whole queue cost a page of 50 17 ms at 50,000),
    and a batch page of 500 neighbours in the queue costs less than a count per job would."""
    conn = sqlite_store._conn()
    reads = SqliteReads(conn)
    now = time.time()

    def queue_up_to(total: int) -> None:
        (queued,) = conn.execute("SELECT count(*) FROM jobs").fetchone()
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO jobs (id, task, state, params, inputs, created_at, updated_at)"
            " VALUES (?, 't2v', 'queued', '{}', '{}', ?, ?)",
            ((f"j{i}", now, now) for i in range(queued, total)),
        )
        conn.execute("COMMIT")

    def newest_page_cost(size: int) -> int:
        page = reads.list_jobs(states=["queued"], limit=size)
        places, cost = steps(conn, lambda: reads.queue_positions(page))
        assert places == counted_positions(sqlite_store, [job.id for job in page])
        return cost

    queue_up_to(2000)
    short = newest_page_cost(50)
    queue_up_to(20_000)
    long = newest_page_cost(50)
    assert long < 2 * short + 50, (short, long)
    one_each = 500 * newest_page_cost(1)
    assert newest_page_cost(500) < one_each / 2, one_each
