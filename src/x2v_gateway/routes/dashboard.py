"""The dashboard: batches made, watched, fixed and downloaded in the browser (Jinja2 + htmx).

Every route lives under `/ui` in one `Router` (see `router()`). Sign-in, CSRF and "admins
only" are decided before a handler runs (`auth.AuthMiddleware`); here, each handler acts as the
signed-in key (`caller()`): it sees and touches that key's jobs only (an admin key: every job),
and the jobs it makes count against that key's quota. Pages are rendered on the server; htmx
swaps fragments, and one Server-Sent Events stream per open page pushes each changed job's new
row (the htmx SSE extension swaps it in). Nothing polls.

What a batch is made of, how its form is checked and how its zip is made live in `batches.py`;
the handlers here parse the request, call one function there and render what it returns.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from litestar import MediaType, Request, Response, Router, get, post
from litestar.exceptions import HTTPException, ValidationException
from litestar.params import FromPath, QueryParameter
from litestar.plugins.htmx import ClientRedirect, HTMXRequest
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Redirect, ServerSentEvent, ServerSentEventMessage, Stream, Template
from litestar.static_files import create_static_files_router
from litestar.types import Guard
from markupsafe import Markup

from ..auth import Caller, LimitError, caller
from ..batches import (
    LABELS, MANIFEST_COLUMNS, MAX_BATCH_JOBS, MODES, RESIZE_MODES, TASKS, BatchSummary, Upload,
    all_items, batch_summary, batch_zip, cancel_batch, create_batch, new_batch_id, plan_batch,
    read_batch_summary, retry_failed, run_again,
)
from ..inputs import declared_size, read_form
from ..models import MAX_SQLITE_INT, TASK_INPUTS, ApiError, iso, plain
from ..store import STATES, TERMINAL, BatchItem, Job, Reads
from .api import ranged_file
from .nodes import NodeView, node_view

if TYPE_CHECKING:
    from litestar.types import ControllerRouterHandler

    from ..app import Gateway

log = logging.getLogger("x2v_gateway.dashboard")

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
BATCH_PAGE_ROWS = 500
LIST_PAGE_ROWS = 50


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway


# -- templates and static files ---------------------------------------------------------------


def templates_dir() -> Path:
    """`templates/` at the repository root, or `x2v_gateway/templates` inside an installed wheel."""
    packaged = Path(__file__).resolve().parent.parent / "templates"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "templates"


def _static_versions() -> dict[str, str]:
    # A hash of each file in the URL: browsers cache static files, and a new version of
    # dashboard.js must not meet an old cached one.
    return {
        path.relative_to(STATIC_DIR).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()[:10]
        for path in STATIC_DIR.rglob("*") if path.is_file()
    }


def setup_templates(engine: JinjaTemplateEngine) -> None:
    """Filters and globals the dashboard's templates use."""
    versions = _static_versions()
    env = engine.engine
    env.globals.update(
        static=lambda name: f"/static/{name}?v={versions.get(name, '0')}",
        STATES=STATES, TASKS=TASKS, MODES=MODES, LABELS=LABELS, RESIZE_MODES=RESIZE_MODES,
        TERMINAL=TERMINAL,
    )
    env.filters.update(when=_when, seconds=_seconds, size=_size, params_text=_params_text, eta=_eta)
    engine.register_template_callable("signed_in", _signed_in)
    env.trim_blocks = env.lstrip_blocks = True


def static_files() -> ControllerRouterHandler:
    """htmx, its SSE extension, the dashboard's CSS and JS: open to everyone, like /healthz."""
    return create_static_files_router(
        # The dashboard's own files, not part of the API.
        path="/static", directories=[STATIC_DIR], include_in_schema=False,
    )


def _signed_in(context: Mapping[str, Any]) -> Caller | None:
    """The key the page is shown to (None on open pages, like sign-in)."""
    request = context.get("request")
    return request.scope.get("state", {}).get("caller") if request is not None else None


def _when(ts: float | None) -> Markup:
    if ts is None:
        return Markup("—")
    text = iso(ts) or ""
    # The browser rewrites it in local time (dashboard.js); UTC is what a page without JS shows.
    return Markup('<time datetime="{0}">{1}</time>').format(text, text[:19].replace("T", " ") + " UTC")


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    value = max(0, round(value))
    if value < 60:
        return f"{value} s"
    if value < 3600:
        return f"{value // 60} min {value % 60:02d} s"
    return f"{value // 3600} h {value % 3600 // 60:02d} min"


def _eta(info: dict[str, Any] | None) -> str:
    """What the upstream expects for a job on it, e.g. " · starts in about 12 s · runs about 40 s".

    A filter, not a macro: the batch table renders it 500 times.
    """
    info = info or {}
    parts = []
    if info.get("pending_seconds") is not None:
        parts.append(f"starts in about {_seconds(info['pending_seconds'])}")
    if info.get("running_seconds") is not None:
        parts.append(f"runs about {_seconds(info['running_seconds'])}")
    return "".join(f" · {part}" for part in parts)


def _size(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _params_text(params: dict[str, Any]) -> str:
    """The parameters besides prompt and seed, short: `infer_steps=4, target_shape=480×832`."""
    parts = []
    for key, value in params.items():
        if key in ("prompt", "negative_prompt", "seed"):
            continue
        if key == "target_shape" and isinstance(value, list):
            value = "×".join(str(v) for v in value)
        parts.append(f"{key}={value}")
    return ", ".join(parts)


def _render(request: Request, name: str, **context: Any) -> str:
    return request.app.template_engine.get_template(name).render(**context)


async def _off_loop_page(request: Request, name: str, context: dict[str, Any]) -> Response:
    """A template rendered on a worker thread, for the pages of up to 500 rows: rendering one
    takes tens of ms, which the event loop would otherwise spend not answering anyone else."""
    full = Template(name, context=context).create_template_context(request)
    html = await asyncio.to_thread(lambda: request.app.template_engine.get_template(name).render(**full))
    return Response(html, media_type=MediaType.HTML)


# -- what the pages show -----------------------------------------------------------------------


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


def _rows(r: Reads, items: list[BatchItem]) -> list[JobRow]:
    positions = r.queue_positions(item.job for item in items)
    return [JobRow(item, positions.get(item.job.id)) for item in items]


async def _item(gw: Gateway, job_id: str, who: Caller) -> BatchItem:
    item = await gw.store.batch_item(job_id)
    if item is None or not who.may_touch(item.job.owner):
        raise ApiError(404, f"There is no job {job_id}. Look for it in the Jobs list.")
    return item


def _list_filters(state: str | None, task: str | None, batch: str | None) -> dict[str, str]:
    filters = {}
    if state:
        if state not in STATES:
            raise ApiError(400, f"{state!r} is not a job state; states are " + ", ".join(STATES))
        filters["state"] = state
    if task:
        if task not in TASK_INPUTS:
            raise ApiError(400, f"{task!r} is not a task type; task types are " + ", ".join(TASK_INPUTS))
        filters["task"] = task
    if batch:
        filters["batch"] = batch.strip()
    return filters


def _jobs_page(
    r: Reads, who: Caller, filters: dict[str, str], before: int | None,
) -> tuple[list[JobRow], int | None]:
    """A page of the jobs list, built on a reader thread."""
    jobs = r.list_jobs(
        states=[filters["state"]] if "state" in filters else (),
        task=filters.get("task"), batch_id=filters.get("batch"), owner=who.sees, before_seq=before,
        limit=LIST_PAGE_ROWS + 1,
    )
    more = len(jobs) > LIST_PAGE_ROWS
    jobs = jobs[:LIST_PAGE_ROWS]
    positions = r.queue_positions(jobs)
    rows = [JobRow(BatchItem(job, None, {}, None), positions.get(job.id)) for job in jobs]
    return rows, (jobs[-1].seq if more else None)


def _batch_page(
    r: Reads, who: Caller, batch_id: str, after: int,
) -> tuple[BatchSummary, list[JobRow], int | None]:
    """A page of the batch's rows after `after`, and where the next page starts (None: last);
    built on a reader thread."""
    summary = read_batch_summary(r, batch_id, who)  # 404 for a batch this key cannot see
    items = r.batch_items(batch_id, after_seq=after, limit=BATCH_PAGE_ROWS + 1, owner=who.sees)
    next_after = items[BATCH_PAGE_ROWS - 1].job.seq if len(items) > BATCH_PAGE_ROWS else None
    return summary, _rows(r, items[:BATCH_PAGE_ROWS]), next_after


async def node_rows(gw: Gateway, who: Caller) -> list[NodeView]:
    """The nodes as `GET /api/v1/nodes` shows them to `who`."""
    return [await node_view(gw, state, who) for state in gw.dispatcher.states.values()]


# -- live updates ------------------------------------------------------------------------------

# Changes are gathered for a moment and sent together: a batch of 200 jobs finishing at once is
# one burst of rows, not 200 separate renders per open page.
COALESCE_SECONDS = 0.25
HEARTBEAT_SECONDS = 15.0


@dataclass
class Feed:
    """What one open page wants to hear about, as SSE messages, for the key it is shown to."""

    request: Request
    who: Caller
    view: str  # batch | list | job | home | nodes
    key: str | None  # the batch or job id
    since: float
    min_interval: float = COALESCE_SECONDS
    # What each job looked like when last sent: the dispatcher reports a job "changed" more
    # often than it visibly changes, and an unchanged row is not sent again.
    _sent: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.view in ("home", "nodes"):
            self.min_interval = 1.5  # whole tables are fetched again: at most this often

    @property
    def gw(self) -> Gateway:
        return gateway(self.request)

    async def stale(self) -> bool:
        """Did what the page shows change between its render and this connection?"""
        if self.view == "job" and self.key:
            job = await self.gw.store.get(self.key)
            return job is not None and self.who.may_touch(job.owner) and job.updated_at > self.since
        if self.view == "batch" and self.key:
            async for item in all_items(self.gw, self.key, self.who.sees):
                if item.job.updated_at > self.since:
                    return True
        if self.view == "list":
            # Any job may be on the list: a change anywhere since the render reloads its rows.
            return self.gw.notifier.changed_at > self.since
        return False

    async def messages(self, ids: set[str]) -> list[ServerSentEventMessage]:
        store, out = self.gw.store, []
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
            if self.view == "batch" and item.job.batch_id != self.key:
                continue
            if not self._changed(item.job):
                continue
            if item.job.created_at > self.since:
                added = True
                if self.view == "batch":
                    continue  # the table is fetched again, with this row in its place
            changed.append(item)
        template = "partials/batch_row.html" if self.view == "batch" else "partials/job_row.html"
        for row in await store.read(lambda r: _rows(r, changed)):  # queue positions: one query for all
            out.append(ServerSentEventMessage(
                event=f"job-{row.job.id}", data=_render(self.request, template, row=row),
            ))
        if added:
            self.since = time.time()
            out.append(ServerSentEventMessage(event="added", data=""))
        if self.view == "batch" and (out or added):
            summary = await batch_summary(self.gw, self.key or "", self.who)
            out.append(ServerSentEventMessage(
                event="summary", data=_render(self.request, "partials/batch_summary.html", s=summary),
            ))
        return out

    def _changed(self, job: Job) -> bool:
        look = (job.state, job.updated_at, json.dumps(job.queue_info, sort_keys=True))
        if self._sent.get(job.id) == look:
            return False
        self._sent[job.id] = look
        return True

    async def _job_live(self, job: Job) -> str:
        return _render(self.request, "partials/job_live.html", **await _job_context(self.gw, job))


async def _event_stream(feed: Feed) -> AsyncIterator[ServerSentEventMessage]:
    notifier = feed.gw.notifier
    queue = notifier.subscribe()
    try:
        # `retry`: how long the browser waits before it reconnects after the stream breaks.
        yield ServerSentEventMessage(data=None, comment="live", retry=3000)
        if await feed.stale():
            yield ServerSentEventMessage(event="resync", data="")
        last = 0.0
        while True:
            try:
                first = await asyncio.wait_for(queue.get(), HEARTBEAT_SECONDS)
            except TimeoutError:
                # Keeps proxies from closing an idle stream, and shows a dead one to the browser.
                yield ServerSentEventMessage(data=None, comment="keep-alive")
                if feed.view == "nodes":  # node health changes without any job changing
                    yield ServerSentEventMessage(event="changed", data="")
                continue
            await asyncio.sleep(max(COALESCE_SECONDS, feed.min_interval - (time.monotonic() - last)))
            ids = {first}
            while not queue.empty():
                ids.add(queue.get_nowait())
            for message in await feed.messages(ids):
                yield message
            last = time.monotonic()
    finally:
        notifier.unsubscribe(queue)


# -- pages and fragments -----------------------------------------------------------------------


def _form_values(form: Any) -> tuple[dict[str, str], list[str]]:
    values = {k: str(v) for k, v in form.items() if k != "file" and isinstance(v, str)}
    return values, [v for v in form.getall("file") if isinstance(v, str)] if "file" in form else []


async def _recent(gw: Gateway, who: Caller) -> tuple[dict[str, int], list[BatchSummary]]:
    """The caller's job counts and latest batches, in one hop to a reader thread."""
    return await gw.store.read(lambda r: (r.owner_counts(who.sees), [
        read_batch_summary(r, batch_id, who) for batch_id in r.recent_batch_ids(limit=20, owner=who.sees)
    ]))


@get("/", include_in_schema=False)
async def home(request: HTMXRequest) -> Template:
    gw, who = gateway(request), caller(request)
    counts, batches = await _recent(gw, who)
    return Template("home.html", context={
        "counts": counts, "batches": batches, "nodes": await node_rows(gw, who), "since": time.time(),
    })


@get("/batches/recent", include_in_schema=False)
async def recent_batches(request: HTMXRequest) -> Template:
    counts, batches = await _recent(gateway(request), caller(request))
    return Template("partials/batch_list.html", context={"counts": counts, "batches": batches})


@get("/batches/new", include_in_schema=False)
async def new_batch(request: HTMXRequest) -> Template:
    gw = gateway(request)
    tasks = {t for s in gw.dispatcher.states.values() for t in s.upstream.tasks}
    return Template("batch_new.html", context={
        "batch_id": new_batch_id(), "available_tasks": tasks,
        "max_file_mb": gw.settings.max_file_mb, "max_jobs": MAX_BATCH_JOBS,
        "manifest_columns": MANIFEST_COLUMNS,
    })


_UPLOAD_HINTS = {
    ("audio", True): ": export it again as WAV, MP3 or M4A",
    ("image", True): ": save it again as PNG or JPEG",
}


@post("/uploads", include_in_schema=False, request_max_body_size=None, status_code=200)
async def upload(request: HTMXRequest) -> Template:
    """One file from the batch form into the blob store; answers with its line in the file list."""
    gw = gateway(request)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ApiError(415, "upload files as multipart/form-data")
    size = declared_size(request) or 0
    # Refused on the headers, before a byte of the body is read.
    if size > gw.settings.max_file_mb * 1024 * 1024 + 64 * 1024:
        raise ApiError(413, f"This file is larger than the {gw.settings.max_file_mb} MiB a file may be")
    gw.jobs.check_free_space(size)
    try:
        kept = await gw.jobs.keep_upload(content_type, request.stream(), owner=caller(request).owner)
    except ApiError as exc:
        if exc.status != 422:
            raise
        name = request.query_params.get("name") or "file"
        role = exc.field if exc.field in ("image", "audio") else "image"
        refused = Upload(name, role, error=exc.message + _UPLOAD_HINTS.get((role, "readable" in exc.message), ""))
        return Template("partials/upload_item.html", context={"u": refused}, status_code=422)
    uploaded = Upload(kept.name, kept.role, kept.sha256, kept.size)
    return Template("partials/upload_item.html", context={"u": uploaded})


@post("/batches/preview", include_in_schema=False, request_max_body_size=8 * 1024 * 1024, status_code=200)
async def preview_batch(request: HTMXRequest) -> Template:
    values, files = _form_values(await read_form(request))
    plan = await plan_batch(gateway(request), values, files)
    return Template("partials/preview.html", context={"plan": plan},
                    status_code=200 if plan.ok else 422)


@post("/batches", include_in_schema=False, request_max_body_size=8 * 1024 * 1024, status_code=200)
async def create_batch_route(request: HTMXRequest) -> Response:
    values, files = _form_values(await read_form(request))
    plan, batch_id = await create_batch(gateway(request), caller(request), values, files)
    if batch_id is None:
        return Template("partials/preview.html", context={"plan": plan}, status_code=422)
    return ClientRedirect(f"/ui/batches/{batch_id}")


@get("/batches/{batch_id:str}", include_in_schema=False)
async def batch_page(
    request: HTMXRequest, batch_id: FromPath[str],
    after: Annotated[int, QueryParameter(ge=0, le=MAX_SQLITE_INT)] = 0,
) -> Response:
    who = caller(request)
    summary, rows, next_after = await gateway(request).store.read(lambda r: _batch_page(r, who, batch_id, after))
    return await _off_loop_page(request, "batch.html", {
        "s": summary, "rows": rows, "after": after, "next_after": next_after,
        "page_rows": BATCH_PAGE_ROWS, "since": time.time(),
    })


@get("/batches/{batch_id:str}/rows", include_in_schema=False)
async def batch_rows(
    request: HTMXRequest, batch_id: FromPath[str],
    after: Annotated[int, QueryParameter(ge=0, le=MAX_SQLITE_INT)] = 0,
) -> Response:
    who = caller(request)
    _, rows, _ = await gateway(request).store.read(lambda r: _batch_page(r, who, batch_id, after))
    return await _off_loop_page(request, "partials/batch_rows.html", {"rows": rows})


@get("/batches/{batch_id:str}/summary", include_in_schema=False)
async def batch_summary_fragment(request: HTMXRequest, batch_id: FromPath[str]) -> Template:
    summary = await batch_summary(gateway(request), batch_id, caller(request))
    return Template("partials/batch_summary.html", context={"s": summary})


@post("/batches/{batch_id:str}/cancel", include_in_schema=False, status_code=200)
async def cancel_batch_route(request: HTMXRequest, batch_id: FromPath[str]) -> Template:
    n = await cancel_batch(gateway(request), caller(request), batch_id)
    message = f"Cancelled {n} job{'s' * (n != 1)}." if n else "Nothing to cancel: every job had ended."
    return _flash(message)


@post("/batches/{batch_id:str}/retry-failed", include_in_schema=False, status_code=200)
async def retry_failed_route(request: HTMXRequest, batch_id: FromPath[str]) -> Template:
    retried, expired, stopped = await retry_failed(gateway(request), caller(request), batch_id)
    message = f"Queued {retried} failed job{'s' * (retried != 1)} again." if retried else "No failed job was retried."
    if expired:
        message += f" {expired} could not be retried: their input files have expired; submit them again."
    if stopped:
        message += f" The rest were not: {stopped}."
    return _flash(message)


def _flash(message: str) -> Template:
    # The table and counts refetch themselves on `rows-changed`, whether or not SSE is connected.
    return Template("partials/flash.html", context={"message": message}, headers={"HX-Trigger": "rows-changed"})


@get("/batches/{batch_id:str}/videos.zip", include_in_schema=False)
async def batch_videos(request: HTMXRequest, batch_id: FromPath[str]) -> Stream:
    return Stream(
        await batch_zip(gateway(request), caller(request), batch_id), media_type="application/zip",
        headers={"content-disposition": f'attachment; filename="{batch_id}.zip"', "cache-control": "no-store"},
    )


@get("/jobs", include_in_schema=False)
async def jobs_page(
    request: HTMXRequest,
    state_filter: Annotated[str | None, QueryParameter(name="state")] = None,
    task: Annotated[str | None, QueryParameter()] = None,
    batch: Annotated[str | None, QueryParameter()] = None,
    before: Annotated[int | None, QueryParameter(ge=1, le=MAX_SQLITE_INT)] = None,
) -> Response:
    gw, who = gateway(request), caller(request)
    filters = _list_filters(state_filter, task, batch)
    (rows, next_before), counts = await gw.store.read(
        lambda r: (_jobs_page(r, who, filters, before), r.owner_counts(who.sees))
    )
    return await _off_loop_page(request, "jobs.html", {
        "rows": rows, "filters": filters, "before": before, "next_before": next_before,
        "counts": counts, "since": time.time(),
    })


@get("/jobs/rows", include_in_schema=False)
async def jobs_rows(
    request: HTMXRequest,
    state_filter: Annotated[str | None, QueryParameter(name="state")] = None,
    task: Annotated[str | None, QueryParameter()] = None,
    batch: Annotated[str | None, QueryParameter()] = None,
) -> Response:
    """The newest page of the jobs list again (new jobs arrived, or the stream reconnected)."""
    filters = _list_filters(state_filter, task, batch)
    who = caller(request)
    rows, _ = await gateway(request).store.read(lambda r: _jobs_page(r, who, filters, None))
    return await _off_loop_page(request, "partials/job_rows.html", {"rows": rows, "filters": filters})


async def _job_context(gw: Gateway, job: Job) -> dict[str, Any]:
    return await gw.store.read(lambda r: {
        "job": job, "item": r.batch_item(job.id), "events": r.events(job.id),
        "queue_position": r.queue_position(job),
        "batch": r.batch(job.batch_id) if job.batch_id else None,
    })


@get("/jobs/{job_id:str}", include_in_schema=False)
async def job_page(request: HTMXRequest, job_id: FromPath[str]) -> Template:
    gw = gateway(request)
    job = (await _item(gw, job_id, caller(request))).job
    inputs = await gw.store.read(lambda r: {role: r.blob(sha) for role, sha in job.inputs.items()})
    return Template("job.html", context={**await _job_context(gw, job), "inputs": inputs, "since": time.time()})


@get("/jobs/{job_id:str}/live", include_in_schema=False)
async def job_live(request: HTMXRequest, job_id: FromPath[str]) -> Template:
    gw = gateway(request)
    item = await _item(gw, job_id, caller(request))
    return Template("partials/job_live.html", context=await _job_context(gw, item.job))


@get("/jobs/{job_id:str}/retry-form", include_in_schema=False)
async def retry_form(request: HTMXRequest, job_id: FromPath[str]) -> Template:
    """The retry form of a row of the batch page, prefilled with the job's prompt and seed."""
    job = (await _item(gateway(request), job_id, caller(request))).job
    return Template("partials/retry_form.html", context={"job": job})


_MEDIA_TYPES = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif",
                "wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac", "ogg": "audio/ogg",
                "m4a": "audio/mp4", "aac": "audio/aac", "webm": "audio/webm"}


@get("/jobs/{job_id:str}/inputs/{role:str}", include_in_schema=False)
async def job_input(request: HTMXRequest, job_id: FromPath[str], role: FromPath[str]) -> Response:
    """An input file of a job (for the thumbnail and the audio player), with Range support."""
    gw = gateway(request)
    item = await _item(gw, job_id, caller(request))
    sha = item.job.inputs.get(role)
    if sha is None:
        raise ApiError(404, f"This job has no {role} input")
    path = gw.blobs.path(sha)
    if item.job.files_expired or not path.is_file():
        raise ApiError(410, "This input file has expired and was deleted")
    blob = await gw.store.blob(sha) or {}
    kind = blob.get("kind", "bin")
    return ranged_file(
        path, request.headers.get("range"), media_type=_MEDIA_TYPES.get(kind, "application/octet-stream"),
        filename=re.sub(r"[^\w.\- ]", "_", item.files.get(role) or f"{role}.{kind}"),
    )


async def _job_fragment(gw: Gateway, who: Caller, job: Job, view: str, headers: dict[str, str] | None = None) -> Template:
    if view == "job":
        return Template("partials/job_live.html", context=await _job_context(gw, job), headers=headers)
    item = await _item(gw, job.id, who)
    (row,) = await gw.store.read(lambda r: _rows(r, [item]))
    template = "partials/batch_row.html" if view == "batch" else "partials/job_row.html"
    return Template(template, context={"row": row}, headers=headers)


@post("/jobs/{job_id:str}/cancel", include_in_schema=False, status_code=200)
async def cancel_job(
    request: HTMXRequest, job_id: FromPath[str], view: Annotated[str, QueryParameter()] = "list",
) -> Template:
    gw, who = gateway(request), caller(request)
    await _item(gw, job_id, who)
    job = await gw.dispatcher.cancel(job_id)
    return await _job_fragment(gw, who, job, view, headers={"HX-Trigger": "rows-changed"})


@post("/jobs/{job_id:str}/retry", include_in_schema=False, status_code=200, request_max_body_size=64 * 1024)
async def retry_job(
    request: HTMXRequest, job_id: FromPath[str], view: Annotated[str, QueryParameter()] = "list",
) -> Response:
    gw, who = gateway(request), caller(request)
    old = (await _item(gw, job_id, who)).job
    form = await read_form(request)
    prompt = str(form.get("prompt", old.params.get("prompt", "")))
    seed = str(form.get("seed", ""))
    job, is_new = await run_again(gw, who, old, prompt, seed)
    if view == "job" and is_new:
        return ClientRedirect(f"/ui/jobs/{job.id}")
    shown = await gw.store.get(old.id) if is_new else job
    return await _job_fragment(gw, who, shown, view, headers={"HX-Trigger": "rows-changed"})


@get("/nodes", include_in_schema=False)
async def nodes_page(request: HTMXRequest) -> Template:
    return Template("nodes.html", context={"nodes": await node_rows(gateway(request), caller(request))})


@get("/nodes/table", include_in_schema=False)
async def nodes_table(request: HTMXRequest) -> Template:
    return Template("partials/nodes_table.html", context={"nodes": await node_rows(gateway(request), caller(request))})


@post("/nodes/{name:str}/drain", include_in_schema=False, status_code=200, request_max_body_size=4096)
async def drain_node(request: HTMXRequest, name: FromPath[str]) -> Template:
    """The drain switch. Admin keys only (auth.ADMIN_CHANGES), and audited there."""
    gw = gateway(request)
    drained = (await read_form(request)).get("drained") == "on"
    await gw.registry.set_drained(name, drained)
    return Template("partials/nodes_table.html", context={"nodes": await node_rows(gw, caller(request))})


@get("/events", include_in_schema=False)
async def events(
    request: HTMXRequest,
    view: Annotated[str, QueryParameter(pattern=r"^(batch|list|job|home|nodes)$")] = "list",
    key: Annotated[str | None, QueryParameter(max_length=100)] = None,
    since: Annotated[float | None, QueryParameter()] = None,
) -> ServerSentEvent:
    """Server-Sent Events for one open page: changed rows as HTML, ready to swap in."""
    feed = Feed(request, caller(request), view, key, since if since is not None else time.time())
    return ServerSentEvent(_event_stream(feed))


# -- errors ------------------------------------------------------------------------------------


def _error_page(request: Request, status: int, message: str) -> Response:
    if request.headers.get("hx-request"):
        return Template("partials/error_message.html", context={"message": message}, status_code=status)
    return Template("error.html", context={"status": status, "message": message}, status_code=status)


def _api_error(request: Request, exc: ApiError) -> Response:
    response = _error_page(request, exc.status, exc.message)
    if isinstance(exc, LimitError):
        response.headers["retry-after"] = str(max(1, round(exc.retry_after)))
    return response


def _validation_error(request: Request, exc: ValidationException) -> Response:
    extra = exc.extra if isinstance(exc.extra, list) else []
    first = extra[0] if extra and isinstance(extra[0], dict) else {}
    key = first.get("key")
    problem = f"{key} {plain(str(first.get('message')))}" if key else exc.detail
    return _error_page(request, 400, f"{problem}. Check the address.")


def _http_error(request: Request, exc: HTTPException) -> Response:
    return _error_page(request, exc.status_code, exc.detail)


def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _error_page(request, 500, "Something went wrong on the gateway; its log has the details. Try again.")


@get("/", include_in_schema=False)  # a browser's way in, not part of the API
async def root() -> Redirect:
    """The gateway's front door is the dashboard."""
    return Redirect("/ui/")


ROUTES = [
    home, recent_batches, new_batch, upload, preview_batch, create_batch_route, batch_page,
    batch_rows, batch_summary_fragment, cancel_batch_route, retry_failed_route, batch_videos,
    jobs_page, jobs_rows, job_page, job_live, retry_form, job_input, cancel_job, retry_job, nodes_page,
    nodes_table, drain_node, events,
]


def router(guards: Sequence[Guard] = ()) -> Router:
    """Every dashboard route, under /ui.

    Sign-in and CSRF are checked for all of them by `auth.AuthMiddleware` (the templates send
    the session's `X-CSRFToken` on every htmx request and upload); `guards` can add more.
    """
    return Router(
        path="/ui", route_handlers=ROUTES, guards=list(guards), request_class=HTMXRequest,
        exception_handlers={
            # LimitError too: the app's own handler for it answers JSON.
            ApiError: _api_error, LimitError: _api_error, ValidationException: _validation_error,
            HTTPException: _http_error, Exception: _internal_error,
        },
        # Pages, htmx fragments, an SSE stream and zips for a signed-in browser, each shaped for
        # the page that asks: not the API that /schema documents (the JSON API does all of it).
        include_in_schema=False,
    )
