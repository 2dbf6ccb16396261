"""Accepting a job: request → validated struct → input files kept → queued row → dispatcher woken."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl

import httpx
import msgspec

from .blobs import BlobStore
from .dispatch import Dispatcher, Notifier
from .inputs import IncomingFile, discard, fetch_input, keep_files, read_multipart
from .models import INPUT_ROLES, TASK_INPUTS, ApiError, JobRequest, generation_params
from .settings import Settings
from .store import IdempotencyConflict, Job, JobStore

_MSGSPEC_PATH = re.compile(r"at `\$\.(\w+)")
_MSGSPEC_FIELD = re.compile(r"field `(\w+)`")


def validation_error(exc: msgspec.ValidationError | msgspec.DecodeError) -> ApiError:
    """msgspec's message, with the field it is about pulled out for the `field` key."""
    message = str(exc)
    match = _MSGSPEC_PATH.search(message) or _MSGSPEC_FIELD.search(message)
    if isinstance(exc, msgspec.DecodeError) and not match:
        return ApiError(400, f"request body is not valid JSON: {message}")
    return ApiError(422, message, match.group(1) if match else None)


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
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise validation_error(exc) from None
        self._check_inputs(request, given=set())
        files: list[IncomingFile] = []
        max_bytes = self.settings.max_upload_mb * 1024 * 1024
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
    ) -> tuple[Job, bool]:
        max_bytes = self.settings.max_upload_mb * 1024 * 1024
        fields, files = await read_multipart(content_type, body, self.blobs, max_bytes=max_bytes)
        return await self._submit_form(fields, files, idempotency_key, owner)

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
        for name, value in parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True):
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
    ) -> tuple[Job, bool]:
        max_bytes = self.settings.max_upload_mb * 1024 * 1024
        try:
            values = {}
            for name, value in fields.items():
                if value.strip() == "":
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
            for role in INPUT_ROLES:
                value = getattr(request, role)
                if value and role not in uploaded:
                    files.append(await fetch_input(role, value, self.blobs, self.http, max_bytes=max_bytes))
        except BaseException:
            discard(files)
            raise
        return await self._accept(request, files, idempotency_key, owner)

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

    async def _accept(
        self, request: JobRequest, files: list[IncomingFile], idempotency_key: str | None,
        owner: str | None,
    ) -> tuple[Job, bool]:
        stored = await keep_files(files, self.store)
        params = generation_params(request)
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
                batch_id=request.batch_id, owner=owner, idempotency_key=idempotency_key,
                request_hash=fingerprint, pinned=request.upstream,
            )
        except IdempotencyConflict:
            raise ApiError(
                409, "this Idempotency-Key was already used for a different request",
                "Idempotency-Key",
            ) from None
        if created:
            self.notifier.changed(job.id)
            self.dispatcher.wake()
        return job, created

    async def wait(self, job: Job, seconds: float) -> Job:
        """Block until the job finishes or `seconds` pass (the old S2V service's wait_for_completion)."""
        deadline = time.monotonic() + min(seconds, self.settings.max_wait)
        while not job.finished:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await self.notifier.wait(job.id, remaining)
            job = self.store.get(job.id) or job
        return job

