"""Pipelines in PostgreSQL: a pipeline's row, its steps, and each step's job made with its record."""

from __future__ import annotations

import json
from typing import Any

import psycopg

from ..pipeline_records import CANCELLED, RUNNING, SUCCEEDED, Pipeline
# One way from rows to records for both backends (the same columns, JSON as text).
from ..sqlite.pipelines import row_to_step
from ..records import IdempotencyConflict, Job, JobWebhook, new_job_id
from .connections import AFTER_NEWEST, PgRows, PostgresThreads, one, rows, timestamp, tuples
from .jobs import record_event
from .pipeline_webhooks import insert_pipeline_webhook, record_pipeline_end


class PipelineReads(PgRows):
    """Pipelines and their steps."""

    def pipeline(self, pipeline_id: str) -> Pipeline | None:
        row = one(self.conn, "SELECT * FROM pipelines WHERE id = %s", (pipeline_id,))
        return self._with_steps([row])[0] if row else None

    def pipelines(
        self, *, owner: str | None = None, before_seq: int | None = None, limit: int = 50,
    ) -> list[Pipeline]:
        mine, args = ("owner = %s AND ", [owner]) if owner is not None else ("", [])
        found = rows(
            self.conn,
            f"SELECT * FROM pipelines WHERE {mine}seq < %s ORDER BY seq DESC LIMIT %s",
            (*args, before_seq or AFTER_NEWEST, limit),
        )
        return self._with_steps(found)

    def pipeline_for_key(self, idempotency_key: str) -> tuple[str, str | None] | None:
        found = tuples(self.conn, "SELECT id, request_hash FROM pipelines WHERE idempotency_key = %s", (idempotency_key,))
        return found[0] if found else None

    def open_pipelines(self) -> list[str]:
        return [r[0] for r in tuples(
            self.conn, "SELECT id FROM pipelines WHERE state IN ('running', 'failed') ORDER BY seq"
        )]

    def _with_steps(self, found: list[dict[str, Any]]) -> list[Pipeline]:
        pipelines = []
        for data in found:
            for column in ("output", "result_meta"):
                data[column] = json.loads(data[column]) if data[column] else None
            steps = rows(self.conn, "SELECT * FROM pipeline_steps WHERE pipeline_id = %s ORDER BY n", (data["id"],))
            pipelines.append(Pipeline(**data, steps=[row_to_step(s) for s in steps]))
        return pipelines


class PipelineWrites(PostgresThreads):
    """A pipeline made, its steps' jobs made, its state moved: each in one transaction."""

    async def create_pipeline(self, pipeline: Pipeline, webhook: JobWebhook | None = None) -> str:
        def write(conn: psycopg.Connection) -> str:
            now = timestamp()
            # ON CONFLICT: two replicas given the same Idempotency-Key at once make one pipeline.
            inserted = conn.execute(
                "INSERT INTO pipelines (id, owner, name, state, output, priority, created_at, updated_at,"
                " idempotency_key, request_hash) VALUES (%s, %s, %s, 'running', %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING",
                (pipeline.id, pipeline.owner, pipeline.name, json.dumps(pipeline.output),
                 pipeline.priority, now, now, pipeline.idempotency_key, pipeline.request_hash),
            ).rowcount
            if not inserted:
                row = one(
                    conn, "SELECT id, request_hash FROM pipelines WHERE idempotency_key = %s", (pipeline.idempotency_key,)
                )
                assert row is not None
                if row["request_hash"] != pipeline.request_hash:
                    raise IdempotencyConflict(pipeline.idempotency_key)
                return row["id"]
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO pipeline_steps (pipeline_id, n, scene, segment, kind, task, params,"
                    " inputs, needs, seconds, audio) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
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

        def write(conn: psycopg.Connection) -> tuple[str, bool] | None:
            # The step's row locked: a pipeline advanced by two replicas at once makes one job.
            row = one(
                conn,
                "SELECT s.job_id, p.state FROM pipeline_steps s JOIN pipelines p ON p.id = s.pipeline_id"
                " WHERE s.pipeline_id = %s AND s.n = %s FOR UPDATE OF s", (pipeline_id, n),
            )
            if row is None:
                return None
            if row["job_id"] is not None:
                return row["job_id"], False
            if row["state"] in (SUCCEEDED, CANCELLED):
                return None
            now = timestamp()
            conn.execute(
                "INSERT INTO jobs (id, task, state, params, inputs, priority, batch_id, owner,"
                " created_at, updated_at) VALUES (%s, %s, 'queued', %s, %s, %s, %s, %s, %s, %s)",
                (job_id, task, json.dumps(params), json.dumps(inputs), priority, pipeline_id,
                 owner, now, now),
            )
            conn.execute(
                "UPDATE pipeline_steps SET job_id = %s WHERE pipeline_id = %s AND n = %s", (job_id, pipeline_id, n)
            )
            record_event(conn, job_id, "queued", f"accepted (steps[{n}] of pipeline {pipeline_id})")
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

        def write(conn: psycopg.Connection) -> bool:
            # The row locked: of two replicas moving it at once, the second sees the first's state.
            was = one(conn, "SELECT state FROM pipelines WHERE id = %s FOR UPDATE", (pipeline_id,))
            if was is None or was["state"] not in only_from:
                return False
            conn.execute(
                "UPDATE pipelines SET state = %s, error = %s, updated_at = %s, finished_at = %s WHERE id = %s",
                (state, error, timestamp(), finished, pipeline_id),
            )
            record_pipeline_end(conn, pipeline_id, state, was["state"], error)
            return True

        return await self._write(write)

    async def finish_pipeline(self, pipeline_id: str, result_sha: str, meta: dict[str, Any]) -> bool:
        now = timestamp()

        def write(conn: psycopg.Connection) -> bool:
            done = conn.execute(
                "UPDATE pipelines SET state = 'succeeded', error = NULL, result_sha = %s, result_meta = %s,"
                " updated_at = %s, finished_at = %s, join_by = NULL, join_until = NULL"
                " WHERE id = %s AND state = %s",
                (result_sha, json.dumps(meta), now, now, pipeline_id, RUNNING),
            ).rowcount == 1
            if done:
                record_pipeline_end(conn, pipeline_id, SUCCEEDED, RUNNING, None)
            return done

        return await self._write(write)

    async def claim_join(self, pipeline_id: str, holder: str, until: float) -> bool:
        # One statement: the row's lock makes a second replica's claim see the first's lease.
        now = timestamp()
        return await self._execute(
            "UPDATE pipelines SET join_by = %s, join_until = %s WHERE id = %s AND state = %s"
            " AND (join_by IS NULL OR join_by = %s OR join_until < %s OR NOT EXISTS"
            " (SELECT 1 FROM replicas r WHERE r.id = pipelines.join_by AND r.expires_at >= %s))",
            (holder, until, pipeline_id, RUNNING, holder, now, now),
        ) == 1
