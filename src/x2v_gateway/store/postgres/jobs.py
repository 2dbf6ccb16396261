"""Jobs in PostgreSQL: a job's row, its timeline, its files, and every change of its state.

Every state change is a conditional UPDATE, so a finished job can never be moved again, by this
replica or another: PostgreSQL re-checks the condition on the row once a concurrent writer is done.

A job's events are numbered in the order they commit (`record_event`), as SQLite's one writer
numbers them: the event streams, the webhooks' cursor and the replicas' change feed read "every
event after id N" and must never miss one that commits late with a lower id.
"""

from __future__ import annotations

import heapq
import itertools
import json
from collections.abc import Iterable
from typing import Any

import psycopg

from ..records import (
    CANCELLED, FAILED, QUEUED, RUNNING, STATES, SUBMITTED, SUCCEEDED, IdempotencyConflict, Job, JobWebhook,
    new_job_id,
)
# One way from a row to a `Job` for both backends: PostgreSQL keeps the same columns (JSON as text).
from ..sqlite.jobs import row_to_job
from .connections import AFTER_NEWEST, PgRows, PostgresThreads, changed, one, rows, timestamp, tuples, value
from .pipeline_files import pipeline_blobs
from .keys import audit
from .webhooks import insert_webhooks

TERMINAL_SQL = "('succeeded', 'failed', 'cancelled')"
# pg_advisory_xact_lock's key for "numbering a job event" (see record_event).
EVENTS_LOCK = 0x7832_7600_0003
# pg_advisory_xact_lock's first key for "claiming a slot of an upstream" (the second: its name's hash).
UPSTREAM_LOCK = 0x7833


class JobReads(PgRows):
    """Jobs, their timelines and their files."""

    def get(self, job_id: str) -> Job | None:
        row = one(self.conn, "SELECT * FROM jobs WHERE id = %s", (job_id,))
        return row_to_job(row) if row else None

    def jobs_by_id(self, ids: list[str]) -> list[Job]:
        found = rows(self.conn, "SELECT * FROM jobs WHERE id = ANY(%s) ORDER BY seq", (list(ids),))
        return [row_to_job(r) for r in found]

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
        # Several states: one page per state, each read newest first from an index, merged (as
        # in SQLite: one `state IN (...)` reads every job in those states and sorts them).
        pages = [
            self._list_rows(state, batch_id, task, owner, before_seq, limit)
            for state in (sorted(set(states)) or [None])
        ]
        merged = heapq.merge(*pages, key=lambda row: row["seq"], reverse=True)
        return [row_to_job(r) for r in itertools.islice(merged, limit)]

    def _list_rows(
        self, state: str | None, batch_id: str | None, task: str | None, owner: str | None,
        before_seq: int | None, limit: int,
    ) -> list[dict[str, Any]]:
        # PostgreSQL's planner weighs the filters by its statistics; each has an index ending
        # in seq (test_store_plans.py checks the plans at 100,000 jobs).
        given = [(column, value) for column, value in (
            ("batch_id", batch_id), ("owner", owner), ("state", state), ("task", task)
        ) if value is not None]
        where = [f"{column} = %s" for column, _ in given] + ["seq < %s"]
        args: list[Any] = [value for _, value in given]
        args.append(AFTER_NEWEST if before_seq is None else before_seq)
        sql = "SELECT * FROM jobs WHERE " + " AND ".join(where) + " ORDER BY seq DESC LIMIT %s"
        return rows(self.conn, sql, (*args, limit))

    def active(self, upstream: str | None = None, replica: str | None = None) -> list[Job]:
        sql = "SELECT * FROM jobs WHERE state IN ('submitted', 'running')"
        args: tuple = ()
        if upstream is not None:
            sql += " AND upstream = %s"
            args = (upstream,)
        if replica is not None:
            sql += " AND replica = %s"
            args += (replica,)
        return [row_to_job(r) for r in rows(self.conn, sql + " ORDER BY seq", args)]

    def inflight_counts(self) -> dict[str, int]:
        return dict(tuples(
            self.conn,
            "SELECT upstream, count(*) FROM jobs WHERE state IN ('submitted', 'running') GROUP BY upstream",
        ))

    def cancel_pending(self) -> list[Job]:
        return [row_to_job(r) for r in rows(self.conn, "SELECT * FROM jobs WHERE cancel_pending")]

    def counts_by_state(self) -> dict[str, int]:
        return self.owner_counts(None)

    def owner_counts(self, owner: str | None) -> dict[str, int]:
        sql, args = "SELECT state, sum(n)::bigint FROM job_counts", ()
        if owner is not None:
            sql, args = sql + " WHERE owner = %s", (owner,)
        counts = dict.fromkeys(STATES, 0)
        for state, n in tuples(self.conn, sql + " GROUP BY state", args):
            counts[state] = n
        return counts

    def events(self, job_id: str) -> list[dict[str, Any]]:
        return rows(
            self.conn, "SELECT at, state, detail FROM job_events WHERE job_id = %s ORDER BY id", (job_id,)
        )

    def events_after(
        self, after_id: int, *, job_id: str | None = None, batch_id: str | None = None,
        owner: str | None = None, limit: int = 500,
    ) -> list[dict[str, Any]]:
        where, args = ["id > %s"], [after_id]
        for column, wanted in (("job_id", job_id), ("batch_id", batch_id), ("owner", owner)):
            if wanted is not None:
                where.append(f"{column} = %s")
                args.append(wanted)
        return rows(
            self.conn,
            "SELECT id, job_id, at, state, detail, batch_id FROM job_events WHERE "
            + " AND ".join(where) + " ORDER BY id LIMIT %s",
            (*args, limit),
        )

    def newest_event_id(self) -> int:
        return value(self.conn, "SELECT coalesce(max(id), 0) FROM job_events")

    def blob(self, sha256: str) -> dict[str, Any] | None:
        return one(self.conn, "SELECT * FROM blobs WHERE sha256 = %s", (sha256,))

    def blob_sizes(self, shas: Iterable[str]) -> dict[str, int]:
        shas = list(shas)
        if not shas:
            return {}
        return dict(tuples(self.conn, "SELECT sha256, size FROM blobs WHERE sha256 = ANY(%s)", (shas,)))

    def recent_run_times(self, limit: int = 5000) -> list[tuple[str, str, float]]:
        return tuples(
            self.conn,
            "SELECT upstream, task, finished_at - started_at FROM jobs WHERE finished_at IS NOT NULL"
            " AND state = 'succeeded' AND started_at IS NOT NULL AND upstream IS NOT NULL"
            " ORDER BY finished_at DESC LIMIT %s",
            (limit,),
        )


class JobWrites(PostgresThreads):
    """Every change of a job: each a conditional UPDATE, with its timeline event."""

    async def _transition(self, event: tuple[str, str, str], sql: str, args: tuple) -> bool:
        """`transition` in a transaction of its own."""
        return await self._write(lambda conn: transition(conn, event, sql, args))

    async def record_blob(self, sha256: str, size: int, kind: str) -> None:
        await self._execute(
            "INSERT INTO blobs (sha256, size, kind, created_at) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (sha256) DO NOTHING",
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

        def write(conn: psycopg.Connection) -> tuple[str, bool]:
            now = timestamp()
            # ON CONFLICT: two replicas given the same Idempotency-Key at once make one job.
            inserted = conn.execute(
                "INSERT INTO jobs (id, task, state, params, inputs, priority, batch_id, owner,"
                " created_at, updated_at, idempotency_key, request_hash, pinned)"
                " VALUES (%s, %s, 'queued', %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (idempotency_key) DO NOTHING",
                (job_id, task, json.dumps(params), json.dumps(inputs), priority, batch_id,
                 owner, now, now, idempotency_key, request_hash, pinned),
            ).rowcount
            if not inserted:
                row = one(conn, "SELECT id, request_hash FROM jobs WHERE idempotency_key = %s", (idempotency_key,))
                assert row is not None
                if row["request_hash"] != request_hash:
                    raise IdempotencyConflict(idempotency_key)
                return row["id"], False
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
        left = list(off_node)

        def write(conn: psycopg.Connection) -> bool:
            now = timestamp()
            if slots is not None:
                # Replicas claiming a slot of one upstream take turns, and each counts the jobs
                # there after the one before it committed: two that both saw the last free slot
                # cannot both fill it.
                conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (UPSTREAM_LOCK, upstream))
                held = value(
                    conn,
                    "SELECT count(*) FROM jobs WHERE upstream = %s AND state IN ('submitted', 'running')"
                    " AND NOT (id = ANY(%s))",
                    (upstream, left),
                )
                if held >= slots:
                    return False
            # A replica whose lease another one took over claims nothing more (it may not know
            # yet: it learns at its next heartbeat). FOR SHARE: a take-over that would remove
            # the lease meanwhile skips it until this claim is committed, and then takes the job.
            if replica is not None and value(
                conn, "SELECT 1 FROM replicas WHERE id = %s FOR SHARE", (replica,)
            ) is None:
                return False
            # SKIP LOCKED: a job another replica is placing right now is its own; this one gets
            # False at once rather than waiting to find it taken.
            if one(conn, "SELECT 1 AS x FROM jobs WHERE id = %s AND state = 'queued' FOR UPDATE SKIP LOCKED", (job_id,)) is None:
                return False
            return transition(
                conn, (job_id, SUBMITTED, f"sent to {upstream}"),
                "UPDATE jobs SET state = 'submitted', upstream = %s, upstream_task_id = %s, replica = %s,"
                " attempts = attempts + 1, submitted_at = %s, updated_at = %s, queue_info = NULL"
                " WHERE id = %s AND state = 'queued'",
                (upstream, task_id, replica, now, now, job_id),
            )

        return await self._write(write)

    async def set_upstream_task_id(self, job_id: str, task_id: str, *, run: int | None = None) -> bool:
        return await self._execute(
            "UPDATE jobs SET upstream_task_id = %s, updated_at = %s WHERE id = %s"
            " AND run = coalesce(%s::integer, run)",
            (task_id, timestamp(), job_id, run),
        ) == 1

    async def requeue(self, job_id: str, reason: str, *, sent: bool = True) -> bool:
        return await self._transition(
            (job_id, QUEUED, reason),
            "UPDATE jobs SET state = 'queued', upstream = NULL, started_at = NULL,"
            " attempts = attempts - %s, updated_at = %s WHERE id = %s AND state IN ('submitted', 'running')",
            (0 if sent else 1, timestamp(), job_id),
        )

    async def mark_running(self, job_id: str, started_at: float | None = None) -> bool:
        now = timestamp()
        return await self._transition(
            (job_id, RUNNING, "started"),
            "UPDATE jobs SET state = 'running', started_at = %s, updated_at = %s, queue_info = NULL"
            " WHERE id = %s AND state = 'submitted'",
            (started_at or now, now, job_id),
        )

    async def set_queue_info(self, updates: dict[str, dict[str, Any] | None]) -> None:
        ids = list(updates)
        infos = [json.dumps(v) if v is not None else None for v in updates.values()]
        # One statement for the whole node's queue (its triggers then run once, not per job).
        await self._execute(
            "UPDATE jobs SET queue_info = v.info FROM unnest(%s::text[], %s::text[]) AS v(id, info)"
            f" WHERE jobs.id = v.id AND jobs.state NOT IN {TERMINAL_SQL}",
            (ids, infos),
        )

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
            "UPDATE jobs SET state = %s, error = %s, result_sha = %s, result_meta = %s,"
            " finished_at = %s, updated_at = %s, queue_info = NULL"
            f" WHERE id = %s AND state NOT IN {TERMINAL_SQL}",
            (state, error, result_sha, json.dumps(result_meta) if result_meta else None,
             now, now, job_id),
        )

    async def set_poster(self, job_id: str, result_sha: str, poster_sha: str) -> bool:
        # updated_at is left alone: a poster is not a change of the job that anyone waits for.
        return await self._execute(
            "UPDATE jobs SET result_meta = jsonb_set(coalesce(result_meta, '{}')::jsonb, '{poster}',"
            " to_jsonb(%s::text))::text"
            " WHERE id = %s AND state = 'succeeded' AND result_sha = %s AND NOT files_expired",
            (poster_sha, job_id, result_sha),
        ) == 1

    async def cancel(
        self, job_id: str, reason: str = "cancelled by user", *, tell_upstream: bool = True
    ) -> Job | None:
        def write(conn: psycopg.Connection) -> None:
            now = timestamp()
            count = changed(
                conn,
                "UPDATE jobs SET state = 'cancelled', error = %s, finished_at = %s, updated_at = %s,"
                " queue_info = NULL,"
                # Only a job an upstream may be running needs a stop request sent there.
                " cancel_pending = (%s AND state IN ('submitted', 'running'))"
                f" WHERE id = %s AND state NOT IN {TERMINAL_SQL}",
                (reason, now, now, tell_upstream, job_id),
            )
            if count:
                record_event(conn, job_id, CANCELLED, reason)

        await self._write(write)
        return await self.get(job_id)

    async def cancel_sent(self, job_id: str) -> None:
        await self._execute("UPDATE jobs SET cancel_pending = false WHERE id = %s", (job_id,))

    async def retry(self, job_id: str) -> Job | None:
        def write(conn: psycopg.Connection) -> None:
            now = timestamp()
            # A stop request not yet delivered is not dropped with the old run: its task
            # becomes a stray, cancelled before that upstream gets anything new.
            conn.execute(
                "INSERT INTO stray_tasks (node, task_id, job_id, created_at)"
                " SELECT upstream, upstream_task_id, id, %s FROM jobs WHERE id = %s"
                " AND state IN ('failed', 'cancelled') AND NOT files_expired AND cancel_pending"
                " AND upstream IS NOT NULL AND upstream_task_id IS NOT NULL"
                " ON CONFLICT (node, task_id) DO UPDATE SET job_id = excluded.job_id,"
                " created_at = excluded.created_at",
                (now, job_id),
            )
            count = changed(
                conn,
                "UPDATE jobs SET state = 'queued', run = run + 1, upstream = NULL,"
                " upstream_task_id = NULL, error = NULL, result_sha = NULL, result_meta = NULL,"
                " submitted_at = NULL, started_at = NULL, finished_at = NULL, updated_at = %s,"
                " cancel_pending = false"
                " WHERE id = %s AND state IN ('failed', 'cancelled') AND NOT files_expired",
                (now, job_id),
            )
            if count:
                record_event(conn, job_id, QUEUED, "retry requested")

        await self._write(write)
        return await self.get(job_id)

    async def resume(self, job_id: str, upstream: str, task_id: str) -> bool:
        now = timestamp()
        return await self._transition(
            (job_id, SUBMITTED, f"retry requested: resumed on {upstream} as the same task"),
            "UPDATE jobs SET state = 'submitted', run = run + 1, error = NULL,"
            " result_sha = NULL, result_meta = NULL, queue_info = NULL, submitted_at = %s,"
            " started_at = NULL, finished_at = NULL, updated_at = %s, cancel_pending = false"
            " WHERE id = %s AND upstream = %s AND upstream_task_id = %s"
            " AND state IN ('failed', 'cancelled') AND NOT files_expired",
            (now, now, job_id, upstream, task_id),
        )

    async def expire_files(self, finished_before: float, grace: float = 3600.0) -> list[str]:
        def write(conn: psycopg.Connection) -> list[str]:
            conn.execute(
                "UPDATE jobs SET files_expired = true WHERE NOT files_expired"
                f" AND state IN {TERMINAL_SQL} AND finished_at < %s",
                (finished_before,),
            )
            # Blobs recorded within the grace period are kept too: they may belong to a request
            # that is still being accepted.
            live = _blobs_of(conn, "NOT files_expired", ()) | pipeline_blobs(conn, finished_before)
            doomed = [
                sha for (sha,) in tuples(conn, "SELECT sha256 FROM blobs WHERE created_at < %s", (timestamp() - grace,))
                if sha not in live
            ]
            conn.execute("DELETE FROM blobs WHERE sha256 = ANY(%s)", (doomed,))
            return doomed

        return await self._write(write)

    async def move(self, job_id: str, upstream: str, reason: str, *, stray: bool) -> bool:
        def write(conn: psycopg.Connection) -> bool:
            now = timestamp()
            row = one(
                conn,
                "SELECT upstream_task_id FROM jobs WHERE id = %s AND upstream = %s"
                " AND state IN ('submitted', 'running') FOR UPDATE",
                (job_id, upstream),
            )
            if row is None:
                return False
            conn.execute(
                "UPDATE jobs SET state = 'queued', upstream = NULL, started_at = NULL,"
                " queue_info = NULL, updated_at = %s WHERE id = %s",
                (now, job_id),
            )
            if stray and row["upstream_task_id"]:
                conn.execute(
                    "INSERT INTO stray_tasks (node, task_id, job_id, created_at) VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT (node, task_id) DO UPDATE SET job_id = excluded.job_id,"
                    " created_at = excluded.created_at",
                    (upstream, row["upstream_task_id"], job_id, now),
                )
            record_event(conn, job_id, QUEUED, reason)
            return True

        return await self._write(write)

    async def purge_files(self, job_ids: list[str], actor: str, target: str) -> list[str]:
        def write(conn: psycopg.Connection) -> list[str]:
            these = f"id = ANY(%s) AND state IN {TERMINAL_SQL}"
            mine = _blobs_of(conn, these, (job_ids,))
            conn.execute(f"UPDATE jobs SET files_expired = true WHERE {these}", (job_ids,))
            kept = _blobs_of(conn, "NOT files_expired", ()) | pipeline_blobs(conn, 0.0)
            doomed = sorted(mine - kept) if mine else []
            conn.execute("DELETE FROM blobs WHERE sha256 = ANY(%s)", (doomed,))
            audit(conn, actor, "purge", target, f"jobs={len(job_ids)} files={len(doomed)}")
            return doomed

        return await self._write(write)


def _blobs_of(conn: psycopg.Connection, where: str, args: Any) -> set[str]:
    """The inputs and results of the jobs `where` selects. A blob may serve many jobs (one
    portrait, 100 voice-overs): it goes only when no job that keeps its files refers to it."""
    blobs: set[str] = set()
    found = tuples(conn, f"SELECT inputs, result_sha, result_meta::jsonb ->> 'poster' FROM jobs WHERE {where}", args)
    for inputs, result, poster in found:
        blobs.update(json.loads(inputs).values())
        blobs.update(sha for sha in (result, poster) if sha)
    return blobs


def transition(conn: psycopg.Connection, event: tuple[str, str, str], sql: str, args: tuple) -> bool:
    """Run one conditional UPDATE of one job; when it moved the job, add its timeline event.

    `event` is (job_id, state, detail). False when the job was not in a state the UPDATE allows
    (finished already, cancelled meanwhile): nothing changed and nothing is recorded.
    """
    moved = changed(conn, sql, args) == 1
    if moved:
        record_event(conn, *event)
    return moved


def lock_events(conn: psycopg.Connection) -> None:
    """Number this transaction's job events after every other's, in commit order: the lock is
    held until commit, so an event with a lower id is never committed after a higher one.

    Taken just before the events are written, as the transaction's last step: holding it, a
    transaction waits for nothing else, so it cannot deadlock with one waiting for it."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (EVENTS_LOCK,))


def record_event(conn: psycopg.Connection, job_id: str, state: str, detail: str) -> None:
    """A job's timeline event, with its owner and batch (the event streams replay by them).
    The last statement of its transaction (`lock_events`)."""
    lock_events(conn)
    conn.execute(
        "INSERT INTO job_events (job_id, at, state, detail, owner, batch_id)"
        " SELECT %s, %s, %s, %s, owner, batch_id FROM jobs WHERE id = %s",
        (job_id, timestamp(), state, detail, job_id),
    )
