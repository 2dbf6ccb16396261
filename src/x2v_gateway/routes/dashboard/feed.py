"""The dashboard's live updates: one Server-Sent Events stream per open page, pushing each changed
job's new row as HTML (the htmx SSE extension swaps it in). Nothing polls."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from litestar import Request, get
from litestar.di import NamedDependency
from litestar.params import QueryParameter
from litestar.plugins.htmx import HTMXRequest
from litestar.response import ServerSentEvent, ServerSentEventMessage

from ...auth import Caller
from ...notify import Notifier
from ...reads import batch_summary, every_item
from ...store import Job, JobStore
from .rows import job_context, job_rows
from .templating import render

# Changes are gathered for a moment and sent together: a batch of 200 jobs finishing at once is
# one burst of rows, not 200 separate renders per open page.
COALESCE_SECONDS = 0.25
HEARTBEAT_SECONDS = 15.0
# A batch's page shows its jobs as table rows or as gallery tiles: a changed job is sent as one.
_ROW_TEMPLATES = {"batch": "partials/batch_row.html", "gallery": "partials/gallery_tile.html"}
_BATCH_VIEWS = set(_ROW_TEMPLATES)


@dataclass
class Feed:
    """What one open page wants to hear about, as SSE messages, for the key it is shown to."""

    request: Request
    who: Caller
    store: JobStore
    notifier: Notifier
    view: str  # batch | gallery | list | job | home | nodes
    key: str | None  # the batch or job id
    since: float
    min_interval: float = COALESCE_SECONDS
    # What each job looked like when last sent: the dispatcher reports a job "changed" more
    # often than it visibly changes, and an unchanged row is not sent again.
    _sent: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.view in ("home", "nodes"):
            self.min_interval = 1.5  # whole tables are fetched again: at most this often

    async def stale(self) -> bool:
        """Did what the page shows change between its render and this connection?"""
        if self.view == "job" and self.key:
            job = await self.store.get(self.key)
            return job is not None and self.who.may_touch(job.owner) and job.updated_at > self.since
        if self.view in _BATCH_VIEWS and self.key:
            async for item in every_item(self.store, self.key, self.who.sees):
                if item.job.updated_at > self.since:
                    return True
        if self.view == "list":
            # Any job may be on the list: a change anywhere since the render reloads its rows.
            return self.notifier.changed_at > self.since
        return False

    async def messages(self, ids: set[str]) -> list[ServerSentEventMessage]:
        store, out = self.store, []
        if self.view in ("home", "nodes"):
            return [ServerSentEventMessage(event="changed", data="")]
        if self.view == "job":
            job = await store.get(self.key or "") if self.key in ids else None
            if job and self.who.may_touch(job.owner) and self._changed(job):
                out.append(ServerSentEventMessage(event=f"job-{job.id}", data=await self._job_live(job)))
            return out
        added, changed = False, []
        found = await store.read(lambda r: [r.batch_item(job_id) for job_id in sorted(ids)])
        for item in found:
            if item is None or not self.who.may_touch(item.job.owner):
                continue
            if self.view in _BATCH_VIEWS and item.job.batch_id != self.key:
                continue
            if not self._changed(item.job):
                continue
            if item.job.created_at > self.since:
                added = True
                if self.view in _BATCH_VIEWS:
                    continue  # the table is fetched again, with this row in its place
            changed.append(item)
        template = _ROW_TEMPLATES.get(self.view, "partials/job_row.html")
        for row in await store.read(lambda r: job_rows(r, changed)):  # queue positions: one query for all
            out.append(ServerSentEventMessage(
                event=f"job-{row.job.id}", data=render(self.request, template, row=row),
            ))
        if added:
            self.since = time.time()
            out.append(ServerSentEventMessage(event="added", data=""))
        if self.view in _BATCH_VIEWS and (out or added):
            summary = await batch_summary(store, self.key or "", self.who)
            out.append(ServerSentEventMessage(
                event="summary", data=render(self.request, "partials/batch_summary.html", s=summary),
            ))
        return out

    def _changed(self, job: Job) -> bool:
        look = (job.state, job.updated_at, json.dumps(job.queue_info, sort_keys=True))
        if self._sent.get(job.id) == look:
            return False
        self._sent[job.id] = look
        return True

    async def _job_live(self, job: Job) -> str:
        return render(self.request, "partials/job_live.html", **await job_context(self.store, job))


async def _event_stream(feed: Feed) -> AsyncIterator[ServerSentEventMessage]:
    with feed.notifier.listen() as changes:
        # `retry`: how long the browser waits before it reconnects after the stream breaks.
        yield ServerSentEventMessage(data=None, comment="live", retry=3000)
        if await feed.stale():
            yield ServerSentEventMessage(event="resync", data="")
        last = 0.0
        while True:
            ids = await changes.next(HEARTBEAT_SECONDS, COALESCE_SECONDS, last + feed.min_interval)
            if not ids:
                # Keeps proxies from closing an idle stream, and shows a dead one to the browser.
                yield ServerSentEventMessage(data=None, comment="keep-alive")
                if feed.view == "nodes":  # node health changes without any job changing
                    yield ServerSentEventMessage(event="changed", data="")
                continue
            for message in await feed.messages(ids):
                yield message
            last = time.monotonic()


@get("/events", include_in_schema=False)
async def events(
    request: HTMXRequest,
    who: NamedDependency[Caller],
    store: NamedDependency[JobStore],
    notifier: NamedDependency[Notifier],
    view: Annotated[str, QueryParameter(pattern=r"^(batch|gallery|list|job|home|nodes)$")] = "list",
    key: Annotated[str | None, QueryParameter(max_length=100)] = None,
    since: Annotated[float | None, QueryParameter()] = None,
) -> ServerSentEvent:
    """Server-Sent Events for one open page: changed rows as HTML, ready to swap in."""
    feed = Feed(request, who, store, notifier, view, key, since if since is not None else time.time())
    return ServerSentEvent(_event_stream(feed))
