"""The JSON API under /api/v1. Handlers parse, call one function, shape the response."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import ResponseHeader
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType
from litestar.openapi.spec import OpenAPIType, Operation, RequestBody, Schema
from litestar.params import FromPath, HeaderParameter, QueryParameter

from ..auth import Caller
from ..blobs import BlobStore
from ..dispatch import Dispatcher
from ..inputs import declared_size
from ..jobs import JobService
from ..schemas import (
    INPUT_ROLES, MAX_SQLITE_INT, TASK_INPUTS, ApiError, JobList, JobRequest, JobView, errors, job_view, makes, media_type,
)
from ..reads import cut_page, find_job, visible
from ..store import STATES, Job, JobStore, Reads
from ..upstream.base import UpstreamError
from .files import blob_file
from .prefer import prefer_wait, wait_outcome, waited


async def view(store: JobStore, job: Job) -> JobView:
    """One job as the API shows it in a list (the job's own page: `_full_view`)."""
    return (await store.read(lambda r: _views(r, [job], False)))[0]


_FullViewReads = tuple[dict[str, int], "int | None", "dict[str, float] | None", list[dict[str, Any]]]


def _full_view_reads(r: Reads, dispatcher: Dispatcher, job: Job) -> _FullViewReads:
    """What a job's own page shows besides the job: its files' sizes, its place in the queue
    and (queued) the wait estimate that starts from that place, and its timeline."""
    position = r.queue_position(job)  # counted once: the estimate starts from it
    return r.blob_sizes(job.inputs.values()), position, dispatcher.estimate(r, job, position), r.events(job.id)


def _full_view(job: Job, reads: _FullViewReads) -> JobView:
    sizes, position, estimate, timeline = reads
    return job_view(job, blob_sizes=sizes, queue_position=position, queue_estimate=estimate, events=timeline)


def _views(r: Reads, jobs: list[Job], events: bool) -> list[JobView]:
    """Jobs as the API shows them: a page of them is built in one hop to a reader thread, in
    two queries, not a few per job."""
    sizes = r.blob_sizes({sha for job in jobs for sha in job.inputs.values()})
    positions = r.queue_positions(jobs)
    return [
        job_view(job, blob_sizes=sizes, queue_position=positions.get(job.id),
                 events=r.events(job.id) if events else None)
        for job in jobs
    ]


def _seq(job: Job) -> int:
    return job.seq


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
    return struct_schema(JobRequest)


def struct_schema(struct: type, files: tuple[str, ...] = ()) -> Schema:
    """A msgspec struct's JSON Schema as an OpenAPI `Schema`; `files`: multipart file fields."""
    schema = msgspec.json.schema(struct)
    found = _openapi_schema(schema, schema.get("$defs", {}))
    for name in files:
        found.properties = {**(found.properties or {}), name: Schema(type=OpenAPIType.STRING, format="binary")}
    return found


def body_operation(description: str, content: dict[str, Schema]) -> type[Operation]:
    """The `operation_class` of a handler that reads its body raw: what it accepts, per media
    type (the compatible surfaces' routes)."""

    @dataclass
    class _BodyOperation(Operation):
        def __post_init__(self) -> None:
            self.request_body = RequestBody(required=True, description=description, content={
                media: OpenAPIMediaType(schema=schema) for media, schema in content.items()
            })

    return _BodyOperation


@dataclass
class _SubmitOperation(Operation):
    """OpenAPI for `POST /jobs`: the handler reads the raw stream, so say what it accepts."""

    def __post_init__(self) -> None:
        json_schema = _job_request_schema()
        form_schema = _job_request_schema()
        for role in INPUT_ROLES:
            form_schema.properties[role] = Schema(type=OpenAPIType.STRING, format="binary")  # type: ignore[index]
        self.request_body = RequestBody(
            required=True,
            description=(
                "A job as JSON (inputs as http(s) URLs, data URLs or base64) or as "
                "multipart/form-data (the same fields as text, `image`, `audio`, `last_frame` and `video` as files)."
            ),
            content={
                "application/json": OpenAPIMediaType(schema=json_schema),
                "multipart/form-data": OpenAPIMediaType(schema=form_schema),
            },
        )


_WAIT_QUERY = QueryParameter(name="wait", ge=0, description=(
    "Seconds to block until the job finishes (at most X2V_MAX_WAIT); wins over `Prefer: wait`"
))
_PREFER = HeaderParameter(name="Prefer", required=False, description=(
    "RFC 7240: `wait=N` blocks up to N seconds until the job finishes, like `?wait=`. A Prefer"
    " that cannot be read is ignored"
))
_WAIT_HEADERS = [
    ResponseHeader(name="Preference-Applied", value="wait=60", documentation_only=True, required=False, description=(
        "`wait=N`: the `Prefer: wait` honoured, N the seconds allowed (at most X2V_MAX_WAIT)"
    )),
    ResponseHeader(name="X2V-Wait", value="timeout", documentation_only=True, required=False, description=(
        "`timeout`: the wait ended before the job did; the body is the job as it is, not finished"
    )),
]


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
        ), *_WAIT_HEADERS],
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
        jobs: NamedDependency[JobService],
        store: NamedDependency[JobStore],
        who: NamedDependency[Caller],
        wait: Annotated[float | None, _WAIT_QUERY] = None,
        prefer: Annotated[str | None, _PREFER] = None,
        idempotency_key: Annotated[str | None, HeaderParameter(name="Idempotency-Key", max_length=200)] = None,
    ) -> Response[JobView]:
        seconds, headers = waited(wait, prefer_wait(prefer), jobs.settings.max_wait)
        job, created = await jobs.submit(
            who, request.headers.get("content-type", ""), request.stream(), size=declared_size(request),
            idempotency_key=idempotency_key, wait=seconds,
        )
        headers |= {"location": f"/api/v1/jobs/{job.id}", **wait_outcome(seconds, job)}
        if not created:
            headers["idempotent-replayed"] = "true"
        return Response(await view(store, job), status_code=201 if created else 200, headers=headers)

    @get("/", summary="List jobs, newest first", responses=errors(400))
    async def list_jobs(
        self,
        store: NamedDependency[JobStore],
        who: NamedDependency[Caller],
        states_filter: Annotated[str | None, QueryParameter(name="state", description="Comma-separated states: " + ", ".join(STATES))] = None,
        batch_id: Annotated[str | None, QueryParameter(name="batch_id")] = None,
        task: Annotated[str | None, QueryParameter(name="task")] = None,
        cursor: Annotated[str | None, QueryParameter(name="cursor")] = None,
        limit: Annotated[int, QueryParameter(name="limit", ge=1, le=500)] = 50,
    ) -> JobList:
        states = [s for s in (states_filter or "").split(",") if s]
        for s in states:
            if s not in STATES:
                raise ApiError(400, f"unknown state {s!r}; states are " + ", ".join(STATES), "state")
        before = _parse_cursor(cursor) if cursor else None

        def page(r: Reads) -> JobList:  # read and built on a reader thread: up to 500 jobs
            jobs, next_seq = cut_page(r.list_jobs(
                states=states, batch_id=batch_id, task=task, owner=who.sees, before_seq=before,
                limit=limit + 1,
            ), limit, _seq)
            return JobList(jobs=_views(r, jobs, False), next_cursor=_cursor(next_seq) if next_seq is not None else None)

        return await store.read(page)

    @get("/{job_id:str}", summary="One job, with its timeline", responses=errors(400, 404), response_headers=_WAIT_HEADERS)
    async def get_job(
        self, store: NamedDependency[JobStore], dispatcher: NamedDependency[Dispatcher],
        jobs: NamedDependency[JobService], who: NamedDependency[Caller], job_id: FromPath[str],
        wait: Annotated[float | None, _WAIT_QUERY] = None,
        prefer: Annotated[str | None, _PREFER] = None,
    ) -> Response[JobView]:
        def read(r: Reads) -> tuple[Job, _FullViewReads, int]:  # one hop, not two
            job = visible(r.get(job_id), job_id, who)
            return job, _full_view_reads(r, dispatcher, job), r.pending_deliveries(job.id)

        seconds, headers = waited(wait, prefer_wait(prefer), jobs.settings.max_wait)
        if seconds:
            await jobs.wait(await find_job(store, job_id, who), seconds)
        job, reads, pending = await store.read(read)
        view = _full_view(job, reads)
        view.webhooks_pending = pending
        return Response(view, headers=headers | wait_outcome(seconds, job))

    @delete(
        "/{job_id:str}", status_code=200, summary="Cancel a job; with purge=true, also delete its files",
        responses=errors(400, 403, 404),
    )
    async def cancel_job(
        self,
        jobs: NamedDependency[JobService],
        store: NamedDependency[JobStore],
        who: NamedDependency[Caller],
        job_id: FromPath[str],
        purge: Annotated[bool, QueryParameter(description="Delete the job's inputs and video now")] = False,
    ) -> JobView:
        return await view(store, await jobs.cancel(job_id, who, purge=purge))

    @post(
        "/{job_id:str}/retry", status_code=200, summary="Run a failed or cancelled job again",
        responses=errors(400, 403, 404, 409, 410),
    )
    async def retry_job(
        self, jobs: NamedDependency[JobService], store: NamedDependency[JobStore],
        who: NamedDependency[Caller], job_id: FromPath[str],
    ) -> JobView:
        return await view(store, await jobs.retry(job_id, who))

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
            302: ResponseSpec(None, description=(
                "With `X2V_S3_PRESIGN_MINUTES` set: a redirect (`Location`) to a presigned URL of the"
                " video in the bucket, which honours `Range` too"
            )),
            **errors(400, 404, 410),
        },
    )
    async def get_video(
        self,
        store: NamedDependency[JobStore],
        blobs: NamedDependency[BlobStore],
        who: NamedDependency[Caller],
        job_id: FromPath[str],
        range_header: Annotated[str | None, HeaderParameter(name="Range")] = None,
    ) -> Response:
        return await _result_file(store, blobs, who, job_id, "video", range_header)

    @get(
        "/{job_id:str}/image", summary="The finished image of a t2i or i2i job (supports Range)",
        media_type="image/png",
        responses={
            200: ResponseSpec(bytes, media_type="image/png", generate_examples=False, description=(
                "The whole image; `Content-Type` is its format (`image/png`, `image/jpeg`...)"
            )),
            206: ResponseSpec(bytes, media_type="image/png", generate_examples=False, description=(
                "The part the `Range` header asked for; `Content-Range` says which"
            )),
            416: ResponseSpec(None, description="The `Range` starts past the end of the image"),
            **errors(400, 404, 410),
        },
    )
    async def get_image(
        self,
        store: NamedDependency[JobStore],
        blobs: NamedDependency[BlobStore],
        who: NamedDependency[Caller],
        job_id: FromPath[str],
        range_header: Annotated[str | None, HeaderParameter(name="Range")] = None,
    ) -> Response:
        return await _result_file(store, blobs, who, job_id, "image", range_header)


async def _result_file(
    store: JobStore, blobs: BlobStore, who: Caller, job_id: str, kind: str, range_header: str | None,
) -> Response:
    """A job's finished result, a `video` or an `image`, as the route of that kind serves it."""
    job = await find_job(store, job_id, who)
    made = makes(job.task)
    if made != kind:
        raise ApiError(404, f"this {job.task} job makes {made}s, not {kind}s: its result is at"
                       f" /api/v1/jobs/{job.id}/{made}")
    if job.files_expired:
        raise ApiError(410, "this job's files have expired and were deleted")
    if job.state != "succeeded" or not job.result_sha:
        raise ApiError(404, f"this job has no {kind}: it is {job.state}")
    fmt = (job.result_meta or {}).get("format") or ("mp4" if kind == "video" else "png")
    return await blob_file(
        blobs, job.result_sha, range_header, media_type=media_type(fmt, job.task), filename=f"{job.id}.{fmt}",
        gone=f"this job's {kind} is no longer stored",
    )


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


async def upstream_models(dispatcher: Dispatcher) -> ModelList:
    """What each upstream can run: a node its one model, a cloud account what its list offers."""
    found = []
    for state in list(dispatcher.states.values()):  # a copy: a cloud's list is awaited
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
    async def list_models(self, dispatcher: NamedDependency[Dispatcher]) -> ModelList:
        return await upstream_models(dispatcher)
