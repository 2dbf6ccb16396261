"""The dashboard's pages and the fragments htmx fetches again: home, batches, jobs, nodes."""

from __future__ import annotations

import re
import time
from typing import Annotated

from litestar import Response, get
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, QueryParameter
from litestar.plugins.htmx import HTMXRequest
from litestar.response import Stream, Template

from ...auth import Caller
from ...batch_files import batch_zip
from ...batch_plan import MANIFEST_COLUMNS, MAX_BATCH_JOBS, new_batch_id
from ...blobs import BlobStore
from ...dispatch import Dispatcher
from ...jobs import JobService
from ...schemas import MAX_SQLITE_INT, ApiError
from ...reads import batch_summary, find_item
from ...settings import Settings
from ...store import JobStore
from ..files import blob_file
from ..nodes import node_views
from ..webhooks import webhook_section
from .rows import BATCH_PAGE_ROWS, job_context, list_filters, read_batch_page, read_jobs_page, recent
from .templating import off_loop_page


@get("/", include_in_schema=False)
async def home(
    store: NamedDependency[JobStore], dispatcher: NamedDependency[Dispatcher], who: NamedDependency[Caller],
) -> Template:
    counts, batches = await recent(store, who)
    return Template("home.html", context={
        "counts": counts, "batches": batches, "nodes": await node_views(store, dispatcher, who),
        "since": time.time(),
    })


@get("/batches/recent", include_in_schema=False)
async def recent_batches(store: NamedDependency[JobStore], who: NamedDependency[Caller]) -> Template:
    counts, batches = await recent(store, who)
    return Template("partials/batch_list.html", context={"counts": counts, "batches": batches})


@get("/batches/new", include_in_schema=False)
async def new_batch(jobs: NamedDependency[JobService], settings: NamedDependency[Settings]) -> Template:
    return Template("batch_new.html", context={
        "batch_id": new_batch_id(), "available_tasks": jobs.runnable_tasks(),
        "max_file_mb": settings.max_file_mb, "max_jobs": MAX_BATCH_JOBS,
        "manifest_columns": MANIFEST_COLUMNS,
    })


# A batch's page, and the parts of it fetched again as jobs are added or retried.
_BATCH_PARTS = {"rows": "partials/batch_rows.html", "gallery": "partials/gallery_tiles.html"}


@get(["/batches/{batch_id:str}", "/batches/{batch_id:str}/rows", "/batches/{batch_id:str}/gallery"], include_in_schema=False)
async def batch_page(
    request: HTMXRequest, store: NamedDependency[JobStore], who: NamedDependency[Caller], batch_id: FromPath[str],
    after: Annotated[int, QueryParameter(ge=0, le=MAX_SQLITE_INT)] = 0,
    view: Annotated[str, QueryParameter(pattern=r"^(table|gallery)$")] = "table",
) -> Response:
    """A page of a batch as a table or a gallery of its videos; or (`/rows`, `/gallery`) its
    rows or tiles alone."""
    summary, rows, next_after = await store.read(lambda r: read_batch_page(r, who, batch_id, after))
    template = _BATCH_PARTS.get(request.url.path.rsplit("/", 1)[-1], "batch.html")
    return await off_loop_page(request, template, {
        "s": summary, "rows": rows, "after": after, "next_after": next_after,
        "page_rows": BATCH_PAGE_ROWS, "since": time.time(), "gallery": view == "gallery",
    })


@get("/batches/{batch_id:str}/summary", include_in_schema=False)
async def batch_summary_fragment(
    store: NamedDependency[JobStore], who: NamedDependency[Caller], batch_id: FromPath[str],
) -> Template:
    return Template("partials/batch_summary.html", context={"s": await batch_summary(store, batch_id, who)})


@get("/batches/{batch_id:str}/videos.zip", include_in_schema=False)
async def batch_videos(
    store: NamedDependency[JobStore], blobs: NamedDependency[BlobStore], who: NamedDependency[Caller],
    batch_id: FromPath[str],
) -> Stream:
    return Stream(
        await batch_zip(store, blobs, who, batch_id), media_type="application/zip",
        headers={"content-disposition": f'attachment; filename="{batch_id}.zip"', "cache-control": "no-store"},
    )


# The jobs list's filters, from the page's address (`?state=&task=&batch=`).
_FILTERS = {"filters": Provide(list_filters, sync_to_thread=False)}


@get("/jobs", include_in_schema=False, dependencies=_FILTERS)
async def jobs_page(
    request: HTMXRequest,
    store: NamedDependency[JobStore],
    who: NamedDependency[Caller],
    filters: NamedDependency[dict[str, str]],
    before: Annotated[int | None, QueryParameter(ge=1, le=MAX_SQLITE_INT)] = None,
) -> Response:
    (rows, next_before), counts = await store.read(
        lambda r: (read_jobs_page(r, who, filters, before), r.owner_counts(who.sees))
    )
    return await off_loop_page(request, "jobs.html", {
        "rows": rows, "filters": filters, "before": before, "next_before": next_before,
        "counts": counts, "since": time.time(),
    })


@get("/jobs/rows", include_in_schema=False, dependencies=_FILTERS)
async def jobs_rows(
    request: HTMXRequest, store: NamedDependency[JobStore], who: NamedDependency[Caller],
    filters: NamedDependency[dict[str, str]],
) -> Response:
    """The newest page of the jobs list again (new jobs arrived, or the stream reconnected)."""
    rows, _ = await store.read(lambda r: read_jobs_page(r, who, filters, None))
    return await off_loop_page(request, "partials/job_rows.html", {"rows": rows, "filters": filters})


@get("/jobs/{job_id:str}", include_in_schema=False)
async def job_page(store: NamedDependency[JobStore], who: NamedDependency[Caller], job_id: FromPath[str]) -> Template:
    job = (await find_item(store, job_id, who)).job
    inputs, hooks = await store.read(lambda r: (
        {role: r.blob(sha) for role, sha in job.inputs.items()}, webhook_section(r, job.id),
    ))
    return Template("job.html", context={
        **await job_context(store, job), "inputs": inputs, "hooks": hooks, "since": time.time(),
    })


@get("/jobs/{job_id:str}/webhooks", include_in_schema=False)
async def job_webhooks(store: NamedDependency[JobStore], who: NamedDependency[Caller], job_id: FromPath[str]) -> Template:
    """The job page's webhook deliveries, fetched again while some are pending."""
    job = (await find_item(store, job_id, who)).job
    hooks = await store.read(lambda r: webhook_section(r, job.id))
    return Template("partials/job_webhooks.html", context={"job": job, "hooks": hooks})


@get("/jobs/{job_id:str}/live", include_in_schema=False)
async def job_live(store: NamedDependency[JobStore], who: NamedDependency[Caller], job_id: FromPath[str]) -> Template:
    item = await find_item(store, job_id, who)
    return Template("partials/job_live.html", context=await job_context(store, item.job))


@get("/jobs/{job_id:str}/retry-form", include_in_schema=False)
async def retry_form(store: NamedDependency[JobStore], who: NamedDependency[Caller], job_id: FromPath[str]) -> Template:
    """The retry form of a row of the batch page, prefilled with the job's prompt and seed."""
    job = (await find_item(store, job_id, who)).job
    return Template("partials/retry_form.html", context={"job": job})


_MEDIA_TYPES = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif",
                "wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac", "ogg": "audio/ogg",
                "m4a": "audio/mp4", "aac": "audio/aac", "webm": "audio/webm", "mp4": "video/mp4"}


@get("/jobs/{job_id:str}/inputs/{role:str}", include_in_schema=False)
async def job_input(
    request: HTMXRequest, store: NamedDependency[JobStore], blobs: NamedDependency[BlobStore],
    who: NamedDependency[Caller], job_id: FromPath[str], role: FromPath[str],
) -> Response:
    """An input file of a job (for the thumbnail and the audio player), with Range support."""
    item = await find_item(store, job_id, who)
    sha = item.job.inputs.get(role)
    if sha is None:
        raise ApiError(404, f"This job has no {role} input")
    gone = "This input file has expired and was deleted"
    if item.job.files_expired:
        raise ApiError(410, gone)
    blob = await store.blob(sha) or {}
    kind = blob.get("kind", "bin")
    return await blob_file(
        blobs, sha, request.headers.get("range"), media_type=_MEDIA_TYPES.get(kind, "application/octet-stream"),
        filename=re.sub(r"[^\w.\- ]", "_", item.files.get(role) or f"{role}.{kind}"), gone=gone,
    )


@get(["/nodes", "/nodes/table"], include_in_schema=False)
async def nodes_page(
    request: HTMXRequest, store: NamedDependency[JobStore], dispatcher: NamedDependency[Dispatcher],
    who: NamedDependency[Caller],
) -> Template:
    """The nodes page, or (`/nodes/table`, fetched again as nodes change) its table alone."""
    template = "partials/nodes_table.html" if request.url.path.endswith("/table") else "nodes.html"
    return Template(template, context={"nodes": await node_views(store, dispatcher, who)})


ROUTES = [
    home, recent_batches, new_batch, batch_page, batch_summary_fragment, batch_videos,
    jobs_page, jobs_rows, job_page, job_live, retry_form, job_input, nodes_page, job_webhooks,
]
