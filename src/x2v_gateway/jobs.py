"""Accepting a job: request → validated struct → input files kept → queued row → dispatcher woken."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec

from .auth import CSRF_FIELD
from .blobs import BlobStore
from .checker import CHECKER, MediaError
from .dispatch import Dispatcher, Notifier
from .forward import UploadForward
from .inputs import (
    IncomingFile, check_free_space, discard, fetch_input, keep_files, not_utf8, read_multipart,
    urlencoded_fields,
)
from .models import (
    INPUT_ROLES, PROMPT_REQUIRED, TASK_INPUTS, ApiError, JobRequest, field_problem, generation_params,
)
from .settings import Settings
from .store import BatchJobSpec, IdempotencyConflict, Job, JobStore
from .upstream.base import Rejected, Unavailable


def validation_error(exc: msgspec.DecodeError, raw: bytes = b"") -> ApiError:
    """A job that msgspec refused, as the API's error naming the field (`raw`: the JSON body)."""
    if isinstance(exc, msgspec.ValidationError):
        field, message = field_problem(exc, JobRequest)
        if field is None:  # the body as a whole: `[1]`, `"t2v"`
            return ApiError(400, f"request body {message} (one job, as JSON)")
        return ApiError(422, message, field)
    if "UTF-8" in str(exc) and (field := _non_utf8_field(raw)):
        return not_utf8(field)
    return ApiError(400, f"request body is not valid JSON: {exc}")


def _non_utf8_field(raw: bytes) -> str | None:
    """The field of a JSON object whose name or text is not valid UTF-8 (msgspec does not say)."""
    try:
        # Each byte that is not UTF-8 becomes a lone surrogate, which no valid text holds.
        doc = json.loads(raw.decode("utf-8", "surrogateescape"))
    except ValueError:
        return None
    for name, value in doc.items() if isinstance(doc, dict) else ():
        if not _is_utf8(name) or not _is_utf8(json.dumps(value, ensure_ascii=False)):
            return name
    return None


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _form_value(name: str, value: str) -> Any:
    # Browsers send every field of a form, empty or not; an empty field means "not set".
    if name == "target_shape":
        value = value.strip()
        if value.startswith("["):
            return json.loads(value)
        return [int(v) for v in re.split(r"[,x× ]+", value) if v]
    return value


class JobService:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        blobs: BlobStore,
        dispatcher: Dispatcher,
        notifier: Notifier,
        http: httpx.AsyncClient,
    ) -> None:
        self.settings = settings
        self.store = store
        self.blobs = blobs
        self.dispatcher = dispatcher
        self.notifier = notifier
        self.http = http

    async def submit_json(
        self, body: AsyncIterator[bytes], *, idempotency_key: str | None, owner: str | None = None
    ) -> tuple[Job, bool]:
        limit = self.settings.max_json_mb * 1024 * 1024
        raw = bytearray()
        async for chunk in body:
            raw += chunk
            if len(raw) > limit:
                raise ApiError(413, f"JSON body is larger than the {self.settings.max_json_mb} MiB"
                               " allowed; send large files as multipart uploads")
        try:
            request = msgspec.json.decode(bytes(raw), type=JobRequest)
        except msgspec.DecodeError as exc:  # ValidationError included
            raise validation_error(exc, bytes(raw)) from None
        self._check_inputs(request, given=set())
        await self._check_cloud_model(request)
        files: list[IncomingFile] = []
        max_bytes = self.settings.max_file_mb * 1024 * 1024
        try:
            for role in INPUT_ROLES:
                value = getattr(request, role)
                if value:
                    files.append(await fetch_input(role, value, self.blobs, self.http, max_bytes=max_bytes))
        except BaseException:
            discard(files)
            raise
        return await self._accept(request, files, idempotency_key, owner)

    async def submit_multipart(
        self,
        content_type: str,
        body: AsyncIterator[bytes],
        *,
        idempotency_key: str | None,
        owner: str | None = None,
        size: int | None = None,
    ) -> tuple[Job, bool]:
        """A job as a multipart upload of `size` bytes (when the client said). A large one is
        sent on to a free node as it arrives (`forward`), and still kept and checked first."""
        forward = None
        threshold = self.settings.form_threshold_mb * 1024 * 1024
        if self.settings.forward_uploads and size is not None and size > threshold:
            forward = UploadForward(self.dispatcher, owner, size)
        try:
            fields, files = await read_multipart(
                content_type, body, self.blobs, forward=forward, **self._upload_limits()
            )
            return await self._submit_form(fields, files, idempotency_key, owner, forward)
        finally:
            if forward is not None:
                await forward.close()

    async def submit_urlencoded(
        self, body: AsyncIterator[bytes], *, idempotency_key: str | None, owner: str | None = None
    ) -> tuple[Job, bool]:
        """A plain HTML form post (no files): inputs, if any, are URLs or base64 text."""
        raw = bytearray()
        async for chunk in body:
            raw += chunk
            if len(raw) > self.settings.max_json_mb * 1024 * 1024:
                raise ApiError(413, f"form body is larger than the {self.settings.max_json_mb} MiB allowed")
        fields: dict[str, str] = {}
        for name, value in urlencoded_fields(bytes(raw)):
            if name in fields:
                raise ApiError(400, f"{name} was sent twice", name)
            fields[name] = value
        return await self._submit_form(fields, [], idempotency_key, owner)

    async def _submit_form(
        self,
        fields: dict[str, str],
        files: list[IncomingFile],
        idempotency_key: str | None,
        owner: str | None,
        forward: UploadForward | None = None,
    ) -> tuple[Job, bool]:
        max_bytes = self.settings.max_file_mb * 1024 * 1024
        try:
            values = {}
            for name, value in fields.items():
                # A signed-in dashboard form carries its CSRF token as a field, which the auth
                # middleware has checked: it is not a job parameter.
                if value.strip() == "" or name == CSRF_FIELD:
                    continue
                try:
                    values[name] = _form_value(name, value)
                except ValueError:
                    raise ApiError(422, f"{name} must be two numbers, height and width", name) from None
            try:
                request = msgspec.convert(values, JobRequest, strict=False)
            except msgspec.ValidationError as exc:
                raise validation_error(exc) from None
            uploaded = {f.role for f in files}
            for role in uploaded:
                if getattr(request, role):
                    raise ApiError(400, f"{role} was sent both as a file and as text", role)
            self._check_inputs(request, given=uploaded)
            await self._check_cloud_model(request)
            for role in INPUT_ROLES:
                value = getattr(request, role)
                if value and role not in uploaded:
                    files.append(await fetch_input(role, value, self.blobs, self.http, max_bytes=max_bytes))
        except BaseException:
            discard(files)
            raise
        return await self._accept(request, files, idempotency_key, owner, forward)

    def _check_inputs(self, request: JobRequest, given: set[str]) -> None:
        present = given | {role for role in INPUT_ROLES if getattr(request, role)}
        needed = TASK_INPUTS[request.task]
        for role in needed:
            if role not in present:
                raise ApiError(422, f"{role} is required for {request.task} jobs", role)
        for role in present - set(needed):
            raise ApiError(422, f"{role} is not used by {request.task} jobs", role)
        if request.upstream is not None and request.upstream not in self.dispatcher.states:
            raise ApiError(422, f"no upstream named {request.upstream!r}; known: "
                           + ", ".join(self.dispatcher.states), "upstream")
        if not any(request.task in s.upstream.tasks for s in self.dispatcher.states.values()):
            raise ApiError(422, f"no configured upstream runs {request.task} jobs", "task")
        if why := self.prompt_missing(request.task, request.prompt, request.upstream):
            raise ApiError(422, f"prompt is required: {why}", "prompt")
        clouds, others = self.candidates(request.task, request.upstream)
        if request.model is not None and others:
            raise ApiError(
                422, "model chooses a hosted-cloud model, and this job may go to "
                + ", ".join(others) + "; pin it to a cloud upstream with `upstream`", "model",
            )

    def prompt_missing(self, task: str, prompt: Any, pinned: str | None = None) -> str | None:
        """Why this job needs the prompt it lacks (None: it has one, or may go without). The one
        rule for the API, batches and retries; a blank prompt is no prompt."""
        if str(prompt or "").strip():
            return None
        if task in PROMPT_REQUIRED:
            return f"a {task} job renders its prompt"
        clouds, others = self.candidates(task, pinned)
        if clouds and not others:
            return f"the hosted cloud refuses {task} jobs without one"
        return None

    def candidates(self, task: str, pinned: str | None) -> tuple[list[Any], list[str]]:
        """The cloud upstreams a job may go to, and the names of the other ones."""
        clouds, others = [], []
        # A copy: batch planning asks from a worker thread while the loop may add a node.
        for state in list(self.dispatcher.states.values()):
            upstream = state.upstream
            if task in upstream.tasks and pinned in (None, upstream.name):
                if upstream.capabilities.chooses_models:
                    clouds.append(upstream)
                else:
                    others.append(upstream.name)
        return clouds, others

    async def _check_cloud_model(self, request: JobRequest) -> None:
        """Refuse a model the cloud does not offer (named, or the default) before anything is uploaded."""
        clouds, _ = self.candidates(request.task, request.upstream)
        params = {"model_cls": request.model} if request.model else None
        for cloud in clouds:
            try:
                await cloud.check_model(cloud.model_for(request.task, params))
            except Rejected as exc:
                raise ApiError(422, str(exc), "model") from None
            except Unavailable:
                pass  # cannot tell now (cloud down, token refused): the job waits for it

    async def _accept(
        self, request: JobRequest, files: list[IncomingFile], idempotency_key: str | None,
        owner: str | None, forward: UploadForward | None = None,
    ) -> tuple[Job, bool]:
        stored = await keep_files(files, self.store, owner)
        params = generation_params(request)
        if request.model is not None:
            params["model_cls"] = request.model
        inputs = {role: s.sha256 for role, s in stored.items()}
        fingerprint = hashlib.sha256(json.dumps(
            [request.task, params, inputs, request.priority, request.batch_id, request.upstream],
            sort_keys=True,
        ).encode()).hexdigest()
        # The seed is fixed now, so that a resubmission after a node restart renders the same video.
        params.setdefault("seed", secrets.randbelow(2**32))
        try:
            job, created = await self.store.create_job(
                task=request.task, params=params, inputs=inputs, priority=request.priority,
                batch_id=request.batch_id, owner=owner,
                # Each key has its own Idempotency-Keys: another key's "row-7" is not this one's.
                idempotency_key=f"{owner}:{idempotency_key}" if owner and idempotency_key else idempotency_key,
                request_hash=fingerprint, pinned=request.upstream,
            )
        except IdempotencyConflict:
            raise ApiError(
                409, "this Idempotency-Key was already used for a different request",
                "Idempotency-Key",
            ) from None
        if created:
            self.notifier.changed(job.id)
            if forward is None or not forward.hand_over(job):
                self.dispatcher.wake()
        return job, created

    def _upload_limits(self) -> dict[str, int]:
        mib = 1024 * 1024
        return {
            "max_bytes": self.settings.max_upload_mb * mib,
            "max_file_bytes": self.settings.max_file_mb * mib,
            "min_free_bytes": self.settings.min_free_disk_mb * mib,
        }

    def check_free_space(self, incoming: int = 0) -> None:
        """507 while the disk is short of space (`X2V_MIN_FREE_DISK_MB`), before a body is read."""
        check_free_space(self.blobs, self.settings.min_free_disk_mb * 1024 * 1024, incoming)

    async def purge(self, job_ids: list[str], actor: str, target: str) -> int:
        """Delete these jobs' inputs and videos now (a file another kept job uses stays); the jobs
        stay, marked `files_expired`. Unfinished ones are cancelled first. Returns files removed."""
        for job_id in job_ids:
            job = await self.store.get(job_id)
            if job is not None and not job.finished:
                await self.dispatcher.cancel(job_id)
        doomed = await self.store.purge_files(job_ids, actor, target)
        for sha in doomed:
            self.blobs.delete(sha)
        for job_id in job_ids:
            self.notifier.changed(job_id)
        return len(doomed)

    async def wait(self, job: Job, seconds: float) -> Job:
        """Block until the job finishes or `seconds` pass (the old S2V service's wait_for_completion)."""
        deadline = time.monotonic() + min(seconds, self.settings.max_wait)
        while not job.finished:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await self.notifier.wait(job.id, remaining)
            job = await self.store.get(job.id) or job
        return job

    # -- batches (the dashboard) ----------------------------------------------------------------

    async def keep_upload(
        self, content_type: str, body: AsyncIterator[bytes], owner: str | None = None,
    ) -> UploadedFile:
        """One file dropped on the batch form, checked by its content and kept in the blob store.

        The browser names the part `image` or `audio` from its guess (MIME type, extension); the
        content decides, so a voice-over with an odd extension is still taken as audio.
        """
        self.check_free_space()
        fields, files = await read_multipart(content_type, body, self.blobs, **self._upload_limits())
        name = fields.get("name") or "the file"
        if len(files) != 1:
            discard(files)
            raise ApiError(400, "send one file per upload", "file")
        incoming = files[0]
        try:
            if incoming.writer.size == 0:
                raise ApiError(422, f"{name} is an empty file", incoming.role)
            role, ext = await _identify(incoming.writer.tmp_path, incoming.role, name, owner)
        except BaseException:
            discard(files)
            raise
        sha, size = await asyncio.to_thread(incoming.writer.commit)
        await self.store.record_blob(sha, size, ext)
        return UploadedFile(name=name, sha256=sha, size=size, role=role)

    async def submit_batch(
        self, batch_id: str, specs: list[BatchJobSpec], *, batch: dict[str, Any] | None = None,
        owner: str | None = None,
    ) -> list[Job] | None:
        """Queue a batch of jobs whose inputs are already in the blob store: all of them or none.

        Returns None when a batch with this id was created already (the form sent twice).
        """
        for spec in specs:
            for role, sha in spec.inputs.items():
                if not self.blobs.exists(sha):
                    name = spec.files.get(role, role)
                    raise ApiError(422, f"{name} is no longer stored on the gateway; add it again", role)
            if why := self.prompt_missing(spec.task, spec.params.get("prompt")):
                raise ApiError(
                    422, f"{', '.join(spec.files.values()) or spec.task}: a prompt is required, {why}", "prompt",
                )
            # Fixed now, as for single jobs: a resubmission after a node restart renders the same video.
            spec.params.setdefault("seed", secrets.randbelow(2**32))
        jobs = await self.store.create_batch(batch_id, specs, batch=batch, owner=owner)
        if jobs:
            for job in jobs:
                self.notifier.changed(job.id)
            self.dispatcher.wake()
        return jobs

    async def run_again(self, job: Job, params: dict[str, Any], files: dict[str, str]) -> Job:
        """A new job with the inputs of `job` and edited parameters, in the same batch."""
        if job.files_expired or not all(self.blobs.exists(sha) for sha in job.inputs.values()):
            raise ApiError(410, "this job's input files have expired; submit it again with its files")
        if why := self.prompt_missing(job.task, params.get("prompt"), job.pinned):
            raise ApiError(422, f"prompt is required: {why}", "prompt")
        params.setdefault("seed", secrets.randbelow(2**32))
        if job.batch_id is None:
            new, _ = await self.store.create_job(
                task=job.task, params=params, inputs=dict(job.inputs), priority=job.priority,
                owner=job.owner, pinned=job.pinned,
            )
        else:
            spec = BatchJobSpec(
                task=job.task, params=params, inputs=dict(job.inputs), files=files,
                priority=job.priority, retry_of=job.id,
            )
            (new,) = await self.store.create_batch(job.batch_id, [spec], owner=job.owner) or []
        self.notifier.changed(new.id)
        self.dispatcher.wake()
        return new


@dataclass(frozen=True)
class UploadedFile:
    name: str
    sha256: str
    size: int
    role: str  # image | audio


async def _identify(path: Path, guess: str, name: str, owner: str | None) -> tuple[str, str]:
    """(role, extension) of an uploaded file, trying the browser's guess first."""
    other = "image" if guess == "audio" else "audio"
    try:
        return guess, await CHECKER.inspect(guess, path, owner)
    except MediaError as first:
        try:
            return other, await CHECKER.inspect(other, path, owner)
        except MediaError:
            raise ApiError(422, f"{name} {first}", guess) from None

