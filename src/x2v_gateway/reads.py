"""What a caller may read of jobs and batches, on top of the store's `Reads`.

Another key's job or batch is "not found", exactly like one that does not exist, so ids cannot
be probed. Lists are read a page at a time, a page cut here once for the API and the dashboard.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

from .auth import Caller
from .schemas import ApiError
from .store import TERMINAL, BatchItem, Job, JobStore, Reads

T = TypeVar("T")


class NotFound(ApiError):
    """A job or batch this caller cannot see; the API and the dashboard word it each their way."""

    def __init__(self, kind: str, ident: str) -> None:
        super().__init__(404, f"no {kind} {ident}")
        self.kind = kind  # job | batch
        self.ident = ident


def visible(job: Job | None, job_id: str, who: Caller) -> Job:
    """The job, if this caller may see it."""
    if job is None or not who.may_touch(job.owner):
        raise NotFound("job", job_id)
    return job


async def find_job(store: JobStore, job_id: str, who: Caller) -> Job:
    """The job, if this caller may see it."""
    return visible(await store.get(job_id), job_id, who)


async def find_item(store: JobStore, job_id: str, who: Caller) -> BatchItem:
    """The job with its place in its batch and its files' names, if this caller may see it."""
    item = await store.batch_item(job_id)
    visible(item.job if item else None, job_id, who)
    assert item is not None
    return item


def cut_page(rows: list[T], limit: int, seq: Callable[[T], int]) -> tuple[list[T], int | None]:
    """Rows read as `limit + 1`: the page, and the cursor where the next one starts (None: last)."""
    if len(rows) > limit:
        return rows[:limit], seq(rows[limit - 1])
    return rows, None


async def every_item(store: JobStore, batch_id: str, owner: str | None) -> AsyncIterator[BatchItem]:
    """Every job of the batch `owner` may see (None: every job), in order, read a page at a time."""
    after = 0
    while items := await store.batch_items(batch_id, after_seq=after, limit=1000, owner=owner):
        for item in items:
            yield item
        after = items[-1].job.seq


# -- a batch's progress --------------------------------------------------------------------------


@dataclass
class BatchSummary:
    """A batch's name, job counts by state, and time left."""

    id: str
    name: str
    task: str | None
    created_at: float | None
    counts: dict[str, int]
    eta: float | None  # seconds left, when there is enough to estimate from

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def done(self) -> int:
        return sum(self.counts[s] for s in TERMINAL)

    @property
    def left(self) -> int:
        return self.total - self.done

    @property
    def percent(self) -> int:
        return int(100 * self.done / self.total) if self.total else 0


async def batch_summary(store: JobStore, batch_id: str, who: Caller) -> BatchSummary:
    """Counts, progress and time left of the batch's jobs this caller may see."""
    return await store.read(lambda r: read_batch_summary(r, batch_id, who))


def read_batch_summary(r: Reads, batch_id: str, who: Caller) -> BatchSummary:
    """`batch_summary` on a reader thread already; NotFound for a batch this caller cannot see
    (its own jobs in another key's batch: those it sees)."""
    batch = r.batch(batch_id)
    if batch is not None and not who.may_touch(batch["owner"]):
        batch = None
    counts = r.batch_counts(batch_id, owner=who.sees)
    if batch is None and not any(counts.values()):
        raise NotFound("batch", batch_id)
    created = batch["created_at"] if batch else r.batch_created_at(batch_id, owner=who.sees)
    name = (batch or {}).get("name") or f"Batch {batch_id}"
    summary = BatchSummary(batch_id, name, (batch or {}).get("task"), created, counts, None)
    # Throughput so far, queueing included: jobs that ran to an end per second since the batch
    # was made. Cancelled jobs end at once and say nothing about speed.
    worked = counts["succeeded"] + counts["failed"]
    busy = counts["queued"] + counts["submitted"] + counts["running"]
    if worked and busy and created:
        summary.eta = busy * (time.time() - created) / worked
    return summary

