"""OpenAI-compatible media routes: the Videos API (`/v1/videos`), so the official `openai` SDK,
with a gateway key as its `api_key` and the gateway as its `base_url`, makes videos on the pool.

A video is a gateway job: its id is the job's id, `status` is `queued`, `in_progress`,
`completed` or `failed` (a cancelled job is `failed` with the code `cancelled`), `size` asks
for the output's `WxH`, `seconds` for its length, and `input_reference` (an image) makes it
image-to-video. `model` is kept in the answer only: the node's model renders.
"""

from __future__ import annotations

import re
import statistics
import time
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, HeaderParameter, QueryParameter

from ..auth import Caller
from ..blobs import BlobStore
from ..compat import OPENAI, errors, file_responses, job_request, result_blob
from ..dispatch import Dispatcher
from ..inputs import IncomingFile, declared_size, discard, read_limited
from ..jobs import JobService
from ..request_bodies import BodyReader
from ..reads import find_job
from ..schemas import ApiError
from ..settings import Settings
from ..store import Job, JobStore
from ..tasks import IMAGE_TASKS
from .api import body_operation, struct_schema
from .files import ranged_file

STATUS = {"queued": "queued", "submitted": "queued", "running": "in_progress",
          "succeeded": "completed", "failed": "failed", "cancelled": "failed"}
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")
# LightX2V's video models render 16 frames a second, plus the first frame (81 frames: 5 s).
FPS = 16
OPENAI_MODEL = "sora-2"  # what the answer names when the request named none


class VideoCreate(msgspec.Struct, kw_only=True):
    """`POST /v1/videos` (`input_reference`: a file in a multipart form, or an object in JSON)."""

    prompt: str
    model: str | None = None
    seconds: str | None = None
    size: str | None = None


class ImageReference(msgspec.Struct, kw_only=True):
    image_url: str | None = None
    file_id: str | None = None


class VideoCreateJson(VideoCreate, kw_only=True):
    input_reference: ImageReference | None = None


class VideoError(msgspec.Struct):
    code: str
    message: str


class Video(msgspec.Struct):
    """OpenAI's `Video` object."""

    id: str
    object: str
    model: str
    status: str
    progress: int
    created_at: int
    completed_at: int | None
    expires_at: int | None
    prompt: str | None
    seconds: str
    size: str
    error: VideoError | None
    remixed_from_video_id: str | None = None


class VideoList(msgspec.Struct):
    object: str
    data: list[Video]
    first_id: str | None
    last_id: str | None
    has_more: bool


class VideoDeleted(msgspec.Struct):
    id: str
    object: str
    deleted: bool


def _shape(size: str) -> list[int]:
    match = _SIZE.match(size)
    if not match:
        raise ApiError(400, "size must be WIDTHxHEIGHT, e.g. 1280x720", "size")
    width, height = int(match.group(1)), int(match.group(2))
    return [height, width]


def _seconds(raw: str) -> int:
    try:
        seconds = int(str(raw).strip())
    except ValueError:
        raise ApiError(400, "seconds must be a whole number of seconds, e.g. 4", "seconds") from None
    if not 1 <= seconds <= 600:
        raise ApiError(400, "seconds must be from 1 to 600", "seconds")
    return seconds


def _job_values(fields: dict[str, Any], has_image: bool) -> dict[str, Any]:
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ApiError(400, "prompt is required", "prompt")
    values: dict[str, Any] = {"task": "i2v" if has_image else "t2v", "prompt": prompt}
    if fields.get("size"):
        values["target_shape"] = _shape(str(fields["size"]))
    if fields.get("seconds"):
        seconds = _seconds(fields["seconds"])
        values["video_duration"] = seconds
        values["target_video_length"] = seconds * FPS + 1
    return values


def _reference(fields: dict[str, Any]) -> str | None:
    """`input_reference` given as an object (`{"image_url": ...}`, JSON or form fields), not a file."""
    ref = fields.get("input_reference")
    if isinstance(ref, dict):
        if ref.get("file_id"):
            raise ApiError(400, "input_reference.file_id: this gateway has no Files API; upload the image"
                           " or give its image_url", "input_reference")
        return ref.get("image_url") or None
    if isinstance(ref, str) and ref:
        return ref
    return fields.get("input_reference[image_url]") or None


def video_view(job: Job, dispatcher: Dispatcher, settings: Settings) -> Video:
    """A job as OpenAI's `Video`."""
    meta = job.result_meta or {}
    asked = job.params.get("target_shape")
    size = f"{asked[1]}x{asked[0]}" if asked else (
        f"{meta['width']}x{meta['height']}" if meta.get("width") else "")
    seconds = job.params.get("video_duration")
    if seconds is None and meta.get("duration"):
        seconds = round(meta["duration"])
    error = None
    if job.state == "cancelled":
        error = VideoError("cancelled", job.error or "cancelled")
    elif job.state == "failed":
        error = VideoError("generation_failed", job.error or "the video could not be made")
    expires = None
    if job.finished_at and settings.retention_hours:
        expires = int(job.finished_at + settings.retention_hours * 3600)
    return Video(
        id=job.id, object="video", model=job.params.get("model_cls") or OPENAI_MODEL,
        status=STATUS[job.state], progress=_progress(job, dispatcher), created_at=int(job.created_at),
        completed_at=int(job.finished_at) if job.finished_at and job.state == "succeeded" else None,
        expires_at=expires, prompt=job.params.get("prompt"), seconds=str(seconds or 5), size=size,
        error=error,
    )


def _progress(job: Job, dispatcher: Dispatcher) -> int:
    """0 until it runs, 100 once done; while it runs, what the upstream reports, else its time
    so far against the run time measured for its task type on its node (at most 99: the end
    is seen, not guessed)."""
    if job.finished:
        return 100
    if job.state != "running" or job.started_at is None or job.upstream is None:
        return 0
    if (reported := (job.queue_info or {}).get("progress")) is not None:
        return max(1, min(99, int(100 * reported)))  # the upstream says how far it has got
    recent = dispatcher.timings.recent(job.upstream).get(job.task)
    if not recent:
        return 0
    return max(1, min(99, int(100 * (time.time() - job.started_at) / statistics.median(recent))))


async def _read_create(request: Request, bodies: BodyReader, settings: Settings) -> tuple[dict[str, Any], list[IncomingFile]]:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        return await bodies.form(content_type, request.stream(), size=declared_size(request),
                                 roles={"input_reference": "image"})
    mb = settings.max_json_mb
    raw = await read_limited(request.stream(), mb * 1024 * 1024, f"request body is larger than the {mb} MiB allowed")
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        raise ApiError(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body, []


@post("/v1/videos", status_code=200, request_max_body_size=None, tags=["OpenAI-compatible"],
      operation_class=body_operation("A video to make", {
          "multipart/form-data": struct_schema(VideoCreate, ("input_reference",)),
          "application/json": struct_schema(VideoCreateJson),
      }),
      summary="OpenAI: create a video (`prompt`, `model`, `seconds`, `size`, `input_reference`)",
      description="multipart/form-data (as the `openai` SDK sends it) or JSON; `input_reference` an"
      " image file, or `{\"image_url\": ...}` (an http(s) or data URL).",
      responses=errors(OPENAI, 400, 403, 413, 415, 507))
async def create_video(
    request: Request, jobs: NamedDependency[JobService], bodies: NamedDependency[BodyReader],
    dispatcher: NamedDependency[Dispatcher],
    settings: NamedDependency[Settings], who: NamedDependency[Caller],
) -> Video:
    fields, files = await _read_create(request, bodies, settings)
    try:
        reference = _reference(fields)
        values = _job_values(fields, bool(files) or bool(reference))
        if reference:
            values["image"] = reference
        job_req = job_request(values, {"image": "input_reference"})
    except BaseException:
        discard(files)
        raise
    job = await jobs.submit_read(who, job_req, files)
    view = video_view(job, dispatcher, settings)
    if isinstance(fields.get("model"), str) and fields["model"]:
        view.model = fields["model"]
    return view


@get("/v1/videos/{video_id:str}", tags=["OpenAI-compatible"], summary="OpenAI: a video's status",
     responses=errors(OPENAI, 400, 404))
async def retrieve_video(
    store: NamedDependency[JobStore], dispatcher: NamedDependency[Dispatcher],
    settings: NamedDependency[Settings], who: NamedDependency[Caller], video_id: FromPath[str],
) -> Video:
    return video_view(await find_job(store, video_id, who), dispatcher, settings)


@get("/v1/videos", tags=["OpenAI-compatible"], summary="OpenAI: this key's videos, newest first",
     responses=errors(OPENAI, 400, 404))
async def list_videos(
    store: NamedDependency[JobStore], dispatcher: NamedDependency[Dispatcher],
    settings: NamedDependency[Settings], who: NamedDependency[Caller],
    after: Annotated[str | None, QueryParameter(description="The last id of the previous page")] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=100)] = 20,
    order: Annotated[str, QueryParameter(description="desc (newest first) only")] = "desc",
) -> VideoList:
    if order != "desc":
        raise ApiError(400, "order: this gateway lists videos newest first (desc) only", "order")
    before = (await find_job(store, after, who)).seq if after else None
    page = await store.list_jobs(owner=who.sees, before_seq=before, limit=limit + 1)
    # Image jobs are no videos: left out, so a page may hold fewer; `last_id` is where it
    # stopped reading, which is where the next page starts.
    data = [video_view(job, dispatcher, settings) for job in page[:limit] if job.task not in IMAGE_TASKS]
    return VideoList("list", data, data[0].id if data else None, page[:limit][-1].id if page else None,
                     len(page) > limit)


@get("/v1/videos/{video_id:str}/content", tags=["OpenAI-compatible"], media_type="video/mp4",
     summary="OpenAI: a completed video's MP4 (supports Range)", responses=file_responses(OPENAI, 400, 404))
async def video_content(
    store: NamedDependency[JobStore], blobs: NamedDependency[BlobStore], who: NamedDependency[Caller],
    video_id: FromPath[str],
    variant: Annotated[str, QueryParameter(description="video only")] = "video",
    range_header: Annotated[str | None, HeaderParameter(name="Range")] = None,
) -> Response:
    job = await find_job(store, video_id, who)
    if variant != "video":
        raise ApiError(404, f"variant {variant!r} is not made by this gateway; the video is", "variant")
    blob = await result_blob(job, blobs)
    if blob is None:
        raise ApiError(404, f"video {video_id} is {STATUS[job.state]}: its content is there once it is completed"
                       if not job.files_expired else f"video {video_id}'s content has expired")
    return ranged_file(blob, range_header, media_type="video/mp4", filename=f"{job.id}.mp4")


@delete("/v1/videos/{video_id:str}", status_code=200, tags=["OpenAI-compatible"],
        summary="OpenAI: delete a video (cancel it if unfinished, and delete its files)",
        responses=errors(OPENAI, 400, 403, 404))
async def delete_video(jobs: NamedDependency[JobService], who: NamedDependency[Caller], video_id: FromPath[str]) -> VideoDeleted:
    job = await jobs.cancel(video_id, who, purge=True)
    return VideoDeleted(job.id, "video.deleted", True)


ROUTES = [create_video, retrieve_video, list_videos, video_content, delete_video]
