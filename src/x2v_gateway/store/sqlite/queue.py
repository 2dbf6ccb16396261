"""The queue in SQLite: a queued job's place, and what dispatch planning reads (lanes, jobs in flight)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from itertools import pairwise
from typing import Any

from ..records import QUEUED, Inflight, Job, Lane, QueuedJob
from .connections import Rows, each_chunk
from .jobs import row_to_job
from .schema import QUEUE_BLOCK_SEQS

_new_tuple = tuple.__new__
# For each (priority, low seq, high seq): the queued jobs of that priority strictly between.
GapCounts = Callable[[list[tuple[int, int, int]]], list[int]]
OWNER_KEY = "coalesce(owner, '')"
BATCH_KEY = "coalesce(batch_id, '')"


class QueueReads(Rows):
    """Places in the queue, its lanes, and the jobs in flight."""

    def queue_position(self, job: Job) -> int | None:
        if job.state != QUEUED:
            return None
        # The blocks of higher priority, the blocks of its priority before its own, then the
        # jobs ahead of it in its own block: at most QUEUE_BLOCK_SEQS entries of the queue index.
        block = job.seq // QUEUE_BLOCK_SEQS
        (ahead,) = self.conn.execute(
            "SELECT coalesce((SELECT sum(n) FROM queue_blocks WHERE priority > :p), 0)"
            " + coalesce((SELECT sum(n) FROM queue_blocks WHERE priority = :p AND block < :b), 0)"
            " + (SELECT count(*) FROM jobs WHERE state = 'queued' AND priority = :p"
            "    AND seq >= :first AND seq < :seq)",
            {"p": job.priority, "b": block, "first": block * QUEUE_BLOCK_SEQS, "seq": job.seq},
        ).fetchone()
        return ahead + 1

    def queue_positions(self, jobs: Iterable[Job]) -> dict[str, int]:
        # Ranking the whole queue cost a page of 50 17 ms at 50,000 queued. Between jobs far
        # apart, the blocks' counts stand in for the middle (at most two partial blocks read).
        return queue_places(jobs, self.queue_position, lambda gaps: [self._queued_between(*gap) for gap in gaps])

    def _queued_between(self, priority: int, low: int, high: int) -> int:
        """Queued jobs of `priority` with `low` < seq < `high`."""
        first, last = low // QUEUE_BLOCK_SEQS, high // QUEUE_BLOCK_SEQS
        count = "SELECT count(*) FROM jobs WHERE state = 'queued' AND priority = :p AND seq > :low AND seq < :high"
        args = {"p": priority, "low": low, "high": high}
        if first == last:
            return self.conn.execute(count, args).fetchone()[0]
        (n,) = self.conn.execute(
            f"SELECT ({count.replace(':high', ':first_end')})"
            " + coalesce((SELECT sum(n) FROM queue_blocks WHERE priority = :p AND block > :first AND block < :last), 0)"
            f" + ({count.replace(':low', ':last_start - 1')})",
            {**args, "first": first, "last": last, "first_end": (first + 1) * QUEUE_BLOCK_SEQS,
             "last_start": last * QUEUE_BLOCK_SEQS},
        ).fetchone()
        return n

    def queue_lanes(self, tasks: Iterable[str], *, batches_per_owner: int = 64) -> list[Lane]:
        conn = self.conn
        lanes: list[Lane] = []
        for task in tasks:
            for priority in _distinct(conn, "priority", "task = ?", (task,)):
                where, args = "task = ? AND priority = ?", (task, priority)
                for owner in _distinct(conn, OWNER_KEY, where, args):
                    found = _skip_batches(
                        conn, (*args, owner), batches_per_owner + 1
                    )
                    if len(found) > batches_per_owner:
                        found = conn.execute(
                            f"SELECT {BATCH_KEY}, min(seq) FROM jobs WHERE state = 'queued'"
                            f" AND {where} AND {OWNER_KEY} = ? GROUP BY {BATCH_KEY}",
                            (*args, owner),
                        ).fetchall()
                    lanes += [Lane(task, priority, owner, batch, seq) for batch, seq in found]
        return lanes

    def lane_jobs(self, lane: Lane, after_seq: int, limit: int) -> list[Job]:
        rows = self.conn.execute(
            f"SELECT * FROM jobs WHERE state = 'queued' AND task = ? AND priority = ?"
            f" AND {OWNER_KEY} = ? AND {BATCH_KEY} = ? AND seq > ? ORDER BY seq LIMIT ?",
            (lane.task, lane.priority, lane.owner, lane.batch, after_seq, limit),
        ).fetchall()
        return [row_to_job(r) for r in rows]

    def lane_heads(self, lane: Lane, after_seq: int, limit: int) -> list[QueuedJob]:
        # Plain tuples made into QueuedJobs as `QueuedJob._make` does, without its Python-level
        # call per row: a start round reads 2,500 of these.
        cursor = self.conn.cursor()
        cursor.row_factory = None
        rows = cursor.execute(
            f"SELECT id, seq, task, pinned FROM jobs WHERE state = 'queued' AND task = ? AND priority = ?"
            f" AND {OWNER_KEY} = ? AND {BATCH_KEY} = ? AND seq > ? ORDER BY seq LIMIT ?",
            (lane.task, lane.priority, lane.owner, lane.batch, after_seq, limit),
        )
        return [_new_tuple(QueuedJob, row) for row in rows]

    def inflight(self) -> list[Inflight]:
        rows = self.conn.execute(
            f"SELECT id, upstream, task, state, {OWNER_KEY}, {BATCH_KEY}, submitted_at,"
            " started_at FROM jobs WHERE state IN ('submitted', 'running') ORDER BY seq"
        )
        return [Inflight(*row) for row in rows]

    def inflight_by_batch(self) -> dict[tuple[str, str], int]:
        rows = self.conn.execute(  # named, as in inflight_counts
            f"SELECT {OWNER_KEY}, {BATCH_KEY}, count(*) FROM jobs INDEXED BY idx_jobs_inflight_batches"
            f" WHERE state IN ('submitted', 'running') GROUP BY {OWNER_KEY}, {BATCH_KEY}"
        )
        return {(owner, batch): n for owner, batch, n in rows}

    def inflight_on(self, upstreams: Iterable[str]) -> list[Inflight]:
        rows = each_chunk(
            self.conn,
            f"SELECT id, upstream, task, state, {OWNER_KEY}, {BATCH_KEY}, submitted_at, started_at"
            " FROM jobs WHERE state IN ('submitted', 'running') AND upstream IN ({marks})",
            list(upstreams),
        )
        return [Inflight(*row) for row in rows]

    def inflight_among(self, job_ids: Iterable[str]) -> set[str]:
        # By id (a few jobs), not by state (every job in flight): `+state` keeps the planner
        # off the state's index.
        rows = each_chunk(
            self.conn, "SELECT id FROM jobs WHERE id IN ({marks}) AND +state IN ('submitted', 'running')",
            list(job_ids),
        )
        return {job_id for (job_id,) in rows}

    def count_pinned(self, upstream: str) -> int:
        (n,) = self.conn.execute(
            "SELECT count(*) FROM jobs WHERE state = 'queued' AND pinned = ?", (upstream,)
        ).fetchone()
        return n


def _distinct(conn: sqlite3.Connection, column: str, where: str, args: tuple) -> list[Any]:
    """Distinct values of an indexed column among queued jobs, one index seek each."""
    values: list[Any] = []
    base = f"SELECT {column} FROM jobs WHERE state = 'queued' AND {where}"
    row = conn.execute(f"{base} ORDER BY {column} LIMIT 1", args).fetchone()
    while row is not None:
        values.append(row[0])
        row = conn.execute(
            f"{base} AND {column} > ? ORDER BY {column} LIMIT 1", (*args, row[0])
        ).fetchone()
    return values


def _skip_batches(conn: sqlite3.Connection, args: tuple, limit: int) -> list[tuple[str, int]]:
    """(batch key, oldest seq) of each batch of one (task, priority, owner), up to `limit`."""
    base = (
        f"SELECT {BATCH_KEY}, seq FROM jobs WHERE state = 'queued' AND task = ?"
        f" AND priority = ? AND {OWNER_KEY} = ?"
    )
    order = f" ORDER BY {BATCH_KEY}, seq LIMIT 1"
    found: list[tuple[str, int]] = []
    row = conn.execute(base + order, args).fetchone()
    while row is not None and len(found) < limit:
        found.append((row[0], row[1]))
        row = conn.execute(f"{base} AND {BATCH_KEY} > ?{order}", (*args, row[0])).fetchone()
    return found


def queue_places(jobs: Iterable[Job], place_of: Callable[[Job], int | None], between: GapCounts) -> dict[str, int]:
    """The places of the queued ones among `jobs` (both stores): in queue order, a job's place is
    the one before's plus the queued jobs between them (`between`), so a page of neighbours (the
    newest 50, a batch's 500) costs a short count each, however long the queue. The first job of
    each priority is placed on its own, as a GET places it (`place_of`)."""
    queued = sorted({job.id: job for job in jobs if job.state == QUEUED}.values(),
                    key=lambda job: (-job.priority, job.seq))
    gaps = [(before.priority, before.seq, job.seq) for before, job in pairwise(queued)
            if before.priority == job.priority]
    counts = iter(between(gaps) if gaps else ())
    places: dict[str, int] = {}
    for before, job in zip([None, *queued], queued, strict=False):
        if before is None or before.priority != job.priority:
            places[job.id] = place_of(job) or 0
        else:
            places[job.id] = places[before.id] + 1 + next(counts)
    return places
