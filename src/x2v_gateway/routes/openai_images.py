"""OpenAI-compatible image routes as LightX2V's own server offers them (`api/openai_images.py`
there): `POST /v1/images/generations` (t2i) and `POST /v1/images/edits` (i2i), synchronous, so
the official `openai` SDK's `images.generate` and `images.edit` make pictures on the pool.

The request waits for its job (at most X2V_MAX_WAIT seconds, 600 on the server) and answers
`{"created", "data": [{"b64_json"} or {"url"}], "output_format": "png", "size", "usage"}`. As on
the server: only `n=1`; generations answer `b64_json` only; edits `url` (default, a
`/v1/files/download/<id>.png` on the gateway) or `b64_json`; a failed job is 500, a cancelled one
409, one still running at the deadline is cancelled and 504. Refusals are OpenAI's error body.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from typing import Any

import msgspec
from litestar import Request, post
from litestar.di import NamedDependency

from ..auth import Caller
from ..blobs import BlobStore
from ..compat import OPENAI, errors, job_request, number, result_blob, whole_number
from ..inputs import declared_size, discard, read_limited
from ..jobs import JobService
from ..request_bodies import BodyReader
from ..schemas import ApiError
from ..settings import Settings
from ..store import Job
from .api import body_operation, struct_schema

_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")


class ImageGeneration(msgspec.Struct, kw_only=True):
    """`POST /v1/images/generations` (other OpenAI fields are accepted and ignored)."""

    prompt: str
    model: str | None = None
    n: int = 1
    size: str | None = None
    response_format: str = "b64_json"
    user: str | None = None
    seed: int | None = None


class ImageEdit(msgspec.Struct, kw_only=True):
    """`POST /v1/images/edits`'s text fields (its file: `image`, or `image[]`)."""

    prompt: str
    model: str | None = None
    n: int = 1
    size: str | None = None
    response_format: str = "url"
    user: str | None = None
    negative_prompt: str = ""
    seed: int | None = None
    i2i_denoise_strength: float | None = None


class TokenDetails(msgspec.Struct):
    image_tokens: int = 0
    text_tokens: int = 0


class Usage(msgspec.Struct):
    input_tokens: int
    input_tokens_details: TokenDetails
    output_tokens: int
    total_tokens: int
    output_tokens_details: TokenDetails


class ImagesResponse(msgspec.Struct):
    created: int
    data: list[dict[str, str]]
    output_format: str
    size: str | None
    usage: Usage


def _shape(size: str | None) -> list[int] | None:
    """`WxH` -> `[h, w]`, as the server reads `size`."""
    if not size:
        return None
    match = _SIZE.match(size)
    if not match or not int(match.group(1)) or not int(match.group(2)):
        raise ApiError(400, "size must be in WxH format, e.g. 1024x1024", "size")
    return [int(match.group(2)), int(match.group(1))]


def _common(prompt: str, n: int, size: str | None) -> dict[str, Any]:
    if n != 1:
        raise ApiError(400, "Only n=1 is currently supported", "n")
    if not prompt.strip():
        raise ApiError(400, "prompt is required", "prompt")
    values: dict[str, Any] = {"prompt": prompt}
    if (shape := _shape(size)) is not None:
        values["target_shape"] = shape
    return values


async def _finished(jobs: JobService, who: Caller, job: Job) -> Job:
    """The job once it ended; one still running at the deadline is cancelled (504), as the
    server cancels its task."""
    if job.state == "succeeded":
        return job
    if job.state == "failed":
        raise ApiError(500, job.error or "Task failed")
    if job.state == "cancelled":
        raise ApiError(409, job.error or "Task cancelled")
    await jobs.cancel(job.id, who)
    raise ApiError(504, f"Task {job.id} timed out after {jobs.settings.max_wait:g} seconds")


async def _answer(request: Request, blobs: BlobStore, job: Job, response_format: str, size: str | None) -> ImagesResponse:
    blob = await result_blob(job, blobs)
    if blob is None:
        raise ApiError(500, f"Task completed but its image is no longer stored: {job.id}")
    if response_format == "b64_json":
        # A PNG within X2V_MAX_IMAGE_MEGAPIXELS: read, then encoded off the event loop.
        data = b"".join([chunk async for chunk in blob.chunks(1024 * 1024)])
        item = {"b64_json": await asyncio.to_thread(lambda: base64.b64encode(data).decode())}
    else:
        item = {"url": f"{str(request.base_url).rstrip('/')}/v1/files/download/{job.id}.png"}
    zero = TokenDetails()
    return ImagesResponse(int(time.time()), [item], "png", size, Usage(0, zero, 0, 0, zero))


@post("/v1/images/generations", status_code=200, request_max_body_size=None, tags=["OpenAI-compatible"],
      summary="OpenAI: generate an image (t2i), waiting for it; `b64_json` only, `n=1`",
      operation_class=body_operation("The image to make", {"application/json": struct_schema(ImageGeneration)}),
      responses=errors(OPENAI, 400, 403, 409, 413, 500, 504, 507))
async def generate_image(
    request: Request, jobs: NamedDependency[JobService], blobs: NamedDependency[BlobStore],
    settings: NamedDependency[Settings], who: NamedDependency[Caller],
) -> ImagesResponse:
    raw = await read_limited(request.stream(), 1024 * 1024, "the body is larger than an image request needs")
    try:
        body = msgspec.json.decode(raw, type=ImageGeneration, strict=False)
    except msgspec.ValidationError as exc:
        field = str(exc).rsplit("$.", 1)[-1].rstrip("`") if "$." in str(exc) else None
        raise ApiError(400, str(exc).split(" - at ")[0], field) from None
    except msgspec.DecodeError:
        raise ApiError(400, "the body must be a JSON object with a prompt") from None
    if body.response_format != "b64_json":
        raise ApiError(400, "response_format: only b64_json is supported", "response_format")
    values = {"task": "t2i", **_common(body.prompt, body.n, body.size)}
    if body.seed is not None:
        values["seed"] = body.seed
    job = await jobs.submit_read(who, job_request(values), wait=settings.max_wait)
    return await _answer(request, blobs, await _finished(jobs, who, job), "b64_json", body.size)


@post("/v1/images/edits", status_code=200, request_max_body_size=None, tags=["OpenAI-compatible"],
      summary="OpenAI: edit an image (i2i), waiting for it; `url` (default) or `b64_json`, `n=1`",
      operation_class=body_operation("The image and the edit", {
          "multipart/form-data": struct_schema(ImageEdit, ("image",)),
      }),
      responses=errors(OPENAI, 400, 403, 409, 413, 415, 500, 504, 507))
async def edit_image(
    request: Request, jobs: NamedDependency[JobService], bodies: NamedDependency[BodyReader],
    blobs: NamedDependency[BlobStore],
    settings: NamedDependency[Settings], who: NamedDependency[Caller],
) -> ImagesResponse:
    fields, files = await bodies.form(
        request.headers.get("content-type", ""), request.stream(), size=declared_size(request),
        roles={"image": "image", "image[]": "image"},
    )
    try:
        if "mask" in fields:
            raise ApiError(400, "mask: the gateway does not pass masks on to nodes", "mask")
        if not files:
            raise ApiError(400, "At least one image is required", "image")
        response_format = fields.get("response_format") or "url"
        if response_format not in ("url", "b64_json"):
            raise ApiError(400, "response_format must be url or b64_json", "response_format")
        values = {"task": "i2i", **_common(fields.get("prompt", ""), whole_number("n", fields.get("n"), 1) or 1,
                                          fields.get("size"))}
        for name, value in (("negative_prompt", fields.get("negative_prompt")),
                            ("seed", whole_number("seed", fields.get("seed"))),
                            ("i2i_denoise_strength", number("i2i_denoise_strength", fields.get("i2i_denoise_strength")))):
            if value not in (None, ""):
                values[name] = value
        job_req = job_request(values)
    except BaseException:
        discard(files)
        raise
    job = await jobs.submit_read(who, job_req, files, wait=settings.max_wait)
    return await _answer(request, blobs, await _finished(jobs, who, job), response_format, fields.get("size"))


ROUTES = [generate_image, edit_image]
