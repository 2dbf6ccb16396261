"""Batches in SQLite: a batch's jobs in order, with the file names the user dropped."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from ..records import STATES, BatchItem, BatchJobSpec, Job, JobWebhook, new_job_id
from .connections import AFTER_NEWEST, Rows, SqliteThreads, timestamp
from .jobs import job_from
from .webhooks import insert_webhooks

# A job with its place in its dashboard batch, and the job retried as a new run of it, if any.
_ITEM_SQL = (
    "SELECT jobs.*, bj.position AS bj_position, bj.files AS bj_files,"
    " bj.retry_of AS bj_retry_of,"
    " (SELECT r.job_id FROM batch_jobs r WHERE r.retry_of = jobs.id"
    "  ORDER BY r.position DESC LIMIT 1) AS bj_retried_as"
    " FROM jobs LEFT JOIN batch_jobs bj ON bj.job_id = jobs.id"
)


class BatchReads(Rows):
    """Batches and their jobs in order."""

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
        if row is None:
            return None
        data = dict(row)
        data["form"] = json.loads(data["form"]) if data["form"] else {}
        return data

    def recent_batch_ids(self, limit: int = 20, window: int = 5000, owner: str | None = None) -> list[str]:
        if owner is None:
            sql, args = "SELECT batch_id, seq FROM jobs WHERE seq < ? ORDER BY seq DESC LIMIT ?", (AFTER_NEWEST, window)
        else:
            sql, args = "SELECT batch_id, seq FROM jobs WHERE owner = ? ORDER BY seq DESC LIMIT ?", (owner, window)
        rows = self.conn.execute(
            f"SELECT batch_id, max(seq) AS last FROM ({sql}) WHERE batch_id IS NOT NULL"
            " GROUP BY batch_id ORDER BY last DESC LIMIT ?",
            (*args, limit),
        )
        return [r[0] for r in rows]

    def list_batches(
        self, *, owner: str | None = None, before: tuple[float, str] | None = None, limit: int = 50,
    ) -> list[dict[str, Any]]:
        where, args = [], []
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if before is not None:
            where.append("(created_at, id) < (?, ?)")
            args += list(before)
        sql = "SELECT * FROM batches" + (" WHERE " + " AND ".join(where) if where else "")
        rows = self.conn.execute(sql + " ORDER BY created_at DESC, id DESC LIMIT ?", (*args, limit))
        found = []
        for row in rows:
            data = dict(row)
            data["form"] = json.loads(data["form"]) if data["form"] else {}
            found.append(data)
        return found

    def batch_counts(self, batch_id: str, owner: str | None = None) -> dict[str, int]:
        mine, args = _owned(owner)
        counts = dict.fromkeys(STATES, 0)
        sql = f"SELECT state, count(*) FROM jobs WHERE batch_id = ?{mine} GROUP BY state"
        for state, n in self.conn.execute(sql, [batch_id, *args]):
            counts[state] = n
        return counts

    def batch_created_at(self, batch_id: str, owner: str | None = None) -> float | None:
        mine, args = _owned(owner)
        row = self.conn.execute(
            f"SELECT created_at FROM jobs WHERE batch_id = ?{mine} ORDER BY seq LIMIT 1", [batch_id, *args]
        ).fetchone()
        return row[0] if row else None

    def batch_items(
        self, batch_id: str, *, after_seq: int = 0, limit: int = 200, owner: str | None = None,
    ) -> list[BatchItem]:
        mine, args = _owned(owner, "jobs.owner")
        rows = self.conn.execute(
            f"{_ITEM_SQL} WHERE jobs.batch_id = ? AND jobs.seq > ?{mine} ORDER BY jobs.seq LIMIT ?",
            (batch_id, after_seq, *args, limit),
        ).fetchall()
        return [row_to_item(r) for r in rows]

    def batch_item(self, job_id: str) -> BatchItem | None:
        row = self.conn.execute(_ITEM_SQL + " WHERE jobs.id = ?", (job_id,)).fetchone()
        return row_to_item(row) if row else None


class BatchWrites(SqliteThreads):
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
        """Queue jobs in a batch, all in one transaction: every job or none.

        With `batch` (name, task, mode, form) a new dashboard batch is recorded too; when a batch
        with that id exists already (a second click on "Create"), nothing is added: None.
        """
        ids = [new_job_id() for _ in specs]

        def write(conn: sqlite3.Connection) -> bool:
            now = timestamp()
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
                " created_at, updated_at, pinned) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)",
                [(job_id, s.task, json.dumps(s.params), json.dumps(s.inputs), s.priority,
                  batch_id, owner, now, now, s.pinned) for job_id, s in zip(ids, specs)],
            )
            conn.executemany(
                "INSERT INTO batch_jobs (job_id, batch_id, position, files, retry_of)"
                " VALUES (?, ?, ?, ?, ?)",
                [(job_id, batch_id, last + n, json.dumps(s.files), s.retry_of)
                 for n, (job_id, s) in enumerate(zip(ids, specs), start=1)],
            )
            insert_webhooks(conn, ids, webhook)
            conn.executemany(
                "INSERT INTO job_events (job_id, at, state, detail, owner, batch_id)"
                " VALUES (?, ?, 'queued', ?, ?, ?)",
                [(job_id, now, f"accepted (a new run of {s.retry_of})" if s.retry_of else "accepted",
                  owner, batch_id) for job_id, s in zip(ids, specs)],
            )
            return True

        if not await self._write(write):
            return None
        return await self.read(lambda r: r.jobs_by_id(ids))


def _owned(owner: str | None, column: str = "owner") -> tuple[str, list[str]]:
    """The condition that keeps only `owner`'s jobs of a batch (all of them for None). Its unary
    + keeps SQLite on the batch's index: it might read all of the owner's jobs instead."""
    return ("", []) if owner is None else (f" AND +{column} = ?", [owner])


def row_to_item(row: sqlite3.Row | dict[str, Any]) -> BatchItem:
    # The job's columns (jobs.*), then batch_jobs' four (_ITEM_SQL): read as a tuple, not a dict,
    # since a batch page reads 500 of them. (PostgreSQL's rows are dicts, in the same order.)
    if isinstance(row, dict):
        names, values = tuple(row), tuple(row.values())
    else:
        names, values = tuple(row.keys()), tuple(row)
    position, files, retry_of, retried_as = values[-4:]
    return BatchItem(
        job=job_from(names[:-4], values[:-4]),
        position=position,
        files=json.loads(files) if files else {},
        retry_of=retry_of,
        retried_as=retried_as,
    )
