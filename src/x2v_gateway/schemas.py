"""What crosses the wire: request and response structs of the JSON API, and their validation."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Literal

import msgspec
from litestar.openapi.datastructures import ResponseSpec
from msgspec import Meta
from msgspec import inspect as mi

from .store import Job, Memo

from .tasks import INPUT_ROLES, PROMPT_REQUIRED, TASK_INPUTS, TaskType, makes, media_type  # noqa: F401 (re-exported)

# What a webhook may be sent for (webhooks.py).
WebhookEvent = Literal["queued", "started", "succeeded", "failed", "cancelled", "batch.finished"]

# SQLite keeps integers in 64 bits and its driver raises on a larger one: every integer a client
# sends that reaches the store (cursors, paging) is checked against this first.
MAX_SQLITE_INT = 2**63 - 1

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
    # Image tasks (t2i, i2i): the node's ImageTaskRequest fields; the cloud keeps them in params.
    aspect_ratio: Annotated[str, Meta(max_length=16, pattern=r"^[1-9][0-9]{0,2}:[1-9][0-9]{0,2}$",
                                      description="width:height of an image, e.g. `16:9`")] | None = None
    i2i_denoise_strength: Annotated[float, Meta(ge=0, le=1)] | None = None


class JobRequest(GenerationParams, kw_only=True, forbid_unknown_fields=True):
    """`POST /api/v1/jobs` as JSON. Inputs are http(s) URLs, data URLs or base64 strings."""

    task: TaskType
    image: str | None = None
    audio: str | None = None
    last_frame: str | None = None
    video: str | None = None  # animate: the driving video
    priority: Annotated[int, Meta(ge=-100, le=100)] = 0
    batch_id: Annotated[str, Meta(max_length=100, pattern=r"^[\w.\-]+$")] | None = None
    upstream: Annotated[str, Meta(max_length=100)] | None = None
    # A hosted-cloud model (`GET /api/v1/models`); kept in the job's params as `model_cls`.
    model: Annotated[str, Meta(min_length=1, max_length=200)] | None = None
    # Where the job's events are POSTed, signed (webhooks.py); none: the key's default, if any.
    webhook_url: Annotated[str, Meta(min_length=1, max_length=2000)] | None = None
    # Which events (in a form: comma-separated); none: succeeded, failed, cancelled, batch.finished.
    webhook_events: Annotated[list[WebhookEvent], Meta(max_length=12)] | None = None


PARAM_FIELDS = tuple(GenerationParams.__struct_fields__)


_AT = re.compile(r" - at `\$\.(\w+)(?:\[\d+\])?`")
_NAMED = re.compile(r"(missing required|unknown) field `(\w+)`")
_WORDS = {"int": "a whole number", "float": "a number", "str": "text", "bool": "true or false",
          "array": "a list", "object": "an object"}


def field_problem(exc: msgspec.ValidationError, struct: type[msgspec.Struct] | None = None) -> tuple[str | None, str]:
    """msgspec's complaint as (field, what it must be), in the words of the hand-written errors.

    With `struct`, the whole rule comes from the field's own type: `infer_steps must be a whole
    number from 1 to 200`, `task must be one of s2v, i2v, t2v, flf2v`, rather than msgspec's
    `Expected int <= 200 - at $.infer_steps`, which says one bound and neither name nor choices.
    """
    message = str(exc)
    fields = {f.name: f.type for f in mi.type_info(struct).fields} if struct else {}
    if named := _NAMED.search(message):
        field = named.group(2)
        if named.group(1) == "unknown":
            known = f"; the fields are {', '.join(fields)}" if fields else ""
            return field, f"{field} is not a field this API knows{known}"
        rule = f": {_describe(fields[field])}" if field in fields else ""
        return field, f"{field} is required{rule}"
    at = _AT.search(message)
    if at is None:
        return None, plain(message)
    field = at.group(1)
    rule = f"must be {_describe(fields[field])}" if field in fields else plain(message[:at.start()])
    return field, f"{field} {rule}"


def plain(text: str) -> str:
    """msgspec's own words made plain where the field's type is not at hand (query parameters):
    `Expected int <= 500` -> `must be a whole number ≤ 500`."""
    text = re.sub(r"Expected `(\w+)(?: \| null)?`", lambda m: "must be " + _WORDS.get(m.group(1), m.group(1)), text)
    text = re.sub(r", got `\w+`", "", text).replace(">=", "≥").replace("<=", "≤")
    return text if text.startswith("must be") else f"is not valid: {text[:1].lower()}{text[1:]}"


def _describe(t: mi.Type) -> str:
    """What a value of this msgspec type must be, in words."""
    if isinstance(t, mi.UnionType):  # `X | None`: null means "not set", not worth a mention
        return " or ".join(_describe(x) for x in t.types if not isinstance(x, mi.NoneType))
    if isinstance(t, mi.LiteralType):
        return "one of " + ", ".join(map(str, t.values))
    if isinstance(t, (mi.IntType, mi.FloatType)):
        noun = "a whole number" if isinstance(t, mi.IntType) else "a number"
        if t.ge is not None and t.le is not None:
            return f"{noun} from {t.ge} to {t.le}"
        bounds = [f"{word} {value}" for word, value in (
            ("≥", t.ge), ("above", t.gt), ("≤", t.le), ("below", t.lt)) if value is not None]
        return " ".join([noun, " and ".join(bounds)]) if bounds else noun
    if isinstance(t, mi.StrType):
        rule = "text"
        if t.min_length and t.max_length is not None:
            rule += f" of {t.min_length} to {t.max_length} characters"
        elif t.max_length is not None:
            rule += f" of at most {t.max_length} characters"
        if t.pattern:
            rule += " made of letters, digits, '.', '-' and '_'" if t.pattern == r"^[\w.\-]+$" else f" matching {t.pattern}"
        return rule
    if isinstance(t, mi.ListType):
        if t.min_length is not None and t.min_length == t.max_length:
            return f"a list of {t.min_length} items, each {_describe(t.item_type)}"
        return f"a list, each item {_describe(t.item_type)}"
    return _WORDS.get(type(t).__name__.removesuffix("Type").lower(), "valid")


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
    kind: Literal["video", "image"] = "video"
    media_type: str = "video/mp4"
    duration: float | None = None
    width: int | None = None
    height: int | None = None
    poster_url: str | None = None  # a JPEG of its first frame


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
    # How far the upstream says the job has got, 0 to 1, where it says (see `RemoteStatus`).
    progress: float | None = None
    # Webhook deliveries of the job not yet made nor given up (`GET /api/v1/jobs/{id}` only).
    webhooks_pending: int | None = None


class JobList(msgspec.Struct):
    jobs: list[JobView]
    next_cursor: str | None


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_FINISHED_VIEWS = Memo(10_000)


def job_view(
    job: Job,
    *,
    blob_sizes: dict[str, int] | None = None,
    queue_position: int | None = None,
    queue_estimate: dict[str, float] | None = None,
    events: list[dict[str, Any]] | None = None,
) -> JobView:
    sizes = blob_sizes or {}
    # A finished job's view changes only with its row (updated_at; files_expired is set without
    # it) and its inputs' sizes: list pages build the same views again and again.
    key = None
    if job.finished and queue_position is None and events is None:
        key = (job.id, job.updated_at, job.files_expired, *(sizes.get(sha) for sha in job.inputs.values()))
        if (view := _FINISHED_VIEWS.get(key)) is not None:
            return view
    result = None
    if job.result_sha and not job.files_expired:
        meta = job.result_meta or {}
        kind = makes(job.task)
        result = ResultRef(
            url=f"/api/v1/jobs/{job.id}/{kind}", sha256=job.result_sha, size=meta.get("size"),
            kind=kind, media_type=media_type(meta.get("format"), job.task),
            duration=meta.get("duration"), width=meta.get("width"), height=meta.get("height"),
            poster_url=f"/api/v1/jobs/{job.id}/poster",
        )
    queue = None
    upstream_info = dict(job.queue_info or {})
    progress = 1.0 if job.state == "succeeded" else upstream_info.pop("progress", None)
    if queue_position is not None:
        queue = QueueInfo(position=queue_position, where="gateway", **(queue_estimate or {}))
    elif upstream_info:
        queue = QueueInfo(where="upstream", **upstream_info)
    view = JobView(
        id=job.id, task=job.task, state=job.state, params=job.params,
        inputs={role: InputRef(sha, sizes.get(sha)) for role, sha in job.inputs.items()},
        upstream=job.upstream, upstream_task_id=job.upstream_task_id, attempts=job.attempts,
        run=job.run, priority=job.priority, batch_id=job.batch_id,
        created_at=iso(job.created_at), submitted_at=iso(job.submitted_at),
        started_at=iso(job.started_at), finished_at=iso(job.finished_at),
        error=job.error, result=result, queue=queue, files_expired=job.files_expired,
        events=[Event(iso(e["at"]), e["state"], e["detail"]) for e in events] if events is not None else None,
        progress=progress,
    )
    if key is not None:
        _FINISHED_VIEWS.put(key, view)
    return view
