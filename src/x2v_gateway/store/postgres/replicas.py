"""Gateway replicas sharing one PostgreSQL database: their leases, the jobs each follows, and what changed.

A take-over is one transaction per heartbeat: the dead replicas' lease rows are locked with
`FOR UPDATE SKIP LOCKED`, so two replicas that notice one death at once do not both take its
jobs, and neither waits for the other.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import psycopg

from .connections import PgRows, PostgresThreads, rows, timestamp, tuples, value

# A job a replica answers for: on an upstream, or cancelled with its stop request still owed.
# The same words as idx_jobs_replica's, so that PostgreSQL uses that index.
_HELD = "(state IN ('submitted', 'running') OR cancel_pending)"


class ReplicaReads(PgRows):
    """The replicas' leases, and the job changes any of them made."""

    def replicas(self) -> list[dict[str, Any]]:
        return rows(self.conn, "SELECT id, started_at, expires_at FROM replicas ORDER BY id")

    def changes_since(self, cursor: int | None, limit: int = 1000) -> tuple[int, list[str]]:
        if cursor is None:
            return value(self.conn, "SELECT coalesce(max(id), 0) FROM job_events"), []
        # Event ids follow commit order (jobs.record_event): none can appear below the cursor later.
        found = tuples(
            self.conn, "SELECT id, job_id FROM job_events WHERE id > %s ORDER BY id LIMIT %s", (cursor, limit)
        )
        if not found:
            return cursor, []
        return found[-1][0], list(dict.fromkeys(job_id for _, job_id in found))


class ReplicaWrites(PostgresThreads):
    """A replica's lease, renewed with each heartbeat, which also takes over the jobs of
    replicas that died."""

    async def join(self, replica: str, lease: float) -> None:
        now = timestamp()
        await self._execute(
            "INSERT INTO replicas (id, started_at, expires_at) VALUES (%s, %s, %s)"
            " ON CONFLICT (id) DO UPDATE SET started_at = excluded.started_at,"
            " expires_at = excluded.expires_at",
            (replica, now, now + lease),
        )

    async def leave(self, replica: str, grace: float = 2.0) -> None:
        # Ending rather than deleted: its jobs stay its own until a replica takes them over,
        # which the others do at their first heartbeat after `grace`.
        await self._execute(
            "UPDATE replicas SET expires_at = least(expires_at, %s) WHERE id = %s", (timestamp() + grace, replica)
        )

    async def heartbeat(self, replica: str, lease: float, gone: Iterable[str] = ()) -> list[str] | None:
        gone = [g for g in gone if g != replica]

        def write(conn: psycopg.Connection) -> list[str] | None:
            now = timestamp()
            if conn.execute(
                "UPDATE replicas SET expires_at = %s WHERE id = %s", (now + lease, replica)
            ).rowcount != 1:
                return None  # taken over: its jobs are another replica's now
            dead = [r[0] for r in tuples(
                conn,
                "SELECT id FROM replicas WHERE id <> %s AND (expires_at < %s OR id = ANY(%s))"
                " ORDER BY id FOR UPDATE SKIP LOCKED",
                (replica, now, gone),
            )]
            if dead:
                conn.execute("DELETE FROM replicas WHERE id = ANY(%s)", (dead,))
            # The dead replicas' jobs, and any job whose replica has no lease at all (made before
            # replicas existed, or by a replica whose row a take-over removed in a race). Jobs
            # another replica is changing right now are left for the next heartbeat.
            taken = tuples(
                conn,
                f"UPDATE jobs SET replica = %s WHERE seq IN (SELECT seq FROM jobs WHERE {_HELD}"
                " AND (replica IS NULL OR replica = ANY(%s) OR NOT EXISTS"
                "  (SELECT 1 FROM replicas r WHERE r.id = jobs.replica))"
                " FOR UPDATE SKIP LOCKED) RETURNING id",
                (replica, dead),
            )
            return [job_id for (job_id,) in taken]

        return await self._write(write)
