"""What crosses the wire: request and response structs of the JSON API, and their validation."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

import msgspec
from litestar.openapi.datastructures import ResponseSpec
from msgspec import Meta

from .store import Job

TaskType = Literal["s2v", "i2v", "t2v", "flf2v"]

# Which inputs each task type needs; any other input is a mistake worth telling the user about.
TASK_INPUTS: dict[str, tuple[str, ...]] = {
    "s2v": ("image", "audio"),
    "i2v": ("image",),
    "flf2v": ("image", "last_frame"),
    "t2v": (),
}
INPUT_ROLES = ("image", "audio", "last_frame")

Seed = Annotated[int, Meta(ge=0, le=2**32 - 1)]
# The node opens the LoRA by this name under its own LoRA folder and has no list of them to
# check it against: a path (`../../etc/passwd`) would reach any file it can read. So a plain
# file name only: no separators, no `..`, no control characters, a conservative set, bounded.
LoraName = Annotated[str, Meta(
    max_length=128,
    # Empty: not set, as for the other text fields. `(?!.*\n)`: `$` also matches before a final
    # newline, and `\Z` is not in the JSON Schema dialect the OpenAPI document speaks.
    pattern=r"^(?!.*\.\.)(?!.*\n)(?:[A-Za-z0-9][A-Za-z0-9._-]*)?$",
    description="a LoRA file name on the node: letters, digits, `.`, `_` and `-`, no `..`",
)]
Side = Annotated[int, Meta(ge=16, le=8192)]


class GenerationParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """Parameters passed to the upstream; only those set are sent (the node's model config
    supplies the rest, as the LightX2V server itself does for JSON requests)."""

    prompt: Annotated[str, Meta(max_length=4000)] = ""
    negative_prompt: Annotated[str, Meta(max_length=4000)] = ""
    seed: Seed | None = None
    infer_steps: Annotated[int, Meta(ge=1, le=200)] | None = None
    target_shape: Annotated[list[Side], Meta(min_length=2, max_length=2)] | None = None
    target_video_length: Annotated[int, Meta(ge=1, le=10000)] | None = None
    video_duration: Annotated[int, Meta(ge=1, le=3600)] | None = None
    target_fps: Annotated[int, Meta(ge=1, le=120)] | None = None
    num_fragments: Annotated[int, Meta(ge=1, le=100)] | None = None
    resize_mode: Literal["adaptive", "keep_ratio_fixed_area", "fixed_min_area", "fixed_max_area", "fixed_shape", "fixed_min_side"] | None = None
    sr_ratio: Annotated[float, Meta(gt=0, le=8)] | None = None
    use_prompt_enhancer: bool | None = None
    lora_name: LoraName | None = None
    lora_strength: Annotated[float, Meta(ge=0, le=10)] | None = None


class JobRequest(GenerationParams, kw_only=True, forbid_unknown_fields=True):
    """`POST /api/v1/jobs` as JSON. Inputs are http(s) URLs, data URLs or base64 strings."""

    task: TaskType
    image: str | None = None
    audio: str | None = None
    last_frame: str | None = None
    priority: Annotated[int, Meta(ge=-100, le=100)] = 0
    batch_id: Annotated[str, Meta(max_length=100, pattern=r"^[\w.\-]+$")] | None = None
    upstream: Annotated[str, Meta(max_length=100)] | None = None
    # A hosted-cloud model (`GET /api/v1/models`); kept in the job's params as `model_cls`.
    model: Annotated[str, Meta(min_length=1, max_length=200)] | None = None


PARAM_FIELDS = tuple(GenerationParams.__struct_fields__)


def generation_params(request: GenerationParams) -> dict[str, Any]:
    """The parameters the user set, as a plain dict (what the job row keeps)."""
    return {
        name: getattr(request, name)
        for name in PARAM_FIELDS
        if getattr(request, name) not in (None, "")
    }


class ApiError(Exception):
    """A client mistake or a refusal: becomes `{"error": {...}}` with this status."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


class ErrorBody(msgspec.Struct):
    """Why a request was refused; `field` names the parameter, field or header at fault."""

    status: int
    message: str
    field: str | None = None


class ErrorResponse(msgspec.Struct):
    """Every refusal of the API, whoever makes it: a handler, the auth middleware, Litestar's
    own validation and routing (app.py shapes them all)."""

    error: ErrorBody


# What each error status means on this API, said once; `errors()` puts them on the routes.
ERROR_MEANINGS: dict[int, str] = {
    400: "The request cannot be read: a parameter, header or body is malformed (`field` names it)",
    401: "No API key, or one that is unknown or revoked (`WWW-Authenticate: Bearer`)",
    403: "An admin key is needed, or a dashboard session sent no valid CSRF token",
    404: "Not found: there is no such thing, or this key may not see it",
    409: "Refused in the current state of things (`message` says why)",
    410: "The job's files have expired and were deleted",
    413: "The body, a file or a field is larger than the gateway allows",
    415: "The body's Content-Type is not one this route reads",
    422: "Read, but a value is refused (`field` names it, `message` says what is allowed)",
    429: "A rate limit or the daily quota: wait the seconds `Retry-After` gives",
    507: "The gateway is short of disk space and takes no new jobs for now",
}


def errors(*statuses: int) -> dict[int, ResponseSpec]:
    """`responses=` of a route behind a key: the statuses it can refuse with besides the 401 and
    429 every such route can give (auth.AuthMiddleware), each with the `{"error": {...}}` body."""
    return {
        status: ResponseSpec(ErrorResponse, description=ERROR_MEANINGS[status], generate_examples=False)
        for status in sorted({401, 429, *statuses})
    }


class InputRef(msgspec.Struct):
    sha256: str
    size: int | None = None


class ResultRef(msgspec.Struct):
    url: str
    sha256: str
    size: int | None = None
    duration: float | None = None
    width: int | None = None
    height: int | None = None


class QueueInfo(msgspec.Struct, omit_defaults=True):
    # Place in the gateway's queue (queued) or the upstream's own queue (submitted).
    position: int | None = None
    where: Literal["gateway", "upstream"] | None = None
    pending_seconds: float | None = None
    running_seconds: float | None = None


class Event(msgspec.Struct):
    at: str
    state: str
    detail: str


class JobView(msgspec.Struct, kw_only=True):
    id: str
    task: str
    state: str
    params: dict[str, Any]
    inputs: dict[str, InputRef]
    upstream: str | None
    upstream_task_id: str | None
    attempts: int
    run: int
    priority: int
    batch_id: str | None
    created_at: str
    submitted_at: str | None
    started_at: str | None
    finished_at: str | None
    error: str | None
    result: ResultRef | None
    queue: QueueInfo | None
    files_expired: bool
    events: list[Event] | None = None


class JobList(msgspec.Struct):
    jobs: list[JobView]
    next_cursor: str | None


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def job_view(
    job: Job,
    *,
    blob_sizes: dict[str, int] | None = None,
    queue_position: int | None = None,
    queue_estimate: dict[str, float] | None = None,
    events: list[dict[str, Any]] | None = None,
) -> JobView:
    sizes = blob_sizes or {}
    result = None
    if job.result_sha and not job.files_expired:
        meta = job.result_meta or {}
        result = ResultRef(
            url=f"/api/v1/jobs/{job.id}/video", sha256=job.result_sha, size=meta.get("size"),
            duration=meta.get("duration"), width=meta.get("width"), height=meta.get("height"),
        )
    queue = None
    if queue_position is not None:
        queue = QueueInfo(position=queue_position, where="gateway", **(queue_estimate or {}))
    elif job.queue_info:
        queue = QueueInfo(where="upstream", **job.queue_info)
    return JobView(
        id=job.id, task=job.task, state=job.state, params=job.params,
        inputs={role: InputRef(sha, sizes.get(sha)) for role, sha in job.inputs.items()},
        upstream=job.upstream, upstream_task_id=job.upstream_task_id, attempts=job.attempts,
        run=job.run, priority=job.priority, batch_id=job.batch_id,
        created_at=iso(job.created_at), submitted_at=iso(job.submitted_at),
        started_at=iso(job.started_at), finished_at=iso(job.finished_at),
        error=job.error, result=result, queue=queue, files_expired=job.files_expired,
        events=[Event(iso(e["at"]), e["state"], e["detail"]) for e in events] if events is not None else None,
    )
