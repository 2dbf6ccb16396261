"""Jobs in SQLite: a job's row, its timeline, its files, and every change of its state.

Every state change is a conditional UPDATE, so a finished job can never be moved again.
"""

from __future__ import annotations

import heapq
import itertools
import json
import sqlite3
from collections.abc import Iterable
from typing import Any

from ..memo import Memo
from ..records import (
    CANCELLED, FAILED, QUEUED, RUNNING, STATES, SUBMITTED, SUCCEEDED, TERMINAL, IdempotencyConflict, Job,
    JobWebhook, new_job_id,
)
from .connections import AFTER_NEWEST, Rows, SqliteThreads, each_chunk, timestamp
from .keys import audit
from .pipeline_files import pipeline_blobs
from .webhooks import insert_webhooks

TERMINAL_SQL = "('succeeded', 'failed', 'cancelled')"
_JSON_COLUMNS = ("params", "inputs", "result_meta", "queue_info")
_BOOL_COLUMNS = ("cancel_pending", "files_expired")


# Finished jobs by their whole row: any change to any column is a new key.
_FINISHED_JOBS = Memo(10_000)


def row_to_job(row: sqlite3.Row | dict[str, Any]) -> Job:
    if isinstance(row, dict):
        return job_from(tuple(row), tuple(row.values()))
    return job_from(tuple(row.keys()), tuple(row))


def job_from(names: tuple[str, ...], values: tuple[Any, ...]) -> Job:
    """A Job from a row's column names and values. A batch page reads 500 at a time: a finished
    job comes from the memo, found by its values alone, without building a dict of its row."""
    # Only a finished job is kept: a job in flight changes, and its key would be work for nothing.
    key = None
    if values[names.index("state")] in TERMINAL:
        key = values
        if (job := _FINISHED_JOBS.get(key)) is not None:
            return job
    data = dict(zip(names, values))
    for column in _JSON_COLUMNS:
        if data[column] is not None:
            data[column] = json.loads(data[column])
    for column in _BOOL_COLUMNS:
        data[column] = bool(data[column])
    try:
        job = Job(**data)
    except TypeError:
        # A column a later release added (its replicas migrated the file while this one still
        # runs, during an upgrade one replica at a time): not this release's business.
        job = Job(**{name: value for name, value in data.items() if name in Job.__struct_fields__})
    if key is not None:
        _FINISHED_JOBS.put(key, job)
    return job


class JobReads(Rows):
    """Jobs, their timelines and their files."""

    def get(self, job_id: str) -> Job | None:
        row = self.conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row_to_job(row) if row else None

    def jobs_by_id(self, ids: list[str]) -> list[Job]:
        rows = each_chunk(self.conn, "SELECT * FROM jobs WHERE id IN ({marks}) ORDER BY seq", ids)
        return [row_to_job(r) for r in rows]

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
        # Several states: one page per state, each read newest first from an index, merged. One
        # `state IN (...)` query reads every job in those states and sorts them.
        pages = [
            self._list_rows(state, batch_id, task, owner, before_seq, limit)
            for state in (sorted(set(states)) or [None])
        ]
        rows = heapq.merge(*pages, key=lambda row: row["seq"], reverse=True)
        return [row_to_job(r) for r in itertools.islice(rows, limit)]

    def _list_rows(
        self, state: str | None, batch_id: str | None, task: str | None, owner: str | None,
        before_seq: int | None, limit: int,
    ) -> list[sqlite3.Row]:
        # The most selective filter picks the index, read newest first: a batch
        # (idx_jobs_batch_id_seq), else an owner's jobs in a state (idx_jobs_owner_state_seq) or
        # all of them (idx_jobs_owner_seq), else a state, else a task. The other filters are
        # checked on the rows it yields (a unary + keeps SQLite from using their indexes):
        # without statistics SQLite may otherwise walk all of one task's jobs to find a batch's.
        given = [(column, value) for column, value in (
            ("batch_id", batch_id), ("owner", owner), ("state", state), ("task", task)
        ) if value is not None]
        lead = given[0][0] if given else None
        indexed = {"owner", "state"} if lead == "owner" else {lead}
        where = [f"{'' if column in indexed else '+'}{column} = ?" for column, _ in given]
        args: list[Any] = [value for _, value in given]
        # Always bounded, so that SQLite seeks to the newest rows rather than scanning for them.
        where.append("seq < ?")
        args.append(AFTER_NEWEST if before_seq is None else before_seq)
        sql = "SELECT * FROM jobs WHERE " + " AND ".join(where) + " ORDER BY seq DESC LIMIT ?"
        return self.conn.execute(sql, (*args, limit)).fetchall()

    def active(self, upstream: str | None = None, replica: str | None = None) -> list[Job]:
        sql = "SELECT * FROM jobs WHERE state IN ('submitted', 'running')"
        args: tuple = ()
        if upstream is not None:
            sql += " AND upstream = ?"
            args = (upstream,)
        if replica is not None:
            sql += " AND +replica = ?"  # the upstream's index finds the few rows
            args += (replica,)
        return [row_to_job(r) for r in self.conn.execute(sql + " ORDER BY seq", args)]

    def inflight_counts(self) -> dict[str, int]:
        # Named: without ANALYZE's statistics (a gateway never runs it) the planner takes
        # idx_jobs_state_seq and looks every row up in the table.
        rows = self.conn.execute(
            "SELECT upstream, count(*) FROM jobs INDEXED BY idx_jobs_inflight_upstream"
            " WHERE state IN ('submitted', 'running') GROUP BY upstream"
        )
        return dict(rows.fetchall())

    def cancel_pending(self) -> list[Job]:
        rows = self.conn.execute("SELECT * FROM jobs WHERE cancel_pending = 1").fetchall()
        return [row_to_job(r) for r in rows]

    def counts_by_state(self) -> dict[str, int]:
        return self.owner_counts(None)

    def owner_counts(self, owner: str | None) -> dict[str, int]:
        sql, args = "SELECT state, sum(n) FROM job_counts", ()
        if owner is not None:
            sql, args = sql + " WHERE owner = ?", (owner,)
        counts = dict.fromkeys(STATES, 0)
        for state, n in self.conn.execute(sql + " GROUP BY state", args):
            counts[state] = n
        return counts

    def events(self, job_id: str) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT at, state, detail FROM job_events WHERE job_id = ? ORDER BY id", (job_id,)
        )
        return [dict(r) for r in rows]

    def events_after(
        self, after_id: int, *, job_id: str | None = None, batch_id: str | None = None,
        owner: str | None = None, limit: int = 500,
    ) -> list[dict[str, Any]]:
        # The most selective filter picks the index (the job's timeline, the batch's events, the
        # owner's, else the events' own ids); the unary + keeps SQLite on it for the others.
        where, args = ["id > ?"], [after_id]
        lead = next((c for c, v in (("job_id", job_id), ("batch_id", batch_id), ("owner", owner)) if v), None)
        for column, value in (("job_id", job_id), ("batch_id", batch_id), ("owner", owner)):
            if value is not None:
                where.append(f"{'' if column == lead else '+'}{column} = ?")
                args.append(value)
        rows = self.conn.execute(
            "SELECT id, job_id, at, state, detail, batch_id FROM job_events WHERE "
            + " AND ".join(where) + " ORDER BY id LIMIT ?",
            (*args, limit),
        )
        return [dict(r) for r in rows]

    def newest_event_id(self) -> int:
        return self.conn.execute("SELECT coalesce(max(id), 0) FROM job_events").fetchone()[0]

    def blob(self, sha256: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM blobs WHERE sha256 = ?", (sha256,)).fetchone()
        return dict(row) if row else None

    def blob_sizes(self, shas: Iterable[str]) -> dict[str, int]:
        shas = list(shas)
        if not shas:
            return {}
        rows = self.conn.execute(
            f"SELECT sha256, size FROM blobs WHERE sha256 IN ({','.join('?' * len(shas))})", shas
        )
        return dict(rows.fetchall())

    def recent_run_times(self, limit: int = 5000) -> list[tuple[str, str, float]]:
        rows = self.conn.execute(
            # Newest first through idx_jobs_finished_at, until enough successes: the unary + keeps
            # SQLite from reading every success through the state index and sorting them.
            "SELECT upstream, task, finished_at - started_at FROM jobs WHERE finished_at IS NOT NULL"
            " AND +state = 'succeeded' AND started_at IS NOT NULL AND upstream IS NOT NULL"
            " ORDER BY finished_at DESC LIMIT ?",
            (limit,),
        )
        return rows.fetchall()


class JobWrites(SqliteThreads):
    """Every change of a job: each a conditional UPDATE, with its timeline event."""

    async def _transition(self, event: tuple[str, str, str], sql: str, args: tuple) -> bool:
        """`transition` in a write of its own (all or nothing)."""
        return await self._write(lambda conn: transition(conn, event, sql, args))

    async def record_blob(self, sha256: str, size: int, kind: str) -> None:
        await self._execute(
            "INSERT OR IGNORE INTO blobs (sha256, size, kind, created_at) VALUES (?, ?, ?, ?)",
            (sha256, size, kind, timestamp()),
        )

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
        webhook: JobWebhook | None = None,
    ) -> tuple[Job, bool]:
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
            now = timestamp()
            conn.execute(
                "INSERT INTO jobs (id, task, state, params, inputs, priority, batch_id, owner,"
                " created_at, updated_at, idempotency_key, request_hash, pinned)"
                " VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, task, json.dumps(params), json.dumps(inputs), priority, batch_id,
                 owner, now, now, idempotency_key, request_hash, pinned),
            )
            insert_webhooks(conn, [job_id], webhook)
            record_event(conn, job_id, QUEUED, "accepted")
            return job_id, True

        found_id, created = await self._write(write)
        job = await self.get(found_id)
        assert job is not None
        return job, created

    async def claim(
        self, job_id: str, upstream: str, task_id: str, *, replica: str | None = None,
        slots: int | None = None, off_node: Iterable[str] = (),
    ) -> bool:
        now = timestamp()
        sql = (
            "UPDATE jobs SET state = 'submitted', upstream = ?, upstream_task_id = ?, replica = ?,"
            " attempts = attempts + 1, submitted_at = ?, updated_at = ?, queue_info = NULL"
            " WHERE id = ? AND state = 'queued'"
        )
        args: tuple = (upstream, task_id, replica, now, now, job_id)
        if replica is not None:
            # A replica whose lease another one took over claims nothing more (it may not know
            # yet: it learns at its next heartbeat).
            sql += " AND EXISTS (SELECT 1 FROM replicas WHERE id = ?)"
            args += (replica,)
        if slots is not None:
            # The slot is taken here, in the transaction that claims the job (BEGIN IMMEDIATE:
            # one writer at a time across every process on this file), so two replicas that both
            # saw the last free slot cannot both fill it.
            left = list(off_node)
            sql += (
                " AND (SELECT count(*) FROM jobs WHERE upstream = ? AND state IN ('submitted', 'running')"
                f" AND id NOT IN ({','.join('?' * len(left))})) < ?"
            )
            args += (upstream, *left, slots)
        return await self._transition((job_id, SUBMITTED, f"sent to {upstream}"), sql, args)

    async def set_upstream_task_id(self, job_id: str, task_id: str, *, run: int | None = None) -> bool:
        return await self._execute(
            "UPDATE jobs SET upstream_task_id = ?, updated_at = ? WHERE id = ? AND run = coalesce(?, run)",
            (task_id, timestamp(), job_id, run),
        ) == 1

    async def requeue(self, job_id: str, reason: str, *, sent: bool = True) -> bool:
        return await self._transition(
            (job_id, QUEUED, reason),
            "UPDATE jobs SET state = 'queued', upstream = NULL, started_at = NULL,"
            " attempts = attempts - ?, updated_at = ? WHERE id = ? AND state IN ('submitted', 'running')",
            (0 if sent else 1, timestamp(), job_id),
        )

    async def mark_running(self, job_id: str, started_at: float | None = None) -> bool:
        now = timestamp()
        return await self._transition(
            (job_id, RUNNING, "started"),
            "UPDATE jobs SET state = 'running', started_at = ?, updated_at = ?, queue_info = NULL"
            " WHERE id = ? AND state = 'submitted'",
            (started_at or now, now, job_id),
        )

    async def set_queue_info(self, updates: dict[str, dict[str, Any] | None]) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.executemany(
                f"UPDATE jobs SET queue_info = ? WHERE id = ? AND state NOT IN {TERMINAL_SQL}",
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
        now = timestamp()
        return await self._transition(
            (job_id, state, error or ""),
            "UPDATE jobs SET state = ?, error = ?, result_sha = ?, result_meta = ?,"
            " finished_at = ?, updated_at = ?, queue_info = NULL"
            f" WHERE id = ? AND state NOT IN {TERMINAL_SQL}",
            (state, error, result_sha, json.dumps(result_meta) if result_meta else None,
             now, now, job_id),
        )

    async def set_poster(self, job_id: str, result_sha: str, poster_sha: str) -> bool:
        # updated_at is left alone: a poster is not a change of the job that anyone waits for.
        return await self._execute(
            "UPDATE jobs SET result_meta = json_set(coalesce(result_meta, '{}'), '$.poster', ?)"
            " WHERE id = ? AND state = 'succeeded' AND result_sha = ? AND files_expired = 0",
            (poster_sha, job_id, result_sha),
        ) == 1

    async def cancel(
        self, job_id: str, reason: str = "cancelled by user", *, tell_upstream: bool = True
    ) -> Job | None:
        def write(conn: sqlite3.Connection) -> None:
            now = timestamp()
            cur = conn.execute(
                "UPDATE jobs SET state = 'cancelled', error = ?, finished_at = ?, updated_at = ?,"
                " queue_info = NULL,"
                # Only a job an upstream may be running needs a stop request sent there.
                " cancel_pending = (? AND state IN ('submitted', 'running'))"
                f" WHERE id = ? AND state NOT IN {TERMINAL_SQL}",
                (reason, now, now, tell_upstream, job_id),
            )
            if cur.rowcount:
                record_event(conn, job_id, CANCELLED, reason)

        await self._write(write)
        return await self.get(job_id)

    async def cancel_sent(self, job_id: str) -> None:
        await self._execute("UPDATE jobs SET cancel_pending = 0 WHERE id = ?", (job_id,))

    async def retry(self, job_id: str) -> Job | None:
        def write(conn: sqlite3.Connection) -> None:
            now = timestamp()
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
                record_event(conn, job_id, QUEUED, "retry requested")

        await self._write(write)
        return await self.get(job_id)

    async def resume(self, job_id: str, upstream: str, task_id: str) -> bool:
        now = timestamp()
        return await self._transition(
            (job_id, SUBMITTED, f"retry requested: resumed on {upstream} as the same task"),
            "UPDATE jobs SET state = 'submitted', run = run + 1, error = NULL,"
            " result_sha = NULL, result_meta = NULL, queue_info = NULL, submitted_at = ?,"
            " started_at = NULL, finished_at = NULL, updated_at = ?, cancel_pending = 0"
            " WHERE id = ? AND upstream = ? AND upstream_task_id = ?"
            " AND state IN ('failed', 'cancelled') AND files_expired = 0",
            (now, now, job_id, upstream, task_id),
        )

    async def expire_files(self, finished_before: float, grace: float = 3600.0) -> list[str]:
        def write(conn: sqlite3.Connection) -> list[str]:
            conn.execute(
                "UPDATE jobs SET files_expired = 1 WHERE files_expired = 0"
                f" AND state IN {TERMINAL_SQL} AND finished_at < ?",
                (finished_before,),
            )
            # Blobs recorded within the grace period are kept too: they may belong to a request
            # that is still being accepted.
            live = _blobs_of(conn, "files_expired = 0", ()) | pipeline_blobs(conn, finished_before)
            doomed = [
                sha for (sha,) in conn.execute(
                    "SELECT sha256 FROM blobs WHERE created_at < ?", (timestamp() - grace,)
                ) if sha not in live
            ]
            conn.executemany("DELETE FROM blobs WHERE sha256 = ?", [(s,) for s in doomed])
            return doomed

        return await self._write(write)

    async def move(self, job_id: str, upstream: str, reason: str, *, stray: bool) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            now = timestamp()
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
            record_event(conn, job_id, QUEUED, reason)
            return True

        return await self._write(write)

    async def purge_files(self, job_ids: list[str], actor: str, target: str) -> list[str]:
        def write(conn: sqlite3.Connection) -> list[str]:
            mine: set[str] = set()
            for start in range(0, len(job_ids), 500):  # SQLite's limit on bound parameters
                chunk = job_ids[start:start + 500]
                these = f"id IN ({','.join('?' * len(chunk))}) AND state IN {TERMINAL_SQL}"
                mine |= _blobs_of(conn, these, chunk)
                conn.execute(f"UPDATE jobs SET files_expired = 1 WHERE {these}", chunk)
            kept = _blobs_of(conn, "files_expired = 0", ()) | pipeline_blobs(conn, 0.0)
            doomed = sorted(mine - kept) if mine else []
            conn.executemany("DELETE FROM blobs WHERE sha256 = ?", [(s,) for s in doomed])
            audit(conn, actor, "purge", target, f"jobs={len(job_ids)} files={len(doomed)}")
            return doomed

        return await self._write(write)


def _blobs_of(conn: sqlite3.Connection, where: str, args: Iterable[Any]) -> set[str]:
    """The inputs and results of the jobs `where` selects. A blob may serve many jobs (one
    portrait, 100 voice-overs): it goes only when no job that keeps its files refers to it."""
    blobs: set[str] = set()
    rows = conn.execute(
        f"SELECT inputs, result_sha, json_extract(result_meta, '$.poster') FROM jobs WHERE {where}",
        tuple(args),
    )
    for inputs, result, poster in rows:
        blobs.update(json.loads(inputs).values())
        blobs.update(sha for sha in (result, poster) if sha)
    return blobs


def transition(
    conn: sqlite3.Connection, event: tuple[str, str, str], sql: str, args: tuple
) -> bool:
    """Run one conditional UPDATE of one job; when it moved the job, add its timeline event.

    `event` is (job_id, state, detail). False when the job was not in a state the UPDATE allows
    (finished already, cancelled meanwhile): nothing changed and nothing is recorded.
    """
    changed = conn.execute(sql, args).rowcount == 1
    if changed:
        record_event(conn, *event)
    return changed


def record_event(conn: sqlite3.Connection, job_id: str, state: str, detail: str) -> None:
    # The job's owner and batch go with the event: the event streams replay by them.
    conn.execute(
        "INSERT INTO job_events (job_id, at, state, detail, owner, batch_id)"
        " SELECT ?, ?, ?, ?, owner, batch_id FROM jobs WHERE id = ?",
        (job_id, timestamp(), state, detail, job_id),
    )
