"""The JSON API under /api/v1. Handlers parse, call one function, shape the response."""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import ResponseHeader
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType
from litestar.openapi.spec import OpenAPIType, Operation, RequestBody, Schema
from litestar.params import FromPath, HeaderParameter, QueryParameter
from litestar.response import Stream

from ..auth import Caller, caller
from ..inputs import declared_size
from ..models import MAX_SQLITE_INT, TASK_INPUTS, ApiError, JobList, JobRequest, JobView, errors, job_view
from ..store import STATES, Inflight, Job, Reads
from ..upstream.base import UpstreamError

if TYPE_CHECKING:
    from ..app import Gateway


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway


async def view(gw: Gateway, job: Job, *, events: bool = False) -> JobView:
    """One job as the API shows it; with `events`, its timeline and (queued) the wait estimate."""
    if not events:
        return (await views(gw, [job]))[0]
    return _full_view(gw, job, await gw.store.read(lambda r: _full_view_reads(r, job)))


_FullViewReads = tuple[dict[str, int], "int | None", "list[Inflight] | None", list[dict[str, Any]]]


def _full_view_reads(r: Reads, job: Job) -> _FullViewReads:
    """What a job's own page shows besides the job: its files' sizes, its place in the queue,
    its timeline, and (queued) the jobs in flight that its wait estimate starts from."""
    inflight = r.inflight() if job.state == "queued" else None
    return r.blob_sizes(job.inputs.values()), r.queue_position(job), inflight, r.events(job.id)


def _full_view(gw: Gateway, job: Job, reads: _FullViewReads) -> JobView:
    sizes, position, inflight, timeline = reads
    # The queue position is read once, and the estimate starts from it.
    estimate = gw.dispatcher.estimate(job, position, inflight) if inflight is not None else None
    return job_view(job, blob_sizes=sizes, queue_position=position, queue_estimate=estimate, events=timeline)


async def views(gw: Gateway, jobs: list[Job], *, events: bool = False) -> list[JobView]:
    """Jobs as the API shows them: a page of them is read and built in one hop to a reader
    thread, in two queries, not a few per job."""
    return await gw.store.read(lambda r: _views(r, jobs, events))


def _views(r: Reads, jobs: list[Job], events: bool) -> list[JobView]:
    sizes = r.blob_sizes({sha for job in jobs for sha in job.inputs.values()})
    positions = r.queue_positions(jobs)
    return [
        job_view(job, blob_sizes=sizes, queue_position=positions.get(job.id),
                 events=r.events(job.id) if events else None)
        for job in jobs
    ]


def _cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def _parse_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not text.startswith("seq:"):
            raise ValueError
        seq = int(text[4:])
        # A job's seq is a positive SQLite integer: anything else was not given out here.
        if not 1 <= seq <= MAX_SQLITE_INT:
            raise ValueError
        return seq
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ApiError(400, "cursor is not one this API gave out", "cursor") from None


_SCHEMA_KEYS = {
    "anyOf": "any_of", "minLength": "min_length", "maxLength": "max_length",
    "minItems": "min_items", "maxItems": "max_items", "exclusiveMinimum": "exclusive_minimum",
    "exclusiveMaximum": "exclusive_maximum",
}


def _openapi_schema(node: dict[str, Any], defs: dict[str, Any]) -> Schema:
    """msgspec's JSON Schema for a struct, as Litestar's OpenAPI `Schema` objects."""
    if "$ref" in node:
        node = defs[node["$ref"].rsplit("/", 1)[-1]]
    kwargs: dict[str, Any] = {}
    for key, value in node.items():
        name = _SCHEMA_KEYS.get(key, key)
        if key == "type":
            value = OpenAPIType(value)
        elif key == "properties":
            value = {k: _openapi_schema(v, defs) for k, v in value.items()}
        elif key == "anyOf":
            value = [_openapi_schema(v, defs) for v in value]
        elif key == "items":
            value = _openapi_schema(value, defs)
        elif name not in {"required", "enum", "minimum", "maximum", "pattern", "default",
                          "title", "description", *_SCHEMA_KEYS.values()}:
            continue
        kwargs[name] = value
    return Schema(**kwargs)


def _job_request_schema() -> Schema:
    schema = msgspec.json.schema(JobRequest)
    return _openapi_schema(schema, schema.get("$defs", {}))


@dataclass
class _SubmitOperation(Operation):
    """OpenAPI for `POST /jobs`: the handler reads the raw stream, so say what it accepts."""

    def __post_init__(self) -> None:
        json_schema = _job_request_schema()
        form_schema = _job_request_schema()
        for role in ("image", "audio", "last_frame"):
            form_schema.properties[role] = Schema(type=OpenAPIType.STRING, format="binary")  # type: ignore[index]
        self.request_body = RequestBody(
            required=True,
            description=(
                "A job as JSON (inputs as http(s) URLs, data URLs or base64) or as "
                "multipart/form-data (the same fields as text, `image`, `audio` and `last_frame` as files)."
            ),
            content={
                "application/json": OpenAPIMediaType(schema=json_schema),
                "multipart/form-data": OpenAPIMediaType(schema=form_schema),
            },
        )


def _stream_file(path: Path, start: int, length: int) -> AsyncIterator[bytes]:
    async def chunks() -> AsyncIterator[bytes]:
        with path.open("rb") as handle:
            handle.seek(start)
            remaining = length
            while remaining > 0:
                # Off the event loop: a cold disk must not stall every other request.
                chunk = await asyncio.to_thread(handle.read, min(256 * 1024, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
                yield chunk

    return chunks()


# At most 18 digits a side: a longer number is past any file, and `int()` refuses 4300+ digits.
# A Range that does not match is ignored (the whole file), as RFC 9110 allows.
_RANGE = re.compile(r"^bytes=(\d{0,18})-(\d{0,18})$", re.ASCII)


def ranged_file(path: Path, range_header: str | None, *, media_type: str, filename: str) -> Response:
    """A file response that honours a single `Range: bytes=a-b`, so a browser can seek."""
    size = path.stat().st_size
    headers = {
        "accept-ranges": "bytes",
        "content-disposition": f'inline; filename="{filename}"',
    }
    match = _RANGE.match(range_header.strip()) if range_header else None
    if not match or match.groups() == ("", ""):
        headers["content-length"] = str(size)
        return Stream(_stream_file(path, 0, size), media_type=media_type, headers=headers)
    first, last = match.groups()
    if first == "":  # the last N bytes
        start, end = max(0, size - int(last)), size - 1
    else:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        return Response(
            content=b"", status_code=416, headers={"content-range": f"bytes */{size}"},
            media_type=media_type,
        )
    headers["content-range"] = f"bytes {start}-{end}/{size}"
    headers["content-length"] = str(end - start + 1)
    return Stream(
        _stream_file(path, start, end - start + 1), media_type=media_type, headers=headers,
        status_code=206,
    )


class JobsController(Controller):
    path = "/api/v1/jobs"
    tags = ["jobs"]

    @post(
        "/",
        operation_class=_SubmitOperation,
        request_max_body_size=None,  # limits are enforced while streaming, per content type
        summary="Submit a job",
        status_code=201,
        response_description="The job was made; `Location` is its URL",
        response_headers=[ResponseHeader(
            name="Location", value="/api/v1/jobs/{id}", documentation_only=True, description="The job's URL",
        )],
        responses={
            200: ResponseSpec(JobView, generate_examples=False, description=(
                "An earlier request with this Idempotency-Key made the job; `Idempotent-Replayed: true`"
            )),
            **errors(400, 403, 409, 413, 415, 422, 507),
        },
    )
    async def create_job(
        self,
        request: Request,
        wait: Annotated[float | None, QueryParameter(name="wait", ge=0, description="Seconds to block until the job finishes")] = None,
        idempotency_key: Annotated[str | None, HeaderParameter(name="Idempotency-Key", max_length=200)] = None,
    ) -> Response[JobView]:
        gw = gateway(request)
        who = caller(request)
        content_type = request.headers.get("content-type", "")
        size = declared_size(request)
        # Everything that can be refused on the headers is refused before the body is read; a
        # body larger than allowed is "too large" (413), whatever the free disk space.
        multipart = content_type.startswith("multipart/form-data")
        allowed_mb = gw.settings.max_upload_mb if multipart else gw.settings.max_json_mb
        if size is not None and size > allowed_mb * 1024 * 1024:
            raise ApiError(413, f"request body is larger than the {allowed_mb} MiB allowed"
                           + ("" if multipart else "; send large files as multipart uploads"))
        gw.jobs.check_free_space(size or 0)
        async with gw.auth.counting_jobs(who) as count:
            if multipart:
                job, created = await gw.jobs.submit_multipart(
                    content_type, request.stream(), idempotency_key=idempotency_key, owner=who.owner,
                    size=size,
                )
            elif content_type.startswith("application/x-www-form-urlencoded"):
                job, created = await gw.jobs.submit_urlencoded(
                    request.stream(), idempotency_key=idempotency_key, owner=who.owner,
                )
            elif content_type.startswith("application/json") or not content_type:
                job, created = await gw.jobs.submit_json(
                    request.stream(), idempotency_key=idempotency_key, owner=who.owner,
                )
            else:
                raise ApiError(
                    415, "send the job as application/json, multipart/form-data or a URL-encoded form",
                    "Content-Type",
                )
            if not created:
                count.refund()  # a replay: no new job
        if wait:
            job = await gw.jobs.wait(job, wait)
        headers = {"location": f"/api/v1/jobs/{job.id}"}
        if not created:
            headers["idempotent-replayed"] = "true"
        return Response(await view(gw, job), status_code=201 if created else 200, headers=headers)

    @get("/", summary="List jobs, newest first", responses=errors(400))
    async def list_jobs(
        self,
        request: Request,
        states_filter: Annotated[str | None, QueryParameter(name="state", description="Comma-separated states: " + ", ".join(STATES))] = None,
        batch_id: Annotated[str | None, QueryParameter(name="batch_id")] = None,
        task: Annotated[str | None, QueryParameter(name="task")] = None,
        cursor: Annotated[str | None, QueryParameter(name="cursor")] = None,
        limit: Annotated[int, QueryParameter(name="limit", ge=1, le=500)] = 50,
    ) -> JobList:
        gw = gateway(request)
        states = [s for s in (states_filter or "").split(",") if s]
        for s in states:
            if s not in STATES:
                raise ApiError(400, f"unknown state {s!r}; states are " + ", ".join(STATES), "state")
        owner, before = caller(request).sees, _parse_cursor(cursor) if cursor else None

        def page(r: Reads) -> JobList:  # read and built on a reader thread: up to 500 jobs
            jobs = r.list_jobs(
                states=states, batch_id=batch_id, task=task, owner=owner, before_seq=before,
                limit=limit + 1,
            )
            more = len(jobs) > limit
            jobs = jobs[:limit]
            return JobList(jobs=_views(r, jobs, False), next_cursor=_cursor(jobs[-1].seq) if more else None)

        return await gw.store.read(page)

    @get("/{job_id:str}", summary="One job, with its timeline", responses=errors(400, 404))
    async def get_job(self, request: Request, job_id: FromPath[str]) -> JobView:
        gw, who = gateway(request), caller(request)

        def read(r: Reads) -> tuple[Job, _FullViewReads]:  # one hop, not two
            job = _visible(r.get(job_id), job_id, who)
            return job, _full_view_reads(r, job)

        job, reads = await gw.store.read(read)
        return _full_view(gw, job, reads)

    @delete(
        "/{job_id:str}", status_code=200, summary="Cancel a job; with purge=true, also delete its files",
        responses=errors(400, 403, 404),
    )
    async def cancel_job(
        self,
        request: Request,
        job_id: FromPath[str],
        purge: Annotated[bool, QueryParameter(description="Delete the job's inputs and video now")] = False,
    ) -> JobView:
        gw = gateway(request)
        who = caller(request)
        await _found(gw, job_id, who)
        job = await gw.dispatcher.cancel(job_id)
        if purge:
            removed = await gw.jobs.purge([job_id], who.label, job_id)
            gw.auth.note(who.label, "purge", job_id, f"jobs=1 files={removed}")
            job = await gw.store.get(job_id)
        return await view(gw, job)

    @post(
        "/{job_id:str}/retry", status_code=200, summary="Run a failed or cancelled job again",
        responses=errors(400, 403, 404, 409, 410),
    )
    async def retry_job(self, request: Request, job_id: FromPath[str]) -> JobView:
        gw = gateway(request)
        who = caller(request)
        job = await _found(gw, job_id, who)
        if job.state not in ("failed", "cancelled"):
            raise ApiError(409, f"only failed or cancelled jobs can be retried; this one is {job.state}", "state")
        if job.files_expired:
            raise ApiError(410, "this job's input files have expired; submit it again", "files_expired")
        async with gw.auth.counting_jobs(who):  # a run again costs a GPU as much as a new job
            job = await gw.dispatcher.retry(job_id)
        return await view(gw, job)

    @get(
        "/{job_id:str}/video", summary="The finished video (supports Range)", media_type="video/mp4",
        responses={
            200: ResponseSpec(bytes, media_type="video/mp4", generate_examples=False, description="The whole video"),
            206: ResponseSpec(bytes, media_type="video/mp4", generate_examples=False, description=(
                "The part the `Range` header asked for; `Content-Range` says which"
            )),
            416: ResponseSpec(None, description=(
                "The `Range` starts past the end of the video; `Content-Range: bytes */<size>` gives its size"
            )),
            **errors(400, 404, 410),
        },
    )
    async def get_video(
        self,
        request: Request,
        job_id: FromPath[str],
        range_header: Annotated[str | None, HeaderParameter(name="Range")] = None,
    ) -> Response:
        gw = gateway(request)
        job = await _found(gw, job_id, caller(request))
        if job.files_expired:
            raise ApiError(410, "this job's files have expired and were deleted")
        if job.state != "succeeded" or not job.result_sha:
            raise ApiError(404, f"this job has no video: it is {job.state}")
        path = gw.blobs.path(job.result_sha)
        if not path.is_file():
            raise ApiError(410, "this job's video is no longer stored")
        return ranged_file(path, range_header, media_type="video/mp4", filename=f"{job.id}.mp4")


class ModelChoice(msgspec.Struct):
    task: str
    model: str | None  # None: whatever model the node was started with, not yet known
    stage: str | None = None
    default: bool = False  # what a job of this task type runs on when it names no `model`


class UpstreamModels(msgspec.Struct):
    upstream: str
    kind: str
    models: list[ModelChoice]
    error: str | None = None  # why the list could not be read (sanitised)


class ModelList(msgspec.Struct):
    upstreams: list[UpstreamModels]


async def upstream_models(gw: Gateway) -> ModelList:
    """What each upstream can run: a node its one model, a cloud account what its list offers."""
    found = []
    for state in gw.dispatcher.states.values():
        upstream = state.upstream
        tasks = sorted(upstream.tasks & set(TASK_INPUTS))
        if not upstream.capabilities.chooses_models:
            choices = [ModelChoice(task, state.model, default=True) for task in tasks]
            found.append(UpstreamModels(upstream.name, upstream.kind, choices))
            continue
        try:
            offered = await upstream.models()
        except UpstreamError as exc:
            found.append(UpstreamModels(upstream.name, upstream.kind, [], str(exc)))
            continue
        choices = []
        for task in tasks:
            default = upstream.model_for(task)
            # Only what a job can ask for: the gateway's task types, on the stage it submits to.
            choices += [
                ModelChoice(m.task, m.model_cls, m.stage, m == default)
                for m in offered if m.task == task and m.stage == default.stage
            ]
        found.append(UpstreamModels(upstream.name, upstream.kind, choices))
    return ModelList(found)


class ModelsController(Controller):
    path = "/api/v1/models"
    tags = ["jobs"]

    @get("/", summary="Models each upstream runs; a job may name one with `model` (hosted cloud)", responses=errors())
    async def list_models(self, request: Request) -> ModelList:
        return await upstream_models(gateway(request))


async def _found(gw: Gateway, job_id: str, who: Caller) -> Job:
    return _visible(await gw.store.get(job_id), job_id, who)


def _visible(job: Job | None, job_id: str, who: Caller) -> Job:
    """The job, if this caller may see it. Another key's job is "not found", exactly like a job
    that does not exist, so ids cannot be probed."""
    if job is None or not who.may_touch(job.owner):
        raise ApiError(404, f"no job {job_id}")
    return job


class BatchCancelled(msgspec.Struct):
    batch_id: str
    jobs: int  # the batch's jobs this key may touch
    cancelled: int  # of them, those that had not finished
    purged: bool
    files_removed: int


class BatchesController(Controller):
    path = "/api/v1/batches"
    tags = ["jobs"]

    @delete(
        "/{batch_id:str}", status_code=200,
        summary="Cancel a batch's unfinished jobs; with purge=true, also delete their files",
        responses=errors(400, 403, 404),
    )
    async def cancel_batch(
        self,
        request: Request,
        batch_id: FromPath[str],
        purge: Annotated[bool, QueryParameter(description="Delete the jobs' inputs and videos now")] = False,
    ) -> BatchCancelled:
        gw = gateway(request)
        who = caller(request)
        jobs: list[Job] = []
        before: int | None = None
        while page := await gw.store.list_jobs(batch_id=batch_id, owner=who.sees, before_seq=before, limit=500):
            jobs += page
            before = page[-1].seq
        if not jobs:
            raise ApiError(404, f"no batch {batch_id}")
        cancelled = 0
        for job in jobs:
            if not job.finished:
                cancelled += 1
                await gw.dispatcher.cancel(job.id)
        removed = 0
        if purge:
            removed = await gw.jobs.purge([j.id for j in jobs], who.label, f"batch {batch_id}")
            gw.auth.note(who.label, "purge", f"batch {batch_id}", f"jobs={len(jobs)} files={removed}")
        return BatchCancelled(batch_id, len(jobs), cancelled, purge, removed)

