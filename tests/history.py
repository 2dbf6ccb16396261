"""A store that has run a long while: many jobs, nearly all finished, with their batches, events,
files, keys, sessions and audit, written straight into a real SQLite file (fast: executemany)."""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from x2v_gateway.store import JobStore

OWNERS = 20  # keys with jobs; job n belongs to k{n % OWNERS}, every 50th to nobody
NODES = 50
QUEUED, INFLIGHT = 3000, 400  # the newest jobs: waiting in the queue, then on nodes
BATCH_SIZE = 100  # one job in three is in a batch of this many; every other batch is the dashboard's


@dataclass
class History:
    """Handles on the filled store, for the reads a test or a benchmark makes."""

    path: Path
    total: int
    first_seq: int
    queued_id: str  # the last queued job: the longest way to its place
    finished_id: str
    inflight_id: str
    dashboard_batch: str  # a batch made in the dashboard (batch_jobs rows), with retries
    api_batch: str  # a batch made through the API (a batch_id only)
    owner: str
    key_hash: str  # of the owner's key
    session_hash: str  # an open session of the owner's key
    node: str


def key_id(n: int) -> str:
    return f"k{n % OWNERS:04d}"


# `seq`s below this are left free for older history (`add_older_history`).
FIRST_SEQ = 10_000_001


def fill_history(path: Path, total: int, *, seed: int = 1) -> History:
    """Write `total` jobs (all but the newest few thousand finished) into a new store at `path`."""
    JobStore(path).close()  # the schema, through the store's own migrations
    conn = _connect(path)
    first_queued = FIRST_SEQ + total - QUEUED - INFLIGHT
    _insert_jobs(conn, range(FIRST_SEQ, FIRST_SEQ + total), first_queued, seed=seed)
    _insert_the_rest(conn)
    conn.execute("COMMIT")
    conn.close()
    last = FIRST_SEQ + total - 1
    last_dashboard = (last // (3 * BATCH_SIZE)) // 2 * 2
    return History(
        path=path, total=total, first_seq=FIRST_SEQ, queued_id=f"j{first_queued + QUEUED - 1:09d}",
        finished_id=f"j{FIRST_SEQ + total // 2:09d}", inflight_id=f"j{last:09d}",
        dashboard_batch=f"b{last_dashboard - 2:06d}", api_batch=f"b{last_dashboard - 1:06d}",
        owner=key_id(1), key_hash=_hash(key_id(1)), session_hash=_hash("session 1"), node="n01",
    )


def add_older_history(path: Path, n: int) -> None:
    """Add `n` finished jobs older than every job of `fill_history`: what no hot path should read."""
    conn = _connect(path)
    _insert_jobs(conn, range(FIRST_SEQ - n, FIRST_SEQ), FIRST_SEQ + n, seed=2)
    conn.execute("COMMIT")
    conn.close()


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    # The file is thrown away if this fails: no need to sync, and every index fits in memory.
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -1000000")
    conn.execute("BEGIN")
    return conn


def _insert_jobs(conn: sqlite3.Connection, seqs: range, first_queued: int, *, seed: int) -> None:
    """Jobs `seqs`, finished before `first_queued`, with their batches and events. The last
    100,000 finished keep their files, and a few of them have a cancel still to send."""
    rng = random.Random(seed)
    now = time.time() - seqs.stop
    sha = "ab" * 32
    jobs, members, batches, events, foreign, pipelines = [], [], [], [], [], []
    recent = first_queued - 100_000
    for n in seqs:
        created = now + n
        batch = None
        if n % 3 == 0:
            number = n // (3 * BATCH_SIZE)
            batch = f"b{number:06d}"
            if number % 2 == 0:
                if n % (3 * BATCH_SIZE) < 3:
                    batches.append((batch, f"Campaign {number}", "s2v", "each", key_id(n), created, "{}"))
                retry_of = f"j{n - 3:09d}" if n % 99 == 0 else None
                members.append((f"j{n:09d}", batch, n, '{"image": "face.png"}', retry_of))
        if n >= first_queued + QUEUED:
            state = rng.choice(("submitted", "running"))
        elif n >= first_queued:
            state = "queued"
        else:
            state = rng.choices(("succeeded", "failed", "cancelled"), (90, 7, 3))[0]
        finished = created + 30 if state in ("succeeded", "failed", "cancelled") else None
        on_node = state != "queued"
        jobs.append((
            n, f"j{n:09d}", ("s2v", "i2v", "t2v")[n % 3], state, '{"prompt": "a cat"}',
            json.dumps({"image": sha}), f"n{n % NODES:02d}" if on_node else None,
            f"j{n:09d}" if on_node else None, 1 if on_node else 0,
            rng.choice((0, 0, 0, 5)) if state == "queued" else 0, batch,
            None if n % 50 == 0 else key_id(n), created, finished or created,
            created + 1 if on_node else None, created + 2 if on_node else None, finished,
            "boom" if state == "failed" else None, sha if state == "succeeded" else None,
            1 if state == "cancelled" and n >= recent and n % 1000 == 0 else 0,
            1 if finished and n < recent else 0,
        ))
        events.append((f"j{n:09d}", created, "queued", "accepted", jobs[-1][11], batch))
        if n % 10 == 0 and jobs[-1][11]:  # a LightX2V client's own task id for it
            foreign.append((jobs[-1][11], "lightx2v", f"task-{n}", f"j{n:09d}", created))
        if n % 500 == 0:  # a pipeline, finished long ago
            pipelines.append((n, f"p{n:09d}", key_id(n), "succeeded", "{}", created, finished or created))
    # The indexes are made again after the rows are in: sorting once costs a third of inserting
    # into each index row by row.
    indexes = conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
        " AND tbl_name IN ('jobs', 'job_events', 'batch_jobs', 'batches')"
    ).fetchall()
    for name, _ in indexes:
        conn.execute(f"DROP INDEX {name}")
    conn.executemany(
        "INSERT INTO jobs (seq, id, task, state, params, inputs, upstream, upstream_task_id,"
        " attempts, priority, batch_id, owner, created_at, updated_at, submitted_at, started_at,"
        " finished_at, error, result_sha, cancel_pending, files_expired)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", jobs,
    )
    conn.executemany("INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?, ?)", batches)
    conn.executemany("INSERT INTO batch_jobs VALUES (?, ?, ?, ?, ?)", members)
    conn.executemany(
        "INSERT INTO job_events (job_id, at, state, detail, owner, batch_id) VALUES (?, ?, ?, ?, ?, ?)", events,
    )
    conn.executemany(
        "INSERT INTO foreign_ids (owner, surface, foreign_id, job_id, created_at) VALUES (?, ?, ?, ?, ?)", foreign,
    )
    conn.executemany(
        "INSERT INTO pipelines (seq, id, owner, state, output, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        pipelines,
    )
    for _, sql in indexes:
        conn.execute(sql)


def _insert_the_rest(conn: sqlite3.Connection) -> None:
    """Files, keys, sessions, quotas, audit entries, nodes, and pipelines."""
    now = time.time()
    sha = "ab" * 32
    conn.executemany(
        "INSERT INTO blobs VALUES (?, 1000, 'png', ?)",
        [(hashlib.sha256(str(i).encode()).hexdigest(), now) for i in range(5000)] + [(sha, now)],
    )
    conn.executemany(
        "INSERT INTO api_keys (id, name, key_hash, prefix, admin, max_concurrent, source, created_at)"
        " VALUES (?, ?, ?, '', ?, ?, 'api', ?)",
        [(key_id(i), f"key {i}", _hash(key_id(i)), int(i == 0), 2 if i % 4 == 0 else None, now)
         for i in range(OWNERS)],
    )
    conn.executemany(
        "INSERT INTO sessions VALUES (?, ?, 'csrf', ?, ?)",
        [(_hash(f"session {i}"), key_id(i), now, time.time() + 3600) for i in range(200)],
    )
    conn.executemany(
        "INSERT INTO key_usage VALUES (?, ?, 100)",
        [(key_id(i), f"2026-01-{d:02d}") for i in range(OWNERS) for d in range(1, 29)],
    )
    conn.executemany(
        "INSERT INTO audit (at, actor, action, target, detail) VALUES (?, 'admin', 'node.drain', ?, '')",
        [(now + i, f"n{i % NODES:02d}") for i in range(5000)],
    )
    conn.executemany(
        "INSERT INTO nodes (name, url, capacity, source, created_at, updated_at)"
        " VALUES (?, ?, 2, 'settings', ?, ?)",
        [(f"n{i:02d}", f"http://127.0.0.1:{9000 + i}", now, now) for i in range(NODES)],
    )
    _insert_pipelines(conn, now)


PIPELINES = 5000  # finished, of three steps each; every other one with a webhook and its delivery


def _insert_pipelines(conn: sqlite3.Connection, now: float) -> None:
    conn.executemany(
        "INSERT INTO pipelines (seq, id, owner, state, output, created_at, updated_at, finished_at, result_sha)"
        " VALUES (?, ?, ?, 'succeeded', '{\"fps\": 16}', ?, ?, ?, ?)",
        [(n + 1, f"p{n:09d}", key_id(n), now + n, now + n, now + n, "ab" * 32) for n in range(PIPELINES)],
    )
    conn.executemany(
        "INSERT INTO pipeline_steps (pipeline_id, n, scene, kind, task, params, inputs, needs, seconds, job_id)"
        " VALUES (?, ?, ?, 'clip', 't2v', '{}', '{}', '{}', 1.0, ?)",
        [(f"p{n:09d}", k, k, f"x{n:09d}{k}") for n in range(PIPELINES) for k in range(3)],
    )
    conn.executemany(
        "INSERT INTO pipeline_events (pipeline_id, at, state) VALUES (?, ?, 'succeeded')",
        [(f"p{n:09d}", now + n) for n in range(PIPELINES)],
    )
    hooked = range(0, PIPELINES, 2)
    conn.executemany(
        "INSERT INTO pipeline_webhooks VALUES (?, 'http://hooks.example/p', 'pipeline.succeeded', ?)",
        [(f"p{n:09d}", key_id(n)) for n in hooked],
    )
    conn.executemany(
        "INSERT INTO webhook_deliveries (id, event_id, type, pipeline_id, url, key_id, payload, created_at,"
        " attempts, delivered_at) VALUES (?, ?, 'pipeline.succeeded', ?, 'http://hooks.example/p', ?, '{}', ?, 1, ?)",
        [(f"msg_p{n}", n + 1, f"p{n:09d}", key_id(n), now + n, now + n) for n in hooked],
    )
    conn.execute("UPDATE webhook_cursor SET pipeline_event_id = ?", (PIPELINES,))


T = TypeVar("T")


def steps(conn: sqlite3.Connection, fn: Callable[[], T]) -> tuple[T, int]:
    """What `fn` returns, and the work SQLite did for it on `conn` in hundreds of VM
    instructions: a measure of cost that no clock or machine load changes."""
    ticks = 0

    def tick() -> int:
        nonlocal ticks
        ticks += 1
        return 0

    conn.set_progress_handler(tick, 100)
    try:
        return fn(), ticks
    finally:
        conn.set_progress_handler(None, 0)


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
