"""Running a batch from the command line: submitting it, following it, downloading its videos.

`submit_batch` uploads the planned jobs a few at a time while `follow` reads the batch every
`interval` seconds and hands each video to a downloader as its job succeeds, so the first
videos are on disk while later jobs still upload. Progress is drawn on stderr (rich), never on
stdout, which keeps the summary or the `--json` answer for pipes.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .api import OK, PATIENCE_SECONDS, SOME_FAILED, TERMINAL, UNFINISHED, UNREACHABLE, ClientError, GatewayAPI, poll
from .plan import PlannedJob, derive_batch_id, fingerprint, idempotency_keys
from .results import ResultsFolder

STATES = ("queued", "submitted", "running", "succeeded", "failed", "cancelled")


class Display:
    """The progress bars on stderr: uploads (bytes), jobs (finished of all), downloads."""

    def __init__(self, enabled: bool) -> None:
        self.progress = None
        self._tasks: dict[str, Any] = {}
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn

            self.progress = Progress(
                TextColumn("{task.description:<9}"), BarColumn(bar_width=30),
                TextColumn("{task.fields[detail]}"),
                console=Console(stderr=True), refresh_per_second=5,
            )

    def __enter__(self) -> Display:
        return self  # drawn from the first bar on: `cancel` and `retry` draw none

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None and self._tasks:
            self.progress.refresh()
            self.progress.stop()

    def note(self, text: str) -> None:
        """A line above the bars: a job that failed, a video that could not be fetched."""
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)

    def bar(self, name: str, total: float, completed: float, detail: str) -> None:
        if self.progress is None:
            return
        if not self._tasks:
            self.progress.start()
        if name not in self._tasks:
            self._tasks[name] = self.progress.add_task(name, total=total or 1, detail="")
        self.progress.update(self._tasks[name], total=total or 1, completed=completed if total else 1, detail=detail)


@dataclass
class Uploads:
    """The submits in flight, and what they sent so far (the upload bar)."""

    total_bytes: int
    jobs: int
    futures: list[Future] = field(default_factory=list)
    sent: int = 0
    made: int = 0
    replayed: int = 0

    def count(self, n: int) -> None:
        self.sent += n  # one `+=` from each upload thread: a bar may be a chunk off, never wrong

    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def check(self) -> None:
        """Stop at the first submit the gateway refused (nothing more is sent), with its reason."""
        for future in self.futures:
            if future.done() and future.exception() is not None:
                for other in self.futures:
                    other.cancel()
                raise future.exception()  # type: ignore[misc]

    def detail(self) -> str:
        text = f"{_size(self.sent)}/{_size(self.total_bytes)} · {self.made + self.replayed}/{self.jobs} jobs"
        return text + (f" ({self.replayed} made before)" if self.replayed else "")


def _size(n: int) -> str:
    """`36 kB`, `1.2 MB`, `2.0 GB`."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.0f} kB"


@dataclass
class Outcome:
    """What a followed batch came to: the final states, and where the videos went."""

    batch_id: str
    jobs: list[dict[str, Any]]
    folder: ResultsFolder | None = None
    submitted_only: bool = False  # `submit --no-wait`: its jobs are not expected to have finished

    @property
    def counts(self) -> dict[str, int]:
        seen = Counter(job["state"] for job in self.jobs)
        return {state: seen[state] for state in STATES}

    @property
    def code(self) -> int:
        counts = self.counts
        if self.submitted_only:
            return OK
        if any(counts[s] for s in STATES if s not in TERMINAL):
            return UNFINISHED
        return SOME_FAILED if counts["failed"] or counts["cancelled"] else OK

    def as_json(self) -> dict[str, Any]:
        folder = self.folder

        def line(job: dict[str, Any]) -> dict[str, Any]:
            made = folder.jobs.get(job["id"], {}) if folder else {}
            video = folder.videos.get(job["id"]) if folder else None
            return {
                "id": job["id"], "number": made.get("number"), "source": made.get("source"),
                "state": job["state"], "error": job.get("error"),
                "file": str(folder.path / video["video"]) if folder and video else None,
            }

        return {"batch_id": self.batch_id, "counts": self.counts, "out": str(folder.path) if folder else None,
                "jobs": [line(job) for job in self.jobs]}

    def summary(self) -> str:
        counts = self.counts
        text = f"batch {self.batch_id}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) if self.jobs \
            else f"batch {self.batch_id}: no jobs"
        if self.folder is not None:
            text += f"; videos and {self.folder.path / 'manifest.csv'}"
        return text


def _jobs_detail(jobs: list[dict[str, Any]], total: int) -> str:
    counts = Counter(job["state"] for job in jobs)
    done = sum(counts[s] for s in TERMINAL)
    ended = ", ".join(f"{counts[s]} {s}" for s in ("succeeded", "failed", "cancelled") if counts[s])
    busy = counts["submitted"] + counts["running"]
    waiting = counts["queued"] + max(0, total - len(jobs))
    text = f"{done}/{total} finished" + (f": {ended}" if ended else "")
    return text + (f" · {busy} running, {waiting} queued" if busy or waiting else "")


class Downloads:
    """The videos being fetched into a folder: one per succeeded job, and again when a retry of
    the job made a new one (its sha256 changed); a video already in the folder is kept."""

    def __init__(self, api: GatewayAPI, folder: ResultsFolder) -> None:
        self.api, self.folder = api, folder
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="download")
        self._asked: dict[str, tuple[str, Future]] = {}  # job id -> (its video's sha256, the download)

    def take(self, jobs: list[dict[str, Any]]) -> None:
        for position, job in enumerate(jobs, start=1):
            result = job.get("result")
            if job["state"] != "succeeded" or not result:
                continue
            if job["id"] in self._asked and self._asked[job["id"]][0] == result["sha256"]:
                continue
            name = self.folder.video_name(job, position)
            future = _done() if self.folder.has_video(job, name) else self._pool.submit(self._fetch, job, name)
            self._asked[job["id"]] = (result["sha256"], future)

    def _fetch(self, job: dict[str, Any], name: str) -> None:
        # A connection that broke off (the gateway restarting) or bytes that arrived damaged:
        # tried again as long as other requests wait for the gateway, backing off as they do.
        give_up = time.monotonic() + PATIENCE_SECONDS
        attempt = 0
        while True:
            attempt += 1
            try:
                self.api.download(job, self.folder.path / name)
                break
            except ClientError as exc:
                if exc.code != UNREACHABLE or time.monotonic() >= give_up:
                    raise
                GatewayAPI.pause(attempt, None, give_up)
        self.folder.record_video(job, name)

    def check(self) -> int:
        """How many have ended; the first that failed stops the command, with its reason."""
        ended = 0
        for _, future in self._asked.values():
            if future.done():
                if future.exception() is not None:
                    raise future.exception()  # type: ignore[misc]
                ended += 1
        return ended

    @property
    def asked(self) -> int:
        return len(self._asked)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def follow(
    api: GatewayAPI, batch_id: str, display: Display, *, folder: ResultsFolder | None = None,
    uploads: Uploads | None = None, expected: int | None = None, wait: bool = True,
    interval: float = 0.5,
) -> Outcome:
    """Follow the batch until every job has finished (or, without `wait`, once), downloading
    each video into `folder` as its job succeeds. With `uploads`, only the jobs `folder` made
    are followed, and the batch is read until every submit has returned."""
    downloads = Downloads(api, folder) if folder is not None else None
    failed_noted: set[str] = set()
    got = 0
    snapshot: list[dict[str, Any]] | None = None  # without `wait`: the jobs as they were at first
    try:
        for jobs in poll(api, batch_id, interval):
            if snapshot is not None:
                jobs = snapshot  # read again only to pace the wait for the downloads
            elif not wait:
                snapshot = jobs
            if uploads is not None:
                uploads.check()
                assert folder is not None
                jobs = [job for job in jobs if job["id"] in folder.jobs]
                display.bar("uploads", uploads.total_bytes, uploads.sent, uploads.detail())
            total = max(expected or 0, len(jobs))
            done = sum(job["state"] in TERMINAL for job in jobs)
            display.bar("jobs", total, done, _jobs_detail(jobs, total))
            for job in jobs:
                if job["state"] == "failed" and job["id"] not in failed_noted:
                    failed_noted.add(job["id"])
                    display.note(f"failed: {job['id']}: {job.get('error') or 'no reason given'}")
            if folder is not None and downloads is not None:
                downloads.take(jobs)
                now = downloads.check()
                if now != got or done == len(jobs):
                    folder.write_manifest(jobs)
                    got = now
                display.bar("downloads", downloads.asked, now, f"{now}/{downloads.asked} videos in {folder.path}")
            submitting = uploads is not None and not uploads.done()
            # As the bars show it: the last frame drawn is the state the command ends on.
            fetched = downloads is None or got == downloads.asked
            if not submitting and fetched and (not wait or done == total):
                if folder is not None:
                    folder.write_manifest(jobs)
                return Outcome(batch_id, jobs, folder)
    finally:
        if downloads is not None:
            downloads.close()
    raise AssertionError("unreachable")


def _done() -> Future:
    future: Future = Future()
    future.set_result(None)
    return future


def submit_batch(
    api: GatewayAPI, planned: list[PlannedJob], out: Path | None, display: Display, *,
    parallel: int, wait: bool, interval: float = 0.5,
) -> Outcome:
    """Submit the jobs the output folder has not made yet, and (with `wait`) follow the batch to
    its end, downloading each video as it is ready. A job is never made twice: one made in an
    earlier run is in the folder's journal, and one whose answer was lost is found by its
    Idempotency-Key (the gateway answers with the job it made).

    The folder keeps the batch it was first used for (jobs added to the inputs later join it);
    without one (`out` None), the folder is named for the batch."""
    me = api.me()  # the URL and the key work, before anything is read or sent
    fingerprint(planned)
    folder = ResultsFolder(out) if out is not None else None
    batch_id = (folder and folder.batch_id) or derive_batch_id(planned, str(me.get("id", "")))
    folder = folder or ResultsFolder(Path(batch_id))
    folder.start(batch_id, api.url)
    todo = [(job, key) for job, key in zip(planned, idempotency_keys(planned, batch_id)) if key not in folder.made]
    uploads = Uploads(total_bytes=sum(job.upload_bytes for job, _ in todo), jobs=len(planned))
    uploads.replayed = len(planned) - len(todo)
    display.bar("uploads", uploads.total_bytes, 0, uploads.detail())

    def submit_one(job: PlannedJob, key: str) -> None:
        view, made = api.submit({**job.fields, "batch_id": batch_id}, job.files, key, uploads.count)
        folder.record_job(key, view["id"], job)
        if made:
            uploads.made += 1
        else:
            uploads.replayed += 1

    pool = ThreadPoolExecutor(parallel, thread_name_prefix="upload")
    uploads.futures = [pool.submit(submit_one, job, key) for job, key in todo]
    try:
        if not wait:
            while not uploads.done():
                uploads.check()
                display.bar("uploads", uploads.total_bytes, uploads.sent, uploads.detail())
                time.sleep(0.2)
            uploads.check()
            display.bar("uploads", uploads.total_bytes, uploads.sent, uploads.detail())
            jobs = [job for job in api.batch_jobs(batch_id) if job["id"] in folder.jobs]
            return Outcome(batch_id, jobs, folder, submitted_only=True)
        return follow(api, batch_id, display, folder=folder, uploads=uploads, expected=len(planned),
                      interval=interval)
    finally:
        # Not waited for here: on Ctrl-C the command ends at once (a job an upload in flight
        # makes is found by its key next time); on a refusal the uploads in flight still end,
        # and record their jobs, before the process exits.
        pool.shutdown(wait=False, cancel_futures=True)


def download_batch(api: GatewayAPI, batch_id: str, out: Path, display: Display, *, wait: bool) -> Outcome:
    """Every finished video of the batch into `out`, skipping those already there."""
    folder = ResultsFolder(out)
    if not api.batch_jobs(batch_id):
        raise ClientError(f"no batch {batch_id} (or none of its jobs is this key's)")
    folder.start(batch_id, api.url)
    return follow(api, batch_id, display, folder=folder, wait=wait)
