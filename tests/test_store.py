"""The job store on a real SQLite file: transitions that must never go wrong."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest

from x2v_gateway.store import IdempotencyConflict, JobStore
from x2v_gateway.store.sqlite import SqliteReads


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "gateway.db")
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
    store._conn().execute("UPDATE blobs SET created_at = created_at - 7200")
    doomed = run(store.expire_files(time.time() + 1))
    assert doomed == [only_old]
    assert run(store.get(old.id)).files_expired


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


@pytest.mark.parametrize("size", [0, 1, 4095, 1024 * 1024, 1024 * 1024 + 7, 5 * 1024 * 1024 + 12345])
def test_blob_writer_stores_exact_bytes_across_direct_io_blocks(tmp_path, size):
    # Full 1 MiB blocks bypass the page cache (O_DIRECT); the tail does not. Whatever the size,
    # the stored file and its address are exactly the bytes written.
    import asyncio
    import hashlib
    import os

    from x2v_gateway.blobs import BlobStore

    blobs = BlobStore(tmp_path / "blobs")
    data = os.urandom(size)

    async def write_all(writer) -> None:
        for i in range(0, len(data), 70_000):  # odd-sized chunks, as a socket delivers them
            writer.write(data[i:i + 70_000])
            await writer.drain()

    writer = blobs.writer()
    asyncio.run(write_all(writer))
    assert writer.tmp_path.read_bytes() == data  # complete for the checks before commit
    sha, stored = writer.commit()
    assert (sha, stored) == (hashlib.sha256(data).hexdigest(), size)
    assert blobs.path(sha).read_bytes() == data
    again = blobs.writer()
    asyncio.run(write_all(again))
    assert again.commit() == (sha, size)  # the same bytes: stored once
    discarded = blobs.writer()
    asyncio.run(write_all(discarded))
    discarded.discard()
    blobs.writer_thread.submit(lambda: None).result()  # the duplicate's removal has run
    assert [p.name for p in blobs.tmp_dir.iterdir()] == []


def _plans_of(conn: sqlite3.Connection, statements: list[str]) -> dict[str, list[str]]:
    return {
        sql: [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql)]
        for sql in statements if sql.lstrip().upper().startswith("SELECT")
    }


def test_every_hot_path_query_uses_an_index_not_a_scan_of_the_history(store):
    # A store that has run a while: mostly finished jobs, a few queued and in flight, with the
    # planner's statistics (ANALYZE), so the plans are the ones a real gateway gets.
    now = time.time()
    rows = []
    for i in range(3000):
        state = "succeeded" if i < 2700 else ("queued", "submitted", "running")[i % 3]
        upstream = None if state == "queued" else f"n{i % 4}"
        rows.append((f"j{i}", ("t2v", "i2v")[i % 2], state, f"k{i % 5}", upstream, i % 3,
                     f"b{i % 40}" if i % 7 else None, now, now))
    conn = store._conn()
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO jobs (id, task, state, params, inputs, owner, upstream, priority, batch_id,"
        " created_at, updated_at) VALUES (?, ?, ?, '{}', '{}', ?, ?, ?, ?, ?, ?)", rows,
    )
    conn.execute("COMMIT")
    conn.execute("ANALYZE")

    partial = {name for (name,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'jobs' AND sql LIKE '% WHERE %'"
    )}
    statements: list[str] = []
    reads = SqliteReads(store._conn())
    conn.set_trace_callback(statements.append)  # the SQL each read really runs, values inlined
    queued = reads.get("j2700")
    assert queued.state == "queued"
    reads.inflight()
    reads.active("n1")
    reads.inflight_counts()
    reads.cancel_pending()
    reads.counts_by_state()
    reads.owner_counts("k1")
    reads.queue_position(queued)
    reads.queue_positions([queued, reads.get("j2703")])
    lanes = reads.queue_lanes(["t2v", "i2v"])
    reads.lane_jobs(lanes[0], 0, 10)
    for kwargs in ({}, {"states": ["queued"]}, {"owner": "k1"}, {"batch_id": "b1"}, {"task": "t2v"},
                   {"before_seq": 1500}):
        reads.list_jobs(limit=500, **kwargs)
    reads.recent_batch_ids()
    reads.recent_batch_ids(owner="k1")
    reads.batch_counts("b1")
    reads.batch_items("b1")
    conn.set_trace_callback(None)

    plans = _plans_of(conn, statements)
    assert len(plans) > 15
    for sql, plan in plans.items():
        for step in plan:
            if step.startswith("SCAN jobs"):
                # Only a partial index (the few jobs in flight) may be read whole.
                assert any(step.endswith(f"INDEX {name}") for name in partial), (sql, plan)


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
    conn = store._conn()
    conn.execute("UPDATE jobs SET owner = 'carol' WHERE id = ?", (c.id,))
    for owner in (None, "alice", "bob", "carol"):
        sql, args = "SELECT state, count(*) FROM jobs", ()
        if owner is not None:
            sql, args = sql + " WHERE owner = ?", (owner,)
        counted = dict(conn.execute(sql + " GROUP BY state", args).fetchall())
        shown = run(store.owner_counts(owner))
        assert {s: n for s, n in shown.items() if n} == counted, owner
