"""What the compatible surfaces share: which paths are whose, the error shapes their clients
expect, and reading their requests into the gateway's `JobRequest`.

Each surface (routes/lightx2v_api.py, routes/openai_api.py, routes/seed_services.py) speaks an
API its clients already use, over the same jobs, keys, quotas and limits as `/api/v1`. A
refusal, whoever makes it (a handler, the auth middleware, Litestar's routing), comes in the
shape that surface's clients read: FastAPI's `{"detail": ...}` for the LightX2V server and the
services the gateway replaces, OpenAI's `{"error": {"message", "type", "param", "code"}}` for the
OpenAI routes.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgspec
from litestar import Response
from litestar.openapi.datastructures import ResponseSpec

from .blobs import BlobStore, StoredBlob
from .schemas import ERROR_MEANINGS, ApiError, JobRequest, field_problem
from .store import Job

LIGHTX2V = "lightx2v"
OPENAI = "openai"
S2V_SERVICE = "s2v-service"
T2V_SERVICE = "t2v-service"

# path prefix -> surface; a prefix ending in "/" or naming a whole segment.
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("/v1/tasks", LIGHTX2V), ("/v1/files/", LIGHTX2V), ("/v1/service/", LIGHTX2V),
    ("/v1/videos", OPENAI), ("/v1/images/", OPENAI),
    ("/api/submit", S2V_SERVICE), ("/api/task/", S2V_SERVICE), ("/api/tasks", S2V_SERVICE),
    ("/video/", T2V_SERVICE),
)


def surface(path: str) -> str | None:
    """The compatible surface a request path belongs to (None: the gateway's own API or pages)."""
    for prefix, name in _PREFIXES:
        if path.startswith(prefix) and (prefix.endswith("/") or len(path) == len(prefix) or path[len(prefix)] == "/"):
            return name
    return None


class FastApiError(msgspec.Struct):
    """A FastAPI service's refusal: a message, or (422) pydantic's list of what is wrong where."""

    detail: str | list[dict[str, Any]]


class OpenAIErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(msgspec.Struct):
    """OpenAI's refusal, which its SDK raises as `openai.BadRequestError` and so on."""

    error: OpenAIErrorBody


_MEANINGS = {**ERROR_MEANINGS, 405: "This method is not allowed on this path",
             500: "The job failed (a synchronous image route: `message` is its error)",
             503: "A task with this task_id exists already (the LightX2V server's answer)",
             504: "The job did not end within X2V_MAX_WAIT seconds; it was cancelled"}


def errors(which: str, *statuses: int) -> dict[int, ResponseSpec]:
    """`responses=` of a compatible route: its refusals in its surface's shape, with the 401 and
    429 the auth middleware can give any of them, and 400 (OpenAI's: 400 where others say 422)."""
    body = OpenAIError if which == OPENAI else FastApiError
    # 400 on every route: Litestar documents one of its own for any route with parameters.
    codes = {400, 401, 429, *statuses}
    if which == OPENAI and 422 in codes:
        codes = (codes - {422}) | {400}
    return {
        code: ResponseSpec(body, description=_MEANINGS[code], generate_examples=False)
        for code in sorted(codes)
    }


_OPENAI_TYPES = {401: "invalid_request_error", 403: "permission_error", 404: "invalid_request_error",
                 429: "rate_limit_exceeded", 500: "server_error", 503: "server_error"}
_OPENAI_CODES = {401: "invalid_api_key", 404: "not_found", 429: "rate_limit_exceeded"}


def error_response(
    path: str, status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None,
    where: str | None = None,
) -> Response | None:
    """A refusal in the shape the surface of `path` uses; None for the gateway's own routes.
    `where`: the field's place (query, path, header; default: the body), for FastAPI's `loc`."""
    which = surface(path)
    if which is None:
        return None
    if which == OPENAI:
        # OpenAI's APIs refuse a bad value with 400 `invalid_request_error`, never 422.
        status = 400 if status == 422 else status
        body: Any = {"error": {
            "message": message, "type": _OPENAI_TYPES.get(status, "invalid_request_error"),
            "param": field, "code": _OPENAI_CODES.get(status),
        }}
    elif status == 422:
        # FastAPI's validation error, which these clients (and their pydantic) were written for.
        where = where or ("header" if field and field[:1].isupper() else "body")
        body = {"detail": [{"type": "value_error", "loc": [where, field] if field else [where],
                            "msg": message, "input": None}]}
    else:
        body = {"detail": message}
    return Response(body, status_code=status, headers=headers)


def naive_local(ts: float | None) -> str | None:
    """A time as the FastAPI services print `datetime.now()`: local, naive, microseconds."""
    return None if ts is None else dt.datetime.fromtimestamp(ts).isoformat()


def job_request(values: dict[str, Any], names: dict[str, str] | None = None) -> JobRequest:
    """A `JobRequest` from a surface's values (already under the gateway's names); a value that
    breaks a rule is a 422 naming the field as that surface's client calls it (`names`)."""
    names = names or {}
    try:
        return msgspec.convert(values, JobRequest, strict=False)
    except msgspec.ValidationError as exc:
        field, message = field_problem(exc, JobRequest)
        if field is None:
            raise ApiError(422, message) from None
        theirs = names.get(field, field)
        raise ApiError(422, message.replace(field, theirs, 1), theirs) from None


def whole_number(name: str, raw: str | None, default: int | None = None) -> int | None:
    """A form field that must hold an integer (FastAPI's `int = Form(...)`), or `default` when absent."""
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw.strip())
    except ValueError:
        raise ApiError(422, f"{name} must be a whole number", name) from None


def number(name: str, raw: str | None, default: float | None = None) -> float | None:
    if raw is None or raw.strip() == "":
        return default
    try:
        return float(raw.strip())
    except ValueError:
        raise ApiError(422, f"{name} must be a number", name) from None


def truth(name: str, raw: str | None, default: bool = False) -> bool:
    """A form boolean as pydantic reads one: true/false, 1/0, yes/no, on/off."""
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in {"true", "1", "yes", "on", "y", "t"}:
        return True
    if value in {"false", "0", "no", "off", "n", "f"}:
        return False
    raise ApiError(422, f"{name} must be true or false", name)


@contextmanager
def renaming(names: dict[str, str]) -> Iterator[None]:
    """Refusals raised inside name a field as this surface's clients call it (`image` ->
    `image_path`): the job checks speak the gateway's names."""
    try:
        yield
    except ApiError as exc:
        theirs = names.get(exc.field or "")
        if theirs is None:
            raise
        raise ApiError(exc.status, exc.message.replace(exc.field or "", theirs, 1), theirs) from None


async def result_blob(job: Job, blobs: BlobStore) -> StoredBlob | None:
    """The stored result of a job that succeeded (None: no result, or no longer kept)."""
    if job.state != "succeeded" or not job.result_sha or job.files_expired:
        return None
    return await blobs.open(job.result_sha)


def looks_like_server_path(value: str) -> bool:
    """A LightX2V client may name a file on the node itself (`/data/face.png`,
    `assets/img_0.jpg`); the gateway cannot read the node's disk, and says so."""
    return value.startswith(("/", "./", "../", "~")) or bool(_FILE_NAME.fullmatch(value))


_FILE_NAME = re.compile(r"[\w.\-/]{1,1024}\.[A-Za-z0-9]{2,5}")


def file_responses(which: str, *statuses: int, media_type: str = "video/mp4") -> dict[int, ResponseSpec]:
    """`responses=` of a route that streams a result: the whole file, a `Range` of it, a range
    past its end, and its refusals."""
    return {
        200: ResponseSpec(bytes, media_type=media_type, generate_examples=False,
                          description="The whole file (`image/png` for an image task's)"),
        206: ResponseSpec(bytes, media_type=media_type, generate_examples=False,
                          description="The part the `Range` header asked for; `Content-Range` says which"),
        416: ResponseSpec(None, description="The `Range` starts past the end; `Content-Range: bytes */<size>`"),
        **errors(which, *statuses),
    }
