"""The job store on a real SQLite file and a real PostgreSQL database: transitions that must
never go wrong, whichever the backend."""

from __future__ import annotations

import asyncio
import itertools
import random
import sqlite3
import time

import pytest

from pg_cluster import raw_sql
from x2v_gateway.store import IdempotencyConflict, JobStore


@pytest.fixture
def store(store_location):
    s = JobStore(store_location)
    yield s
    s.close()


def run(coro):
    return asyncio.run(coro)


def new_job(store: JobStore, **kw):
    kw.setdefault("task", "t2v")
    kw.setdefault("params", {"prompt": "a cat", "seed": 1})
    kw.setdefault("inputs", {})
    job, _ = run(store.create_job(**kw))
    return job


def test_store_uses_wal_and_survives_reopening(tmp_path):
    first = JobStore(tmp_path / "g.db")
    job = new_job(first)
    first.close()
    second = JobStore(tmp_path / "g.db")  # migrations already applied: nothing to redo
    assert run(second.get(job.id)).params == {"prompt": "a cat", "seed": 1}
    mode = sqlite3.connect(tmp_path / "g.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    second.close()


def test_cancelled_job_stays_cancelled_whatever_the_upstream_says_later(store):
    job = new_job(store)
    assert run(store.claim(job.id, "node1", job.id))
    assert run(store.mark_running(job.id))
    assert run(store.cancel(job.id)).state == "cancelled"
    # The node finishes the cancelled task anyway and reports it completed / failed.
    assert not run(store.succeed(job.id, "0" * 64, {"duration": 1.0}))
    assert not run(store.fail(job.id, "boom"))
    assert not run(store.mark_running(job.id))
    assert not run(store.requeue(job.id, "node forgot"))
    final = run(store.get(job.id))
    assert final.state == "cancelled" and final.result_sha is None
    assert final.cancel_pending  # the node still has to be told


def test_a_job_is_claimed_once(store):
    job = new_job(store)
    assert run(store.claim(job.id, "node1", job.id))
    assert not run(store.claim(job.id, "node2", job.id))
    assert run(store.get(job.id)).upstream == "node1"


def test_backpressure_requeue_does_not_count_as_an_attempt(store):
    job = new_job(store)
    run(store.claim(job.id, "node1", job.id))
    run(store.requeue(job.id, "queue full", sent=False))
    again = run(store.get(job.id))
    assert (again.state, again.attempts, again.upstream) == ("queued", 0, None)


def test_idempotency_key_returns_the_same_job_and_refuses_another_request(store):
    first, created = run(store.create_job(task="t2v", params={}, inputs={}, idempotency_key="k1", request_hash="a"))
    again, created_again = run(store.create_job(task="t2v", params={}, inputs={}, idempotency_key="k1", request_hash="a"))
    assert created and not created_again and again.id == first.id
    with pytest.raises(IdempotencyConflict):
        run(store.create_job(task="t2v", params={}, inputs={}, idempotency_key="k1", request_hash="b"))


def test_queue_order_is_priority_then_age(store):
    low = new_job(store)
    high = new_job(store, priority=5)
    later = new_job(store)
    assert [run(store.queue_position(j)) for j in (high, low, later)] == [1, 2, 3]


def test_retention_keeps_a_blob_that_a_live_job_still_uses(store):
    shared, only_old = "a" * 64, "b" * 64
    run(store.record_blob(shared, 10, "png"))
    run(store.record_blob(only_old, 10, "wav"))
    old = new_job(store, task="s2v", inputs={"image": shared, "audio": only_old})
    new_job(store, task="i2v", inputs={"image": shared})
    run(store.claim(old.id, "n", old.id))
    run(store.fail(old.id, "x"))
    # Both blobs are older than the one-hour grace for requests still being accepted.
    raw_sql(store, "UPDATE blobs SET created_at = created_at - 7200")
    doomed = run(store.expire_files(time.time() + 1))
    assert doomed == [only_old]
    assert run(store.get(old.id)).files_expired


def test_a_finished_job_read_again_shows_every_later_change(store):
    """Finished jobs' rows and views are kept for list pages (store.Memo): a change made without
    touching updated_at (the cancel delivered, the files expired) must still show."""
    from x2v_gateway.schemas import job_view

    def listed():
        job = run(store.read(lambda r: r.list_jobs(limit=1)))[0]
        return job, job_view(job)

    run(store.record_blob("c" * 64, 10, "png"))
    job = new_job(store, task="i2v", inputs={"image": "c" * 64})
    run(store.claim(job.id, "n", job.id))
    run(store.mark_running(job.id))
    run(store.cancel(job.id))
    first, view = listed()
    assert first.cancel_pending and listed()[0] is first  # the second read is the kept one
    run(store.cancel_sent(job.id))
    assert not listed()[0].cancel_pending
    raw_sql(store, "UPDATE blobs SET created_at = created_at - 7200")
    run(store.expire_files(time.time() + 1))
    expired, expired_view = listed()
    assert expired.files_expired and expired_view.files_expired and not view.files_expired


def test_finished_jobs_of_a_batch_are_each_their_own(store):
    """A batch's rows are read with their batch columns (store/sqlite/batches.py, row_to_item): each finished job
    is kept under its own values, never another's."""
    from x2v_gateway.store import BatchJobSpec

    specs = [BatchJobSpec(task="t2v", params={"prompt": p}, inputs={}, files={}) for p in "ab"]
    jobs = run(store.create_batch("b1", specs))
    for job in jobs:
        run(store.cancel(job.id))
    for _ in range(2):  # the second time from what was kept
        items = run(store.read(lambda r: r.batch_items("b1")))
        assert [i.job.params["prompt"] for i in items] == ["a", "b"]


def test_list_cursor_pages_through_every_job_once(store):
    ids = [new_job(store).id for _ in range(7)]
    seen, cursor = [], None
    while True:
        page = run(store.list_jobs(before_seq=cursor, limit=3))
        if not page:
            break
        seen += [j.id for j in page]
        cursor = page[-1].seq
    assert seen == list(reversed(ids))


def test_list_pages_hold_the_same_jobs_whichever_filters_pick_the_index(store):
    # A page is read from whichever index fits its filters best, one read per state merged:
    # every combination of filters and cursor gives what filtering every job would.
    rng = random.Random(3)
    for i in range(120):
        job = new_job(store, task=rng.choice(("t2v", "s2v")), owner=rng.choice(("alice", "bob", None)),
                      batch_id=rng.choice(("b1", "b2", None)))
        state = rng.choice(("queued", "succeeded", "failed", "cancelled", "running"))
        raw_sql(store, "UPDATE jobs SET state = ? WHERE id = ?", (state, job.id))
    every = sorted(run(store.list_jobs(limit=1000)), key=lambda j: -j.seq)
    assert len(every) == 120
    for states in ((), ("failed",), ("succeeded", "failed", "queued")):
        for batch_id, task, owner in itertools.product(("b1", None), ("t2v", None), ("alice", None)):
            for before in (None, every[40].seq):
                shown = run(store.list_jobs(states=states, batch_id=batch_id, task=task, owner=owner,
                                            before_seq=before, limit=7))
                expected = [
                    j for j in every
                    if (not states or j.state in states) and batch_id in (None, j.batch_id)
                    and task in (None, j.task) and owner in (None, j.owner)
                    and (before is None or j.seq < before)
                ][:7]
                assert [j.id for j in shown] == [j.id for j in expected], (states, batch_id, task, owner, before)


def test_job_counts_follow_every_change_of_state_and_owner(store):
    # The counts the dashboard and /metrics show come from a table triggers keep; they must
    # match a count of the jobs themselves after every kind of change.
    a = new_job(store, owner="alice")
    b = new_job(store, owner="bob")
    c = new_job(store)
    run(store.claim(a.id, "n1", a.id))
    run(store.mark_running(a.id))
    run(store.succeed(a.id, "0" * 64, {}))
    run(store.cancel(b.id))
    run(store.retry(b.id))
    run(store.claim(c.id, "n1", c.id))
    run(store.requeue(c.id, "node forgot"))
    raw_sql(store, "UPDATE jobs SET owner = 'carol' WHERE id = ?", (c.id,))
    for owner in (None, "alice", "bob", "carol"):
        sql, args = "SELECT state, count(*) FROM jobs", ()
        if owner is not None:
            sql, args = sql + " WHERE owner = ?", (owner,)
        counted = dict(raw_sql(store, sql + " GROUP BY state", args))
        shown = run(store.owner_counts(owner))
        assert {s: n for s, n in shown.items() if n} == counted, owner


def test_nothing_above_the_store_imports_sqlite():
    # The store's interface is all the rest of the gateway uses: a second backend (PostgreSQL
    # for several replicas) is then one more module under store/, and nothing else changes.
    import ast
    from pathlib import Path

    import x2v_gateway

    package = Path(x2v_gateway.__file__).parent
    found = []
    for path in package.rglob("*.py"):
        if path.is_relative_to(package / "store"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            found += [f"{path.relative_to(package)}: {name}" for name in names
                      if name.split(".")[0] in ("sqlite3", "sqlite_utils") or "store.sqlite" in name]
    assert not found


def test_a_keys_rate_limit_gives_a_minutes_burst_then_says_how_long_to_wait(store):
    # Kept in memory for SQLite (one process), in a table replicas share for PostgreSQL.
    waits = [run(store.take_request("k1", 3)) for _ in range(4)]
    assert waits[:3] == [0.0, 0.0, 0.0] and 19 < waits[3] <= 20
    assert run(store.take_request("k2", 3)) == 0.0  # each key its own bucket
