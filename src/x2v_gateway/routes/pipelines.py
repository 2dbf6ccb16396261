"""Pipelines under /api/v1/pipelines: submit one JSON document, follow its steps, cancel, retry
a step, download the finished video. Handlers parse, call one function, shape the response."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import ResponseHeader
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, Operation, RequestBody
from litestar.params import FromPath, HeaderParameter, QueryParameter

from ..auth import Caller
from ..blobs import BlobStore
from ..inputs import declared_size
from ..pipelines import PipelineService
from ..pipelines.plan import PipelineRequest
from ..pipelines.views import PipelineList, PipelineView, view, views
from ..schemas import ApiError, errors
from ..store import JobStore
from .api import _cursor, _openapi_schema, _parse_cursor
from .files import blob_file
from .webhooks import JobDeliveries, deliveries_view


@dataclass
class _SubmitOperation(Operation):
    """OpenAPI for `POST /pipelines`: the handler reads the raw stream, so say what it accepts."""

    def __post_init__(self) -> None:
        schema = msgspec.json.schema(PipelineRequest)
        self.request_body = RequestBody(
            required=True,
            description="Scenes, in order, and the output's frame rate and size; inputs as http(s) URLs,"
                        " data URLs or base64.",
            content={"application/json": OpenAPIMediaType(schema=_openapi_schema(schema, schema.get("$defs", {})))},
        )


class PipelinesController(Controller):
    path = "/api/v1/pipelines"
    tags = ["pipelines"]

    @post(
        "/",
        operation_class=_SubmitOperation,
        # The body is read as a stream, bounded by X2V_MAX_JSON_MB, inputs (base64) included.
        request_max_body_size=None,
        summary="Submit a pipeline: scenes joined into one video",
        status_code=201,
        response_headers=[ResponseHeader(
            name="Location", value="/api/v1/pipelines/{id}", documentation_only=True, description="The pipeline's URL",
        )],
        responses={
            200: ResponseSpec(PipelineView, generate_examples=False, description=(
                "An earlier request with this Idempotency-Key made the pipeline; `Idempotent-Replayed: true`"
            )),
            **errors(400, 403, 409, 413, 415, 422, 507),
        },
    )
    async def create_pipeline(
        self, request: Request, pipelines: NamedDependency[PipelineService], store: NamedDependency[JobStore],
        who: NamedDependency[Caller],
        idempotency_key: Annotated[str | None, HeaderParameter(name="Idempotency-Key", max_length=200)] = None,
    ) -> Response[PipelineView]:
        pipeline, created = await pipelines.submit(
            who, request.headers.get("content-type", ""), request.stream(), size=declared_size(request),
            idempotency_key=idempotency_key,
        )
        headers = {"location": f"/api/v1/pipelines/{pipeline.id}"}
        if not created:
            headers["idempotent-replayed"] = "true"
        return Response(await view(store, pipeline), status_code=201 if created else 200, headers=headers)

    @get("/", summary="List pipelines, newest first", responses=errors(400))
    async def list_pipelines(
        self, store: NamedDependency[JobStore], who: NamedDependency[Caller],
        cursor: Annotated[str | None, QueryParameter(name="cursor")] = None,
        limit: Annotated[int, QueryParameter(name="limit", ge=1, le=100)] = 20,
    ) -> PipelineList:
        before = _parse_cursor(cursor) if cursor else None
        found = await store.pipelines(owner=who.sees, before_seq=before, limit=limit + 1)
        page = found[:limit]
        more = len(found) > limit
        return PipelineList(await views(store, page), _cursor(page[-1].seq) if more else None)

    @get("/{pipeline_id:str}", summary="One pipeline, with each step and its job", responses=errors(400, 404))
    async def get_pipeline(
        self, pipelines: NamedDependency[PipelineService], store: NamedDependency[JobStore],
        who: NamedDependency[Caller], pipeline_id: FromPath[str],
    ) -> PipelineView:
        return await view(store, await pipelines.find(pipeline_id, who))

    @delete("/{pipeline_id:str}", status_code=200, summary="Cancel a pipeline and its unfinished steps",
            responses=errors(400, 403, 404))
    async def cancel_pipeline(
        self, pipelines: NamedDependency[PipelineService], store: NamedDependency[JobStore],
        who: NamedDependency[Caller], pipeline_id: FromPath[str],
    ) -> PipelineView:
        return await view(store, await pipelines.cancel(pipeline_id, who))

    @post("/{pipeline_id:str}/steps/{n:int}/retry", status_code=200,
          summary="Run one failed or cancelled step again (the others stay as they are)",
          responses=errors(400, 403, 404, 409, 410))
    async def retry_step(
        self, pipelines: NamedDependency[PipelineService], store: NamedDependency[JobStore],
        who: NamedDependency[Caller], pipeline_id: FromPath[str], n: FromPath[int],
    ) -> PipelineView:
        return await view(store, await pipelines.retry_step(pipeline_id, n, who))

    @get("/{pipeline_id:str}/webhooks", tags=["webhooks"],
         summary="A pipeline's webhook and its deliveries: attempts, last answer, next attempt",
         responses=errors(400, 404))
    async def pipeline_webhooks(
        self, pipelines: NamedDependency[PipelineService], store: NamedDependency[JobStore],
        who: NamedDependency[Caller], pipeline_id: FromPath[str],
    ) -> JobDeliveries:
        found = (await pipelines.find(pipeline_id, who)).id
        return await store.read(lambda r: deliveries_view(r.pipeline_webhook(found), r.pipeline_deliveries(found)))

    @get(
        "/{pipeline_id:str}/video", summary="The finished video (supports Range)", media_type="video/mp4",
        responses={
            200: ResponseSpec(bytes, media_type="video/mp4", generate_examples=False, description="The whole video"),
            206: ResponseSpec(bytes, media_type="video/mp4", generate_examples=False, description=(
                "The part the `Range` header asked for; `Content-Range` says which"
            )),
            **errors(400, 404, 410),
        },
    )
    async def get_video(
        self, pipelines: NamedDependency[PipelineService], blobs: NamedDependency[BlobStore],
        who: NamedDependency[Caller], pipeline_id: FromPath[str],
        range_header: Annotated[str | None, HeaderParameter(name="Range")] = None,
    ) -> Response:
        pipeline = await pipelines.find(pipeline_id, who)
        if pipeline.files_expired:
            raise ApiError(410, "this pipeline's video has expired and was deleted")
        if pipeline.state != "succeeded" or not pipeline.result_sha:
            raise ApiError(404, f"this pipeline has no video yet: it is {pipeline.state}")
        return await blob_file(
            blobs, pipeline.result_sha, range_header, media_type="video/mp4", filename=f"{pipeline.id}.mp4",
            gone="this pipeline's video is no longer stored",
        )
