"""`x2v-gateway migrate-store`: a SQLite deployment copied into PostgreSQL reads the same, and a
second run copies nothing twice."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

from x2v_gateway.store import BatchJobSpec, JobStore


def run(coro):
    return asyncio.run(coro)


def fill(store: JobStore) -> None:
    """A little of everything a deployment keeps."""
    run(store.record_blob("a" * 64, 10, "png"))
    done, _ = run(store.create_job(task="i2v", params={"prompt": "cat"}, inputs={"image": "a" * 64}, owner="k1",
                                   idempotency_key="idem-1", request_hash="h1"))
    run(store.claim(done.id, "n1", done.id))
    run(store.mark_running(done.id))
    run(store.succeed(done.id, "b" * 64, {"duration": 2.0}))
    moving, _ = run(store.create_job(task="t2v", params={"prompt": "dog"}, inputs={}, priority=5))
    run(store.claim(moving.id, "n1", moving.id))
    run(store.cancel(moving.id))
    specs = [BatchJobSpec(task="t2v", params={"prompt": p}, inputs={}, files={"image": f"{p}.png"}) for p in "xyz"]
    run(store.create_batch("b1", specs, batch={"name": "three", "task": "t2v", "mode": "pairs", "form": {"n": 3}}))
    run(store.save_node("n1", url="http://10.0.0.5:8000", capacity=2, tasks=["t2v"], source="api"))
    run(store.set_node_flags("n1", drained=True))
    run(store.add_stray("n1", "old-task", moving.id))
    key = {"id": "k1", "name": "alice", "key_hash": "f" * 64, "prefix": "x2v_ab", "admin": False,
           "daily_quota": 10, "max_concurrent": 2, "rate_per_min": 60.0, "source": "api"}
    run(store.create_key(key, "admin"))
    run(store.create_session("s" * 64, "k1", "csrf-token", time.time() + 3600))
    run(store.reserve_jobs("k1", "2026-12-05", 3, 10))


def snapshot(store: JobStore) -> dict:
    """Everything a user of the gateway could see of the store."""

    def read(r):
        jobs = r.list_jobs(limit=100)
        return {
            "jobs": jobs,
            "events": {j.id: [(e["state"], e["detail"]) for e in r.events(j.id)] for j in jobs},
            "counts": r.counts_by_state(),
            "positions": r.queue_positions(jobs),
            "batch": r.batch("b1"),
            "items": [(i.job.id, i.position, i.files) for i in r.batch_items("b1")],
            "nodes": r.nodes(),
            "strays": r.stray_tasks("n1"),
            "keys": r.keys(),
            "session": r.session("s" * 64),
            "used": r.jobs_used("k1", "2026-12-05"),
            "audit": [(a["actor"], a["action"], a["target"], a["detail"]) for a in r.audit_log()],
            "blob": r.blob("a" * 64),
        }

    return run(store.read(read))


def migrate(source, target) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "x2v_gateway.cli", "migrate-store", "--from", str(source), "--to", target,
         "--env-file", "/nonexistent"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "100"},
    )


def test_a_sqlite_deployment_copied_into_postgresql_reads_the_same_and_copies_once(tmp_path, pg_cluster):
    source = tmp_path / "gateway.db"
    sqlite = JobStore(source)
    fill(sqlite)
    before = snapshot(sqlite)
    sqlite.close()
    url = pg_cluster.new_database()

    first = migrate(source, url)
    assert first.returncode == 0, first.stderr
    assert "jobs                 5 rows (5 new)" in first.stdout
    assert "api_keys             1 rows (1 new)" in first.stdout
    pg = JobStore(url)
    try:
        assert snapshot(pg) == before
        # A second run (after more work on SQLite, say) copies what changed, and nothing twice.
        again = migrate(source, url)
        assert again.returncode == 0, again.stderr
        assert "jobs                 5 rows (0 new)" in again.stdout
        assert "audit                1 rows (0 new)" in again.stdout
        assert snapshot(pg) == before
        # New jobs and audit entries take numbers after the copied ones.
        job, _ = run(pg.create_job(task="t2v", params={}, inputs={}))
        assert job.seq > max(j.seq for j in before["jobs"])
        # The idempotency key came along: the same request made again is the copied job.
        same, created = run(pg.create_job(task="i2v", params={}, inputs={}, idempotency_key="idem-1", request_hash="h1"))
        assert not created and same.id == before["jobs"][-1].id
    finally:
        pg.close()
    # Another deployment's database is not written over.
    other = tmp_path / "other.db"
    store = JobStore(other)
    fill(store)
    store.close()
    refused = migrate(other, url)
    assert refused.returncode == 1 and "already holds jobs" in refused.stderr
