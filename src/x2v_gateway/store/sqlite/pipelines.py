"""Pipelines in SQLite: a pipeline's row, its steps, and each step's job made with its record."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from ..pipeline_records import CANCELLED, RUNNING, SUCCEEDED, Pipeline, PipelineStep
from ..records import IdempotencyConflict, Job, JobWebhook, new_job_id
from .connections import AFTER_NEWEST, Rows, SqliteThreads, timestamp
from .jobs import record_event
from .pipeline_webhooks import insert_pipeline_webhook, record_pipeline_end

_JSON_STEP = ("params", "inputs", "needs", "audio")


class PipelineReads(Rows):
    """Pipelines and their steps."""

    def pipeline(self, pipeline_id: str) -> Pipeline | None:
        row = self.conn.execute("SELECT * FROM pipelines WHERE id = ?", (pipeline_id,)).fetchone()
        return self._with_steps([row])[0] if row else None

    def pipelines(
        self, *, owner: str | None = None, before_seq: int | None = None, limit: int = 50,
    ) -> list[Pipeline]:
        mine, args = ("owner = ? AND ", [owner]) if owner is not None else ("", [])
        rows = self.conn.execute(
            f"SELECT * FROM pipelines WHERE {mine}seq < ? ORDER BY seq DESC LIMIT ?",
            (*args, before_seq or AFTER_NEWEST, limit),
        ).fetchall()
        return self._with_steps(rows)

    def pipeline_for_key(self, idempotency_key: str) -> tuple[str, str | None] | None:
        row = self.conn.execute(
            "SELECT id, request_hash FROM pipelines WHERE idempotency_key = ?", (idempotency_key,)
        ).fetchone()
        return (row[0], row[1]) if row else None

    def open_pipelines(self) -> list[str]:
        return [r[0] for r in self.conn.execute(
            "SELECT id FROM pipelines WHERE state IN ('running', 'failed') ORDER BY seq"
        )]

    def _with_steps(self, rows: list[sqlite3.Row]) -> list[Pipeline]:
        pipelines = []
        for row in rows:
            data = dict(row)
            for column in ("output", "result_meta"):
                data[column] = json.loads(data[column]) if data[column] else None
            data["files_expired"] = bool(data["files_expired"])
            steps = self.conn.execute(
                "SELECT * FROM pipeline_steps WHERE pipeline_id = ? ORDER BY n", (data["id"],)
            ).fetchall()
            pipelines.append(Pipeline(**data, steps=[row_to_step(s) for s in steps]))
        return pipelines


class PipelineWrites(SqliteThreads):
    """A pipeline made, its steps' jobs made, its state moved: each in one transaction."""

    async def create_pipeline(self, pipeline: Pipeline, webhook: JobWebhook | None = None) -> str:
        def write(conn: sqlite3.Connection) -> str:
            if pipeline.idempotency_key is not None:
                row = conn.execute(
                    "SELECT id, request_hash FROM pipelines WHERE idempotency_key = ?", (pipeline.idempotency_key,)
                ).fetchone()
                if row is not None:
                    if row["request_hash"] != pipeline.request_hash:
                        raise IdempotencyConflict(pipeline.idempotency_key)
                    return row["id"]
            now = timestamp()
            conn.execute(
                "INSERT INTO pipelines (id, owner, name, state, output, priority, created_at, updated_at,"
                " idempotency_key, request_hash) VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?)",
                (pipeline.id, pipeline.owner, pipeline.name, json.dumps(pipeline.output),
                 pipeline.priority, now, now, pipeline.idempotency_key, pipeline.request_hash),
            )
            conn.executemany(
                "INSERT INTO pipeline_steps (pipeline_id, n, scene, segment, kind, task, params,"
                " inputs, needs, seconds, audio) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(pipeline.id, s.n, s.scene, s.segment, s.kind, s.task, json.dumps(s.params),
                  json.dumps(s.inputs), json.dumps(s.needs), s.seconds,
                  json.dumps(s.audio) if s.audio is not None else None) for s in pipeline.steps],
            )
            insert_pipeline_webhook(conn, pipeline.id, webhook)
            return pipeline.id

        return await self._write(write)

    async def create_step_job(
        self, pipeline_id: str, n: int, *, task: str, params: dict[str, Any], inputs: dict[str, str],
        priority: int = 0, owner: str | None = None,
    ) -> tuple[Job, bool] | None:
        job_id = new_job_id()

        def write(conn: sqlite3.Connection) -> tuple[str, bool] | None:
            row = conn.execute(
                "SELECT s.job_id, p.state FROM pipeline_steps s JOIN pipelines p ON p.id = s.pipeline_id"
                " WHERE s.pipeline_id = ? AND s.n = ?", (pipeline_id, n),
            ).fetchone()
            if row is None:
                return None
            if row["job_id"] is not None:
                return row["job_id"], False
            if row["state"] in (SUCCEEDED, CANCELLED):
                return None
            now = timestamp()
            conn.execute(
                "INSERT INTO jobs (id, task, state, params, inputs, priority, batch_id, owner,"
                " created_at, updated_at) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
                (job_id, task, json.dumps(params), json.dumps(inputs), priority, pipeline_id,
                 owner, now, now),
            )
            record_event(conn, job_id, "queued", f"accepted (steps[{n}] of pipeline {pipeline_id})")
            conn.execute(
                "UPDATE pipeline_steps SET job_id = ? WHERE pipeline_id = ? AND n = ?", (job_id, pipeline_id, n)
            )
            return job_id, True

        made = await self._write(write)
        if made is None:
            return None
        job = await self.get(made[0])
        assert job is not None  # jobs are never deleted
        return job, made[1]

    async def set_pipeline_state(
        self, pipeline_id: str, state: str, error: str | None = None, *, only_from: tuple[str, ...],
    ) -> bool:
        finished = timestamp() if state in (SUCCEEDED, CANCELLED) else None

        def write(conn: sqlite3.Connection) -> bool:
            was = conn.execute("SELECT state FROM pipelines WHERE id = ?", (pipeline_id,)).fetchone()
            if was is None or was[0] not in only_from:
                return False
            conn.execute(
                "UPDATE pipelines SET state = ?, error = ?, updated_at = ?, finished_at = ? WHERE id = ?",
                (state, error, timestamp(), finished, pipeline_id),
            )
            record_pipeline_end(conn, pipeline_id, state, was[0], error)
            return True

        return await self._write(write)

    async def finish_pipeline(self, pipeline_id: str, result_sha: str, meta: dict[str, Any]) -> bool:
        now = timestamp()

        def write(conn: sqlite3.Connection) -> bool:
            done = conn.execute(
                "UPDATE pipelines SET state = 'succeeded', error = NULL, result_sha = ?, result_meta = ?,"
                " updated_at = ?, finished_at = ?, join_by = NULL, join_until = NULL WHERE id = ? AND state = ?",
                (result_sha, json.dumps(meta), now, now, pipeline_id, RUNNING),
            ).rowcount == 1
            if done:
                record_pipeline_end(conn, pipeline_id, SUCCEEDED, RUNNING, None)
            return done

        return await self._write(write)

    async def claim_join(self, pipeline_id: str, holder: str, until: float) -> bool:
        # A running pipeline's join: free, already `holder`'s (a second look), its lease over,
        # or its holder a replica whose own lease is over (it died, or was restarted).
        now = timestamp()
        return await self._execute(
            "UPDATE pipelines SET join_by = ?, join_until = ? WHERE id = ? AND state = ?"
            " AND (join_by IS NULL OR join_by = ? OR join_until < ? OR NOT EXISTS"
            " (SELECT 1 FROM replicas r WHERE r.id = pipelines.join_by AND r.expires_at >= ?))",
            (holder, until, pipeline_id, RUNNING, holder, now, now),
        ) == 1


def row_to_step(row: sqlite3.Row) -> PipelineStep:
    data = dict(row)
    data.pop("pipeline_id")
    for column in _JSON_STEP:
        data[column] = json.loads(data[column]) if data[column] else ({} if column != "audio" else None)
    return PipelineStep(**data)

