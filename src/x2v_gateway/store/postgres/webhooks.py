"""Webhooks in PostgreSQL: each job's webhook, the deliveries to make, keys' secrets and defaults.

The job events (job_events) are the source: the worker reads those of jobs with a webhook after
its cursor and records their deliveries, and moves the cursor, in one transaction. Event ids grow
in commit order (jobs.record_event): an event the worker has not seen is always after the cursor,
whichever replica recorded it. Two replicas' workers recording the same events add each delivery
once (unique per event, type and URL).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import psycopg

from ..records import JobWebhook
from .connections import PgRows, PostgresThreads, changed, one, rows, timestamp, value
from .keys import audit

TERMINAL_SQL = "('succeeded', 'failed', 'cancelled')"
_PENDING = "delivered_at IS NULL AND gave_up_at IS NULL"
_ALL_COLUMNS = (
    "id", "event_id", "type", "job_id", "url", "key_id", "payload", "created_at", "attempts",
    "next_attempt_at", "last_attempt_at", "last_status", "last_error", "delivered_at", "gave_up_at",
)
# The columns of a delivery the API shows (not its payload).
_DELIVERY_COLUMNS = (
    "id, event_id, type, job_id, url, created_at, attempts, next_attempt_at, last_attempt_at,"
    " last_status, last_error, delivered_at, gave_up_at"
)


def insert_webhooks(conn: psycopg.Connection, job_ids: list[str], webhook: JobWebhook | None) -> None:
    """Give these new jobs a webhook, in the transaction that makes them."""
    if webhook is not None:
        conn.execute(
            "INSERT INTO job_webhooks (job_id, url, events, key_id)"
            " SELECT job_id, %s, %s, %s FROM unnest(%s::text[]) AS j(job_id)",
            (webhook.url, ",".join(webhook.events), webhook.key_id, list(job_ids)),
        )


def _webhook(row: dict[str, Any]) -> JobWebhook:
    return JobWebhook(row["url"], tuple(row["events"].split(",")), row["key_id"])


class WebhookReads(PgRows):
    """Job events to send, deliveries, and what signs them."""

    def job_webhook(self, job_id: str) -> JobWebhook | None:
        row = one(self.conn, "SELECT * FROM job_webhooks WHERE job_id = %s", (job_id,))
        return _webhook(row) if row else None

    def webhook_events(self, limit: int = 200) -> tuple[list[dict[str, Any]], int]:
        cursor = value(self.conn, "SELECT event_id FROM webhook_cursor")
        newest = value(self.conn, "SELECT coalesce(max(id), 0) FROM job_events")
        found = rows(
            self.conn,
            "SELECT e.id, e.job_id, e.at, e.state, e.detail, w.url, w.events, w.key_id,"
            " j.batch_id, j.owner FROM job_events e"
            " JOIN job_webhooks w ON w.job_id = e.job_id JOIN jobs j ON j.id = e.job_id"
            " WHERE e.id > %s AND e.id <= %s ORDER BY e.id LIMIT %s",
            (cursor, newest, limit),
        )
        events = [
            {"id": r["id"], "job_id": r["job_id"], "at": r["at"], "state": r["state"], "detail": r["detail"],
             "batch_id": r["batch_id"], "owner": r["owner"], "webhook": _webhook(r)}
            for r in found
        ]
        return events, (found[-1]["id"] if len(found) == limit else newest)

    def batch_last_event(self, batch_id: str, owner: str | None) -> int | None:
        owned, args = ("", ()) if owner is None else (" AND owner = %s", (owner,))
        unfinished = value(
            self.conn,
            f"SELECT 1 FROM jobs WHERE batch_id = %s AND state NOT IN {TERMINAL_SQL}{owned} LIMIT 1",
            (batch_id, *args),
        )
        if unfinished:
            return None
        return value(
            self.conn,
            "SELECT max(e.id) FROM jobs j JOIN job_events e ON e.job_id = j.id"
            f" WHERE j.batch_id = %s{'' if owner is None else ' AND j.owner = %s'}",
            (batch_id, *args),
        )

    def batch_webhooks(self, batch_id: str, owner: str | None) -> list[JobWebhook]:
        owned, args = ("", ()) if owner is None else (" AND j.owner = %s", (owner,))
        found = rows(
            self.conn,
            "SELECT DISTINCT w.url, w.events, w.key_id FROM jobs j JOIN job_webhooks w ON w.job_id = j.id"
            f" WHERE j.batch_id = %s{owned} AND 'batch.finished' = ANY(string_to_array(w.events, ','))",
            (batch_id, *args),
        )
        return [_webhook(r) for r in found]

    def due_deliveries(self, now: float, limit: int, skip_urls: Iterable[str] = ()) -> list[tuple[str, str]]:
        found = rows(
            self.conn,
            f"SELECT id, url FROM webhook_deliveries WHERE {_PENDING} AND next_attempt_at <= %s"
            " AND NOT (url = ANY(%s::text[])) ORDER BY next_attempt_at LIMIT %s",
            (now, list(skip_urls), limit),
        )
        return [(r["id"], r["url"]) for r in found]

    def next_delivery_at(self) -> float | None:
        return value(self.conn, f"SELECT min(next_attempt_at) FROM webhook_deliveries WHERE {_PENDING}")

    def job_deliveries(self, job_id: str, limit: int = 200) -> list[dict[str, Any]]:
        return rows(
            self.conn,
            f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries WHERE job_id = %s"
            " ORDER BY created_at, event_id LIMIT %s",
            (job_id, limit),
        )

    def pending_deliveries(self, job_id: str) -> int:
        return value(self.conn, f"SELECT count(*) FROM webhook_deliveries WHERE job_id = %s AND {_PENDING}", (job_id,))

    def webhook_secrets(self, key_id: str) -> list[str]:
        row = one(
            self.conn,
            "SELECT webhook_secret, webhook_secret_previous, webhook_secret_previous_until"
            " FROM api_keys WHERE id = %s", (key_id,),
        )
        if row is None or not row["webhook_secret"]:
            return []
        found = [row["webhook_secret"]]
        if row["webhook_secret_previous"] and (row["webhook_secret_previous_until"] or 0) > timestamp():
            found.append(row["webhook_secret_previous"])
        return found


class WebhookWrites(PostgresThreads):
    """Deliveries recorded and attempted; keys' webhooks and secrets set."""

    async def record_deliveries(
        self, deliveries: list[dict[str, Any]], cursor: int, pipeline_cursor: int | None = None,
    ) -> int:
        def write(conn: psycopg.Connection) -> int:
            added = 0
            for d in deliveries:
                added += changed(
                    conn,
                    "INSERT INTO webhook_deliveries (id, event_id, type, job_id, pipeline_id, url,"
                    " key_id, payload, created_at, next_attempt_at) VALUES (%(id)s, %(event_id)s, %(type)s,"
                    " %(job_id)s, %(pipeline_id)s, %(url)s, %(key_id)s, %(payload)s, %(created_at)s,"
                    " %(created_at)s) ON CONFLICT DO NOTHING",
                    {"job_id": None, "pipeline_id": None, **d},
                )
            conn.execute("UPDATE webhook_cursor SET event_id = greatest(event_id, %s)", (cursor,))
            if pipeline_cursor is not None:
                conn.execute(
                    "UPDATE webhook_cursor SET pipeline_event_id = greatest(pipeline_event_id, %s)",
                    (pipeline_cursor,),
                )
            return added

        return await self._write(write)

    async def claim_deliveries(self, ids: list[str], now: float, until: float) -> list[dict[str, Any]]:
        # SKIP LOCKED: two replicas' workers claiming at once each get their own deliveries.
        # Each row comes back as it was (next_attempt_at: when it fell due), as SQLite's does.
        if not ids:
            return []
        returned = ", ".join(
            f"due.{c}" if c == "next_attempt_at" else f"d.{c}" for c in _ALL_COLUMNS
        )
        claimed = await self._write(lambda conn: rows(
            conn,
            "UPDATE webhook_deliveries d SET next_attempt_at = %s FROM (SELECT id, next_attempt_at"
            f" FROM webhook_deliveries WHERE id = ANY(%s::text[]) AND {_PENDING} AND next_attempt_at <= %s"
            " FOR UPDATE SKIP LOCKED) due WHERE d.id = due.id"
            f" RETURNING {returned}",
            (until, list(ids), now),
        ))
        order = {delivery_id: n for n, delivery_id in enumerate(ids)}
        return sorted(claimed, key=lambda d: order[d["id"]])

    async def delivery_attempted(
        self, delivery_id: str, *, at: float, status: int | None, error: str | None,
        next_attempt_at: float | None,
    ) -> None:
        delivered = status is not None and 200 <= status < 300
        await self._execute(
            "UPDATE webhook_deliveries SET attempts = attempts + 1, last_attempt_at = %s,"
            " last_status = %s, last_error = %s, next_attempt_at = %s, delivered_at = %s, gave_up_at = %s"
            f" WHERE id = %s AND {_PENDING}",
            (at, status, error, None if delivered else next_attempt_at, at if delivered else None,
             at if not delivered and next_attempt_at is None else None, delivery_id),
        )

    async def set_key_webhook(
        self, key_id: str, url: str | None, events: tuple[str, ...] | None, actor: str,
    ) -> bool:
        def write(conn: psycopg.Connection) -> bool:
            found = changed(
                conn,
                "UPDATE api_keys SET webhook_url = %s, webhook_events = %s WHERE id = %s",
                (url, ",".join(events) if url and events else None, key_id),
            )
            if found:
                audit(conn, actor, "key.webhook", key_id, "set" if url else "removed")
            return bool(found)

        return await self._write(write)

    async def set_webhook_secret(
        self, key_id: str, secret: str, actor: str, *, previous_until: float | None,
    ) -> bool:
        def write(conn: psycopg.Connection) -> bool:
            found = changed(
                conn,
                "UPDATE api_keys SET webhook_secret_previous = CASE WHEN %s::float8 IS NULL THEN NULL"
                " ELSE webhook_secret END, webhook_secret_previous_until = %s, webhook_secret = %s"
                " WHERE id = %s",
                (previous_until, previous_until, secret, key_id),
            )
            if found:
                audit(conn, actor, "key.webhook-secret", key_id, "rotated")
            return bool(found)

        return await self._write(write)
