"""Foreign ids in PostgreSQL: the names clients of the compatible surfaces give jobs (routes/compat)."""

from __future__ import annotations

from .connections import PgRows, PostgresThreads, changed, timestamp, tuples, value


class ForeignReads(PgRows):
    """A foreign id's job, and a page of jobs' foreign ids."""

    def foreign_job(self, owner: str, surface: str, foreign_id: str) -> str | None:
        return value(
            self.conn,
            "SELECT job_id FROM foreign_ids WHERE owner = %s AND surface = %s AND foreign_id = %s",
            (owner, surface, foreign_id),
        )

    def foreign_ids(self, owner: str, surface: str, job_ids: list[str]) -> dict[str, str]:
        found = tuples(
            self.conn,
            "SELECT job_id, foreign_id FROM foreign_ids WHERE owner = %s AND surface = %s"
            " AND job_id = ANY(%s) ORDER BY created_at",
            (owner, surface, list(job_ids)),
        )
        return dict(found)


class ForeignWrites(PostgresThreads):
    async def save_foreign_id(
        self, owner: str, surface: str, foreign_id: str, job_id: str, *, replace: bool = False,
    ) -> bool:
        conflict = "DO UPDATE SET job_id = excluded.job_id, created_at = excluded.created_at" if replace else "DO NOTHING"
        return await self._write(lambda conn: changed(
            conn,
            "INSERT INTO foreign_ids (owner, surface, foreign_id, job_id, created_at)"
            f" VALUES (%s, %s, %s, %s, %s) ON CONFLICT (owner, surface, foreign_id) {conflict}",
            (owner, surface, foreign_id, job_id, timestamp()),
        ) > 0)
