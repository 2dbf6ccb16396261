"""A pipeline's joined video in the retention sweep and purges: kept like a job's result
(no job refers to it, so the jobs' own bookkeeping would not keep it)."""

from __future__ import annotations

import psycopg

from .connections import tuples


def pipeline_blobs(conn: psycopg.Connection, finished_before: float) -> set[str]:
    """The retention sweep's part for pipelines: a joined video finished before the cutoff
    expires; the ones still kept are returned (no job refers to them)."""
    conn.execute(
        "UPDATE pipelines SET files_expired = true WHERE NOT files_expired AND finished_at < %s",
        (finished_before,),
    )
    return {sha for (sha,) in tuples(
        conn, "SELECT result_sha FROM pipelines WHERE NOT files_expired AND result_sha IS NOT NULL"
    )}
