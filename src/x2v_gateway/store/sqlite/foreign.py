"""Foreign ids in SQLite: the names clients of the compatible surfaces give jobs (routes/compat)."""

from __future__ import annotations

import sqlite3

from .connections import Rows, SqliteThreads, each_chunk, timestamp


class ForeignReads(Rows):
    """A foreign id's job, and a page of jobs' foreign ids."""

    def foreign_job(self, owner: str, surface: str, foreign_id: str) -> str | None:
        row = self.conn.execute(
            "SELECT job_id FROM foreign_ids WHERE owner = ? AND surface = ? AND foreign_id = ?",
            (owner, surface, foreign_id),
        ).fetchone()
        return row[0] if row else None

    def foreign_ids(self, owner: str, surface: str, job_ids: list[str]) -> dict[str, str]:
        rows = each_chunk(
            self.conn,
            "SELECT job_id, foreign_id FROM foreign_ids WHERE owner = ? AND surface = ?"
            " AND job_id IN ({marks}) ORDER BY created_at",
            job_ids, (owner, surface),
        )
        return {job_id: foreign_id for job_id, foreign_id in rows}


class ForeignWrites(SqliteThreads):
    async def save_foreign_id(
        self, owner: str, surface: str, foreign_id: str, job_id: str, *, replace: bool = False,
    ) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
            cursor = conn.execute(
                f"{verb} INTO foreign_ids (owner, surface, foreign_id, job_id, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (owner, surface, foreign_id, job_id, timestamp()),
            )
            return cursor.rowcount > 0

        return await self._write(write)
