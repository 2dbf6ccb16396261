"""Batches for scripts under /api/v1/batches: list, one batch's progress, its zip, creation from a
JSON list of jobs in one request, cancel. Handlers parse, call one function, shape the answer."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Annotated

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import ResponseHeader
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, Operation, RequestBody
from litestar.params import FromPath, HeaderParameter, QueryParameter
from litestar.response import Stream

from ..auth import Caller
from ..batch_files import batch_zip
from ..batch_requests import MAX_API_BATCH_JOBS, create_batch
from ..blobs import BlobStore
from ..jobs import JobService
from ..reads import BatchSummary, batch_summary, read_batch_summary
from ..schemas import MAX_SQLITE_INT, ApiError, JobRequest, JobView, WebhookEvent, errors, iso
from ..store import JobStore, Reads
from .api import _openapi_schema, _views


class _BatchBody(msgspec.Struct):
    """What `POST /api/v1/batches` takes, for the OpenAPI document (the handler reads the body
    as it streams, job by job)."""

    jobs: list[JobRequest]
    name: str | None = None
    webhook_url: str | None = None  # every job's webhook (jobs themselves may not name one)
    webhook_events: list[WebhookEvent] | None = None


@dataclass
class _CreateOperation(Operation):
    def __post_init__(self) -> None:
        schema = msgspec.json.schema(_BatchBody)
        self.request_body = RequestBody(required=True, content={
            "application/json": OpenAPIMediaType(schema=_openapi_schema(schema, schema.get("$defs", {}))),
        })


class BatchView(msgspec.Struct, kw_only=True):
    id: str
    name: str
    task: str | None  # the task type of all its jobs; None when they are of several
    created_at: str | None
    counts: dict[str, int]  # jobs by state
    total: int
    done: int  # jobs that finished: succeeded, failed or cancelled
    progress: float  # done / total
    eta_seconds: float | None  # time left, from its throughput so far; None until it has one
    zip_url: str


class BatchList(msgspec.Struct):
    batches: list[BatchView]
    next_cursor: str | None


class BatchCreated(BatchView, kw_only=True):
    jobs: list[JobView]  # in the order of the request's `jobs`


class BatchCancelled(msgspec.Struct):
    batch_id: str
    jobs: int  # the batch's jobs this key may touch
    cancelled: int  # of them, those that had not finished (and the cancel ended)
    purged: bool
    files_removed: int


def batch_view(summary: BatchSummary) -> BatchView:
    return BatchView(
        id=summary.id, name=summary.name, task=summary.task, created_at=iso(summary.created_at),
        counts=summary.counts, total=summary.total, done=summary.done,
        progress=round(summary.done / summary.total, 4) if summary.total else 0.0,
        eta_seconds=round(summary.eta, 1) if summary.eta is not None else None,
        zip_url=f"/api/v1/batches/{summary.id}/zip",
    )


def _cursor(row: dict) -> str:
    return base64.urlsafe_b64encode(f"{row['created_at']!r}|{row['id']}".encode()).decode().rstrip("=")


def _parse_cursor(cursor: str) -> tuple[float, str]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, _, batch_id = text.partition("|")
        created = float(at)
        if not batch_id or not 0 <= created <= MAX_SQLITE_INT:
            raise ValueError
        return created, batch_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ApiError(400, "cursor is not one this API gave out", "cursor") from None


class BatchesController(Controller):
    path = "/api/v1/batches"
    tags = ["batches"]

    @post(
        "/",
        operation_class=_CreateOperation,
        summary="Make a batch from a JSON list of jobs, all accepted or none",
        description=(
            f"`{{\"name\": ..., \"jobs\": [...]}}`, each job as `POST /api/v1/jobs` takes it as JSON"
            f" (inputs as URLs, data URLs or base64), at most {MAX_API_BATCH_JOBS} jobs and"
            " `X2V_MAX_JSON_MB` in all. A refusal names the job and its field: `jobs[3].prompt`."
            " An `Idempotency-Key` makes it safe to send again."
        ),
        request_max_body_size=None,  # X2V_MAX_JSON_MB, enforced while the body streams
        status_code=201,
        response_headers=[ResponseHeader(
            name="Location", value="/api/v1/batches/{id}", documentation_only=True, description="The batch's URL",
        )],
        responses={
            200: ResponseSpec(BatchCreated, generate_examples=False, description=(
                "An earlier request with this Idempotency-Key made the batch; `Idempotent-Replayed: true`"
            )),
            **errors(400, 403, 409, 413, 415, 422, 507),
        },
    )
    async def create_batch(
        self,
        request: Request,
        jobs: NamedDependency[JobService],
        store: NamedDependency[JobStore],
        who: NamedDependency[Caller],
        idempotency_key: Annotated[str | None, HeaderParameter(name="Idempotency-Key", max_length=200)] = None,
    ) -> Response[BatchCreated]:
        content_type = request.headers.get("content-type", "")
        if content_type and not content_type.startswith("application/json"):
            raise ApiError(415, "send the batch as application/json", "Content-Type")
        made = await create_batch(jobs, who, request.stream(), idempotency_key=idempotency_key)

        def read(r: Reads) -> BatchCreated:
            view = batch_view(read_batch_summary(r, made.batch_id, who))
            return BatchCreated(**msgspec.structs.asdict(view), jobs=_views(r, made.jobs, False))

        headers = {"location": f"/api/v1/batches/{made.batch_id}"}
        if not made.created:
            headers["idempotent-replayed"] = "true"
        return Response(await store.read(read), status_code=201 if made.created else 200, headers=headers)

    @get("/", summary="Batches, newest first (this key's; an admin key: every one)", responses=errors(400))
    async def list_batches(
        self,
        store: NamedDependency[JobStore],
        who: NamedDependency[Caller],
        cursor: Annotated[str | None, QueryParameter(name="cursor")] = None,
        limit: Annotated[int, QueryParameter(name="limit", ge=1, le=100)] = 20,
    ) -> BatchList:
        before = _parse_cursor(cursor) if cursor else None

        def page(r: Reads) -> BatchList:  # counts of up to 100 batches, in one hop to a reader thread
            rows = r.list_batches(owner=who.sees, before=before, limit=limit + 1)
            shown = rows[:limit]
            views = [batch_view(read_batch_summary(r, row["id"], who)) for row in shown]
            return BatchList(views, _cursor(shown[-1]) if len(rows) > limit else None)

        return await store.read(page)

    @get("/{batch_id:str}", summary="One batch: counts by state, progress, time left", responses=errors(400, 404))
    async def get_batch(
        self, store: NamedDependency[JobStore], who: NamedDependency[Caller], batch_id: FromPath[str],
    ) -> BatchView:
        return batch_view(await batch_summary(store, batch_id, who))

    @get(
        "/{batch_id:str}/zip", summary="The batch's results (videos, images) and a manifest.csv, as a zip",
        media_type="application/zip",
        responses={
            200: ResponseSpec(bytes, media_type="application/zip", generate_examples=False, description=(
                "Every finished result of the batch, `0001_face_voice.mp4` or `0002.png`, and `manifest.csv`"
            )),
            **errors(400, 404),
        },
    )
    async def get_zip(
        self, store: NamedDependency[JobStore], blobs: NamedDependency[BlobStore],
        who: NamedDependency[Caller], batch_id: FromPath[str],
    ) -> Stream:
        return Stream(
            await batch_zip(store, blobs, who, batch_id), media_type="application/zip",
            headers={"content-disposition": f'attachment; filename="{batch_id}.zip"', "cache-control": "no-store"},
        )

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
