"""Gateway replicas sharing one SQLite file: their leases, the jobs each follows, and what changed.

Several processes on one machine may open the same file (WAL). Every write runs in BEGIN
IMMEDIATE, which takes the file's one write lock: that is what plays the part of PostgreSQL's row
locks here (a take-over and a lease renewal never interleave, nor two claims of one slot).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Any

from .connections import Rows, SqliteThreads, timestamp

# A job a replica answers for: on an upstream, or cancelled with its stop request still owed.
# The same words as idx_jobs_replica's, so that SQLite uses that index.
_HELD = "(state IN ('submitted', 'running') OR cancel_pending = 1)"


class ReplicaReads(Rows):
    """The replicas' leases, and the job changes any of them made."""

    def replicas(self) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT id, started_at, expires_at FROM replicas ORDER BY id")
        return [dict(r) for r in rows]

    def changes_since(self, cursor: int | None, limit: int = 1000) -> tuple[int, list[str]]:
        if cursor is None:
            (last,) = self.conn.execute("SELECT coalesce(max(id), 0) FROM job_events").fetchone()
            return last, []
        rows = self.conn.execute(
            "SELECT id, job_id FROM job_events WHERE id > ? ORDER BY id LIMIT ?", (cursor, limit)
        ).fetchall()
        if not rows:
            return cursor, []
        return rows[-1][0], list(dict.fromkeys(job_id for _, job_id in rows))


class ReplicaWrites(SqliteThreads):
    """A replica's lease, renewed with each heartbeat, which also takes over the jobs of
    replicas that died."""

    async def join(self, replica: str, lease: float) -> None:
        now = timestamp()
        await self._execute(
            "INSERT INTO replicas (id, started_at, expires_at) VALUES (?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET started_at = excluded.started_at,"
            " expires_at = excluded.expires_at",
            (replica, now, now + lease),
        )

    async def leave(self, replica: str, grace: float = 2.0) -> None:
        # Ending rather than deleted: its jobs stay its own until a replica takes them over,
        # which the others do at their first heartbeat after `grace`.
        await self._execute(
            "UPDATE replicas SET expires_at = min(expires_at, ?) WHERE id = ?", (timestamp() + grace, replica)
        )

    async def heartbeat(self, replica: str, lease: float, gone: Iterable[str] = ()) -> list[str] | None:
        gone = [g for g in gone if g != replica]

        def write(conn: sqlite3.Connection) -> list[str] | None:
            now = timestamp()
            if conn.execute(
                "UPDATE replicas SET expires_at = ? WHERE id = ?", (now + lease, replica)
            ).rowcount != 1:
                return None  # taken over: its jobs are another replica's now
            dead = [row[0] for row in conn.execute(
                "SELECT id FROM replicas WHERE id != ? AND (expires_at < ?"
                f" OR id IN ({','.join('?' * len(gone))}))",
                (replica, now, *gone),
            )]
            if dead:
                conn.execute(f"DELETE FROM replicas WHERE id IN ({','.join('?' * len(dead))})", dead)
            # The dead replicas' jobs, and any job whose replica has no lease at all (made before
            # replicas existed, or by a replica whose row a take-over removed in a race).
            rows = conn.execute(
                f"UPDATE jobs SET replica = ? WHERE {_HELD}"
                " AND (replica IS NULL OR replica NOT IN (SELECT id FROM replicas)) RETURNING id",
                (replica,),
            ).fetchall()
            return [row[0] for row in rows]

        return await self._write(write)
