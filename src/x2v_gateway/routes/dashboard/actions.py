"""The dashboard's actions: uploads, a batch's preview and creation, cancels and retries, the
drain switch. Each parses the form, calls one method of the job service (or the node registry)
and answers with the fragment htmx swaps in."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Response, post
from litestar.di import NamedDependency
from litestar.params import FromPath, QueryParameter
from litestar.plugins.htmx import ClientRedirect, HTMXRequest
from litestar.response import Template

from ...auth import Caller
from ...batch_plan import Upload
from ...dispatch import Dispatcher
from ...inputs import declared_size, read_form
from ...jobs import JobService
from ...request_bodies import BodyReader
from ...schemas import ApiError
from ...node_registry import NodeRegistry
from ...reads import find_item
from ...store import Job, JobStore
from ..nodes import node_views
from .rows import job_context, job_rows

_UPLOAD_HINTS = {
    ("audio", True): ": export it again as WAV, MP3 or M4A",
    ("image", True): ": save it again as PNG or JPEG",
    ("video", True): ": export it again as MP4",
}


@post("/uploads", include_in_schema=False, request_max_body_size=None, status_code=200)
async def upload(request: HTMXRequest, bodies: NamedDependency[BodyReader], who: NamedDependency[Caller]) -> Template:
    """One file from the batch form into the blob store; answers with its line in the file list."""
    try:
        kept = await bodies.keep_dropped(
            request.headers.get("content-type", ""), request.stream(), size=declared_size(request) or 0,
            owner=who.owner,
        )
    except ApiError as exc:
        if exc.status != 422:
            raise
        name = request.query_params.get("name") or "file"
        role = exc.field if exc.field in ("image", "audio", "video") else "image"
        refused = Upload(name, role, error=exc.message + _UPLOAD_HINTS.get((role, "readable" in exc.message), ""))
        return Template("partials/upload_item.html", context={"u": refused}, status_code=422)
    uploaded = Upload(kept.name, kept.role, kept.sha256, kept.size)
    return Template("partials/upload_item.html", context={"u": uploaded})


def _form_values(form: Any) -> tuple[dict[str, str], list[str]]:
    values = {k: str(v) for k, v in form.items() if k != "file" and isinstance(v, str)}
    return values, [v for v in form.getall("file") if isinstance(v, str)] if "file" in form else []


@post("/batches/preview", include_in_schema=False, request_max_body_size=8 * 1024 * 1024, status_code=200)
async def preview_batch(request: HTMXRequest, jobs: NamedDependency[JobService]) -> Template:
    values, files = _form_values(await read_form(request))
    plan = await jobs.plan_batch(values, files)
    return Template("partials/preview.html", context={"plan": plan},
                    status_code=200 if plan.ok else 422)


@post("/batches", include_in_schema=False, request_max_body_size=8 * 1024 * 1024, status_code=200)
async def create_batch(
    request: HTMXRequest, jobs: NamedDependency[JobService], who: NamedDependency[Caller],
) -> Response:
    values, files = _form_values(await read_form(request))
    plan, batch_id = await jobs.create_batch(who, values, files)
    if batch_id is None:
        return Template("partials/preview.html", context={"plan": plan}, status_code=422)
    return ClientRedirect(f"/ui/batches/{batch_id}")


@post("/batches/{batch_id:str}/cancel", include_in_schema=False, status_code=200)
async def cancel_batch(
    jobs: NamedDependency[JobService], who: NamedDependency[Caller], batch_id: FromPath[str],
) -> Template:
    n = (await jobs.cancel_batch(batch_id, who)).cancelled
    message = f"Cancelled {n} job{'s' * (n != 1)}." if n else "Nothing to cancel: every job had ended."
    return _flash(message)


@post("/batches/{batch_id:str}/retry-failed", include_in_schema=False, status_code=200)
async def retry_failed(
    jobs: NamedDependency[JobService], who: NamedDependency[Caller], batch_id: FromPath[str],
) -> Template:
    retried, expired, stopped = await jobs.retry_failed(batch_id, who)
    message = f"Queued {retried} failed job{'s' * (retried != 1)} again." if retried else "No failed job was retried."
    if expired:
        message += f" {expired} could not be retried: their input files have expired; submit them again."
    if stopped:
        message += f" The rest were not: {stopped}."
    return _flash(message)


def _flash(message: str) -> Template:
    # The table and counts refetch themselves on `rows-changed`, whether or not SSE is connected.
    return Template("partials/flash.html", context={"message": message}, headers={"HX-Trigger": "rows-changed"})


async def _job_fragment(store: JobStore, who: Caller, job: Job, view: str) -> Template:
    """The job's row (or, on its own page, its live part) after an action; the page's table and
    counts refetch themselves on `rows-changed`."""
    headers = {"HX-Trigger": "rows-changed"}
    if view == "job":
        return Template("partials/job_live.html", context=await job_context(store, job), headers=headers)
    item = await find_item(store, job.id, who)
    (row,) = await store.read(lambda r: job_rows(r, [item]))
    template = "partials/batch_row.html" if view == "batch" else "partials/job_row.html"
    return Template(template, context={"row": row}, headers=headers)


@post("/jobs/{job_id:str}/cancel", include_in_schema=False, status_code=200)
async def cancel_job(
    jobs: NamedDependency[JobService], store: NamedDependency[JobStore], who: NamedDependency[Caller],
    job_id: FromPath[str], view: Annotated[str, QueryParameter()] = "list",
) -> Template:
    return await _job_fragment(store, who, await jobs.cancel(job_id, who), view)


@post("/jobs/{job_id:str}/retry", include_in_schema=False, status_code=200, request_max_body_size=64 * 1024)
async def retry_job(
    request: HTMXRequest, jobs: NamedDependency[JobService], store: NamedDependency[JobStore],
    who: NamedDependency[Caller], job_id: FromPath[str], view: Annotated[str, QueryParameter()] = "list",
) -> Response:
    form = await read_form(request)
    prompt = str(form["prompt"]) if "prompt" in form else None
    job, is_new = await jobs.run_again(job_id, who, prompt, str(form.get("seed", "")))
    if view == "job" and is_new:
        return ClientRedirect(f"/ui/jobs/{job.id}")
    shown = await store.get(job_id) if is_new else job
    assert shown is not None  # jobs are never deleted
    return await _job_fragment(store, who, shown, view)


@post("/nodes/{name:str}/drain", include_in_schema=False, status_code=200, request_max_body_size=4096)
async def drain_node(
    request: HTMXRequest, store: NamedDependency[JobStore], dispatcher: NamedDependency[Dispatcher],
    registry: NamedDependency[NodeRegistry], who: NamedDependency[Caller], name: FromPath[str],
) -> Template:
    """The drain switch. Admin keys only (auth.ADMIN_CHANGES), and audited there."""
    drained = (await read_form(request)).get("drained") == "on"
    await registry.set_drained(name, drained)
    return Template("partials/nodes_table.html", context={"nodes": await node_views(store, dispatcher, who)})


ROUTES = [upload, preview_batch, create_batch, cancel_batch, retry_failed, cancel_job, retry_job, drain_node]
