"""What the dashboard's pages show: job rows with their queue places, a page of the jobs list or
of a batch, a job's own page, the home page's counts and batches. Each built on a reader thread."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any

from litestar.params import QueryParameter

from ...auth import Caller
from ...schemas import TASK_INPUTS, ApiError
from ...reads import BatchSummary, cut_page, read_batch_summary
from ...store import STATES, BatchItem, Job, JobStore, Reads

BATCH_PAGE_ROWS = 500
LIST_PAGE_ROWS = 50


@dataclass
class JobRow:
    item: BatchItem
    queue_position: int | None

    @property
    def job(self) -> Job:
        return self.item.job

    @property
    def took(self) -> float | None:
        """Seconds on a node (from when it was sent there: a fast job may never be seen running)."""
        job = self.job
        began = job.started_at or job.submitted_at
        if began is None:
            return None
        return (job.finished_at or time.time()) - began


def job_rows(r: Reads, items: list[BatchItem]) -> list[JobRow]:
    positions = r.queue_positions(item.job for item in items)
    return [JobRow(item, positions.get(item.job.id)) for item in items]


def list_filters(
    # `state` is a name Litestar keeps for the app's state.
    state_filter: Annotated[str | None, QueryParameter(name="state")] = None,
    task: Annotated[str | None, QueryParameter()] = None,
    batch: Annotated[str | None, QueryParameter()] = None,
) -> dict[str, str]:
    """The jobs list's filters, as the page's address gives them (a dependency of its handlers)."""
    filters = {}
    if state_filter:
        if state_filter not in STATES:
            raise ApiError(400, f"{state_filter!r} is not a job state; states are " + ", ".join(STATES))
        filters["state"] = state_filter
    if task:
        if task not in TASK_INPUTS:
            raise ApiError(400, f"{task!r} is not a task type; task types are " + ", ".join(TASK_INPUTS))
        filters["task"] = task
    if batch:
        filters["batch"] = batch.strip()
    return filters


def read_jobs_page(
    r: Reads, who: Caller, filters: dict[str, str], before: int | None,
) -> tuple[list[JobRow], int | None]:
    """A page of the jobs list, and where the next page starts (None: last)."""
    jobs, next_before = cut_page(r.list_jobs(
        states=[filters["state"]] if "state" in filters else (),
        task=filters.get("task"), batch_id=filters.get("batch"), owner=who.sees, before_seq=before,
        limit=LIST_PAGE_ROWS + 1,
    ), LIST_PAGE_ROWS, _job_seq)
    return job_rows(r, [BatchItem(job, None, {}, None) for job in jobs]), next_before


def read_batch_page(
    r: Reads, who: Caller, batch_id: str, after: int,
) -> tuple[BatchSummary, list[JobRow], int | None]:
    """A page of the batch's rows after `after`, and where the next page starts (None: last)."""
    summary = read_batch_summary(r, batch_id, who)  # 404 for a batch this key cannot see
    items, next_after = cut_page(
        r.batch_items(batch_id, after_seq=after, limit=BATCH_PAGE_ROWS + 1, owner=who.sees),
        BATCH_PAGE_ROWS, _item_seq,
    )
    return summary, job_rows(r, items), next_after


def _job_seq(job: Job) -> int:
    return job.seq


def _item_seq(item: BatchItem) -> int:
    return item.job.seq


async def job_context(store: JobStore, job: Job) -> dict[str, Any]:
    """What a job's page (and its live part) shows besides the job."""
    return await store.read(lambda r: {
        "job": job, "item": r.batch_item(job.id), "events": r.events(job.id),
        "queue_position": r.queue_position(job),
        "batch": r.batch(job.batch_id) if job.batch_id else None,
    })


async def recent(store: JobStore, who: Caller) -> tuple[dict[str, int], list[BatchSummary]]:
    """The caller's job counts and latest batches, in one hop to a reader thread."""
    return await store.read(lambda r: (r.owner_counts(who.sees), [
        read_batch_summary(r, batch_id, who) for batch_id in r.recent_batch_ids(limit=20, owner=who.sees)
    ]))
