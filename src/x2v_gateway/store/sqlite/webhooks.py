"""Webhooks in SQLite: each job's webhook, the deliveries to make, keys' secrets and defaults.

The job events (job_events) are the source: the worker reads those of jobs with a webhook after
its cursor and records their deliveries, and moves the cursor, in one transaction. Event ids grow
in commit order here (one writer): an event the worker has not seen is always after the cursor.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Any

from ..records import JobWebhook
from .connections import Rows, SqliteThreads, timestamp
from .keys import audit

TERMINAL_SQL = "('succeeded', 'failed', 'cancelled')"
_PENDING = "delivered_at IS NULL AND gave_up_at IS NULL"
# A job's deliveries, asked on every GET of the job: while the table is nearly empty, SQLite's
# statistics (after an ANALYZE) would have it read the table whole, and keep doing so as it grows.
_BY_JOB = "INDEXED BY idx_webhook_deliveries_job_id_created_at"
# The columns of a delivery the API shows (not its payload).
_DELIVERY_COLUMNS = (
    "id, event_id, type, job_id, url, created_at, attempts, next_attempt_at, last_attempt_at,"
    " last_status, last_error, delivered_at, gave_up_at"
)


def insert_webhooks(conn: sqlite3.Connection, job_ids: Iterable[str], webhook: JobWebhook | None) -> None:
    """Give these new jobs a webhook, in the transaction that makes them."""
    if webhook is not None:
        conn.executemany(
            "INSERT INTO job_webhooks (job_id, url, events, key_id) VALUES (?, ?, ?, ?)",
            [(job_id, webhook.url, ",".join(webhook.events), webhook.key_id) for job_id in job_ids],
        )


def _webhook(row: sqlite3.Row) -> JobWebhook:
    return JobWebhook(row["url"], tuple(row["events"].split(",")), row["key_id"])


class WebhookReads(Rows):
    """Job events to send, deliveries, and what signs them."""

    def job_webhook(self, job_id: str) -> JobWebhook | None:
        row = self.conn.execute("SELECT * FROM job_webhooks WHERE job_id = ?", (job_id,)).fetchone()
        return _webhook(row) if row else None

    def webhook_events(self, limit: int = 200) -> tuple[list[dict[str, Any]], int]:
        """Job events after the cursor whose job has a webhook, oldest first, each with the job's
        webhook (`webhook`), its batch and owner; and the cursor once these are recorded."""
        (cursor,) = self.conn.execute("SELECT event_id FROM webhook_cursor").fetchone()
        (newest,) = self.conn.execute("SELECT coalesce(max(id), 0) FROM job_events").fetchone()
        # Walks the new events by id (a few lookups each), however many jobs have webhooks:
        # CROSS JOIN keeps SQLite from walking every job's webhook instead, whatever it guesses.
        rows = self.conn.execute(
            "SELECT e.id, e.job_id, e.at, e.state, e.detail, w.url, w.events, w.key_id,"
            " j.batch_id, j.owner FROM job_events e"
            " CROSS JOIN job_webhooks w ON w.job_id = e.job_id CROSS JOIN jobs j ON j.id = e.job_id"
            " WHERE e.id > ? AND e.id <= ? ORDER BY e.id LIMIT ?",
            (cursor, newest, limit),
        ).fetchall()
        events = [
            {"id": r["id"], "job_id": r["job_id"], "at": r["at"], "state": r["state"], "detail": r["detail"],
             "batch_id": r["batch_id"], "owner": r["owner"], "webhook": _webhook(r)}
            for r in rows
        ]
        return events, (rows[-1]["id"] if len(rows) == limit else newest)

    def batch_last_event(self, batch_id: str, owner: str | None) -> int | None:
        """The id of the batch's newest job event when every job of the batch has finished;
        None while one has not. (A batch id is per owner: another key's batch of that name is
        another batch.)"""
        owned, args = ("", ()) if owner is None else (" AND +owner = ?", (owner,))
        unfinished = self.conn.execute(
            f"SELECT 1 FROM jobs WHERE batch_id = ? AND state NOT IN {TERMINAL_SQL}{owned} LIMIT 1",
            (batch_id, *args),
        ).fetchone()
        if unfinished:
            return None
        (last,) = self.conn.execute(
            "SELECT max(e.id) FROM jobs j JOIN job_events e ON e.job_id = j.id"
            f" WHERE j.batch_id = ?{'' if owner is None else ' AND +j.owner = ?'}",
            (batch_id, *args),
        ).fetchone()
        return last

    def batch_webhooks(self, batch_id: str, owner: str | None) -> list[JobWebhook]:
        """The different webhooks of a batch's jobs that want `batch.finished`."""
        owned, args = ("", ()) if owner is None else (" AND +j.owner = ?", (owner,))
        rows = self.conn.execute(
            "SELECT DISTINCT w.url, w.events, w.key_id FROM jobs j JOIN job_webhooks w ON w.job_id = j.id"
            f" WHERE j.batch_id = ?{owned} AND ',' || w.events || ',' LIKE '%,batch.finished,%'",
            (batch_id, *args),
        ).fetchall()
        return [_webhook(r) for r in rows]

    def due_deliveries(self, now: float, limit: int, skip_urls: Iterable[str] = ()) -> list[tuple[str, str]]:
        """(id, url) of pending deliveries due by `now`, the most overdue first, but those to
        `skip_urls`."""
        skip = list(skip_urls)
        rows = self.conn.execute(
            f"SELECT id, url FROM webhook_deliveries WHERE {_PENDING} AND next_attempt_at <= ?"
            f" AND url NOT IN ({','.join('?' * len(skip))}) ORDER BY next_attempt_at LIMIT ?",
            (now, *skip, limit),
        )
        return [tuple(r) for r in rows]

    def next_delivery_at(self) -> float | None:
        (at,) = self.conn.execute(
            f"SELECT min(next_attempt_at) FROM webhook_deliveries WHERE {_PENDING}"
        ).fetchone()
        return at

    def job_deliveries(self, job_id: str, limit: int = 200) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries {_BY_JOB} WHERE job_id = ?"
            " ORDER BY created_at, event_id LIMIT ?",
            (job_id, limit),
        )
        return [dict(r) for r in rows]

    def pending_deliveries(self, job_id: str) -> int:
        (n,) = self.conn.execute(
            f"SELECT count(*) FROM webhook_deliveries {_BY_JOB} WHERE job_id = ? AND {_PENDING}", (job_id,)
        ).fetchone()
        return n

    def webhook_secrets(self, key_id: str) -> list[str]:
        """The secrets that sign a key's deliveries now: its own, and during a rotation the one
        it replaced."""
        row = self.conn.execute(
            "SELECT webhook_secret, webhook_secret_previous, webhook_secret_previous_until"
            " FROM api_keys WHERE id = ?", (key_id,),
        ).fetchone()
        if row is None or not row[0]:
            return []
        found = [row[0]]
        if row[1] and (row[2] or 0) > timestamp():
            found.append(row[1])
        return found


class WebhookWrites(SqliteThreads):
    """Deliveries recorded and attempted; keys' webhooks and secrets set."""

    async def record_deliveries(
        self, deliveries: list[dict[str, Any]], cursor: int, pipeline_cursor: int | None = None,
    ) -> int:
        """Add these deliveries (one already recorded for its event, type and URL is left as it
        was) and move the cursors past the events they came from; how many were new."""

        def write(conn: sqlite3.Connection) -> int:
            added = 0
            for d in deliveries:
                added += conn.execute(
                    "INSERT OR IGNORE INTO webhook_deliveries (id, event_id, type, job_id, pipeline_id,"
                    " url, key_id, payload, created_at, next_attempt_at) VALUES (:id, :event_id, :type,"
                    " :job_id, :pipeline_id, :url, :key_id, :payload, :created_at, :created_at)",
                    {"job_id": None, "pipeline_id": None, **d},
                ).rowcount
            conn.execute("UPDATE webhook_cursor SET event_id = max(event_id, ?)", (cursor,))
            if pipeline_cursor is not None:
                conn.execute(
                    "UPDATE webhook_cursor SET pipeline_event_id = max(pipeline_event_id, ?)", (pipeline_cursor,)
                )
            return added

        return await self._write(write)

    async def claim_deliveries(self, ids: list[str], now: float, until: float) -> list[dict[str, Any]]:
        """Take these deliveries for an attempt, those still pending and due by `now` (another
        replica may have taken one meanwhile): each is due again only at `until` (a lease), so
        no other round or replica attempts it too, and one a crash cut short is due again then."""

        def write(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            # One by one (a few, one per free slot): `id IN (...)` on a table that looks small
            # to SQLite's statistics is read whole.
            found = [conn.execute(
                f"SELECT * FROM webhook_deliveries WHERE id = ? AND {_PENDING} AND next_attempt_at <= ?",
                (delivery_id, now),
            ).fetchone() for delivery_id in ids]
            rows = [dict(r) for r in found if r is not None]
            conn.executemany(
                "UPDATE webhook_deliveries SET next_attempt_at = ? WHERE id = ?",
                [(until, row["id"]) for row in rows],
            )
            return rows

        return await self._write(write) if ids else []

    async def delivery_attempted(
        self, delivery_id: str, *, at: float, status: int | None, error: str | None,
        next_attempt_at: float | None,
    ) -> None:
        """One attempt's outcome: delivered (a 2xx), or failed and due again at `next_attempt_at`
        (None: given up)."""
        delivered = status is not None and 200 <= status < 300
        await self._execute(
            "UPDATE webhook_deliveries SET attempts = attempts + 1, last_attempt_at = ?,"
            " last_status = ?, last_error = ?, next_attempt_at = ?,"
            " delivered_at = CASE WHEN ? THEN ? END,"
            " gave_up_at = CASE WHEN NOT ? AND ? IS NULL THEN ? END"
            f" WHERE id = ? AND {_PENDING}",
            (at, status, error, None if delivered else next_attempt_at, delivered, at,
             delivered, next_attempt_at, at, delivery_id),
        )

    async def set_key_webhook(
        self, key_id: str, url: str | None, events: tuple[str, ...] | None, actor: str,
    ) -> bool:
        """A key's default webhook (None: none). False: no such key."""

        def write(conn: sqlite3.Connection) -> bool:
            changed = conn.execute(
                "UPDATE api_keys SET webhook_url = ?, webhook_events = ? WHERE id = ?",
                (url, ",".join(events) if url and events else None, key_id),
            ).rowcount
            if changed:
                audit(conn, actor, "key.webhook", key_id, "set" if url else "removed")
            return bool(changed)

        return await self._write(write)

    async def set_webhook_secret(
        self, key_id: str, secret: str, actor: str, *, previous_until: float | None,
    ) -> bool:
        """A key's new signing secret. With `previous_until`, the one it replaces still signs
        until then; else it stops at once. False: no such key."""

        def write(conn: sqlite3.Connection) -> bool:
            changed = conn.execute(
                "UPDATE api_keys SET webhook_secret_previous = CASE WHEN ? IS NULL THEN NULL"
                " ELSE webhook_secret END, webhook_secret_previous_until = ?, webhook_secret = ?"
                " WHERE id = ?",
                (previous_until, previous_until, secret, key_id),
            ).rowcount
            if changed:
                audit(conn, actor, "key.webhook-secret", key_id, "rotated")
            return bool(changed)

        return await self._write(write)
