"""The LightX2V server's own API (`lightx2v/server/` in ModelTC/LightX2V), answered by the whole
pool: a client written for one node changes only its base URL (and sends a key, or the operator
names one with X2V_HEADERLESS_KEY) and its tasks become the gateway's durable jobs.

The shapes are the server's (../shared/lightx2v/selfhosted.md): `task_status` on submit and
`status` elsewhere, `pending`/`processing`/`completed`/`failed`/`cancelled`, naive local
timestamps, `{"detail": ...}` errors, a DELETE that always answers 200. Where the gateway does
better than a node, it does: a cancel is final, tasks outlive restarts, the queue never fills
(no 503 `Task queue is full`), `/result` honours `Range`, and no error names a server path.

A task's id is the gateway job's id, or the `task_id` the client chose (kept per key in the
store's foreign ids, like the `save_result_path` file name `/v1/files/download/` serves).
"""

from __future__ import annotations

import posixpath
import time
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.response import Stream
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, HeaderParameter, QueryParameter

from ..auth import Caller
from ..blobs import BlobStore
from ..compat import (
    LIGHTX2V, errors, file_responses, job_request, naive_local, renaming, result_blob, truth, whole_number,
)
from ..dispatch import Dispatcher
from ..inputs import IncomingFile, declared_size, discard, read_limited
from ..jobs import JobService
from ..request_bodies import BodyReader
from ..settings import Settings
from ..schemas import ApiError
from ..store import Job, JobStore, Reads
from ..tasks import IMAGE_TASKS
from .api import body_operation, struct_schema
from .files import ranged_file
from .lightx2v_requests import (
    FORM_DEFAULTS, FORM_FILES, NAMES, BaseTask, ImageForm, ImageTask, PydanticError, VideoForm, VideoTask,
    decode, field_error, file_name, job_values, pydantic_error,
)

TASK_IDS = "lightx2v-task"  # foreign ids: a client's own task_id -> job
FILES = "lightx2v-file"  # foreign ids: a save_result_path's file name -> job
STATUS = {"queued": "pending", "submitted": "pending", "running": "processing",
          "succeeded": "completed", "failed": "failed", "cancelled": "cancelled"}
# The server keeps at most this many tasks, and lists them all.
LISTED = 1000


class Submitted(msgspec.Struct):
    task_id: str
    task_status: str
    save_result_path: str


class Stopped(msgspec.Struct):
    stop_status: str
    reason: str


class TaskStatusView(msgspec.Struct):
    task_id: str
    status: str
    start_time: str | None
    end_time: str | None
    error: str | None
    error_type: str
    save_result_path: str | None


async def _accept(
    jobs: JobService, store: JobStore, who: Caller, task: BaseTask, values: dict[str, Any],
    files: list[IncomingFile],
) -> tuple[Job, Submitted]:
    """Queue the job, under the client's own task_id when it chose one."""
    chosen = task.task_id.strip()
    try:
        if len(chosen) > 200 or "/" in chosen:
            raise field_error("task_id", "task_id must be at most 200 characters, without '/'")
        if chosen and await _known(store, who, chosen):
            raise _Duplicate(chosen)
        with renaming(NAMES):
            request = job_request(values, NAMES)
    except BaseException:
        discard(files)
        raise
    with renaming(NAMES):
        job = await jobs.submit_read(who, request, files)
    task_id = chosen or job.id
    if chosen and not await store.save_foreign_id(who.owner, TASK_IDS, chosen, job.id):
        # Another request took this task_id a moment earlier: as the node would, refuse this one.
        await jobs.cancel(job.id, who)
        raise _Duplicate(chosen)
    name = file_name(task_id, task.save_result_path, _ext(job))
    if name != f"{job.id}{_ext(job)}":
        # A later task writing the same file on a node replaces it: the newest job has the name.
        await store.save_foreign_id(who.owner, FILES, name, job.id, replace=True)
    return job, Submitted(task_id, "pending", task.save_result_path or task_id)


class _Duplicate(Exception):
    def __init__(self, task_id: str) -> None:
        super().__init__(f"Task ID {task_id} already exists")


def _duplicate_error(request: Request, exc: _Duplicate) -> Response:
    return Response({"detail": str(exc)}, status_code=503)


async def _known(store: JobStore, who: Caller, task_id: str) -> bool:
    return await _find(store, who, task_id) is not None


async def _find(store: JobStore, who: Caller, task_id: str) -> Job | None:
    """The job a task id names for this key: its own chosen id, else a gateway job id."""
    def read(r: Reads) -> Job | None:
        job_id = r.foreign_job(who.owner, TASK_IDS, task_id) or task_id
        job = r.get(job_id)
        return job if job is not None and who.may_touch(job.owner) else None

    return await store.read(read)


def _ext(job: Job) -> str:
    return ".png" if job.task in IMAGE_TASKS else ".mp4"


def _status(job: Job, task_id: str, file_name: str | None) -> TaskStatusView:
    state = STATUS[job.state]
    name = file_name or f"{job.id}{_ext(job)}"
    if state != "completed" and file_name is None:
        name = task_id  # the request's value until the node has written the file
    error = "Task cancelled by user" if job.state == "cancelled" else job.error
    return TaskStatusView(
        task_id=task_id, status=state,
        start_time=naive_local(job.started_at or job.submitted_at or job.created_at),
        end_time=naive_local(job.finished_at) if job.finished else None,
        error=error, error_type="", save_result_path=name,
    )


def _statuses(r: Reads, who: Caller, jobs: list[Job]) -> list[TaskStatusView]:
    ids = [job.id for job in jobs]
    task_ids = r.foreign_ids(who.owner, TASK_IDS, ids)
    files = r.foreign_ids(who.owner, FILES, ids)
    return [_status(job, task_ids.get(job.id, job.id), files.get(job.id)) for job in jobs]


async def _task_status(store: JobStore, who: Caller, task_id: str) -> TaskStatusView:
    job = await _find(store, who, task_id)
    if job is None:
        raise _NotFound("Task not found")
    return (await store.read(lambda r: _statuses(r, who, [job])))[0]


class _NotFound(Exception):
    pass


def _not_found(request: Request, exc: _NotFound) -> Response:
    return Response({"detail": str(exc)}, status_code=404)


class _Forbidden(Exception):
    """A download path that leaves the outputs folder (the node's guard answers 403 too)."""


def _forbidden(request: Request, exc: _Forbidden) -> Response:
    return Response({"detail": "Access to this file is not allowed"}, status_code=403)


EXCEPTIONS = {PydanticError: pydantic_error, _Duplicate: _duplicate_error, _NotFound: _not_found,
              _Forbidden: _forbidden}


@post(["/v1/tasks/video/", "/v1/tasks/"], status_code=200, request_max_body_size=None,
      operation_class=body_operation("LightX2V's `VideoTaskRequest`", {"application/json": struct_schema(VideoTask)}),
      summary="LightX2V: submit a video task (JSON)", tags=["LightX2V server API"],
      description="The LightX2V server's `VideoTaskRequest`; inputs as http(s) URLs, base64 or data URLs."
      " `POST /v1/tasks/` is the server's deprecated alias.", exception_handlers=EXCEPTIONS,
      responses=errors(LIGHTX2V, 400, 403, 413, 422, 503, 507))
async def submit_video(
    request: Request, jobs: NamedDependency[JobService], store: NamedDependency[JobStore],
    settings: NamedDependency[Settings], who: NamedDependency[Caller],
) -> Submitted:
    return await _submit_json(request, jobs, store, settings, who, VideoTask)


async def _submit_json(
    request: Request, jobs: JobService, store: JobStore, settings: Settings, who: Caller, struct: type[BaseTask],
) -> Submitted:
    mb = settings.max_json_mb
    raw = await read_limited(request.stream(), mb * 1024 * 1024, f"JSON body is larger than the {mb} MiB"
                             " allowed; send large files to the /form route")
    task = decode(raw, struct)
    return (await _accept(jobs, store, who, task, job_values(task, set()), []))[1]


@post("/v1/tasks/video/form", status_code=200, request_max_body_size=None,
      operation_class=body_operation("The form, `image_file` required", {
          "multipart/form-data": struct_schema(VideoForm, ("image_file", "last_frame_file", "audio_file")),
      }),
      summary="LightX2V: submit a video task (multipart upload)", tags=["LightX2V server API"],
      description="`image_file` (required), `last_frame_file`, `audio_file`, and the text fields"
      " `prompt`, `negative_prompt`, `save_result_path`, `use_prompt_enhancer`, `num_fragments`,"
      " `infer_steps`, `target_video_length`, `seed` (default 42), `video_duration`, `target_fps`.",
      exception_handlers=EXCEPTIONS, responses=errors(LIGHTX2V, 400, 403, 413, 415, 422, 503, 507))
async def submit_video_form(
    request: Request, jobs: NamedDependency[JobService], bodies: NamedDependency[BodyReader],
    store: NamedDependency[JobStore], who: NamedDependency[Caller],
) -> Submitted:
    return await _submit_form(request, jobs, bodies, store, who, VideoTask, FORM_FILES, FORM_DEFAULTS, image_required=True)


async def _submit_form(
    request: Request, jobs: JobService, bodies: BodyReader, store: JobStore, who: Caller, struct: type[BaseTask],
    roles: dict[str, str], defaults: dict[str, int], *, image_required: bool, **text: str,
) -> Submitted:
    """A form route: its files, its text fields, and every number with the server's default."""
    fields, files = await bodies.form(
        request.headers.get("content-type", ""), request.stream(), size=declared_size(request), roles=roles,
    )
    try:
        if image_required and "image" not in {f.role for f in files}:
            raise PydanticError("missing", ["image_file"], "Field required")
        task = struct(
            prompt=fields.get("prompt", ""), negative_prompt=fields.get("negative_prompt", ""),
            save_result_path=fields.get("save_result_path", ""),
            use_prompt_enhancer=truth("use_prompt_enhancer", fields.get("use_prompt_enhancer")),
            **{name: whole_number(name, fields.get(name), default) for name, default in defaults.items()},
            **{name: fields.get(name) or default for name, default in text.items()},
        )
        values = job_values(task, {f.role for f in files})
    except BaseException:
        discard(files)
        raise
    return (await _accept(jobs, store, who, task, values, files))[1]


@post("/v1/tasks/image/sync", status_code=200, request_max_body_size=None, media_type="image/png",
      operation_class=body_operation("LightX2V's `ImageTaskRequest`", {"application/json": struct_schema(ImageTask)}),
      summary="LightX2V: make an image and answer it (PNG) once made, within `timeout_seconds`",
      tags=["LightX2V server API"], exception_handlers=EXCEPTIONS,
      responses={200: ResponseSpec(bytes, media_type="image/png", generate_examples=False, description="The image"),
                 **errors(LIGHTX2V, 400, 403, 409, 413, 422, 500, 503, 504, 507)})
async def submit_image_sync(
    request: Request, jobs: NamedDependency[JobService], store: NamedDependency[JobStore],
    blobs: NamedDependency[BlobStore], settings: NamedDependency[Settings], who: NamedDependency[Caller],
    timeout_seconds: Annotated[int, QueryParameter(description="At most X2V_MAX_WAIT")] = 600,
    poll_interval_seconds: Annotated[float, QueryParameter(description="Accepted; the gateway is told when the job ends")] = 0.5,
) -> Stream:
    if timeout_seconds <= 0:
        raise ApiError(400, "timeout_seconds must be > 0", "timeout_seconds")
    if not poll_interval_seconds > 0:
        raise ApiError(400, "poll_interval_seconds must be > 0", "poll_interval_seconds")
    mb = settings.max_json_mb
    task = decode(await read_limited(request.stream(), mb * 1024 * 1024, f"JSON body is larger than the {mb} MiB allowed"), ImageTask)
    if task.presigned_url:
        # The gateway does not PUT results to URLs its clients name: fetch the image from here.
        raise field_error("presigned_url", "presigned_url: the gateway answers the image itself and uploads it nowhere")
    job, _ = await _accept(jobs, store, who, task, job_values(task, set()), [])
    job = await jobs.wait(job, min(timeout_seconds, settings.max_wait))
    if job.state == "failed":
        raise ApiError(500, job.error or "Task failed")
    if job.state == "cancelled":
        raise ApiError(409, "Task cancelled by user")
    if job.state != "succeeded":
        await jobs.cancel(job.id, who)
        raise ApiError(504, f"Task {job.id} timed out after {timeout_seconds} seconds")
    blob = await result_blob(job, blobs)
    if blob is None:
        raise ApiError(500, f"Task completed but its image is no longer stored: {job.id}")
    return Stream(blob.chunks(), media_type="image/png",
                  headers={"content-disposition": 'inline; filename="result.png"', "content-length": str(blob.size)})


@post("/v1/tasks/image/", status_code=200, request_max_body_size=None,
      operation_class=body_operation("LightX2V's `ImageTaskRequest`", {"application/json": struct_schema(ImageTask)}),
      summary="LightX2V: submit an image task (JSON): t2i, or i2i with `image_path`", tags=["LightX2V server API"],
      exception_handlers=EXCEPTIONS, responses=errors(LIGHTX2V, 400, 403, 413, 422, 503, 507))
async def submit_image(
    request: Request, jobs: NamedDependency[JobService], store: NamedDependency[JobStore],
    settings: NamedDependency[Settings], who: NamedDependency[Caller],
) -> Submitted:
    return await _submit_json(request, jobs, store, settings, who, ImageTask)


@post("/v1/tasks/image/form", status_code=200, request_max_body_size=None,
      operation_class=body_operation("The form; with `image_file` an i2i task, else t2i", {
          "multipart/form-data": struct_schema(ImageForm, ("image_file",)),
      }),
      summary="LightX2V: submit an image task (multipart upload)", tags=["LightX2V server API"],
      exception_handlers=EXCEPTIONS, responses=errors(LIGHTX2V, 400, 403, 413, 415, 422, 503, 507))
async def submit_image_form(
    request: Request, jobs: NamedDependency[JobService], bodies: NamedDependency[BodyReader],
    store: NamedDependency[JobStore], who: NamedDependency[Caller],
) -> Submitted:
    return await _submit_form(request, jobs, bodies, store, who, ImageTask, {"image_file": "image"},
                              {"infer_steps": 5, "seed": 42}, image_required=False, aspect_ratio="16:9")


@get("/v1/tasks/{task_id:str}/status", summary="LightX2V: a task's status", tags=["LightX2V server API"],
     exception_handlers=EXCEPTIONS, responses=errors(LIGHTX2V, 404, 422))
async def task_status(store: NamedDependency[JobStore], who: NamedDependency[Caller], task_id: FromPath[str]) -> TaskStatusView:
    return await _task_status(store, who, task_id)


@get("/v1/tasks/", summary="LightX2V: every task of this key (the newest 1000), keyed by task id, oldest first",
     tags=["LightX2V server API"], responses=errors(LIGHTX2V))
async def list_tasks(store: NamedDependency[JobStore], who: NamedDependency[Caller]) -> dict[str, TaskStatusView]:
    def read(r: Reads) -> dict[str, TaskStatusView]:  # up to 1000 jobs: on a reader thread
        jobs = list(reversed(r.list_jobs(owner=who.sees, limit=LISTED)))
        return {view.task_id: view for view in _statuses(r, who, jobs)}

    return await store.read(read)


@delete("/v1/tasks/all/running", status_code=200, summary="LightX2V: cancel every unfinished task of this key",
        tags=["LightX2V server API"], responses=errors(LIGHTX2V, 403))
async def stop_all_tasks(
    jobs: NamedDependency[JobService], store: NamedDependency[JobStore], who: NamedDependency[Caller],
) -> Stopped:
    # This key's own tasks only, an admin's too: on a node "all" is one client's queue, not
    # every key's work in the pool.
    seen: set[str] = set()
    while unfinished := [job for job in await store.list_jobs(
        states=["queued", "submitted", "running"], owner=who.owner, limit=500,
    ) if job.id not in seen]:
        for job in unfinished:
            seen.add(job.id)  # each asked once, whatever the cancel found
            await jobs.cancel(job.id, who)
    return Stopped("success", "All tasks stopped successfully.")


@delete("/v1/tasks/{task_id:str}", status_code=200, summary="LightX2V: cancel a task (always 200)",
        tags=["LightX2V server API"], responses=errors(LIGHTX2V, 403, 422))
async def stop_task(
    jobs: NamedDependency[JobService], store: NamedDependency[JobStore], who: NamedDependency[Caller],
    task_id: FromPath[str],
) -> Stopped:
    job = await _find(store, who, task_id)
    if job is None or job.state in ("succeeded", "failed"):
        return Stopped("do_nothing", "Task not found or already completed.")
    await jobs.cancel(job.id, who)
    return Stopped("success", "Task stopped successfully.")


@get("/v1/tasks/{task_id:str}/result", summary="LightX2V: a completed task's file (supports Range)",
     tags=["LightX2V server API"], exception_handlers=EXCEPTIONS,
     responses=file_responses(LIGHTX2V, 404, 422))
async def task_result(
    store: NamedDependency[JobStore], blobs: NamedDependency[BlobStore], who: NamedDependency[Caller],
    task_id: FromPath[str], range_header: Annotated[str | None, HeaderParameter(name="Range")] = None,
) -> Response:
    view = await _task_status(store, who, task_id)
    if view.status != "completed":
        raise _NotFound("Task not completed")
    job = await _find(store, who, task_id)
    assert job is not None
    return await _file(job, blobs, view.save_result_path or f"{job.id}{_ext(job)}", range_header)


async def _file(job: Job, blobs: BlobStore, name: str, range_header: str | None) -> Response:
    blob = await result_blob(job, blobs)
    if blob is None:
        raise _NotFound(f"File not found: {name}")
    media = "image/png" if name.lower().endswith(".png") else "video/mp4"
    return ranged_file(blob, range_header, media_type=media, filename=name, disposition="attachment")


@get("/v1/files/download/{file_path:path}", summary="LightX2V: a result file by its name",
     tags=["LightX2V server API"], exception_handlers=EXCEPTIONS,
     responses=file_responses(LIGHTX2V, 403, 404, 422))
async def download_file(
    store: NamedDependency[JobStore], blobs: NamedDependency[BlobStore], who: NamedDependency[Caller],
    file_path: FromPath[str], range_header: Annotated[str | None, HeaderParameter(name="Range")] = None,
) -> Response:
    name = file_path.lstrip("/") if file_path.startswith("/") and not file_path.startswith("//") else file_path
    parts = name.replace("\\", "/").split("/")
    if file_path.startswith("//") or ".." in parts:
        raise _Forbidden(name)
    base = parts[-1]

    def read(r: Reads) -> Job | None:
        for candidate in dict.fromkeys((name.removeprefix("./"), base)):
            job_id = r.foreign_job(who.owner, FILES, candidate)
            if job_id is None and posixpath.splitext(candidate)[1].lower() in (".mp4", ".png"):
                job_id = posixpath.splitext(candidate)[0]  # a gateway job's own `<id>.mp4`
            job = r.get(job_id) if job_id else None
            if job is not None and who.may_touch(job.owner):
                return job
        return None

    job = await store.read(read) if base else None
    if job is None:
        raise _NotFound(f"File not found: {name}")
    return await _file(job, blobs, base, range_header)


class ServiceStatus(msgspec.Struct):
    service_status: str
    current_task: str | None
    active_tasks: list[str]
    pending_tasks: int
    queue_size: int
    total_tasks: int
    completed_tasks: int
    failed_tasks: int


@get("/v1/service/status", summary="LightX2V: idle when the pool would start a task now",
     tags=["LightX2V server API"], responses=errors(LIGHTX2V))
async def service_status(
    store: NamedDependency[JobStore], dispatcher: NamedDependency[Dispatcher], who: NamedDependency[Caller],
) -> ServiceStatus:
    return await _service(store, dispatcher, who)


async def _service(store: JobStore, dispatcher: Dispatcher, who: Caller) -> ServiceStatus:
    # "idle" is what LightX2V's multi-server script waits for before it sends the next task:
    # a GPU in the pool would start one now (nothing waits in the gateway's queue, and some
    # node with room is up).
    def read(r: Reads) -> tuple[dict[str, int], dict[str, int], dict[str, int], list[TaskStatusView]]:
        running = r.list_jobs(states=["running"], owner=who.sees, limit=100)
        return (r.owner_counts(None), r.owner_counts(who.sees), r.inflight_counts(),
                _statuses(r, who, running))

    everyone, mine, inflight, running = await store.read(read)
    now = time.monotonic()
    room = any(
        state.accepting(now) and inflight.get(name, 0) < state.capacity
        for name, state in dispatcher.states.items()
    )
    idle = room and everyone["queued"] == 0
    active = [view.task_id for view in running]
    return ServiceStatus(
        service_status="idle" if idle else "busy", current_task=active[0] if active else None,
        active_tasks=active, pending_tasks=mine["queued"] + mine["submitted"],
        queue_size=sum(state.upstream.slots for state in dispatcher.states.values()),
        total_tasks=sum(mine.values()), completed_tasks=mine["succeeded"], failed_tasks=mine["failed"],
    )


class QueueStatus(msgspec.Struct):
    is_processing: bool
    current_task: str | None
    pending_count: int
    active_count: int
    queue_size: int
    queue_available: int


@get("/v1/tasks/queue/status", summary="LightX2V: this key's tasks in flight against the pool's slots",
     tags=["LightX2V server API"], responses=errors(LIGHTX2V))
async def queue_status(
    store: NamedDependency[JobStore], dispatcher: NamedDependency[Dispatcher], who: NamedDependency[Caller],
) -> QueueStatus:
    service = await _service(store, dispatcher, who)
    active = service.pending_tasks + len(service.active_tasks)
    return QueueStatus(
        is_processing=bool(service.active_tasks), current_task=service.current_task,
        pending_count=service.pending_tasks, active_count=active, queue_size=service.queue_size,
        # The gateway's own queue takes every task: room is never short, only the pool's slots.
        queue_available=max(0, service.queue_size - active),
    )


class ServiceMetadata(msgspec.Struct):
    nproc_per_node: int
    model_cls: str
    model_path: str


@get("/v1/service/metadata", summary="LightX2V: the pool's model class", tags=["LightX2V server API"], responses=errors(LIGHTX2V))
async def service_metadata(dispatcher: NamedDependency[Dispatcher]) -> ServiceMetadata:
    # One model across the pool is named; a mixed pool is no model class a client could plan
    # for. Nodes' model paths are theirs: none is shown.
    models = {state.model for state in dispatcher.states.values() if state.model}
    return ServiceMetadata(1, models.pop() if len(models) == 1 else "x2v-gateway", "")


ROUTES = [submit_video, submit_video_form, submit_image, submit_image_form, submit_image_sync, queue_status, task_status, list_tasks, stop_task, task_result,
          stop_all_tasks, download_file, service_status, service_metadata]
