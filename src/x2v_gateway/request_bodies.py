"""Reading what a client sends, within the upload limits, before a job is checked.

A job's body (JSON, a multipart upload that may be forwarded to a node as it arrives, or a
URL-encoded form) becomes a `JobRequest` and its uploaded files; a compatible surface's form
becomes its text fields and files; a file dropped on the dashboard's batch form is checked by
its content and kept. Everything that can be refused on the headers (size, free disk) is refused
before a byte of the body is read. What is accepted is `JobService`'s (jobs.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from .auth import CSRF_FIELD
from .blobs import BlobStore
from .checker import CHECKER, MediaError
from .dispatch import Dispatcher
from .forward import UploadForward
from .inputs import (
    IncomingFile, check_free_space, discard, job_from_form, job_from_json, read_limited, read_multipart,
    urlencoded_fields,
)
from .schemas import ApiError, JobRequest
from .settings import Settings
from .store import JobStore

MIB = 1024 * 1024


@dataclass
class JobBody:
    """A job as its body said it: the request, its uploaded files (on disk, not yet kept) and,
    for a large upload, the forward that is sending them on to a node already."""

    request: JobRequest
    files: list[IncomingFile]
    forward: UploadForward | None = None


@dataclass(frozen=True)
class UploadedFile:
    name: str
    sha256: str
    size: int
    role: str  # image | audio | video


class BodyReader:
    """Request bodies read within the limits of `settings` into the blob store's spool."""

    def __init__(self, settings: Settings, store: JobStore, blobs: BlobStore, dispatcher: Dispatcher) -> None:
        self.settings = settings
        self.store = store
        self.blobs = blobs
        self.dispatcher = dispatcher

    def refuse_job_headers(self, content_type: str, size: int | None) -> None:
        """413 for a job body declared larger than allowed (whatever the free disk space), 507
        while the disk is short of space."""
        multipart = content_type.startswith("multipart/form-data")
        allowed_mb = self.settings.max_upload_mb if multipart else self.settings.max_json_mb
        if size is not None and size > allowed_mb * MIB:
            raise ApiError(413, f"request body is larger than the {allowed_mb} MiB allowed"
                           + ("" if multipart else "; send large files as multipart uploads"))
        self.check_free_space(size or 0)

    @asynccontextmanager
    async def job(
        self, content_type: str, body: AsyncIterator[bytes], *, size: int | None, owner: str | None,
    ) -> AsyncIterator[JobBody]:
        """A job as JSON, a multipart upload or a URL-encoded form of `size` bytes (when the
        client said). A large upload is sent on to a free node as it arrives (`forward`), and
        still kept and checked first; the forward ends when the block does."""
        forward = None
        try:
            if content_type.startswith("multipart/form-data"):
                if self.settings.forward_uploads and size is not None and size > self.settings.form_threshold_mb * MIB:
                    forward = UploadForward(self.dispatcher, owner, size)
                fields, files = await read_multipart(content_type, body, self.blobs, forward=forward, **self.limits())
                read = JobBody(*_from_form(fields, files), forward)
            elif content_type.startswith("application/x-www-form-urlencoded"):
                read = JobBody(*_from_form(await self._urlencoded(body), []))
            elif content_type.startswith("application/json") or not content_type:
                mb = self.settings.max_json_mb
                raw = await read_limited(body, mb * MIB, f"JSON body is larger than the {mb} MiB"
                                         " allowed; send large files as multipart uploads")
                read = JobBody(job_from_json(raw), [])
            else:
                raise ApiError(
                    415, "send the job as application/json, multipart/form-data or a URL-encoded form",
                    "Content-Type",
                )
            yield read
        finally:
            if forward is not None:
                await forward.close()

    async def form(
        self, content_type: str, body: AsyncIterator[bytes], *, size: int | None, roles: dict[str, str],
    ) -> tuple[dict[str, str], list[IncomingFile]]:
        """A compatible surface's form: its text fields, and its files (part name -> job input
        role by `roles`) on disk, within the upload limits. A URL-encoded form (FastAPI's `Form`
        reads those too) has text fields only."""
        if content_type.startswith("application/x-www-form-urlencoded"):
            return await self._urlencoded(body), []
        if not content_type.startswith("multipart/form-data"):
            raise ApiError(415, "send this request as multipart/form-data", "Content-Type")
        if size is not None and size > self.settings.max_upload_mb * MIB:
            raise ApiError(413, f"request body is larger than the {self.settings.max_upload_mb} MiB allowed")
        self.check_free_space(size or 0)
        return await read_multipart(content_type, body, self.blobs, roles=roles, **self.limits())

    async def keep_dropped(
        self, content_type: str, body: AsyncIterator[bytes], *, size: int, owner: str | None = None,
    ) -> UploadedFile:
        """One file of `size` bytes dropped on the batch form, checked by its content and kept in
        the blob store.

        The browser names the part `image` or `audio` from its guess (MIME type, extension); the
        content decides, so a voice-over with an odd extension is still taken as audio.
        """
        if not content_type.startswith("multipart/form-data"):
            raise ApiError(415, "upload files as multipart/form-data")
        # Refused on the headers, before a byte of the body is read.
        if size > self.settings.max_file_mb * MIB + 64 * 1024:
            raise ApiError(413, f"This file is larger than the {self.settings.max_file_mb} MiB a file may be")
        self.check_free_space(size)
        fields, files = await read_multipart(content_type, body, self.blobs, **self.limits())
        name = fields.get("name") or "the file"
        if len(files) != 1:
            discard(files)
            raise ApiError(400, "send one file per upload", "file")
        incoming = files[0]
        try:
            if incoming.writer.size == 0:
                raise ApiError(422, f"{name} is an empty file", incoming.role)
            role, ext = await _identify(await incoming.writer.written(), incoming.role, name, owner)
        except BaseException:
            discard(files)
            raise
        sha, size = await incoming.writer.commit()
        await self.store.record_blob(sha, size, ext)
        return UploadedFile(name=name, sha256=sha, size=size, role=role)

    def limits(self) -> dict[str, int]:
        return {
            "max_bytes": self.settings.max_upload_mb * MIB,
            "max_file_bytes": self.settings.max_file_mb * MIB,
            "min_free_bytes": self.settings.min_free_disk_mb * MIB,
        }

    def check_free_space(self, incoming: int = 0) -> None:
        """507 while the disk is short of space (`X2V_MIN_FREE_DISK_MB`), before a body is read."""
        check_free_space(self.blobs, self.settings.min_free_disk_mb * MIB, incoming)

    async def _urlencoded(self, body: AsyncIterator[bytes]) -> dict[str, str]:
        mb = self.settings.max_json_mb
        raw = await read_limited(body, mb * MIB, f"form body is larger than the {mb} MiB allowed")
        fields: dict[str, str] = {}
        for name, value in urlencoded_fields(raw):
            if name in fields:
                raise ApiError(400, f"{name} was sent twice", name)
            fields[name] = value
        return fields


def refuse_doubled_inputs(request: JobRequest, files: list[IncomingFile]) -> None:
    """400 for an input sent both as an uploaded file and as text (a URL, base64)."""
    for role in {f.role for f in files}:
        if getattr(request, role):
            raise ApiError(400, f"{role} was sent both as a file and as text", role)


def _from_form(fields: dict[str, str], files: list[IncomingFile]) -> tuple[JobRequest, list[IncomingFile]]:
    try:
        # A signed-in dashboard form carries its CSRF token as a field, which the auth
        # middleware has checked: it is not a job parameter.
        request = job_from_form({name: value for name, value in fields.items() if name != CSRF_FIELD})
        refuse_doubled_inputs(request, files)
    except BaseException:
        discard(files)
        raise
    return request, files


async def _identify(path: Path, guess: str, name: str, owner: str | None) -> tuple[str, str]:
    """(role, extension) of an uploaded file, trying the browser's guess first. A video is
    taken only when the browser named it one (animate's driving video): an MP4 guessed to be
    audio stays audio."""
    others = {"image": ("audio",), "audio": ("image",), "video": ("image", "audio")}.get(guess, ("audio",))
    try:
        return guess, await CHECKER.inspect(guess, path, owner)
    except MediaError as first:
        for other in others:
            try:
                return other, await CHECKER.inspect(other, path, owner)
            except MediaError:
                pass
        raise ApiError(422, f"{name} {first}", guess) from None
