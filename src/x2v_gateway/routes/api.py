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
from ..schemas import MAX_SQLITE_INT, TASK_INPUTS, ApiError, JobList, JobRequest, JobView, errors, job_view
from ..reads import cut_page, find_job, visible
from ..store import STATES, Inflight, Job, JobStore, Reads
from ..upstream.base import UpstreamError
from .files import blob_file


async def view(store: JobStore, job: Job) -> JobView:
    """One job as the API shows it in a list (the job's own page: `_full_view`)."""
    return (await store.read(lambda r: _views(r, [job], False)))[0]


_FullViewReads = tuple[dict[str, int], "int | None", "list[Inflight] | None", list[dict[str, Any]]]


def _full_view_reads(r: Reads, job: Job) -> _FullViewReads:
    """What a job's own page shows besides the job: its files' sizes, its place in the queue,
    its timeline, and (queued) the jobs in flight that its wait estimate starts from."""
    inflight = r.inflight() if job.state == "queued" else None
    return r.blob_sizes(job.inputs.values()), r.queue_position(job), inflight, r.events(job.id)


def _full_view(dispatcher: Dispatcher, job: Job, reads: _FullViewReads) -> JobView:
    sizes, position, inflight, timeline = reads
    # The queue position is read once, and the estimate starts from it.
    estimate = dispatcher.estimate(job, position, inflight) if inflight is not None else None
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
        jobs: NamedDependency[JobService],
        store: NamedDependency[JobStore],
        who: NamedDependency[Caller],
        wait: Annotated[float | None, QueryParameter(name="wait", ge=0, description="Seconds to block until the job finishes")] = None,
        idempotency_key: Annotated[str | None, HeaderParameter(name="Idempotency-Key", max_length=200)] = None,
    ) -> Response[JobView]:
        job, created = await jobs.submit(
            who, request.headers.get("content-type", ""), request.stream(), size=declared_size(request),
            idempotency_key=idempotency_key, wait=wait,
        )
        headers = {"location": f"/api/v1/jobs/{job.id}"}
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

    @get("/{job_id:str}", summary="One job, with its timeline", responses=errors(400, 404))
    async def get_job(
        self, store: NamedDependency[JobStore], dispatcher: NamedDependency[Dispatcher],
        who: NamedDependency[Caller], job_id: FromPath[str],
    ) -> JobView:
        def read(r: Reads) -> tuple[Job, _FullViewReads]:  # one hop, not two
            job = visible(r.get(job_id), job_id, who)
            return job, _full_view_reads(r, job)

        job, reads = await store.read(read)
        return _full_view(dispatcher, job, reads)

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
        job = await find_job(store, job_id, who)
        if job.files_expired:
            raise ApiError(410, "this job's files have expired and were deleted")
        if job.state != "succeeded" or not job.result_sha:
            raise ApiError(404, f"this job has no video: it is {job.state}")
        return await blob_file(
            blobs, job.result_sha, range_header, media_type="video/mp4", filename=f"{job.id}.mp4",
            gone="this job's video is no longer stored",
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
    for state in dispatcher.states.values():
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


class BatchCancelled(msgspec.Struct):
    batch_id: str
    jobs: int  # the batch's jobs this key may touch
    cancelled: int  # of them, those that had not finished (and the cancel ended)
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
        jobs: NamedDependency[JobService],
        who: NamedDependency[Caller],
        batch_id: FromPath[str],
        purge: Annotated[bool, QueryParameter(description="Delete the jobs' inputs and videos now")] = False,
    ) -> BatchCancelled:
        done = await jobs.cancel_batch(batch_id, who, purge=purge)
        return BatchCancelled(batch_id, done.jobs, done.cancelled, purge, done.files_removed)
