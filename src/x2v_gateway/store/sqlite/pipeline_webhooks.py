"""Pipelines' webhooks in SQLite: a pipeline's webhook, its ends as events, and what the webhook
worker reads of them (webhook_worker.py turns them into deliveries, as it does job events).

A pipeline's end (succeeded, failed, cancelled) is recorded in the transaction that moves it;
the worker reads those after its own cursor (`webhook_cursor.pipeline_event_id`) and records
their deliveries and moves that cursor in one transaction, with the job events'.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from ..records import JobWebhook
from .connections import Rows, timestamp
# One reading of a webhook's row, one list of a delivery's shown columns, for jobs and pipelines.
from .webhooks import _DELIVERY_COLUMNS, _webhook

# The ends of a pipeline a webhook may hear of (a failed one retried runs again, and may end again).
PIPELINE_ENDS = ("succeeded", "failed", "cancelled")


def insert_pipeline_webhook(conn: sqlite3.Connection, pipeline_id: str, webhook: JobWebhook | None) -> None:
    """Give a new pipeline its webhook, in the transaction that makes it."""
    if webhook is not None:
        conn.execute(
            "INSERT INTO pipeline_webhooks (pipeline_id, url, events, key_id) VALUES (?, ?, ?, ?)",
            (pipeline_id, webhook.url, ",".join(webhook.events), webhook.key_id),
        )


def record_pipeline_end(conn: sqlite3.Connection, pipeline_id: str, state: str, was: str, detail: str | None) -> None:
    """The pipeline's move from `was` to `state`, as an event when it is an end it was not at."""
    if state in PIPELINE_ENDS and state != was:
        conn.execute(
            "INSERT INTO pipeline_events (pipeline_id, at, state, detail) VALUES (?, ?, ?, ?)",
            (pipeline_id, timestamp(), state, detail),
        )



class PipelineWebhookReads(Rows):
    """A pipeline's webhook and deliveries; its events the worker has not turned into any yet."""

    def pipeline_webhook(self, pipeline_id: str) -> JobWebhook | None:
        row = self.conn.execute("SELECT * FROM pipeline_webhooks WHERE pipeline_id = ?", (pipeline_id,)).fetchone()
        return _webhook(row) if row else None

    def pipeline_webhook_events(self, limit: int = 200) -> tuple[list[dict[str, Any]], int]:
        """Pipeline events after the worker's cursor whose pipeline has a webhook, oldest first,
        each with that webhook (`webhook`); and the cursor once these are recorded."""
        (cursor,) = self.conn.execute("SELECT pipeline_event_id FROM webhook_cursor").fetchone()
        (newest,) = self.conn.execute("SELECT coalesce(max(id), 0) FROM pipeline_events").fetchone()
        rows = self.conn.execute(
            "SELECT e.id, e.pipeline_id, e.at, e.state, e.detail, w.url, w.events, w.key_id"
            " FROM pipeline_events e CROSS JOIN pipeline_webhooks w ON w.pipeline_id = e.pipeline_id"
            " WHERE e.id > ? AND e.id <= ? ORDER BY e.id LIMIT ?",
            (cursor, newest, limit),
        ).fetchall()
        events = [
            {"id": r["id"], "pipeline_id": r["pipeline_id"], "at": r["at"], "state": r["state"],
             "detail": r["detail"], "webhook": _webhook(r)}
            for r in rows
        ]
        return events, (rows[-1]["id"] if len(rows) == limit else newest)

    def pipeline_deliveries(self, pipeline_id: str, limit: int = 200) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries WHERE pipeline_id = ?"
            " ORDER BY created_at, event_id LIMIT ?",
            (pipeline_id, limit),
        )
        return [dict(r) for r in rows]
