"""The queue in PostgreSQL: a queued job's place, and what dispatch planning reads (lanes, jobs in flight)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import psycopg

from ..records import QUEUED, Inflight, Job, Lane, QueuedJob
from ..sqlite.jobs import row_to_job
from ..sqlite.queue import queue_places
from ..sqlite.schema import QUEUE_BLOCK_SEQS
from .connections import PgRows, one, rows, tuples, value

OWNER_KEY = "coalesce(owner, '')"
BATCH_KEY = "coalesce(batch_id, '')"


class QueueReads(PgRows):
    """Places in the queue, its lanes, and the jobs in flight."""

    def queue_position(self, job: Job) -> int | None:
        if job.state != QUEUED:
            return None
        # The blocks of higher priority, the blocks of its priority before its own, then the
        # jobs ahead of it in its own block (see the SQLite schema's m021).
        block = job.seq // QUEUE_BLOCK_SEQS
        ahead = value(
            self.conn,
            "SELECT coalesce((SELECT sum(n) FROM queue_blocks WHERE priority > %(p)s), 0)"
            " + coalesce((SELECT sum(n) FROM queue_blocks WHERE priority = %(p)s AND block < %(b)s), 0)"
            " + (SELECT count(*) FROM jobs WHERE state = 'queued' AND priority = %(p)s"
            "    AND seq >= %(first)s AND seq < %(seq)s)",
            {"p": job.priority, "b": block, "first": block * QUEUE_BLOCK_SEQS, "seq": job.seq},
        )
        return int(ahead) + 1

    def queue_positions(self, jobs: Iterable[Job]) -> dict[str, int]:
        # As in SQLite, with every gap counted in one statement: a round trip each would cost
        # more than the counts. Ranking the whole queue cost a page of 500 107 ms at 50,000 queued.
        return queue_places(jobs, self.queue_position, self._queued_between)

    def _queued_between(self, gaps: list[tuple[int, int, int]]) -> list[int]:
        """For each (priority, low, high): the queued jobs of that priority with low < seq < high.
        Between jobs far apart the blocks' counts stand in for the middle (two partial blocks read)."""
        count = "(SELECT count(*) FROM jobs WHERE state = 'queued' AND priority = g.p AND seq > {low} AND seq < {high})"
        found = tuples(
            self.conn,
            "SELECT CASE WHEN g.lo / %(b)s = g.hi / %(b)s THEN " + count.format(low="g.lo", high="g.hi")
            + " ELSE " + count.format(low="g.lo", high="(g.lo / %(b)s + 1) * %(b)s")
            + " + coalesce((SELECT sum(n) FROM queue_blocks WHERE priority = g.p"
            "   AND block > g.lo / %(b)s AND block < g.hi / %(b)s), 0)"
            " + " + count.format(low="(g.hi / %(b)s) * %(b)s - 1", high="g.hi") + " END"
            " FROM unnest(%(p)s::int[], %(lo)s::bigint[], %(hi)s::bigint[]) WITH ORDINALITY AS g(p, lo, hi, i)"
            " ORDER BY g.i",
            {"b": QUEUE_BLOCK_SEQS, "p": [p for p, _, _ in gaps], "lo": [lo for _, lo, _ in gaps],
             "hi": [hi for _, _, hi in gaps]},
        )
        return [int(n) for (n,) in found]

    def queue_lanes(self, tasks: Iterable[str], *, batches_per_owner: int = 64) -> list[Lane]:
        conn = self.conn
        lanes: list[Lane] = []
        for task in tasks:
            for priority in _distinct(conn, "priority", "task = %s", (task,)):
                where, args = "task = %s AND priority = %s", (task, priority)
                for owner in _distinct(conn, OWNER_KEY, where, args):
                    found = _skip_batches(conn, (*args, owner), batches_per_owner + 1)
                    if len(found) > batches_per_owner:
                        found = tuples(
                            conn,
                            f"SELECT {BATCH_KEY}, min(seq) FROM jobs WHERE state = 'queued'"
                            f" AND {where} AND {OWNER_KEY} = %s GROUP BY {BATCH_KEY}",
                            (*args, owner),
                        )
                    lanes += [Lane(task, priority, owner, batch, seq) for batch, seq in found]
        return lanes

    def lane_jobs(self, lane: Lane, after_seq: int, limit: int) -> list[Job]:
        found = rows(
            self.conn,
            f"SELECT * FROM jobs WHERE state = 'queued' AND task = %s AND priority = %s"
            f" AND {OWNER_KEY} = %s AND {BATCH_KEY} = %s AND seq > %s ORDER BY seq LIMIT %s",
            (lane.task, lane.priority, lane.owner, lane.batch, after_seq, limit),
        )
        return [row_to_job(r) for r in found]

    def lane_heads(self, lane: Lane, after_seq: int, limit: int) -> list[QueuedJob]:
        found = tuples(
            self.conn,
            f"SELECT id, seq, task, pinned FROM jobs WHERE state = 'queued' AND task = %s AND priority = %s"
            f" AND {OWNER_KEY} = %s AND {BATCH_KEY} = %s AND seq > %s ORDER BY seq LIMIT %s",
            (lane.task, lane.priority, lane.owner, lane.batch, after_seq, limit),
        )
        return [QueuedJob(*row) for row in found]

    def inflight(self) -> list[Inflight]:
        found = tuples(
            self.conn,
            f"SELECT id, upstream, task, state, {OWNER_KEY}, {BATCH_KEY}, submitted_at,"
            " started_at FROM jobs WHERE state IN ('submitted', 'running') ORDER BY seq",
        )
        return [Inflight(*row) for row in found]

    def inflight_by_batch(self) -> dict[tuple[str, str], int]:
        found = tuples(
            self.conn,
            f"SELECT {OWNER_KEY}, {BATCH_KEY}, count(*) FROM jobs WHERE state IN ('submitted', 'running')"
            f" GROUP BY {OWNER_KEY}, {BATCH_KEY}",
        )
        return {(owner, batch): n for owner, batch, n in found}

    def inflight_on(self, upstreams: Iterable[str]) -> list[Inflight]:
        found = tuples(
            self.conn,
            f"SELECT id, upstream, task, state, {OWNER_KEY}, {BATCH_KEY}, submitted_at, started_at"
            " FROM jobs WHERE state IN ('submitted', 'running') AND upstream = ANY(%s) ORDER BY seq",
            (list(upstreams),),
        )
        return [Inflight(*row) for row in found]

    def inflight_among(self, job_ids: Iterable[str]) -> set[str]:
        found = tuples(
            self.conn,
            "SELECT id FROM jobs WHERE id = ANY(%s) AND state IN ('submitted', 'running')",
            (list(job_ids),),
        )
        return {job_id for (job_id,) in found}

    def count_pinned(self, upstream: str) -> int:
        return value(self.conn, "SELECT count(*) FROM jobs WHERE state = 'queued' AND pinned = %s", (upstream,))


def _distinct(conn: psycopg.Connection, column: str, where: str, args: tuple) -> list[Any]:
    """Distinct values of an indexed column among queued jobs, one index seek each (a loose
    index scan, which PostgreSQL's planner does not do by itself)."""
    values: list[Any] = []
    base = f"SELECT {column} AS v FROM jobs WHERE state = 'queued' AND {where}"
    row = one(conn, f"{base} ORDER BY {column} LIMIT 1", args)
    while row is not None:
        values.append(row["v"])
        row = one(conn, f"{base} AND {column} > %s ORDER BY {column} LIMIT 1", (*args, row["v"]))
    return values


def _skip_batches(conn: psycopg.Connection, args: tuple, limit: int) -> list[tuple[str, int]]:
    """(batch key, oldest seq) of each batch of one (task, priority, owner), up to `limit`."""
    base = (
        f"SELECT {BATCH_KEY} AS batch, seq FROM jobs WHERE state = 'queued' AND task = %s"
        f" AND priority = %s AND {OWNER_KEY} = %s"
    )
    order = f" ORDER BY {BATCH_KEY}, seq LIMIT 1"
    found: list[tuple[str, int]] = []
    row = one(conn, base + order, args)
    while row is not None and len(found) < limit:
        found.append((row["batch"], row["seq"]))
        row = one(conn, f"{base} AND {BATCH_KEY} > %s{order}", (*args, row["batch"]))
    return found
