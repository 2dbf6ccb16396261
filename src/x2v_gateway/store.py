"""The job store: every job, its whole life, in one SQLite file.

A job row holds everything needed to resume after a crash: task type, parameters, input blob
references, the upstream it went to and the upstream task id, state, attempts, timestamps, error
and result. Writes go through one thread that owns the only writing connection (SQLite has one
writer anyway); reads run on a few reader threads, each with its own connection, which WAL lets
run beside the writer. The event loop never runs a query: it awaits them.

Every state change is a conditional UPDATE, so a finished job can never be moved again: a job
cancelled by its user stays cancelled even when its node later reports the task completed.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Concatenate, NamedTuple, ParamSpec, TypeVar

import msgspec
from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

T = TypeVar("T")
P = ParamSpec("P")

# Threads that read the store. One: what a read costs is mostly Python (rows into jobs, jobs into
# views), which holds the GIL, so more readers only fight the event loop for it. Measured with
# bench/burst.py (15 s at the full burst's rate): /healthz p99 52 ms with one reader, 1.3 s with
# two or four, and the API's own p50 75 ms against 0.8 s.
READER_THREADS = 1
# Queued jobs on one page above which their places come from one ranking of the whole queue.
_RANK_WHOLE_QUEUE_FROM = 32

QUEUED, SUBMITTED, RUNNING = "queued", "submitted", "running"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
STATES = (QUEUED, SUBMITTED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
ACTIVE = (SUBMITTED, RUNNING)  # handed to an upstream, not finished
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
_TERMINAL_SQL = "('succeeded', 'failed', 'cancelled')"


class Job(msgspec.Struct, kw_only=True):
    """One row of `jobs`, as the rest of the gateway sees it."""

    seq: int
    id: str
    task: str
    state: str
    params: dict[str, Any]
    inputs: dict[str, str]  # role (image | audio | last_frame) -> blob sha256
    upstream: str | None = None
    upstream_task_id: str | None = None
    run: int = 0  # how many times the user asked to retry
    attempts: int = 0  # submissions that may have reached an upstream
    priority: int = 0
    batch_id: str | None = None
    owner: str | None = None
    created_at: float
    updated_at: float
    submitted_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    result_sha: str | None = None
    result_meta: dict[str, Any] | None = None
    queue_info: dict[str, Any] | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    pinned: str | None = None  # the upstream the user asked for, if any
    cancel_pending: bool = False
    files_expired: bool = False

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before for a different request."""


_JSON_COLUMNS = ("params", "inputs", "result_meta", "queue_info")
_BOOL_COLUMNS = ("cancel_pending", "files_expired")

migrations = Migrations("x2v_gateway")


@migrations()
def m001_jobs(db: Database) -> None:
    db["jobs"].create(
        {
            "seq": int, "id": str, "task": str, "state": str, "params": str, "inputs": str,
            "upstream": str, "upstream_task_id": str, "run": int, "attempts": int,
            "priority": int, "batch_id": str, "owner": str,
            "created_at": float, "updated_at": float, "submitted_at": float,
            "started_at": float, "finished_at": float, "error": str,
            "result_sha": str, "result_meta": str, "queue_info": str,
            "idempotency_key": str, "request_hash": str, "pinned": str,
            "cancel_pending": int, "files_expired": int,
        },
        pk="seq",
        not_null={"id", "task", "state", "params", "inputs", "created_at", "updated_at"},
        defaults={"run": 0, "attempts": 0, "priority": 0, "cancel_pending": 0, "files_expired": 0},
    )
    db["jobs"].create_index(["id"], unique=True)
    db["jobs"].create_index(["idempotency_key"], unique=True)
    # The dispatcher's hot query: the next queued jobs, by priority then age.
    db.execute("CREATE INDEX idx_jobs_queue ON jobs (state, priority DESC, seq)")
    db["jobs"].create_index(["upstream", "state"])
    db["jobs"].create_index(["batch_id", "seq"])
    db["jobs"].create_index(["finished_at"])
    db["blobs"].create(
        {"sha256": str, "size": int, "kind": str, "created_at": float}, pk="sha256"
    )
    db["job_events"].create(
        {"id": int, "job_id": str, "at": float, "state": str, "detail": str}, pk="id"
    )
    db["job_events"].create_index(["job_id", "id"])


@migrations()
def m002_dashboard_batches(db: Database) -> None:
    # A batch made in the dashboard: its name and the form it came from, and for each of its
    # jobs the file names the user dropped (the jobs themselves only know blob hashes).
    db["batches"].create(
        {"id": str, "name": str, "task": str, "mode": str, "owner": str, "created_at": float,
         "form": str},
        pk="id", not_null={"created_at"},
    )
    db["batches"].create_index(["created_at"])
    db["batch_jobs"].create(
        {"job_id": str, "batch_id": str, "position": int, "files": str, "retry_of": str},
        pk="job_id", not_null={"batch_id", "position", "files"},
    )
    db["batch_jobs"].create_index(["batch_id", "position"])
    # Partial: almost every row has no retry_of, and a full index on it looks useless to the
    # query planner (after ANALYZE it scans the table instead, for each row of a batch page).
    db.execute("CREATE INDEX idx_batch_jobs_retry_of ON batch_jobs (retry_of) WHERE retry_of IS NOT NULL")
    # The dashboard's reads: counts of one batch by state (covered by this index, so a batch
    # of 10,000 jobs is counted without touching its rows), and the jobs list filtered by state
    # or task, newest first, which otherwise walks every row to find a rare state.
    db.execute("CREATE INDEX idx_jobs_batch_state ON jobs (batch_id, state)")
    db.execute("CREATE INDEX idx_jobs_state_seq ON jobs (state, seq)")
    db.execute("CREATE INDEX idx_jobs_task_seq ON jobs (task, seq)")


@migrations()
def m003_nodes(db: Database) -> None:
    # The node registry: nodes from X2V_NODES are copied here at start; nodes added, drained or
    # removed through the admin API live only here. `removed` keeps a settings node removed
    # across restarts; `source` says who decides its URL ("settings" or "api").
    db["nodes"].create(
        {"name": str, "url": str, "capacity": int, "tasks": str, "drained": int, "removed": int,
         "source": str, "created_at": float, "updated_at": float},
        pk="name", not_null={"created_at", "updated_at"},
        defaults={"capacity": 1, "drained": 0, "removed": 0},
    )
    # Tasks a job was moved away from while its node could not be told: each is cancelled on
    # that node when it answers again, so a moved job never runs there as well.
    db["stray_tasks"].create(
        {"node": str, "task_id": str, "job_id": str, "created_at": float},
        pk=("node", "task_id"),
    )
    # Fair dispatch walks the queue lane by lane (task, priority, owner, batch), skipping from
    # one lane to the next through this index instead of reading every queued row.
    db.execute(
        "CREATE INDEX idx_jobs_lanes ON jobs"
        " (state, task, priority, coalesce(owner, ''), coalesce(batch_id, ''), seq)"
    )
    # Every node's follow loop asks for unsent cancels; without this, each ask reads every job.
    db.execute("CREATE INDEX idx_jobs_cancel_pending ON jobs (cancel_pending) WHERE cancel_pending = 1")


@migrations()
def m010_keys(db: Database) -> None:
    # API keys. Only the sha256 of a key is kept: a generated key holds 256 random bits, so a
    # plain hash cannot be reversed or guessed and needs no salt or slow hash. `prefix` (the
    # first characters of a generated key) lets a person tell keys apart in `keys list`.
    db["api_keys"].create(
        {"id": str, "name": str, "key_hash": str, "prefix": str, "admin": int,
         "daily_quota": int, "max_concurrent": int, "rate_per_min": float, "source": str,
         "created_at": float, "created_by": str, "revoked_at": float, "revoked_by": str},
        pk="id", not_null={"name", "key_hash", "created_at"}, defaults={"admin": 0},
    )
    db["api_keys"].create_index(["key_hash"], unique=True)
    # Dashboard sign-ins: the cookie's sha256, the key it acts for, its CSRF token.
    db["sessions"].create(
        {"id_hash": str, "key_id": str, "csrf": str, "created_at": float, "expires_at": float},
        pk="id_hash", not_null={"key_id", "csrf", "expires_at"},
    )
    db["sessions"].create_index(["key_id"])
    # Jobs accepted per key and UTC day, for daily quotas (retries of a job count too).
    db["key_usage"].create({"key_id": str, "day": str, "jobs": int}, pk=("key_id", "day"))
    db["audit"].create(
        {"id": int, "at": float, "actor": str, "action": str, "target": str, "detail": str},
        pk="id", not_null={"at", "actor", "action"},
    )
    # A key's own jobs, newest first, without reading everyone else's.
    db.execute("CREATE INDEX idx_jobs_owner_seq ON jobs (owner, seq)")


@migrations()
def m020_hot_path_indexes(db: Database) -> None:
    # The jobs handed to an upstream: read once per node per poll tick, per dispatch round and
    # per look at a queued job. Partial, so they hold only those few rows, however many finished
    # jobs the store keeps (without them each read walked the whole table).
    db.execute("CREATE INDEX idx_jobs_inflight ON jobs (seq) WHERE state IN ('submitted', 'running')")
    db.execute(
        "CREATE INDEX idx_jobs_inflight_upstream ON jobs (upstream, seq)"
        " WHERE state IN ('submitted', 'running')"
    )
    # Jobs by owner and state, kept by triggers: the dashboard's and /metrics' counts are then a
    # read of a few rows instead of a count of a million (owner '' for jobs without one).
    db.execute(
        "CREATE TABLE job_counts (owner TEXT NOT NULL, state TEXT NOT NULL, n INTEGER NOT NULL,"
        " PRIMARY KEY (owner, state)) WITHOUT ROWID"
    )
    db.execute(
        "INSERT INTO job_counts SELECT coalesce(owner, ''), state, count(*) FROM jobs GROUP BY 1, 2"
    )
    add = (
        "INSERT INTO job_counts VALUES (coalesce(new.owner, ''), new.state, 1)"
        " ON CONFLICT (owner, state) DO UPDATE SET n = n + 1;"
    )
    remove = "UPDATE job_counts SET n = n - 1 WHERE owner = coalesce(old.owner, '') AND state = old.state;"
    db.execute(f"CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs BEGIN {add} END")
    db.execute(f"CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs BEGIN {remove} END")
    db.execute(
        "CREATE TRIGGER jobs_count_update AFTER UPDATE OF state, owner ON jobs"
        f" WHEN old.state IS NOT new.state OR old.owner IS NOT new.owner BEGIN {remove} {add} END"
    )


# Queued jobs are counted in blocks of this many `seq`s (see m021_queue_blocks).
QUEUE_BLOCK_SEQS = 1024


@migrations()
def m021_queue_blocks(db: Database) -> None:
    # A queued job's place in the queue is asked on every GET of it. Counting the jobs ahead of
    # it in the queue index walks one index entry per job ahead: 0.56 ms half-way down a queue
    # of 10,000, 5 ms at 100,000. Queued jobs counted per (priority, block of 1024 seqs), kept by
    # triggers, make it a sum over the blocks ahead plus a count inside its own block, at most
    # 1024 entries however long the queue. Empty blocks are dropped, so the blocks ahead are
    # never more than the queued jobs (and usually ~1/1000 of them).
    db.execute(
        "CREATE TABLE queue_blocks (priority INTEGER NOT NULL, block INTEGER NOT NULL,"
        " n INTEGER NOT NULL, PRIMARY KEY (priority, block)) WITHOUT ROWID"
    )
    db.execute(
        f"INSERT INTO queue_blocks SELECT priority, seq / {QUEUE_BLOCK_SEQS}, count(*) FROM jobs"
        " WHERE state = 'queued' GROUP BY 1, 2"
    )
    add = (
        f"INSERT INTO queue_blocks VALUES (new.priority, new.seq / {QUEUE_BLOCK_SEQS}, 1)"
        " ON CONFLICT (priority, block) DO UPDATE SET n = n + 1;"
    )
    where = f"priority = old.priority AND block = old.seq / {QUEUE_BLOCK_SEQS}"
    remove = f"UPDATE queue_blocks SET n = n - 1 WHERE {where}; DELETE FROM queue_blocks WHERE {where} AND n <= 0;"
    db.execute(f"CREATE TRIGGER jobs_queue_insert AFTER INSERT ON jobs WHEN new.state = 'queued' BEGIN {add} END")
    db.execute(f"CREATE TRIGGER jobs_queue_delete AFTER DELETE ON jobs WHEN old.state = 'queued' BEGIN {remove} END")
    db.execute(
        "CREATE TRIGGER jobs_queue_leave AFTER UPDATE OF state, priority ON jobs"
        f" WHEN old.state = 'queued' AND (new.state IS NOT 'queued' OR new.priority IS NOT old.priority)"
        f" BEGIN {remove} END"
    )
    db.execute(
        "CREATE TRIGGER jobs_queue_enter AFTER UPDATE OF state, priority ON jobs"
        f" WHEN new.state = 'queued' AND (old.state IS NOT 'queued' OR new.priority IS NOT old.priority)"
        f" BEGIN {add} END"
    )


class BatchJobSpec(msgspec.Struct, kw_only=True):
    """One job to create in a batch, from inputs already in the blob store."""

    task: str
    params: dict[str, Any]
    inputs: dict[str, str]  # role -> blob sha256
    files: dict[str, str]  # role -> the file name the user gave it
    priority: int = 0
    retry_of: str | None = None


class BatchItem(msgspec.Struct):
    """A job of a batch, with its place in the batch and its files' names (empty for jobs
    that came through the API with a `batch_id`)."""

    job: Job
    position: int | None
    files: dict[str, str]
    retry_of: str | None
    retried_as: str | None = None


def _now() -> float:
    return time.time()


def new_job_id() -> str:
    # Lower-case base32: safe as an upstream task id and as a file name on the node.
    return "j" + base64.b32encode(secrets.token_bytes(10)).decode().lower()


class Memo:
    """A bounded map for values that are costly to build and never change once built, such as a
    finished job's `Job` and view: list pages show the same finished jobs again and again.
    Thread-safe (reader threads and the event loop share it); the oldest entry goes first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: dict[Any, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        return self._items.get(key)

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            if len(self._items) > self.size:
                del self._items[next(iter(self._items))]


# Finished jobs by their whole row: any change to any column is a new key.
_FINISHED_JOBS = Memo(10_000)


def _row_to_job(row: sqlite3.Row | dict[str, Any]) -> Job:
    finished = row["state"] in TERMINAL
    key = tuple(row.values()) if isinstance(row, dict) else tuple(row)
    if finished and (job := _FINISHED_JOBS.get(key)) is not None:
        return job
    data = dict(row)
    for column in _JSON_COLUMNS:
        if data[column] is not None:
            data[column] = json.loads(data[column])
    for column in _BOOL_COLUMNS:
        data[column] = bool(data[column])
    job = Job(**data)
    if finished:
        _FINISHED_JOBS.put(key, job)
    return job


def _connect(path: Path) -> sqlite3.Connection:
    # Each connection is used by the one thread that made it (`JobStore._conn`); only `close`
    # touches it from another, once every thread is done.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    # Readers and the writer wait for each other a little instead of failing at once.
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


class Reads:
    """The store's reads, on one connection.

    JobStore runs each on a reader thread (`await store.get(job_id)`); `await store.read(fn)` runs
    several in one hop (`store.read(lambda r: (r.get(job_id), r.events(job_id)))`), and the writer
    uses them inside its transactions (`Reads(conn)`).
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def get(self, job_id: str) -> Job | None:
        row = self.conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _row_to_job(row) if row else None

    def jobs_by_id(self, ids: list[str]) -> list[Job]:
        """These jobs, oldest first."""
        jobs: list[Job] = []
        for start in range(0, len(ids), 500):  # SQLite's limit on bound parameters
            chunk = ids[start:start + 500]
            rows = self.conn.execute(
                f"SELECT * FROM jobs WHERE id IN ({','.join('?' * len(chunk))}) ORDER BY seq", chunk
            )
            jobs += [_row_to_job(r) for r in rows]
        return jobs

    def list_jobs(
        self,
        *,
        states: Iterable[str] = (),
        batch_id: str | None = None,
        task: str | None = None,
        owner: str | None = None,
        before_seq: int | None = None,
        limit: int = 50,
    ) -> list[Job]:
        """Newest first; `before_seq` is the cursor (the `seq` of the last job of the previous page)."""
        where, args = [], []
        states = list(states)
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args += states
        for column, value in (("batch_id", batch_id), ("task", task), ("owner", owner)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        # Always bounded, so that SQLite seeks to the newest rows rather than scanning for them.
        where.append("seq < ?")
        args.append(_AFTER_NEWEST if before_seq is None else before_seq)
        sql = "SELECT * FROM jobs WHERE " + " AND ".join(where) + " ORDER BY seq DESC LIMIT ?"
        rows = self.conn.execute(sql, (*args, limit)).fetchall()
        return [_row_to_job(r) for r in rows]

    def active(self, upstream: str | None = None) -> list[Job]:
        """Jobs handed to an upstream and not finished (optionally: to this one)."""
        sql = "SELECT * FROM jobs WHERE state IN ('submitted', 'running')"
        args: tuple = ()
        if upstream is not None:
            sql += " AND upstream = ?"
            args = (upstream,)
        return [_row_to_job(r) for r in self.conn.execute(sql + " ORDER BY seq", args)]

    def inflight_counts(self) -> dict[str, int]:
        """Jobs handed to each upstream and not finished."""
        rows = self.conn.execute(
            "SELECT upstream, count(*) FROM jobs WHERE state IN ('submitted', 'running')"
            " GROUP BY upstream"
        )
        return dict(rows.fetchall())

    def cancel_pending(self) -> list[Job]:
        """Cancelled jobs whose upstream task has not been told to stop yet."""
        rows = self.conn.execute("SELECT * FROM jobs WHERE cancel_pending = 1").fetchall()
        return [_row_to_job(r) for r in rows]

    def counts_by_state(self) -> dict[str, int]:
        return self.owner_counts(None)

    def queue_position(self, job: Job) -> int | None:
        """1-based place of a queued job in the gateway's own queue."""
        if job.state != QUEUED:
            return None
        # The blocks of higher priority, the blocks of its priority before its own, then the
        # jobs ahead of it in its own block: at most QUEUE_BLOCK_SEQS entries of the queue index.
        block = job.seq // QUEUE_BLOCK_SEQS
        (ahead,) = self.conn.execute(
            "SELECT coalesce((SELECT sum(n) FROM queue_blocks WHERE priority > :p), 0)"
            " + coalesce((SELECT sum(n) FROM queue_blocks WHERE priority = :p AND block < :b), 0)"
            " + (SELECT count(*) FROM jobs WHERE state = 'queued' AND priority = :p"
            "    AND seq >= :first AND seq < :seq)",
            {"p": job.priority, "b": block, "first": block * QUEUE_BLOCK_SEQS, "seq": job.seq},
        ).fetchone()
        return ahead + 1

    def events(self, job_id: str) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT at, state, detail FROM job_events WHERE job_id = ? ORDER BY id", (job_id,)
        )
        return [dict(r) for r in rows]

    def blob(self, sha256: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM blobs WHERE sha256 = ?", (sha256,)).fetchone()
        return dict(row) if row else None

    _ITEM_SQL = (
        "SELECT jobs.*, bj.position AS bj_position, bj.files AS bj_files,"
        " bj.retry_of AS bj_retry_of,"
        " (SELECT r.job_id FROM batch_jobs r WHERE r.retry_of = jobs.id"
        "  ORDER BY r.position DESC LIMIT 1) AS bj_retried_as"
        " FROM jobs LEFT JOIN batch_jobs bj ON bj.job_id = jobs.id"
    )

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        """A batch made in the dashboard (API batches have no row here, only a `batch_id`)."""
        row = self.conn.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
        if row is None:
            return None
        data = dict(row)
        data["form"] = json.loads(data["form"]) if data["form"] else {}
        return data

    def recent_batch_ids(self, limit: int = 20, window: int = 5000, owner: str | None = None) -> list[str]:
        """Batches (made in the dashboard or through the API) with a job among the last
        `window` jobs (of `owner`, if given), the most recently active first. Bounded: it never
        reads more rows than the window, however many jobs the store holds."""
        if owner is None:
            sql, args = "SELECT batch_id, seq FROM jobs WHERE seq < ? ORDER BY seq DESC LIMIT ?", (_AFTER_NEWEST, window)
        else:
            sql, args = "SELECT batch_id, seq FROM jobs WHERE owner = ? ORDER BY seq DESC LIMIT ?", (owner, window)
        rows = self.conn.execute(
            f"SELECT batch_id, max(seq) AS last FROM ({sql}) WHERE batch_id IS NOT NULL"
            " GROUP BY batch_id ORDER BY last DESC LIMIT ?",
            (*args, limit),
        )
        return [r[0] for r in rows]

    def owner_counts(self, owner: str | None) -> dict[str, int]:
        """Jobs by state: all of them, or one owner's (from `job_counts`, kept by triggers)."""
        sql, args = "SELECT state, sum(n) FROM job_counts", ()
        if owner is not None:
            sql, args = sql + " WHERE owner = ?", (owner,)
        counts = dict.fromkeys(STATES, 0)
        for state, n in self.conn.execute(sql + " GROUP BY state", args):
            counts[state] = n
        return counts

    def batch_counts(self, batch_id: str, owner: str | None = None) -> dict[str, int]:
        """A batch's jobs by state (only `owner`'s, if given: a batch id is not unique across keys)."""
        sql, args = "SELECT state, count(*) FROM jobs WHERE batch_id = ?", [batch_id]
        if owner is not None:
            sql += " AND owner = ?"
            args.append(owner)
        counts = dict.fromkeys(STATES, 0)
        for state, n in self.conn.execute(sql + " GROUP BY state", args):
            counts[state] = n
        return counts

    def batch_created_at(self, batch_id: str, owner: str | None = None) -> float | None:
        """When the batch's first job was accepted."""
        sql, args = "SELECT created_at FROM jobs WHERE batch_id = ?", [batch_id]
        if owner is not None:
            sql += " AND owner = ?"
            args.append(owner)
        row = self.conn.execute(sql + " ORDER BY seq LIMIT 1", args).fetchone()
        return row[0] if row else None

    def batch_items(
        self, batch_id: str, *, after_seq: int = 0, limit: int = 200, owner: str | None = None,
    ) -> list[BatchItem]:
        """A batch's jobs (`owner`'s, if given) in the order they were made; `after_seq` is the cursor."""
        sql, args = self._ITEM_SQL + " WHERE jobs.batch_id = ? AND jobs.seq > ?", [batch_id, after_seq]
        if owner is not None:
            sql += " AND jobs.owner = ?"
            args.append(owner)
        rows = self.conn.execute(sql + " ORDER BY jobs.seq LIMIT ?", (*args, limit)).fetchall()
        return [_row_to_item(r) for r in rows]

    def batch_item(self, job_id: str) -> BatchItem | None:
        row = self.conn.execute(self._ITEM_SQL + " WHERE jobs.id = ?", (job_id,)).fetchone()
        return _row_to_item(row) if row else None

    def blob_sizes(self, shas: Iterable[str]) -> dict[str, int]:
        shas = list(shas)
        if not shas:
            return {}
        rows = self.conn.execute(
            f"SELECT sha256, size FROM blobs WHERE sha256 IN ({','.join('?' * len(shas))})", shas
        )
        return dict(rows.fetchall())

    def queue_positions(self, jobs: Iterable[Job]) -> dict[str, int]:
        """1-based places in the gateway's queue of the queued jobs among `jobs`."""
        queued = [job for job in jobs if job.state == QUEUED]
        if len(queued) <= _RANK_WHOLE_QUEUE_FROM:
            # One block count per queued job on the page (at most 1024 index entries each): a
            # page of 50 at 10,000 queued costs 2.3 ms where ranking the whole queue in one pass
            # cost 14 ms, and it does not grow with the queue.
            return {job.id: self.queue_position(job) for job in queued}
        # A page of hundreds of queued jobs: one pass over the queue index costs less than a
        # block count each (a 500-job page during a burst spent ~25 ms on those).
        seqs = {job.seq: job.id for job in queued}
        rows = self.conn.execute(
            "SELECT seq, pos FROM (SELECT seq, row_number() OVER (ORDER BY priority DESC, seq)"
            " AS pos FROM jobs WHERE state = 'queued')"
            f" WHERE seq IN ({','.join('?' * len(seqs))})",
            tuple(seqs),
        )
        return {seqs[seq]: pos for seq, pos in rows}

    def nodes(self) -> list[dict[str, Any]]:
        """Every row of the node registry, removed ones included."""
        rows = self.conn.execute("SELECT * FROM nodes ORDER BY created_at, name").fetchall()
        nodes = []
        for row in rows:
            node = dict(row)
            node["tasks"] = json.loads(node["tasks"]) if node["tasks"] else None
            node["drained"], node["removed"] = bool(node["drained"]), bool(node["removed"])
            nodes.append(node)
        return nodes

    def count_pinned(self, upstream: str) -> int:
        """Queued jobs that only this upstream may run."""
        (n,) = self.conn.execute(
            "SELECT count(*) FROM jobs WHERE state = 'queued' AND pinned = ?", (upstream,)
        ).fetchone()
        return n

    def queue_lanes(self, tasks: Iterable[str], *, batches_per_owner: int = 64) -> list[Lane]:
        """The queue's lanes for these task types: one per (task, priority, owner, batch), each
        with the `seq` of its oldest job.

        The lane index is walked with one seek per lane (skip-scan), so 50,000 queued jobs in a
        few lanes cost a few dozen index lookups, not a read of every row. An owner with more
        batches than `batches_per_owner` at one priority is counted in a single grouped pass
        instead, which costs at most one read of that owner's queued jobs.
        """
        conn = self.conn
        lanes: list[Lane] = []
        for task in tasks:
            for priority in _distinct(conn, "priority", "task = ?", (task,)):
                where, args = "task = ? AND priority = ?", (task, priority)
                for owner in _distinct(conn, _OWNER_KEY, where, args):
                    found = _skip_batches(
                        conn, (*args, owner), batches_per_owner + 1
                    )
                    if len(found) > batches_per_owner:
                        found = conn.execute(
                            f"SELECT {_BATCH_KEY}, min(seq) FROM jobs WHERE state = 'queued'"
                            f" AND {where} AND {_OWNER_KEY} = ? GROUP BY {_BATCH_KEY}",
                            (*args, owner),
                        ).fetchall()
                    lanes += [Lane(task, priority, owner, batch, seq) for batch, seq in found]
        return lanes

    def lane_jobs(self, lane: Lane, after_seq: int, limit: int) -> list[Job]:
        """Queued jobs of one lane, oldest first, after `after_seq`."""
        rows = self.conn.execute(
            f"SELECT * FROM jobs WHERE state = 'queued' AND task = ? AND priority = ?"
            f" AND {_OWNER_KEY} = ? AND {_BATCH_KEY} = ? AND seq > ? ORDER BY seq LIMIT ?",
            (lane.task, lane.priority, lane.owner, lane.batch, after_seq, limit),
        ).fetchall()
        return [_row_to_job(r) for r in rows]

    def lane_heads(self, lane: Lane, after_seq: int, limit: int) -> list[QueuedJob]:
        """`lane_jobs` in the few columns a dispatch round weighs (no JSON): a round at a start
        places thousands of jobs, and building each whole `Job` cost more than the placing."""
        rows = self.conn.execute(
            f"SELECT id, seq, task, pinned FROM jobs WHERE state = 'queued' AND task = ? AND priority = ?"
            f" AND {_OWNER_KEY} = ? AND {_BATCH_KEY} = ? AND seq > ? ORDER BY seq LIMIT ?",
            (lane.task, lane.priority, lane.owner, lane.batch, after_seq, limit),
        )
        return [QueuedJob(*row) for row in rows]

    def inflight(self) -> list[Inflight]:
        """Every job handed to an upstream and not finished, in a few columns (no JSON)."""
        rows = self.conn.execute(
            f"SELECT id, upstream, task, state, {_OWNER_KEY}, {_BATCH_KEY}, submitted_at,"
            " started_at FROM jobs WHERE state IN ('submitted', 'running') ORDER BY seq"
        )
        return [Inflight(*row) for row in rows]

    def recent_run_times(self, limit: int = 5000) -> list[tuple[str, str, float]]:
        """(upstream, task, seconds from started to finished) of the latest successes."""
        rows = self.conn.execute(
            "SELECT upstream, task, finished_at - started_at FROM jobs WHERE finished_at IS NOT NULL"
            " AND state = 'succeeded' AND started_at IS NOT NULL AND upstream IS NOT NULL"
            " ORDER BY finished_at DESC LIMIT ?",
            (limit,),
        )
        return rows.fetchall()

    def stray_tasks(self, node: str) -> list[str]:
        rows = self.conn.execute(
            "SELECT task_id FROM stray_tasks WHERE node = ? ORDER BY created_at", (node,)
        )
        return [task_id for (task_id,) in rows]

    def key_by_hash(self, key_hash: str) -> dict[str, Any] | None:
        """The key with this hash, revoked or not."""
        row = self.conn.execute("SELECT * FROM api_keys WHERE key_hash = ?", (key_hash,)).fetchone()
        return _key_row(row) if row else None

    def key(self, key_id: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return _key_row(row) if row else None

    def keys(self) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM api_keys ORDER BY created_at").fetchall()
        return [_key_row(r) for r in rows]

    def session(self, id_hash: str) -> tuple[dict[str, Any], str, float] | None:
        """(the key, the CSRF token, when it expires) of a session that has not expired, of a
        key not revoked."""
        row = self.conn.execute(
            "SELECT k.*, s.csrf AS session_csrf, s.expires_at AS session_expires_at"
            " FROM sessions s JOIN api_keys k ON k.id = s.key_id"
            " WHERE s.id_hash = ? AND s.expires_at > ? AND k.revoked_at IS NULL",
            (id_hash, _now()),
        ).fetchone()
        if row is None:
            return None
        data = dict(row)
        csrf, expires_at = data.pop("session_csrf"), data.pop("session_expires_at")
        return _key_row(data), csrf, expires_at

    def jobs_used(self, key_id: str, day: str) -> int:
        row = self.conn.execute(
            "SELECT jobs FROM key_usage WHERE key_id = ? AND day = ?", (key_id, day)
        ).fetchone()
        return row[0] if row else 0

    def concurrency_limits(self) -> dict[str, int]:
        """Owner (key id) -> most of its jobs on upstreams at once, for keys that have a limit."""
        rows = self.conn.execute(
            "SELECT id, max_concurrent FROM api_keys WHERE max_concurrent IS NOT NULL"
            " AND revoked_at IS NULL"
        )
        return dict(rows.fetchall())

    def audit_log(self, limit: int = 100, before_id: int | None = None) -> list[dict[str, Any]]:
        """Audit entries, newest first; `before_id` is the cursor."""
        sql, args = "SELECT * FROM audit", []
        if before_id is not None:
            sql += " WHERE id < ?"
            args.append(before_id)
        rows = self.conn.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit))
        return [dict(r) for r in rows]


def _off_loop(read: Callable[Concatenate[Reads, P], T]) -> Callable[Concatenate[JobStore, P], Awaitable[T]]:
    """`Reads.x` as `JobStore.x`: the same read, awaited, run on a reader thread."""

    @functools.wraps(read)
    async def run(store: JobStore, *args: P.args, **kwargs: P.kwargs) -> T:
        return await store.read(lambda reads: read(reads, *args, **kwargs))

    return run


class JobStore:
    """Jobs in SQLite, never read or written on the event loop.

    Every method is a coroutine. Writes run on one writer thread (SQLite has one writer anyway);
    reads on a few reader threads, each with its own connection, which WAL lets run beside the
    writer. A read of a 500-job page or a scan gone wrong then costs the loop nothing but the
    hand-off, and `/healthz` answers while it runs.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        db = Database(path)
        db.enable_wal()
        migrations.apply(db)
        db.close()
        self._local = threading.local()
        # Every connection, by the thread (name, id) it belongs to.
        self._conns: dict[tuple[str, int], sqlite3.Connection] = {}
        self._conns_lock = threading.Lock()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="x2v-store-writer")
        self._readers = ThreadPoolExecutor(max_workers=READER_THREADS, thread_name_prefix="x2v-store-reader")

    # -- plumbing -------------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (each reader thread, the writer, a test's own thread)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _connect(self.path)
            # WAL with synchronous=NORMAL is durable across a process crash (SIGKILL), which
            # is the failure the gateway is built to survive; only a power loss can drop the
            # last commits.
            conn.execute("PRAGMA synchronous = NORMAL")
            with self._conns_lock:
                self._conns[(threading.current_thread().name, threading.get_ident())] = conn
        return conn

    def read_blocking(self, fn: Callable[[Reads], T]) -> T:
        """Run `fn` on the calling thread. Only where no event loop serves requests: building
        the gateway before it starts, the command line."""
        return fn(Reads(self._conn()))

    async def read(self, fn: Callable[[Reads], T]) -> T:
        """Run `fn` on a reader thread: several reads (and the work on their rows) in one hop."""
        return await asyncio.get_running_loop().run_in_executor(
            self._readers, lambda: fn(Reads(self._conn()))
        )

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        return await asyncio.get_running_loop().run_in_executor(self._writer, run)

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        with self._conns_lock:
            conns, self._conns = self._conns, {}
        for conn in conns.values():
            conn.close()
        self._local = threading.local()

    async def is_writable(self) -> bool:
        """A cheap check for /readyz: can this process write to the store right now.

        Asked on the writer thread: taking the write lock waits up to the busy timeout (5 s)
        while another writer holds it, which must not stall the event loop.
        """
        try:
            await self._write(lambda conn: None)
            return True
        except sqlite3.Error:
            return False

    # -- reads ----------------------------------------------------------------------------------

    get = _off_loop(Reads.get)
    list_jobs = _off_loop(Reads.list_jobs)
    active = _off_loop(Reads.active)
    inflight_counts = _off_loop(Reads.inflight_counts)
    cancel_pending = _off_loop(Reads.cancel_pending)
    counts_by_state = _off_loop(Reads.counts_by_state)
    queue_position = _off_loop(Reads.queue_position)
    events = _off_loop(Reads.events)
    blob = _off_loop(Reads.blob)
    batch = _off_loop(Reads.batch)
    recent_batch_ids = _off_loop(Reads.recent_batch_ids)
    owner_counts = _off_loop(Reads.owner_counts)
    batch_counts = _off_loop(Reads.batch_counts)
    batch_created_at = _off_loop(Reads.batch_created_at)
    batch_items = _off_loop(Reads.batch_items)
    batch_item = _off_loop(Reads.batch_item)
    blob_sizes = _off_loop(Reads.blob_sizes)
    queue_positions = _off_loop(Reads.queue_positions)
    nodes = _off_loop(Reads.nodes)
    count_pinned = _off_loop(Reads.count_pinned)
    queue_lanes = _off_loop(Reads.queue_lanes)
    lane_jobs = _off_loop(Reads.lane_jobs)
    inflight = _off_loop(Reads.inflight)
    recent_run_times = _off_loop(Reads.recent_run_times)
    stray_tasks = _off_loop(Reads.stray_tasks)
    key_by_hash = _off_loop(Reads.key_by_hash)
    keys = _off_loop(Reads.keys)
    session = _off_loop(Reads.session)
    jobs_used = _off_loop(Reads.jobs_used)
    concurrency_limits = _off_loop(Reads.concurrency_limits)
    audit_log = _off_loop(Reads.audit_log)
    # -- writes ---------------------------------------------------------------------------------

    async def record_blob(self, sha256: str, size: int, kind: str) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR IGNORE INTO blobs (sha256, size, kind, created_at) VALUES (?, ?, ?, ?)",
                (sha256, size, kind, _now()),
            )

        await self._write(write)

    async def create_job(
        self,
        *,
        task: str,
        params: dict[str, Any],
        inputs: dict[str, str],
        priority: int = 0,
        batch_id: str | None = None,
        owner: str | None = None,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        pinned: str | None = None,
    ) -> tuple[Job, bool]:
        """Insert a queued job; with an Idempotency-Key already used, return that job instead.

        Returns (job, created). Raises IdempotencyConflict when the key came with another request.
        """
        job_id = new_job_id()

        def write(conn: sqlite3.Connection) -> tuple[str, bool]:
            if idempotency_key is not None:
                row = conn.execute(
                    "SELECT id, request_hash FROM jobs WHERE idempotency_key = ?",
                    (idempotency_key,),
                ).fetchone()
                if row is not None:
                    if row["request_hash"] != request_hash:
                        raise IdempotencyConflict(idempotency_key)
                    return row["id"], False
            now = _now()
            conn.execute(
                "INSERT INTO jobs (id, task, state, params, inputs, priority, batch_id, owner,"
                " created_at, updated_at, idempotency_key, request_hash, pinned)"
                " VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, task, json.dumps(params), json.dumps(inputs), priority, batch_id,
                 owner, now, now, idempotency_key, request_hash, pinned),
            )
            _event(conn, job_id, QUEUED, "accepted")
            return job_id, True

        found_id, created = await self._write(write)
        job = await self.get(found_id)
        assert job is not None
        return job, created

    async def claim(self, job_id: str, upstream: str, task_id: str) -> bool:
        """Record a submission attempt *before* it is sent: queued -> submitted on `upstream`.

        Because the record comes first, a crash at any later point leaves a row that says where
        the job may be, and the restart asks that upstream before anything is sent again.
        """

        def write(conn: sqlite3.Connection) -> bool:
            now = _now()
            return _transition(
                conn, (job_id, SUBMITTED, f"sent to {upstream}"),
                "UPDATE jobs SET state = 'submitted', upstream = ?, upstream_task_id = ?,"
                " attempts = attempts + 1, submitted_at = ?, updated_at = ?, queue_info = NULL"
                " WHERE id = ? AND state = 'queued'",
                (upstream, task_id, now, now, job_id),
            )

        return await self._write(write)

    async def set_upstream_task_id(self, job_id: str, task_id: str, *, run: int | None = None) -> bool:
        """Record the upstream's id of the job's task (also for a job cancelled meanwhile: its
        pending cancel needs it). With `run`, only if the job is still on that run: a retry
        sent while the attempt was in flight must not get the old attempt's task."""

        def write(conn: sqlite3.Connection) -> bool:
            return conn.execute(
                "UPDATE jobs SET upstream_task_id = ?, updated_at = ? WHERE id = ? AND run = coalesce(?, run)",
                (task_id, _now(), job_id, run),
            ).rowcount == 1

        return await self._write(write)

    async def requeue(self, job_id: str, reason: str, *, sent: bool = True) -> bool:
        """Back to the gateway's queue (node full, node forgot the task, node gone).

        `sent=False` when the upstream certainly did not take the attempt (back-pressure), so it
        does not count as one.
        """

        def write(conn: sqlite3.Connection) -> bool:
            return _transition(
                conn, (job_id, QUEUED, reason),
                "UPDATE jobs SET state = 'queued', upstream = NULL, started_at = NULL,"
                " attempts = attempts - ?, updated_at = ? WHERE id = ? AND state IN ('submitted', 'running')",
                (0 if sent else 1, _now(), job_id),
            )

        return await self._write(write)

    async def mark_running(self, job_id: str, started_at: float | None = None) -> bool:
        """A submitted job runs; `started_at` when the upstream says when it began (else now)."""

        def write(conn: sqlite3.Connection) -> bool:
            now = _now()
            return _transition(
                conn, (job_id, RUNNING, "started"),
                "UPDATE jobs SET state = 'running', started_at = ?, updated_at = ?, queue_info = NULL"
                " WHERE id = ? AND state = 'submitted'",
                (started_at or now, now, job_id),
            )

        return await self._write(write)

    async def set_queue_info(self, updates: dict[str, dict[str, Any] | None]) -> None:
        """Upstream queue position / estimates for jobs not finished, in one transaction."""

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany(
                f"UPDATE jobs SET queue_info = ? WHERE id = ? AND state NOT IN {_TERMINAL_SQL}",
                [(json.dumps(v) if v is not None else None, k) for k, v in updates.items()],
            )

        await self._write(write)

    async def succeed(self, job_id: str, result_sha: str, result_meta: dict[str, Any]) -> bool:
        return await self._finish(job_id, SUCCEEDED, result_sha=result_sha, result_meta=result_meta)

    async def fail(self, job_id: str, error: str) -> bool:
        return await self._finish(job_id, FAILED, error=error)

    async def _finish(
        self,
        job_id: str,
        state: str,
        *,
        error: str | None = None,
        result_sha: str | None = None,
        result_meta: dict[str, Any] | None = None,
    ) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            now = _now()
            return _transition(
                conn, (job_id, state, error or ""),
                "UPDATE jobs SET state = ?, error = ?, result_sha = ?, result_meta = ?,"
                " finished_at = ?, updated_at = ?, queue_info = NULL"
                f" WHERE id = ? AND state NOT IN {_TERMINAL_SQL}",
                (state, error, result_sha, json.dumps(result_meta) if result_meta else None,
                 now, now, job_id),
            )

        return await self._write(write)

    async def cancel(
        self, job_id: str, reason: str = "cancelled by user", *, tell_upstream: bool = True
    ) -> Job | None:
        """Cancel a job that has not finished; final at once, whatever its upstream says later.

        Returns the job as it is after the call (unchanged if it had already finished), or None.
        """

        def write(conn: sqlite3.Connection) -> None:
            now = _now()
            cur = conn.execute(
                "UPDATE jobs SET state = 'cancelled', error = ?, finished_at = ?, updated_at = ?,"
                " queue_info = NULL,"
                # Only a job an upstream may be running needs a stop request sent there.
                " cancel_pending = (? AND state IN ('submitted', 'running'))"
                f" WHERE id = ? AND state NOT IN {_TERMINAL_SQL}",
                (reason, now, now, tell_upstream, job_id),
            )
            if cur.rowcount:
                _event(conn, job_id, CANCELLED, reason)

        await self._write(write)
        return await self.get(job_id)

    async def cancel_sent(self, job_id: str) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE jobs SET cancel_pending = 0 WHERE id = ?", (job_id,))

        await self._write(write)

    async def retry(self, job_id: str) -> Job | None:
        """A failed or cancelled job goes back to the queue as a new run (same parameters)."""

        def write(conn: sqlite3.Connection) -> None:
            now = _now()
            # A stop request not yet delivered is not dropped with the old run: its task
            # becomes a stray, cancelled before that upstream gets anything new.
            conn.execute(
                "INSERT OR REPLACE INTO stray_tasks (node, task_id, job_id, created_at)"
                " SELECT upstream, upstream_task_id, id, ? FROM jobs WHERE id = ?"
                " AND state IN ('failed', 'cancelled') AND files_expired = 0 AND cancel_pending = 1"
                " AND upstream IS NOT NULL AND upstream_task_id IS NOT NULL",
                (now, job_id),
            )
            cur = conn.execute(
                "UPDATE jobs SET state = 'queued', run = run + 1, upstream = NULL,"
                " upstream_task_id = NULL, error = NULL, result_sha = NULL, result_meta = NULL,"
                " submitted_at = NULL, started_at = NULL, finished_at = NULL, updated_at = ?,"
                " cancel_pending = 0"
                " WHERE id = ? AND state IN ('failed', 'cancelled') AND files_expired = 0",
                (now, job_id),
            )
            if cur.rowcount:
                _event(conn, job_id, QUEUED, "retry requested")

        await self._write(write)
        return await self.get(job_id)

    async def resume(self, job_id: str, upstream: str, task_id: str) -> bool:
        """A failed or cancelled job whose upstream took its task back (the cloud's resume):
        `submitted` again on the same upstream task, as a new run, without a new submission.

        Only if the job is still finished on that upstream task (a second retry sent meanwhile
        did nothing to it).
        """

        def write(conn: sqlite3.Connection) -> bool:
            now = _now()
            return _transition(
                conn, (job_id, SUBMITTED, f"retry requested: resumed on {upstream} as the same task"),
                "UPDATE jobs SET state = 'submitted', run = run + 1, error = NULL,"
                " result_sha = NULL, result_meta = NULL, queue_info = NULL, submitted_at = ?,"
                " started_at = NULL, finished_at = NULL, updated_at = ?, cancel_pending = 0"
                " WHERE id = ? AND upstream = ? AND upstream_task_id = ?"
                " AND state IN ('failed', 'cancelled') AND files_expired = 0",
                (now, now, job_id, upstream, task_id),
            )

        return await self._write(write)

    async def expire_files(self, finished_before: float, grace: float = 3600.0) -> list[str]:
        """Mark finished jobs older than the cutoff as expired; return blobs nothing else needs."""

        def write(conn: sqlite3.Connection) -> list[str]:
            conn.execute(
                "UPDATE jobs SET files_expired = 1 WHERE files_expired = 0"
                f" AND state IN {_TERMINAL_SQL} AND finished_at < ?",
                (finished_before,),
            )
            # A blob may serve many jobs (one portrait, 100 voice-overs): it goes only when no
            # job that still keeps its files refers to it. Blobs recorded within the grace period
            # are kept too: they may belong to a request that is still being accepted.
            live: set[str] = set()
            for inputs, result in conn.execute(
                "SELECT inputs, result_sha FROM jobs WHERE files_expired = 0"
            ):
                live.update(json.loads(inputs).values())
                if result:
                    live.add(result)
            doomed = [
                sha for (sha,) in conn.execute(
                    "SELECT sha256 FROM blobs WHERE created_at < ?", (_now() - grace,)
                ) if sha not in live
            ]
            conn.executemany("DELETE FROM blobs WHERE sha256 = ?", [(s,) for s in doomed])
            return doomed

        return await self._write(write)

    # -- batches (the dashboard) ----------------------------------------------------------------

    async def create_batch(
        self,
        batch_id: str,
        specs: list[BatchJobSpec],
        *,
        batch: dict[str, Any] | None = None,
        owner: str | None = None,
    ) -> list[Job] | None:
        """Queue jobs in a batch, all in one transaction: every job or none.

        With `batch` (name, task, mode, form) a new dashboard batch is recorded too; when a batch
        with that id exists already (a second click on "Create"), nothing is added: None.
        """
        ids = [new_job_id() for _ in specs]

        def write(conn: sqlite3.Connection) -> bool:
            now = _now()
            if batch is not None:
                if conn.execute("SELECT 1 FROM batches WHERE id = ?", (batch_id,)).fetchone():
                    return False
                conn.execute(
                    "INSERT INTO batches (id, name, task, mode, owner, created_at, form)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (batch_id, batch.get("name"), batch.get("task"), batch.get("mode"), owner,
                     now, json.dumps(batch.get("form") or {})),
                )
            (last,) = conn.execute(
                "SELECT coalesce(max(position), 0) FROM batch_jobs WHERE batch_id = ?", (batch_id,)
            ).fetchone()
            conn.executemany(
                "INSERT INTO jobs (id, task, state, params, inputs, priority, batch_id, owner,"
                " created_at, updated_at) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
                [(job_id, s.task, json.dumps(s.params), json.dumps(s.inputs), s.priority,
                  batch_id, owner, now, now) for job_id, s in zip(ids, specs)],
            )
            conn.executemany(
                "INSERT INTO batch_jobs (job_id, batch_id, position, files, retry_of)"
                " VALUES (?, ?, ?, ?, ?)",
                [(job_id, batch_id, last + n, json.dumps(s.files), s.retry_of)
                 for n, (job_id, s) in enumerate(zip(ids, specs), start=1)],
            )
            conn.executemany(
                "INSERT INTO job_events (job_id, at, state, detail) VALUES (?, ?, 'queued', ?)",
                [(job_id, now, f"accepted (a new run of {s.retry_of})" if s.retry_of else "accepted")
                 for job_id, s in zip(ids, specs)],
            )
            return True

        if not await self._write(write):
            return None
        return await self.read(lambda r: r.jobs_by_id(ids))

    # -- the node registry ----------------------------------------------------------------------

    async def save_node(
        self, name: str, *, url: str, capacity: int, tasks: Iterable[str] | None, source: str
    ) -> None:
        """Add a node, or replace its URL, capacity and task types (a removed node comes back).

        Whether it is drained is left as it was: a drained node stays drained until undrained.
        """
        tasks_json = json.dumps(sorted(tasks)) if tasks is not None else None

        def write(conn: sqlite3.Connection) -> None:
            now = _now()
            conn.execute(
                "INSERT INTO nodes (name, url, capacity, tasks, drained, removed, source,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, 0, 0, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET url = excluded.url,"
                " capacity = excluded.capacity, tasks = excluded.tasks, removed = 0,"
                " source = excluded.source, updated_at = excluded.updated_at",
                (name, url, capacity, tasks_json, source, now, now),
            )

        await self._write(write)

    async def set_node_flags(
        self, name: str, *, drained: bool | None = None, removed: bool | None = None
    ) -> None:
        """Drain/undrain or remove a node. A row is made for an upstream not in the registry
        yet (a cloud account), so that its drained flag outlives a restart too."""

        def write(conn: sqlite3.Connection) -> None:
            now = _now()
            conn.execute(
                "INSERT OR IGNORE INTO nodes (name, source, created_at, updated_at)"
                " VALUES (?, 'api', ?, ?)",
                (name, now, now),
            )
            for column, value in (("drained", drained), ("removed", removed)):
                if value is not None:
                    conn.execute(
                        f"UPDATE nodes SET {column} = ?, updated_at = ? WHERE name = ?",
                        (int(value), now, name),
                    )

        await self._write(write)

    async def delete_node(self, name: str) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM nodes WHERE name = ?", (name,))

        await self._write(write)

    # -- fair dispatch --------------------------------------------------------------------------

    async def move(self, job_id: str, upstream: str, reason: str, *, stray: bool) -> bool:
        """Take a job back from `upstream` into the gateway's queue (node dead, or too slow to
        start it). With `stray`, its task there is remembered, to be cancelled when the node
        answers again. Only if the job is still on that upstream and not finished."""

        def write(conn: sqlite3.Connection) -> bool:
            now = _now()
            row = conn.execute(
                "SELECT upstream_task_id FROM jobs WHERE id = ? AND upstream = ?"
                " AND state IN ('submitted', 'running')",
                (job_id, upstream),
            ).fetchone()
            if row is None:
                return False
            conn.execute(
                "UPDATE jobs SET state = 'queued', upstream = NULL, started_at = NULL,"
                " queue_info = NULL, updated_at = ? WHERE id = ?",
                (now, job_id),
            )
            if stray and row["upstream_task_id"]:
                conn.execute(
                    "INSERT OR REPLACE INTO stray_tasks (node, task_id, job_id, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    (upstream, row["upstream_task_id"], job_id, now),
                )
            _event(conn, job_id, QUEUED, reason)
            return True

        return await self._write(write)

    async def add_stray(self, node: str, task_id: str, job_id: str) -> None:
        """A task on `node` that no job owns any more (its job was retried while the attempt
        was in flight): cancelled there before the node gets anything new."""

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO stray_tasks (node, task_id, job_id, created_at) VALUES (?, ?, ?, ?)",
                (node, task_id, job_id, _now()),
            )

        await self._write(write)

    async def drop_stray(self, node: str, task_id: str) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM stray_tasks WHERE node = ? AND task_id = ?", (node, task_id))

        await self._write(write)


    # -- API keys, sessions, quotas, audit (auth.py) ----------------------------------------------

    async def create_key(self, key: dict[str, Any], actor: str) -> dict[str, Any]:
        """Insert a key row (`key` holds every column but the timestamps). Names are unique among
        keys that are not revoked, so `keys revoke NAME` means one key."""

        def write(conn: sqlite3.Connection) -> None:
            taken = conn.execute(
                "SELECT id FROM api_keys WHERE name = ? AND revoked_at IS NULL", (key["name"],)
            ).fetchone()
            if taken:
                raise KeyNameTaken(f"a key named {key['name']!r} exists ({taken['id']}); revoke it"
                                   " first or choose another name")
            conn.execute(
                "INSERT INTO api_keys (id, name, key_hash, prefix, admin, daily_quota,"
                " max_concurrent, rate_per_min, source, created_at, created_by)"
                " VALUES (:id, :name, :key_hash, :prefix, :admin, :daily_quota, :max_concurrent,"
                " :rate_per_min, :source, :created_at, :created_by)",
                {**key, "admin": int(key["admin"]), "created_at": _now(), "created_by": actor},
            )
            _audit(conn, actor, "key.create", key["id"], _key_summary(key))

        await self._write(write)
        return await self.read(lambda r: r.key(key["id"]))

    async def revoke_key(
        self, key_id: str, actor: str, *, keep_admin: bool = False
    ) -> dict[str, Any] | None:
        """Revoke a key and end its dashboard sessions. None when no such key is active.

        With `keep_admin`, refuse (AdminKeyNeeded) to revoke the key in X2V_ADMIN_KEY or the
        last active admin key. The check is made in the revoking transaction, so two revokes at
        once cannot each leave the other's key as the last one and both pass.
        """

        def write(conn: sqlite3.Connection) -> bool:
            now = _now()
            if keep_admin:
                row = conn.execute(
                    "SELECT admin, source FROM api_keys WHERE id = ? AND revoked_at IS NULL", (key_id,)
                ).fetchone()
                if row is not None and row["admin"]:
                    if row["source"] == "env":
                        raise AdminKeyNeeded(
                            f"{key_id} is the key in X2V_ADMIN_KEY, which the gateway's operator"
                            " signs in with: to retire it, set a new X2V_ADMIN_KEY and restart (the"
                            " old one then stops working), or run `x2v-gateway keys revoke` on the"
                            " server"
                        )
                    others = conn.execute(
                        "SELECT COUNT(*) FROM api_keys WHERE admin AND revoked_at IS NULL AND id != ?",
                        (key_id,),
                    ).fetchone()[0]
                    if not others:
                        raise AdminKeyNeeded(
                            f"{key_id} is the last working admin key: revoking it would leave nobody"
                            " able to manage keys and nodes. Make another admin key first"
                            ' (POST /api/v1/keys with "admin": true)'
                        )
            cur = conn.execute(
                "UPDATE api_keys SET revoked_at = ?, revoked_by = ? WHERE id = ? AND revoked_at IS NULL",
                (now, actor, key_id),
            )
            if not cur.rowcount:
                return False
            conn.execute("DELETE FROM sessions WHERE key_id = ?", (key_id,))
            name = conn.execute("SELECT name FROM api_keys WHERE id = ?", (key_id,)).fetchone()[0]
            _audit(conn, actor, "key.revoke", key_id, f"name={name}")
            return True

        if not await self._write(write):
            return None
        return await self.read(lambda r: r.key(key_id))

    async def create_session(self, id_hash: str, key_id: str, csrf: str, expires_at: float) -> None:
        def write(conn: sqlite3.Connection) -> None:
            now = _now()
            conn.execute("DELETE FROM sessions WHERE expires_at < ?", (now,))
            conn.execute(
                "INSERT INTO sessions (id_hash, key_id, csrf, created_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (id_hash, key_id, csrf, now, expires_at),
            )

        await self._write(write)

    async def delete_session(self, id_hash: str) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM sessions WHERE id_hash = ?", (id_hash,))

        await self._write(write)

    async def reserve_jobs(self, key_id: str, day: str, n: int, quota: int | None) -> int | None:
        """Count `n` more jobs for a key today, unless that goes over `quota`: the new total, or
        None (nothing counted). Check and count are one transaction, so two requests at once
        cannot both take the last job of a quota."""

        def write(conn: sqlite3.Connection) -> int | None:
            row = conn.execute(
                "SELECT jobs FROM key_usage WHERE key_id = ? AND day = ?", (key_id, day)
            ).fetchone()
            used = row[0] if row else 0
            if quota is not None and used + n > quota:
                return None
            conn.execute(
                "INSERT INTO key_usage (key_id, day, jobs) VALUES (?, ?, ?) ON CONFLICT"
                " (key_id, day) DO UPDATE SET jobs = jobs + excluded.jobs",
                (key_id, day, n),
            )
            return used + n

        return await self._write(write)

    async def release_jobs(self, key_id: str, day: str, n: int) -> None:
        """Give back jobs counted by `reserve_jobs` for a request that was then refused."""

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE key_usage SET jobs = max(0, jobs - ?) WHERE key_id = ? AND day = ?",
                (n, key_id, day),
            )

        await self._write(write)

    async def record_audit(self, actor: str, action: str, target: str, detail: str = "") -> None:
        def write(conn: sqlite3.Connection) -> None:
            _audit(conn, actor, action, target, detail)

        await self._write(write)

    async def purge_files(self, job_ids: list[str], actor: str, target: str) -> list[str]:
        """Mark these finished jobs' files deleted; return the blobs no kept job needs any more.

        A portrait shared with a job whose files are kept stays. Unlike the retention sweep, a
        blob recorded a moment ago is not spared: a purge is someone asking for their files to be
        gone now.
        """

        def write(conn: sqlite3.Connection) -> list[str]:
            mine: set[str] = set()
            for start in range(0, len(job_ids), 500):  # SQLite's limit on bound parameters
                chunk = job_ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                for inputs, result in conn.execute(
                    f"SELECT inputs, result_sha FROM jobs WHERE id IN ({marks})"
                    f" AND state IN {_TERMINAL_SQL}", chunk,
                ):
                    mine.update(json.loads(inputs).values())
                    if result:
                        mine.add(result)
                conn.execute(
                    f"UPDATE jobs SET files_expired = 1 WHERE id IN ({marks})"
                    f" AND state IN {_TERMINAL_SQL}", chunk,
                )
            live: set[str] = set()
            if mine:
                for inputs, result in conn.execute(
                    "SELECT inputs, result_sha FROM jobs WHERE files_expired = 0"
                ):
                    live.update(json.loads(inputs).values())
                    if result:
                        live.add(result)
            doomed = sorted(mine - live)
            conn.executemany("DELETE FROM blobs WHERE sha256 = ?", [(s,) for s in doomed])
            _audit(conn, actor, "purge", target, f"jobs={len(job_ids)} files={len(doomed)}")
            return doomed

        return await self._write(write)


class KeyNameTaken(ValueError):
    """An active key already has this name."""


class AdminKeyNeeded(ValueError):
    """Revoking this key would lock every admin out (see `JobStore.revoke_key`)."""


def _key_row(row: Any) -> dict[str, Any]:
    data = dict(row)
    data["admin"] = bool(data["admin"])
    return data


def _key_summary(key: dict[str, Any]) -> str:
    """A key's settings for the audit log: never its hash, never the key."""
    parts = [f"name={key['name']}", f"admin={bool(key['admin'])}"]
    for column in ("daily_quota", "max_concurrent", "rate_per_min"):
        if key.get(column) is not None:
            parts.append(f"{column}={key[column]:g}" if isinstance(key[column], float) else f"{column}={key[column]}")
    return " ".join(parts)


def _audit(conn: sqlite3.Connection, actor: str, action: str, target: str, detail: str) -> None:
    conn.execute(
        "INSERT INTO audit (at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
        (_now(), actor, action, target, detail),
    )


class Lane(NamedTuple):
    """Queued jobs that share a task type, a priority, an owner and a batch."""

    task: str
    priority: int
    owner: str  # '' for none
    batch: str  # '' for none
    head_seq: int


class QueuedJob(NamedTuple):
    """A queued job as a dispatch round weighs it (`Reads.lane_heads`)."""

    id: str
    seq: int
    task: str
    pinned: str | None


class Inflight(NamedTuple):
    id: str
    upstream: str
    task: str
    state: str
    owner: str
    batch: str
    submitted_at: float | None
    started_at: float | None


_OWNER_KEY = "coalesce(owner, '')"
_AFTER_NEWEST = 2**63 - 1  # a `seq` above every job's
_BATCH_KEY = "coalesce(batch_id, '')"


def _distinct(conn: sqlite3.Connection, column: str, where: str, args: tuple) -> list[Any]:
    """Distinct values of an indexed column among queued jobs, one index seek each."""
    values: list[Any] = []
    base = f"SELECT {column} FROM jobs WHERE state = 'queued' AND {where}"
    row = conn.execute(f"{base} ORDER BY {column} LIMIT 1", args).fetchone()
    while row is not None:
        values.append(row[0])
        row = conn.execute(
            f"{base} AND {column} > ? ORDER BY {column} LIMIT 1", (*args, row[0])
        ).fetchone()
    return values


def _skip_batches(conn: sqlite3.Connection, args: tuple, limit: int) -> list[tuple[str, int]]:
    """(batch key, oldest seq) of each batch of one (task, priority, owner), up to `limit`."""
    base = (
        f"SELECT {_BATCH_KEY}, seq FROM jobs WHERE state = 'queued' AND task = ?"
        f" AND priority = ? AND {_OWNER_KEY} = ?"
    )
    order = f" ORDER BY {_BATCH_KEY}, seq LIMIT 1"
    found: list[tuple[str, int]] = []
    row = conn.execute(base + order, args).fetchone()
    while row is not None and len(found) < limit:
        found.append((row[0], row[1]))
        row = conn.execute(f"{base} AND {_BATCH_KEY} > ?{order}", (*args, row[0])).fetchone()
    return found


def _row_to_item(row: sqlite3.Row) -> BatchItem:
    data = dict(row)
    extra = {k: data.pop(k) for k in [k for k in data if k.startswith("bj_")]}
    job = _row_to_job(data)
    return BatchItem(
        job=job,
        position=extra["bj_position"],
        files=json.loads(extra["bj_files"]) if extra["bj_files"] else {},
        retry_of=extra["bj_retry_of"],
        retried_as=extra["bj_retried_as"],
    )


def _transition(
    conn: sqlite3.Connection, event: tuple[str, str, str], sql: str, args: tuple
) -> bool:
    """Run one conditional UPDATE of one job; when it moved the job, add its timeline event.

    `event` is (job_id, state, detail). False when the job was not in a state the UPDATE allows
    (finished already, cancelled meanwhile): nothing changed and nothing is recorded.
    """
    changed = conn.execute(sql, args).rowcount == 1
    if changed:
        _event(conn, *event)
    return changed


def _event(conn: sqlite3.Connection, job_id: str, state: str, detail: str) -> None:
    conn.execute(
        "INSERT INTO job_events (job_id, at, state, detail) VALUES (?, ?, ?, ?)",
        (job_id, _now(), state, detail),
    )
