"""The job store: every job, its whole life, in one SQLite file.

A job row holds everything needed to resume after a crash: task type, parameters, input blob
references, the upstream it went to and the upstream task id, state, attempts, timestamps, error
and result. Writes go through one thread that owns the only writing connection (sqlite-utils
connections are bound to their thread, and SQLite has one writer anyway); reads use a connection
of the calling thread, which WAL lets run beside the writer.

Every state change is a conditional UPDATE, so a finished job can never be moved again: a job
cancelled by its user stays cancelled even when its node later reports the task completed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

T = TypeVar("T")

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


def _now() -> float:
    return time.time()


def new_job_id() -> str:
    # Lower-case base32: safe as an upstream task id and as a file name on the node.
    return "j" + base64.b32encode(secrets.token_bytes(10)).decode().lower()


def _row_to_job(row: sqlite3.Row) -> Job:
    data = dict(row)
    for column in _JSON_COLUMNS:
        if data[column] is not None:
            data[column] = json.loads(data[column])
    for column in _BOOL_COLUMNS:
        data[column] = bool(data[column])
    return Job(**data)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
    conn.row_factory = sqlite3.Row
    # Readers and the writer wait for each other a little instead of failing at once.
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


class JobStore:
    """Jobs in SQLite. Async methods write (on the writer thread); plain methods read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        db = Database(path)
        db.enable_wal()
        migrations.apply(db)
        db.close()
        self._local = threading.local()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="x2v-store-writer")

    # -- plumbing -------------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _connect(self.path)
            # WAL with synchronous=NORMAL is durable across a process crash (SIGKILL), which
            # is the failure the gateway is built to survive; only a power loss can drop the
            # last commits.
            conn.execute("PRAGMA synchronous = NORMAL")
        return conn

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
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def is_writable(self) -> bool:
        """A cheap check for /readyz: can this process write to the store right now."""
        try:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return True
        except sqlite3.Error:
            return False

    # -- reads ----------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        row = self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _row_to_job(row) if row else None

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
        if before_seq is not None:
            where.append("seq < ?")
            args.append(before_seq)
        sql = "SELECT * FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        rows = self._conn().execute(sql, (*args, limit)).fetchall()
        return [_row_to_job(r) for r in rows]

    def queued(self, limit: int, tasks: Iterable[str] | None = None) -> list[Job]:
        """The next jobs to dispatch: highest priority first, then oldest."""
        sql = "SELECT * FROM jobs WHERE state = 'queued'"
        args: list[Any] = []
        if tasks is not None:
            tasks = list(tasks)
            sql += f" AND task IN ({','.join('?' * len(tasks))})"
            args += tasks
        sql += " ORDER BY priority DESC, seq LIMIT ?"
        rows = self._conn().execute(sql, (*args, limit)).fetchall()
        return [_row_to_job(r) for r in rows]

    def active(self, upstream: str | None = None) -> list[Job]:
        """Jobs handed to an upstream and not finished (optionally: to this one)."""
        sql = "SELECT * FROM jobs WHERE state IN ('submitted', 'running')"
        args: tuple = ()
        if upstream is not None:
            sql += " AND upstream = ?"
            args = (upstream,)
        return [_row_to_job(r) for r in self._conn().execute(sql + " ORDER BY seq", args)]

    def inflight_counts(self) -> dict[str, int]:
        """Jobs handed to each upstream and not finished."""
        rows = self._conn().execute(
            "SELECT upstream, count(*) FROM jobs WHERE state IN ('submitted', 'running')"
            " GROUP BY upstream"
        )
        return dict(rows.fetchall())

    def cancel_pending(self) -> list[Job]:
        """Cancelled jobs whose upstream task has not been told to stop yet."""
        rows = self._conn().execute("SELECT * FROM jobs WHERE cancel_pending = 1").fetchall()
        return [_row_to_job(r) for r in rows]

    def counts_by_state(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for state, n in self._conn().execute("SELECT state, count(*) FROM jobs GROUP BY state"):
            counts[state] = n
        return counts

    def queue_position(self, job: Job) -> int | None:
        """1-based place of a queued job in the gateway's own queue."""
        if job.state != QUEUED:
            return None
        (ahead,) = self._conn().execute(
            "SELECT count(*) FROM jobs WHERE state = 'queued' AND"
            " (priority > ? OR (priority = ? AND seq < ?))",
            (job.priority, job.priority, job.seq),
        ).fetchone()
        return ahead + 1

    def events(self, job_id: str) -> list[dict[str, Any]]:
        rows = self._conn().execute(
            "SELECT at, state, detail FROM job_events WHERE job_id = ? ORDER BY id", (job_id,)
        )
        return [dict(r) for r in rows]

    def blob(self, sha256: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT * FROM blobs WHERE sha256 = ?", (sha256,)).fetchone()
        return dict(row) if row else None

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
        job = self.get(found_id)
        assert job is not None
        return job, created

    async def claim(self, job_id: str, upstream: str, task_id: str) -> bool:
        """Record a submission attempt *before* it is sent: queued -> submitted on `upstream`.

        Because the record comes first, a crash at any later point leaves a row that says where
        the job may be, and the restart asks that upstream before anything is sent again.
        """

        def write(conn: sqlite3.Connection) -> bool:
            now = _now()
            cur = conn.execute(
                "UPDATE jobs SET state = 'submitted', upstream = ?, upstream_task_id = ?,"
                " attempts = attempts + 1, submitted_at = ?, updated_at = ?, queue_info = NULL"
                " WHERE id = ? AND state = 'queued'",
                (upstream, task_id, now, now, job_id),
            )
            if cur.rowcount:
                _event(conn, job_id, SUBMITTED, f"sent to {upstream}")
            return cur.rowcount == 1

        return await self._write(write)

    async def set_upstream_task_id(self, job_id: str, task_id: str) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE jobs SET upstream_task_id = ?, updated_at = ? WHERE id = ?",
                (task_id, _now(), job_id),
            )

        await self._write(write)

    async def requeue(self, job_id: str, reason: str, *, sent: bool = True) -> bool:
        """Back to the gateway's queue (node full, node forgot the task, node gone).

        `sent=False` when the upstream certainly did not take the attempt (back-pressure), so it
        does not count as one.
        """

        def write(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE jobs SET state = 'queued', upstream = NULL, started_at = NULL,"
                f" attempts = attempts - ?, updated_at = ? WHERE id = ? AND state IN ('submitted', 'running')",
                (0 if sent else 1, _now(), job_id),
            )
            if cur.rowcount:
                _event(conn, job_id, QUEUED, reason)
            return cur.rowcount == 1

        return await self._write(write)

    async def mark_running(self, job_id: str) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            now = _now()
            cur = conn.execute(
                "UPDATE jobs SET state = 'running', started_at = ?, updated_at = ?, queue_info = NULL"
                " WHERE id = ? AND state = 'submitted'",
                (now, now, job_id),
            )
            if cur.rowcount:
                _event(conn, job_id, RUNNING, "started")
            return cur.rowcount == 1

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
            cur = conn.execute(
                "UPDATE jobs SET state = ?, error = ?, result_sha = ?, result_meta = ?,"
                " finished_at = ?, updated_at = ?, queue_info = NULL"
                f" WHERE id = ? AND state NOT IN {_TERMINAL_SQL}",
                (state, error, result_sha, json.dumps(result_meta) if result_meta else None,
                 now, now, job_id),
            )
            if cur.rowcount:
                _event(conn, job_id, state, error or "")
            return cur.rowcount == 1

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
        return self.get(job_id)

    async def cancel_sent(self, job_id: str) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE jobs SET cancel_pending = 0 WHERE id = ?", (job_id,))

        await self._write(write)

    async def retry(self, job_id: str) -> Job | None:
        """A failed or cancelled job goes back to the queue as a new run (same parameters)."""

        def write(conn: sqlite3.Connection) -> None:
            now = _now()
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
        return self.get(job_id)

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


def _event(conn: sqlite3.Connection, job_id: str, state: str, detail: str) -> None:
    conn.execute(
        "INSERT INTO job_events (job_id, at, state, detail) VALUES (?, ?, ?, ?)",
        (job_id, _now(), state, detail),
    )
