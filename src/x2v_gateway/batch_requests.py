"""A batch made by one JSON request (`POST /api/v1/batches`): `{name, jobs: [...]}`, each job as
`POST /api/v1/jobs` takes it, all accepted or none.

Every job is read and checked (fields, inputs it needs, the prompt rule, cloud models) before any
input is fetched; a mistake is a 4xx naming the job's index and its field (`jobs[3].prompt`).
Then each distinct input (one portrait for a hundred jobs is one URL or one base64 string) is
fetched and checked by its content once, and only when every one passed are they kept and the
jobs queued, in one transaction. An `Idempotency-Key` names the batch: the same request with it
again answers the batch made before; a different request with it gets 409.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import msgspec
from msgspec import Meta

from .auth import Caller
from .batch_plan import MAX_BATCH_JOBS, new_batch_id
from .inputs import (
    IncomingFile, StoredInput, check_file, check_free_space, commit_file, discard, fetch_input,
    job_from_json, read_limited,
)
from .reads import every_item
from .schemas import INPUT_ROLES, ApiError, JobRequest, WebhookEvent, field_problem, generation_params
from .store import BatchJobSpec, Job

if TYPE_CHECKING:
    from .jobs import JobService

# A batch is one transaction, as the dashboard's: bigger runs are split by the client.
MAX_API_BATCH_JOBS = MAX_BATCH_JOBS


class BatchRequest(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /api/v1/batches`: a name and the jobs, each a `POST /api/v1/jobs` JSON body
    (without `batch_id`: the batch gives it)."""

    jobs: Annotated[list[msgspec.Raw], Meta(min_length=1, max_length=MAX_API_BATCH_JOBS)]
    name: Annotated[str, Meta(max_length=200)] | None = None
    # One webhook for every job of the batch, as the dashboard's batch form gives one.
    webhook_url: Annotated[str, Meta(min_length=1, max_length=2000)] | None = None
    webhook_events: Annotated[list[WebhookEvent], Meta(max_length=12)] | None = None


@dataclass(frozen=True)
class MadeBatch:
    batch_id: str
    jobs: list[Job]  # in the request's order
    created: bool  # False: an Idempotency-Key replay


def read_batch(raw: bytes) -> tuple[BatchRequest, list[JobRequest]]:
    """The batch and its jobs, every job decoded and checked against the schema."""
    try:
        body = msgspec.json.decode(raw, type=BatchRequest)
    except msgspec.ValidationError as exc:
        field, message = field_problem(exc, BatchRequest)
        if field is None:
            raise ApiError(400, f"request body {message} ({{\"name\", \"jobs\": [...]}}, as JSON)") from None
        if field == "jobs" and "length" in str(exc):
            message = f"jobs must list 1 to {MAX_API_BATCH_JOBS} jobs; split a larger run into several batches"
        raise ApiError(422, message, field) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    requests = []
    for index, item in enumerate(body.jobs):
        with _item(index):
            request = job_from_json(bytes(item))
            if request.batch_id is not None:
                raise ApiError(422, "batch_id is given by the batch; leave it out", "batch_id")
            for field in ("webhook_url", "webhook_events"):
                if getattr(request, field) is not None:
                    raise ApiError(422, f"{field} is the batch's, for all its jobs: set it beside `jobs`", field)
        requests.append(request)
    return body, requests


@contextmanager
def _item(index: int) -> Iterator[None]:
    """A refusal about one job, said of `jobs[index]` and its field."""
    try:
        yield
    except ApiError as exc:
        if exc.status >= 500 or exc.status in (413, 429, 507):
            raise  # about the request or the gateway, not this job
        at = f"jobs[{index}]"
        status = 422 if exc.status == 400 and exc.field is None else exc.status
        message = exc.message.removeprefix("request body ")  # the job is not the request's body
        raise ApiError(status, f"{at}: {message}", f"{at}.{exc.field}" if exc.field else at) from None


async def create_batch(
    service: JobService, who: Caller, stream: AsyncIterator[bytes], *, idempotency_key: str | None,
) -> MadeBatch:
    """Read, check and queue a batch sent as JSON, for `who` (see the module's docstring)."""
    settings = service.settings
    mb = settings.max_json_mb
    raw = await read_limited(stream, mb * 1024 * 1024, f"JSON body is larger than the {mb} MiB"
                             " allowed; send large files by URL, or split the batch")
    body, requests = read_batch(raw)
    name = (body.name or "").strip() or None
    digest = hashlib.sha256(raw).hexdigest()
    if idempotency_key:
        batch_id = "b" + hashlib.sha256(f"{who.owner}:{idempotency_key}".encode()).hexdigest()[:32]
        if (made := await _replay(service, who, batch_id, digest)) is not None:
            return made
    else:
        batch_id = new_batch_id()
    for index, request in enumerate(requests):
        with _item(index):
            service.check_job(request)
            await service.check_cloud_model(request)
    webhook = await service.webhooks.for_job(body.webhook_url, body.webhook_events, who.owner)

    async with service.auth.counting_jobs(who, len(requests)) as count:
        specs = await _fetch_and_keep(service, requests, who.owner)
        tasks = {spec.task for spec in specs}
        jobs = await service.submit_batch(
            batch_id, specs, owner=who.owner, webhook=webhook,
            batch={"name": name, "task": tasks.pop() if len(tasks) == 1 else None, "mode": "api",
                   "form": {"request_sha256": digest, "jobs": len(specs)}},
        )
        if jobs is None:  # the same key, a moment earlier, by a request sent twice at once
            count.refund()
            if (made := await _replay(service, who, batch_id, digest)) is not None:
                return made
            raise ApiError(409, "a batch with this id exists already", "Idempotency-Key")
    return MadeBatch(batch_id, jobs, True)


async def _replay(service: JobService, who: Caller, batch_id: str, digest: str) -> MadeBatch | None:
    """The batch an earlier request with this Idempotency-Key made, if any; 409 when that
    request was a different one."""
    existing = await service.store.batch(batch_id)
    if existing is None:
        return None
    if not who.may_touch(existing["owner"]) or existing["form"].get("request_sha256") != digest:
        raise ApiError(409, "this Idempotency-Key was already used for a different request", "Idempotency-Key")
    jobs = [item.job async for item in every_item(service.store, batch_id, who.sees)]
    return MadeBatch(batch_id, jobs, False)


async def _fetch_and_keep(service: JobService, requests: list[JobRequest], owner: str | None) -> list[BatchJobSpec]:
    """Each distinct input fetched and checked once, all kept only when all passed; the specs."""
    settings, blobs = service.settings, service.blobs
    max_bytes = settings.max_file_mb * 1024 * 1024
    min_free = settings.min_free_disk_mb * 1024 * 1024
    fetched: dict[tuple[str, str], IncomingFile] = {}
    first_use: dict[tuple[str, str], int] = {}
    try:
        for index, request in enumerate(requests):
            for role in INPUT_ROLES:
                value = getattr(request, role)
                if not value or (role, value) in fetched:
                    continue
                with _item(index):
                    check_free_space(blobs, min_free)
                    fetched[(role, value)] = await fetch_input(role, value, blobs, service.http, max_bytes=max_bytes)
                first_use[(role, value)] = index
        kinds = {}
        for key, incoming in fetched.items():
            with _item(first_use[key]):
                kinds[key] = await check_file(incoming, owner)
    except BaseException:
        discard(list(fetched.values()))
        raise
    stored: dict[tuple[str, str], StoredInput] = {
        key: await commit_file(incoming, kinds[key], service.store) for key, incoming in fetched.items()
    }
    specs = []
    for request in requests:
        params = generation_params(request)
        if request.model is not None:
            params["model_cls"] = request.model
        inputs = {role: stored[(role, value)].sha256 for role in INPUT_ROLES if (value := getattr(request, role))}
        specs.append(BatchJobSpec(
            task=request.task, params=params, inputs=inputs, files={}, priority=request.priority,
            pinned=request.upstream,
        ))
    return specs
