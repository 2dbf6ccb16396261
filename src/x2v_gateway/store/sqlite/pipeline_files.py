"""A pipeline's joined video in the retention sweep and purges: kept like a job's result
(no job refers to it, so the jobs' own bookkeeping would not keep it)."""

from __future__ import annotations

import sqlite3


def pipeline_blobs(conn: sqlite3.Connection, finished_before: float) -> set[str]:
    """The retention sweep's part for pipelines: a joined video finished before the cutoff
    expires; the ones still kept are returned (no job refers to them)."""
    conn.execute(
        "UPDATE pipelines SET files_expired = 1 WHERE files_expired = 0 AND finished_at < ?",
        (finished_before,),
    )
    return {sha for (sha,) in conn.execute(
        "SELECT result_sha FROM pipelines WHERE files_expired = 0 AND result_sha IS NOT NULL"
    )}
