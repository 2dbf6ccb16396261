"""Pipelines' webhooks in PostgreSQL: as SQLite's (store/sqlite/pipeline_webhooks.py). A pipeline
event is numbered under the job events' lock (`lock_events`), so its ids grow in commit order too:
one the worker has not seen is always after its cursor, whichever replica recorded it."""

from __future__ import annotations

from typing import Any

import psycopg

from ..records import JobWebhook
from ..sqlite.pipeline_webhooks import PIPELINE_ENDS
from .connections import PgRows, one, rows, timestamp, value
from .jobs import lock_events
# One reading of a webhook's row, one list of a delivery's shown columns, for jobs and pipelines.
from .webhooks import _DELIVERY_COLUMNS, _webhook



def insert_pipeline_webhook(conn: psycopg.Connection, pipeline_id: str, webhook: JobWebhook | None) -> None:
    """Give a new pipeline its webhook, in the transaction that makes it."""
    if webhook is not None:
        conn.execute(
            "INSERT INTO pipeline_webhooks (pipeline_id, url, events, key_id) VALUES (%s, %s, %s, %s)",
            (pipeline_id, webhook.url, ",".join(webhook.events), webhook.key_id),
        )


def record_pipeline_end(conn: psycopg.Connection, pipeline_id: str, state: str, was: str, detail: str | None) -> None:
    """The pipeline's move from `was` to `state`, as an event when it is an end it was not at.
    The last statement of its transaction (`lock_events`)."""
    if state in PIPELINE_ENDS and state != was:
        lock_events(conn)
        conn.execute(
            "INSERT INTO pipeline_events (pipeline_id, at, state, detail) VALUES (%s, %s, %s, %s)",
            (pipeline_id, timestamp(), state, detail),
        )



class PipelineWebhookReads(PgRows):
    """A pipeline's webhook and deliveries; its events the worker has not turned into any yet."""

    def pipeline_webhook(self, pipeline_id: str) -> JobWebhook | None:
        row = one(self.conn, "SELECT * FROM pipeline_webhooks WHERE pipeline_id = %s", (pipeline_id,))
        return _webhook(row) if row else None

    def pipeline_webhook_events(self, limit: int = 200) -> tuple[list[dict[str, Any]], int]:
        cursor = value(self.conn, "SELECT pipeline_event_id FROM webhook_cursor")
        newest = value(self.conn, "SELECT coalesce(max(id), 0) FROM pipeline_events")
        found = rows(
            self.conn,
            "SELECT e.id, e.pipeline_id, e.at, e.state, e.detail, w.url, w.events, w.key_id"
            " FROM pipeline_events e JOIN pipeline_webhooks w ON w.pipeline_id = e.pipeline_id"
            " WHERE e.id > %s AND e.id <= %s ORDER BY e.id LIMIT %s",
            (cursor, newest, limit),
        )
        events = [
            {"id": r["id"], "pipeline_id": r["pipeline_id"], "at": r["at"], "state": r["state"],
             "detail": r["detail"], "webhook": _webhook(r)}
            for r in found
        ]
        return events, (found[-1]["id"] if len(found) == limit else newest)

    def pipeline_deliveries(self, pipeline_id: str, limit: int = 200) -> list[dict[str, Any]]:
        return rows(
            self.conn,
            f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries WHERE pipeline_id = %s"
            " ORDER BY created_at, event_id LIMIT %s",
            (pipeline_id, limit),
        )
