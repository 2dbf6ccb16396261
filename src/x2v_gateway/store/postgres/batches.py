"""Batches in PostgreSQL: a batch's jobs in order, with the file names the user dropped."""

from __future__ import annotations

import json
from typing import Any

import psycopg

from ..records import STATES, BatchItem, BatchJobSpec, Job, JobWebhook, new_job_id
from ..sqlite.batches import row_to_item
from .connections import PgRows, PostgresThreads, one, rows, timestamp, tuples, value
from .jobs import lock_events
from .webhooks import insert_webhooks

# A job with its place in its dashboard batch, and the job retried as a new run of it, if any.
# The LIMIT keeps the lateral join a lookup per job of the page: joined whole, the planner
# hashed every batch's rows for a page of 500 jobs.
_ITEM_SQL = (
    "SELECT jobs.*, bj.position AS bj_position, bj.files AS bj_files,"
    " bj.retry_of AS bj_retry_of,"
    " (SELECT r.job_id FROM batch_jobs r WHERE r.retry_of = jobs.id"
    "  ORDER BY r.position DESC LIMIT 1) AS bj_retried_as"
    " FROM jobs LEFT JOIN LATERAL (SELECT position, files, retry_of FROM batch_jobs"
    "  WHERE batch_jobs.job_id = jobs.id LIMIT 1) bj ON true"
)
# pg_advisory_xact_lock's first key for "adding jobs to a batch" (the second: the batch id's hash).
_BATCH_LOCK = 0x7832


class BatchReads(PgRows):
    """Batches and their jobs in order."""

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        data = one(self.conn, "SELECT * FROM batches WHERE id = %s", (batch_id,))
        if data is None:
            return None
        data["form"] = json.loads(data["form"]) if data["form"] else {}
        return data

    def list_batches(
        self, *, owner: str | None = None, before: tuple[float, str] | None = None, limit: int = 50,
    ) -> list[dict[str, Any]]:
        where, args = [], []
        if owner is not None:
            where.append("owner = %s")
            args.append(owner)
        if before is not None:
            where.append("(created_at, id) < (%s, %s)")
            args += list(before)
        sql = "SELECT * FROM batches" + (" WHERE " + " AND ".join(where) if where else "")
        found = rows(self.conn, sql + " ORDER BY created_at DESC, id DESC LIMIT %s", (*args, limit))
        for data in found:
            data["form"] = json.loads(data["form"]) if data["form"] else {}
        return found

    def recent_batch_ids(self, limit: int = 20, window: int = 5000, owner: str | None = None) -> list[str]:
        if owner is None:
            sql, args = "SELECT batch_id, seq FROM jobs ORDER BY seq DESC LIMIT %s", (window,)
        else:
            sql, args = "SELECT batch_id, seq FROM jobs WHERE owner = %s ORDER BY seq DESC LIMIT %s", (owner, window)
        found = tuples(
            self.conn,
            f"SELECT batch_id, max(seq) AS last FROM ({sql}) recent WHERE batch_id IS NOT NULL"
            " GROUP BY batch_id ORDER BY last DESC LIMIT %s",
            (*args, limit),
        )
        return [r[0] for r in found]

    def batch_counts(self, batch_id: str, owner: str | None = None) -> dict[str, int]:
        mine, args = _owned(owner)
        counts = dict.fromkeys(STATES, 0)
        sql = f"SELECT state, count(*) FROM jobs WHERE batch_id = %s{mine} GROUP BY state"
        for state, n in tuples(self.conn, sql, [batch_id, *args]):
            counts[state] = n
        return counts

    def batch_created_at(self, batch_id: str, owner: str | None = None) -> float | None:
        mine, args = _owned(owner)
        return value(
            self.conn, f"SELECT created_at FROM jobs WHERE batch_id = %s{mine} ORDER BY seq LIMIT 1", [batch_id, *args]
        )

    def batch_items(
        self, batch_id: str, *, after_seq: int = 0, limit: int = 200, owner: str | None = None,
    ) -> list[BatchItem]:
        mine, args = _owned(owner, "jobs.owner")
        found = rows(
            self.conn,
            f"{_ITEM_SQL} WHERE jobs.batch_id = %s AND jobs.seq > %s{mine} ORDER BY jobs.seq LIMIT %s",
            (batch_id, after_seq, *args, limit),
        )
        return [row_to_item(r) for r in found]

    def batch_item(self, job_id: str) -> BatchItem | None:
        row = one(self.conn, _ITEM_SQL + " WHERE jobs.id = %s", (job_id,))
        return row_to_item(row) if row else None


class BatchWrites(PostgresThreads):
    """A batch's jobs, queued in one transaction."""

    async def create_batch(
        self,
        batch_id: str,
        specs: list[BatchJobSpec],
        *,
        batch: dict[str, Any] | None = None,
        owner: str | None = None,
        webhook: JobWebhook | None = None,
    ) -> list[Job] | None:
        ids = [new_job_id() for _ in specs]

        def write(conn: psycopg.Connection) -> bool:
            now = timestamp()
            # Jobs added to one batch by two replicas at once take positions one after the other.
            conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_BATCH_LOCK, batch_id))
            if batch is not None:
                added = conn.execute(
                    "INSERT INTO batches (id, name, task, mode, owner, created_at, form)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
                    (batch_id, batch.get("name"), batch.get("task"), batch.get("mode"), owner,
                     now, json.dumps(batch.get("form") or {})),
                ).rowcount
                if not added:
                    return False
            last = value(conn, "SELECT coalesce(max(position), 0) FROM batch_jobs WHERE batch_id = %s", (batch_id,))
            with conn.cursor() as cur:
                cur.execute(
                    "INSERT INTO jobs (id, task, state, params, inputs, priority, batch_id, owner,"
                    " created_at, updated_at, pinned) SELECT id, task, state, params, inputs, priority,"
                    " batch_id, owner, created_at, updated_at, pinned FROM unnest(%s::text[], %s::text[],"
                    " %s::text[], %s::text[], %s::text[], %s::integer[], %s::text[], %s::text[],"
                    " %s::float8[], %s::float8[], %s::text[]) WITH ORDINALITY AS u(id, task, state, params,"
                    " inputs, priority, batch_id, owner, created_at, updated_at, pinned, n)"
                    # In the specs' order: a job's seq is its place in the batch.
                    " ORDER BY n",
                    (ids, [s.task for s in specs], ["queued"] * len(ids),
                     [json.dumps(s.params) for s in specs], [json.dumps(s.inputs) for s in specs],
                     [s.priority for s in specs], [batch_id] * len(ids), [owner] * len(ids),
                     [now] * len(ids), [now] * len(ids), [s.pinned for s in specs]),
                )
                cur.execute(
                    "INSERT INTO batch_jobs (job_id, batch_id, position, files, retry_of)"
                    " SELECT * FROM unnest(%s::text[], %s::text[], %s::integer[], %s::text[], %s::text[])",
                    (ids, [batch_id] * len(ids), list(range(last + 1, last + 1 + len(ids))),
                     [json.dumps(s.files) for s in specs], [s.retry_of for s in specs]),
                )
                insert_webhooks(conn, ids, webhook)
                lock_events(conn)  # the events last (jobs.record_event)
                cur.execute(
                    "INSERT INTO job_events (job_id, at, state, detail, owner, batch_id)"
                    " SELECT job_id, %s, 'queued', detail, %s, %s"
                    " FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS e(job_id, detail, n) ORDER BY n",
                    (now, owner, batch_id, ids,
                     [f"accepted (a new run of {s.retry_of})" if s.retry_of else "accepted" for s in specs]),
                )
            return True

        if not await self._write(write):
            return None
        return await self.read(lambda r: r.jobs_by_id(ids))


def _owned(owner: str | None, column: str = "owner") -> tuple[str, list[str]]:
    """The condition that keeps only `owner`'s jobs of a batch (all of them for None)."""
    return ("", []) if owner is None else (f" AND {column} = %s", [owner])
