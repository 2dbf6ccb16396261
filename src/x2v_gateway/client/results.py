"""An output folder of `submit` and `download`: the videos, a manifest.csv, and a journal.

The journal, `.x2v-client.jsonl`, is what a second run reads to go on where the first stopped:
the folder's batch and gateway, each job made (with the Idempotency-Key it was made with), each
video downloaded. A line is appended and flushed the moment the thing it records happened, so a
client killed at any point loses at most the line it was writing (a torn last line is skipped).
A video takes its final name only once its sha256 matched (`GatewayAPI.download`), so a file
under that name is whole; a file with the size and sha256 the API reports is not fetched again.
"""

from __future__ import annotations

import csv
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

from .api import USAGE, ClientError
from .plan import PlannedJob, file_sha256

JOURNAL = ".x2v-client.jsonl"
MANIFEST = "manifest.csv"
_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}

MANIFEST_FIELDS = (
    "file", "job_id", "number", "source", "state", "task", "image", "audio", "prompt",
    "negative_prompt", "seed", "parameters", "node", "attempts", "created_at", "started_at",
    "finished_at", "error", "sha256",
)
# A spreadsheet reads a cell starting with one of these as a formula (OWASP's "CSV injection"):
# a leading `'` keeps it text, as the dashboard's manifest.csv does.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class ResultsFolder:
    """One output folder, which holds one batch of one gateway."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ClientError(f"--out / DIR: cannot make the folder {path} ({exc.strerror})", USAGE) from None
        self.batch_id: str | None = None
        self.gateway: str | None = None
        self.made: dict[str, dict[str, Any]] = {}  # Idempotency-Key -> what the job was made from
        self.jobs: dict[str, dict[str, Any]] = {}  # job id -> the same
        self.videos: dict[str, dict[str, Any]] = {}  # job id -> the file downloaded, its sha256, size, mtime
        self._names: dict[str, str] = {}  # job id -> its video's name, once chosen
        self._lock = threading.Lock()
        self._read()

    def _read(self) -> None:
        journal = self.path / JOURNAL
        if not journal.exists():
            return
        for line in journal.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # the line a killed run was writing
            if "batch_id" in entry:
                self.batch_id, self.gateway = entry["batch_id"], entry.get("gateway")
            elif "key" in entry:
                self.made[entry["key"]] = self.jobs[entry["job_id"]] = entry
            elif "video" in entry:
                self.videos[entry["job_id"]] = entry

    def _append(self, entry: dict[str, Any]) -> None:
        with self._lock, (self.path / JOURNAL).open("a") as journal:
            journal.write(json.dumps(entry) + "\n")

    def start(self, batch_id: str, gateway: str) -> None:
        """Make this the folder of `batch_id` on `gateway`, or check that it is."""
        if self.batch_id is None:
            self.batch_id, self.gateway = batch_id, gateway
            self._append({"batch_id": batch_id, "gateway": gateway})
        elif self.gateway != gateway:
            raise ClientError(f"--out / DIR: {self.path} holds results from {self.gateway}, not {gateway};"
                              " choose another folder", USAGE)
        elif self.batch_id != batch_id:
            raise ClientError(f"--out / DIR: {self.path} holds batch {self.batch_id}, not {batch_id};"
                              " choose another folder", USAGE)

    def record_job(self, key: str, job_id: str, planned: PlannedJob) -> None:
        """A job was made (or found made, by its key): remembered before anything else happens."""
        entry = {
            "key": key, "job_id": job_id, "number": planned.number, "source": planned.source,
            "files": {role: path.name for role, path in planned.files.items()},
        }
        with self._lock:
            self.made[key] = self.jobs[job_id] = entry
        self._append(entry)

    def video_name(self, job: dict[str, Any], position: int) -> str:
        """`0007_face_voice.mp4`: the job's number and its files (as the dashboard's zip names
        them), or its place in the batch and its id for a job this folder did not make."""
        if job["id"] in self.videos:
            return self.videos[job["id"]]["video"]
        if job["id"] in self._names:
            return self._names[job["id"]]
        made = self.jobs.get(job["id"])
        parts = [f"{made['number']:04d}", *(Path(n).stem for n in made["files"].values())] if made \
            else [f"{position:04d}", job["id"]]
        label = re.sub(r"[^\w.\-]+", "-", "_".join(parts)).strip("-")[:120] or job["id"]
        # An image job's result (t2i, i2i) is an image: named for its type, as the zip names it.
        ext = _EXTENSIONS.get((job.get("result") or {}).get("media_type", ""), "mp4")
        name, n = f"{label}.{ext}", 1
        taken = {v["video"] for v in self.videos.values()} | set(self._names.values())
        while name in taken:
            n += 1
            name = f"{label}-{n}.{ext}"
        self._names[job["id"]] = name
        return name

    def has_video(self, job: dict[str, Any], name: str) -> bool:
        """Whether the job's video is already here (then it is recorded as downloaded)."""
        result = job["result"]
        target = self.path / name
        try:
            stat = target.stat()
        except FileNotFoundError:
            return False
        known = self.videos.get(job["id"])
        if known and known["sha256"] == result["sha256"] and (known["size"], known["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns):
            return True  # recorded by an earlier run, untouched since: not read again
        if result.get("size") not in (None, stat.st_size) or file_sha256(target) != result["sha256"]:
            return False
        self.record_video(job, name)
        return True

    def record_video(self, job: dict[str, Any], name: str) -> None:
        stat = (self.path / name).stat()
        entry = {"job_id": job["id"], "video": name, "sha256": job["result"]["sha256"],
                 "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        with self._lock:
            self.videos[job["id"]] = entry
        self._append(entry)

    def write_manifest(self, jobs: list[dict[str, Any]]) -> None:
        """manifest.csv: a line per job, in the order of the inputs (then of the batch, for jobs
        this folder did not make), written whole and then renamed (never half a file)."""
        order = {job["id"]: n for n, job in enumerate(jobs)}
        jobs = sorted(jobs, key=lambda j: (self.jobs.get(j["id"], {}).get("number", len(jobs)), order[j["id"]]))
        part = self.path / (MANIFEST + ".part")
        with part.open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=MANIFEST_FIELDS)
            writer.writeheader()
            for job in jobs:
                writer.writerow({k: _as_text(v) for k, v in self._manifest_row(job).items()})
        os.replace(part, self.path / MANIFEST)

    def _manifest_row(self, job: dict[str, Any]) -> dict[str, Any]:
        params = dict(job["params"])
        made = self.jobs.get(job["id"], {})
        video = self.videos.get(job["id"])
        current = video is not None and job.get("result") and video["sha256"] == job["result"]["sha256"]
        return {
            "file": video["video"] if current else "", "job_id": job["id"],
            "number": made.get("number", ""), "source": made.get("source", ""), "state": job["state"],
            "task": job["task"], "image": made.get("files", {}).get("image", ""),
            "audio": made.get("files", {}).get("audio", ""), "prompt": params.pop("prompt", ""),
            "negative_prompt": params.pop("negative_prompt", ""), "seed": params.pop("seed", ""),
            "parameters": json.dumps(params, sort_keys=True) if params else "",
            "node": job.get("upstream") or "", "attempts": job.get("attempts", ""),
            "created_at": job.get("created_at") or "", "started_at": job.get("started_at") or "",
            "finished_at": job.get("finished_at") or "", "error": job.get("error") or "",
            "sha256": (job.get("result") or {}).get("sha256", ""),
        }


def _as_text(cell: Any) -> Any:
    if isinstance(cell, str) and cell.startswith(_FORMULA_STARTS):
        return "'" + cell
    return cell
