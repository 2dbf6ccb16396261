"""The services this gateway replaces, answered over its jobs, so that their scripts work unchanged
but for the base URL and key:

* the S2V batch web service (a FastAPI app in front of the hosted cloud, `web_backend.py`):
  `POST /api/submit` (multipart: `prompt`, `negative_prompt`, `cfg_scale`, `duration`, `seed`,
  `model_cls`, `stage`, `image`, `audio`, `wait_for_completion`), `GET /api/task/{id}`,
  `GET /api/tasks?limit&offset`, `DELETE /api/task/{id}`; statuses `CREATED`, `PENDING`,
  `PROCESSING`, `SUCCEED`, `FAILED`, `CANCELLED`;
* the Wan2.1 T2V service (`/video/submit`, `/video/status`, `/video/cancel` with `requestId`;
  `image_size`, `num_frames`, `guidance_scale`, `infer_steps` within its ranges, else 422;
  statuses `InQueue`, `InProgress`, `Succeed`, `Failed`).

Both were FastAPI apps: refusals are `{"detail": ...}` (compat.py).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, delete, get, post, route
from litestar.di import NamedDependency
from litestar.params import FromPath, QueryParameter

from ..auth import Caller
from ..compat import S2V_SERVICE, T2V_SERVICE, errors, job_request, naive_local, renaming, truth, whole_number
from ..inputs import discard, declared_size, read_limited
from ..jobs import JobService
from ..request_bodies import BodyReader
from ..reads import NotFound, find_job
from ..schemas import ApiError
from ..settings import Settings
from ..store import Job, JobStore, Reads
from .api import body_operation, struct_schema

# -- the S2V batch web service ---------------------------------------------------------------------

S2V_STATUS = {"queued": "PENDING", "submitted": "PENDING", "running": "PROCESSING",
              "succeeded": "SUCCEED", "failed": "FAILED", "cancelled": "CANCELLED"}
# The hosted cloud's own words, which the service passed on as `api_status`.
CLOUD_STATUS = {"queued": "PENDING", "submitted": "PENDING", "running": "RUNNING",
                "succeeded": "SUCCEED", "failed": "FAILED", "cancelled": "CANCEL"}
DEFAULT_MODEL, DEFAULT_STAGE = "SekoTalk", "single_stage"
MAX_OFFSET = 10_000  # a page starts at most this far down the list (it is read from the top)


class S2VForm(msgspec.Struct, kw_only=True):
    """`POST /api/submit`'s text fields (its files: `image`, `audio`)."""

    prompt: str
    negative_prompt: str | None = None
    cfg_scale: int = 5
    duration: int = 7
    seed: int | None = None
    model_cls: str = DEFAULT_MODEL
    stage: str = DEFAULT_STAGE
    wait_for_completion: bool = False


class RequestId(msgspec.Struct):
    requestId: str  # noqa: N815 (the service's own name)


def result_url(request: Request, job: Job) -> str:
    """Where the finished video is downloaded from (the LightX2V files route: a compatible
    path, so a header-less client can fetch it too)."""
    return f"{str(request.base_url).rstrip('/')}/v1/files/download/{job.id}.mp4"


def s2v_task(request: Request, job: Job) -> dict[str, Any]:
    """A job as the service's task record."""
    task: dict[str, Any] = {
        "task_id": job.id, "status": S2V_STATUS[job.state], "prompt": job.params.get("prompt", ""),
        "created_at": naive_local(job.created_at), "updated_at": naive_local(job.updated_at),
        "api_task_id": job.id, "api_status": CLOUD_STATUS[job.state],
    }
    if job.state == "succeeded" and job.result_sha and not job.files_expired:
        task["result_url"] = result_url(request, job)
    if job.state == "failed":
        task["error"] = job.error or "Unknown error"
    return task


async def _find(store: JobStore, who: Caller, task_id: str) -> Job:
    try:
        return await find_job(store, task_id, who)
    except NotFound:
        raise ApiError(404, "Task not found") from None


@post("/api/submit", status_code=200, request_max_body_size=None, tags=["Replaced services"],
      operation_class=body_operation("The task", {
          "multipart/form-data": struct_schema(S2VForm, ("image", "audio")),
          "application/x-www-form-urlencoded": struct_schema(S2VForm),
      }),
      summary="S2V batch service: submit one s2v task (multipart); `wait_for_completion` blocks until it ends",
      responses=errors(S2V_SERVICE, 400, 403, 413, 415, 422, 507))
async def s2v_submit(
    request: Request, jobs: NamedDependency[JobService], bodies: NamedDependency[BodyReader],
    settings: NamedDependency[Settings],
    who: NamedDependency[Caller],
) -> dict[str, Any]:
    fields, files = await bodies.form(
        request.headers.get("content-type", ""), request.stream(), size=declared_size(request),
        roles={"image": "image", "audio": "audio"},
    )
    try:
        if not fields.get("prompt"):
            raise ApiError(422, "Field required", "prompt")
        whole_number("cfg_scale", fields.get("cfg_scale"), 5)  # the node's model config sets it
        values: dict[str, Any] = {
            "task": "s2v", "prompt": fields["prompt"], "negative_prompt": fields.get("negative_prompt") or "",
            "video_duration": whole_number("duration", fields.get("duration"), 7),
            "seed": whole_number("seed", fields.get("seed")),
        }
        model = fields.get("model_cls") or DEFAULT_MODEL
        if model != DEFAULT_MODEL:
            values["model"] = model  # a hosted-cloud model: only where the job can go to the cloud
        if (fields.get("stage") or DEFAULT_STAGE) != DEFAULT_STAGE:
            raise ApiError(422, "stage: the gateway runs single_stage tasks only", "stage")
        wait = truth("wait_for_completion", fields.get("wait_for_completion"))
        names = {"video_duration": "duration", "model": "model_cls"}
        with renaming(names):
            job_req = job_request({k: v for k, v in values.items() if v is not None}, names)
    except BaseException:
        discard(files)
        raise
    with renaming({"model": "model_cls"}):
        job = await jobs.submit_read(who, job_req, files, wait=settings.max_wait if wait else None)
    return {"task_id": job.id, "status": S2V_STATUS[job.state] if wait else "CREATED"}


@get("/api/task/{task_id:str}", tags=["Replaced services"], summary="S2V batch service: one task",
     responses=errors(S2V_SERVICE, 404, 422))
async def s2v_task_status(
    request: Request, store: NamedDependency[JobStore], who: NamedDependency[Caller], task_id: FromPath[str],
) -> dict[str, Any]:
    return s2v_task(request, await _find(store, who, task_id))


@get("/api/tasks", tags=["Replaced services"], summary="S2V batch service: this key's tasks, newest first",
     responses=errors(S2V_SERVICE, 422))
async def s2v_tasks(
    request: Request, store: NamedDependency[JobStore], who: NamedDependency[Caller],
    limit: Annotated[int, QueryParameter(ge=1, le=500)] = 50,
    offset: Annotated[int, QueryParameter(ge=0, le=MAX_OFFSET)] = 0,
) -> dict[str, Any]:
    def read(r: Reads) -> tuple[list[Job], int]:
        jobs = r.list_jobs(owner=who.sees, limit=offset + limit)[offset:]
        return jobs, sum(r.owner_counts(who.sees).values())

    jobs, total = await store.read(read)
    return {"tasks": [s2v_task(request, job) for job in jobs], "total": total, "limit": limit, "offset": offset}


@delete("/api/task/{task_id:str}", status_code=200, tags=["Replaced services"],
        summary="S2V batch service: cancel a task", responses=errors(S2V_SERVICE, 403, 404, 422))
async def s2v_cancel(
    jobs: NamedDependency[JobService], store: NamedDependency[JobStore], who: NamedDependency[Caller],
    task_id: FromPath[str],
) -> dict[str, Any]:
    job = await _find(store, who, task_id)
    await jobs.cancel(job.id, who)
    return {"success": True, "task_id": task_id}


# -- the Wan2.1 T2V service --------------------------------------------------------------------------

T2V_STATUS = {"queued": "InQueue", "submitted": "InQueue", "running": "InProgress",
              "succeeded": "Succeed", "failed": "Failed", "cancelled": "Failed"}
IMAGE_SIZES = {"480x832": [832, 480], "832x480": [480, 832]}  # width x height -> [height, width]


class T2VSubmit(msgspec.Struct, kw_only=True):
    """The service's request, with its documented ranges."""

    prompt: str
    image_size: str
    num_frames: int
    guidance_scale: float
    infer_steps: int
    seed: int | None = None
    model: str | None = None


_RANGES = {"num_frames": (24, 120), "guidance_scale": (1.0, 20.0), "infer_steps": (20, 100),
           "seed": (0, 2147483647)}


def _t2v_request(raw: bytes) -> T2VSubmit:
    try:
        body = msgspec.json.decode(raw, type=T2VSubmit, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc)
        field = message.rsplit("$.", 1)[-1].rstrip("`") if "$." in message else None
        if field is None and "missing required field" in message:
            field = message.split("`")[1]
        raise ApiError(422, message.split(" - at ")[0], field) from None
    except msgspec.DecodeError as exc:
        raise ApiError(422, f"JSON decode error: {exc}") from None
    if not 10 <= len(body.prompt) <= 500:
        raise ApiError(422, "prompt must be 10 to 500 characters", "prompt")
    if body.image_size not in IMAGE_SIZES:
        raise ApiError(422, "image_size must be 480x832 or 832x480", "image_size")
    for name, (lo, hi) in _RANGES.items():
        value = getattr(body, name)
        if value is not None and not lo <= value <= hi:
            raise ApiError(422, f"{name} must be from {lo} to {hi}", name)
    return body


async def _request_id(request: Request, settings: Settings) -> str:
    raw = await read_limited(request.stream(), 64 * 1024, "the body is larger than a requestId needs")
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        raise ApiError(422, "the body must be JSON: {\"requestId\": ...}", "requestId") from None
    request_id = body.get("requestId") if isinstance(body, dict) else None
    if not isinstance(request_id, str) or not request_id:
        raise ApiError(422, "Field required", "requestId")
    return request_id


@post("/video/submit", status_code=202, request_max_body_size=None, tags=["Replaced services"],
      operation_class=body_operation("The request", {"application/json": struct_schema(T2VSubmit)}),
      summary="Wan2.1 T2V service: submit (`prompt`, `image_size`, `num_frames`, `guidance_scale`, `infer_steps`, `seed`)",
      responses=errors(T2V_SERVICE, 403, 413, 422, 507))
async def t2v_submit(
    request: Request, jobs: NamedDependency[JobService], settings: NamedDependency[Settings],
    who: NamedDependency[Caller],
) -> dict[str, str]:
    body = _t2v_request(await read_limited(request.stream(), 64 * 1024, "the body is larger than a request needs"))
    # guidance_scale is checked but not passed on: a LightX2V node takes its model config's.
    values = {"task": "t2v", "prompt": body.prompt, "target_shape": IMAGE_SIZES[body.image_size],
              "target_video_length": body.num_frames, "infer_steps": body.infer_steps, "seed": body.seed}
    job_req = job_request({k: v for k, v in values.items() if v is not None}, {"target_video_length": "num_frames"})
    job = await jobs.submit_read(who, job_req)
    return {"requestId": job.id}


@post("/video/status", status_code=200, tags=["Replaced services"],
      operation_class=body_operation("Which request", {"application/json": struct_schema(RequestId)}), summary="Wan2.1 T2V service: a request's status",
      responses=errors(T2V_SERVICE, 403, 404, 413, 422))
async def t2v_status(
    request: Request, store: NamedDependency[JobStore], settings: NamedDependency[Settings],
    who: NamedDependency[Caller],
) -> dict[str, Any]:
    job = await _find(store, who, await _request_id(request, settings))
    answer: dict[str, Any] = {"status": T2V_STATUS[job.state], "reason": "", "results": None}
    if job.state == "succeeded" and job.result_sha and not job.files_expired:
        inference = (job.finished_at or 0) - (job.started_at or job.finished_at or 0)
        answer["results"] = {"videos": [{"url": result_url(request, job)}],
                             "timings": {"inference": round(inference, 3)}, "seed": job.params.get("seed")}
    elif job.state == "succeeded":
        answer["status"], answer["reason"] = "Failed", "the video has expired and was deleted"
    elif job.state in ("failed", "cancelled"):
        answer["reason"] = "cancelled" if job.state == "cancelled" else job.error or "failed"
    return answer


@route("/video/cancel", http_method=["POST", "DELETE"], status_code=200, tags=["Replaced services"],
       operation_class=body_operation("Which request", {"application/json": struct_schema(RequestId)}),
       summary="Wan2.1 T2V service: cancel a request (POST, or the DELETE its Postman guide shows)",
       responses=errors(T2V_SERVICE, 403, 404, 413, 422))
async def t2v_cancel(
    request: Request, jobs: NamedDependency[JobService], store: NamedDependency[JobStore],
    settings: NamedDependency[Settings], who: NamedDependency[Caller],
) -> dict[str, str]:
    job = await _find(store, who, await _request_id(request, settings))
    if job.state in ("succeeded", "failed"):
        return {"status": "Failed", "reason": f"the request has already {'succeeded' if job.state == 'succeeded' else 'failed'}"}
    await jobs.cancel(job.id, who)
    return {"status": "Succeed"}


ROUTES = [s2v_submit, s2v_task_status, s2v_tasks, s2v_cancel, t2v_submit, t2v_status, t2v_cancel]
