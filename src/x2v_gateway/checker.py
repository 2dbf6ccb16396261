"""Media checks in a helper process: the gateway never parses an untrusted file itself.

Every upload is checked by its content (Pillow for images, FFmpeg through PyAV for audio) and
every result is probed before a job succeeds. Those are large C code bases reading whatever a
client or an upstream sent. In a helper process, a file that crashes or hangs them costs a
refused file and a new helper, not the gateway with every upload and job it holds. It also keeps
their libraries (about 25 MiB) out of the gateway's memory.

A small pool of helpers per gateway process (`X2V_MEDIA_CHECKERS`, default 2), each started on
first use (or by `warm()`) and running one check at a time. A check that takes longer than
`timeout` seconds kills its helper, and the next check starts a new one. One owner (an API key)
has at most all helpers but one at once: a tenant uploading slow or hostile files waits for its
own checks, while everyone else's still get a helper.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import multiprocessing
import threading
from concurrent.futures import Future
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from . import media
from .media import ImageInfo, MediaError, VideoInfo

__all__ = ["CHECKER", "CheckFailed", "ImageInfo", "MediaChecker", "MediaError", "VideoInfo"]

log = logging.getLogger(__name__)


class CheckFailed(MediaError):
    """The checker crashed or ran out of time on a file: it is refused as unreadable."""


def _serve(conn: Connection) -> None:  # the helper process
    checks = {**media.INSPECTORS, "result_video": media.probe_video, "result_image": media.probe_image}
    while True:
        try:
            name, path, options = conn.recv()
        except (EOFError, OSError):
            return  # the gateway is gone
        try:
            if "poster" in options:
                options["poster"] = Path(options["poster"])
            reply: tuple[str, Any] = ("ok", checks[name](Path(path), **options))
        except FileNotFoundError as exc:
            reply = ("missing", str(exc))
        except ValueError as exc:  # MediaError included: what is wrong with the file
            reply = ("bad", str(exc))
        except Exception as exc:  # anything else a library raised on this file
            reply = ("bad", f"could not be checked ({type(exc).__name__})")
        conn.send(reply)


class _Helper:
    """One helper process and the pipe to it; used by one check at a time (the pool sees to it)."""

    def __init__(self) -> None:
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.is_alive() else None

    def started(self) -> Connection:
        if self._process is not None and self._process.is_alive() and self._conn is not None:
            return self._conn
        self.stop()
        # spawn, not fork: a fork of a process that runs threads and an event loop is not safe.
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        process = context.Process(target=_serve, args=(theirs,), name="x2v-media-checker", daemon=True)
        process.start()
        theirs.close()
        self._process, self._conn = process, ours
        return ours

    def check(self, name: str, path: Path, options: dict[str, Any], timeout: float) -> Any:
        # A helper that died since the last check (killed, out of memory) costs no file a
        # refusal: the check runs again in a new one. Twice in a row, the file is the cause.
        for attempt in (1, 2):
            conn = self.started()
            try:
                conn.send((name, str(path), options))
                if not conn.poll(timeout):
                    log.warning("media checker: no answer on %s after %g s; restarting it", path.name, timeout)
                    self.stop()
                    raise CheckFailed(f"could not be checked within {timeout:g} s")
                kind, value = conn.recv()
                break
            except (EOFError, OSError):
                log.warning("media checker died while checking %s; restarting it", path.name)
                self.stop()
                if attempt == 2:
                    raise CheckFailed("could not be checked (it made the media checker crash)") from None
        if kind == "ok":
            return value
        if kind == "missing":
            raise FileNotFoundError(value)
        raise MediaError(value)

    def stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._process is not None:
            with contextlib.suppress(Exception):
                self._process.kill()
                self._process.join(5)
        self._process = self._conn = None


class MediaChecker:
    """The pool of helpers. `owner` is who asked (an API key's id; None: the gateway's own
    checks of results), so that no one owner holds every helper."""

    def __init__(self, timeout: float = 60.0, workers: int = 2, max_megapixels: float = 40.0) -> None:
        self.timeout = timeout
        self.max_megapixels = max_megapixels
        self._lock = threading.Lock()
        self._workers = workers
        self._helpers: list[_Helper] = []
        self._idle: list[_Helper] = []
        self._busy: collections.Counter[str | None] = collections.Counter()  # checks running per owner
        self._waiting: collections.deque[tuple[str | None, Future[_Helper]]] = collections.deque()
        self.configure(workers=workers)

    def configure(self, *, workers: int | None = None, max_megapixels: float | None = None) -> None:
        """Resize the pool (`X2V_MEDIA_CHECKERS`) and set the image size limit, from settings."""
        with self._lock:
            if max_megapixels is not None:
                self.max_megapixels = max_megapixels
            if workers is not None:
                self._workers = workers
            while len(self._helpers) < self._workers:
                helper = _Helper()
                self._helpers.append(helper)
                self._idle.append(helper)
            # Too many now: idle ones go at once, busy ones when their check ends (`_release`).
            while len(self._helpers) > self._workers and self._idle:
                helper = self._idle.pop()
                self._helpers.remove(helper)
                helper.stop()
            self._admit()

    @property
    def per_owner(self) -> int:
        """Checks one owner may run at once: every helper but one, so another owner gets one."""
        return max(1, self._workers - 1)

    async def inspect(self, role: str, path: Path, owner: str | None = None) -> str:
        """The extension of an `image`, `last_frame`, `audio` or `video` input; MediaError if it is not one."""
        options = {"max_pixels": int(self.max_megapixels * 1_000_000)} if role != "audio" else {}
        return await self._check(role, path, options, owner)

    async def probe_video(self, path: Path, owner: str | None = None, *, poster: Path | None = None) -> VideoInfo:
        """What a video holds; ValueError when it is not a playable video (see media.probe_video).
        With `poster`, its first frame is written there as a JPEG, if it can be."""
        return await self._check("result_video", path, {"poster": str(poster)} if poster else {}, owner)

    async def probe_image(self, path: Path, owner: str | None = None, *, poster: Path | None = None) -> ImageInfo:
        """What an image result holds; ValueError when it does not decode (media.probe_image).
        With `poster`, a JPEG thumbnail of it is written there."""
        options: dict[str, Any] = {"max_pixels": int(self.max_megapixels * 1_000_000)}
        if poster:
            options["poster"] = str(poster)
        return await self._check("result_image", path, options, owner)

    @property
    def pid(self) -> int | None:
        """The process id of a helper that runs (the first one), if any."""
        return next((helper.pid for helper in self._helpers if helper.pid is not None), None)

    def warm(self) -> None:
        """Start one helper in the background, so that the first upload does not wait for it."""
        def start() -> None:
            with self._lock:
                helper = self._idle[-1] if self._idle else None
                if helper is not None:
                    self._idle.remove(helper)
            if helper is not None:
                try:
                    helper.started()
                finally:
                    self._release(helper, None, counted=False)

        threading.Thread(target=start, name="media-checker-start", daemon=True).start()

    async def _check(self, name: str, path: Path, options: dict[str, Any], owner: str | None) -> Any:
        # Waiting for a helper happens here, on the event loop, not in a thread: a tenant's queue
        # of uploads must not hold the threads everyone else's work runs on.
        turn: Future[_Helper] = Future()
        with self._lock:
            self._waiting.append((owner, turn))
            self._admit()
        try:
            helper = await asyncio.wrap_future(turn)
        except asyncio.CancelledError:
            with self._lock:
                handed = turn.done() and not turn.cancelled()
                if not handed:
                    turn.cancel()
            if handed:
                self._release(turn.result(), owner)
            raise
        try:
            return await asyncio.to_thread(helper.check, name, path, options, self.timeout)
        finally:
            self._release(helper, owner)

    def _admit(self) -> None:
        """Hand idle helpers to waiting checks, in order, skipping owners at their limit."""
        for owner, turn in list(self._waiting):
            if not self._idle:
                return
            if not turn.cancelled() and self._busy[owner] >= self.per_owner:
                continue  # this owner's turn comes when one of its checks ends
            self._waiting.remove((owner, turn))
            # False when the check was given up meanwhile (its request went away).
            if turn.set_running_or_notify_cancel():
                self._busy[owner] += 1
                turn.set_result(self._idle.pop())

    def _release(self, helper: _Helper, owner: str | None, *, counted: bool = True) -> None:
        with self._lock:
            if counted:
                self._busy[owner] -= 1
                if self._busy[owner] <= 0:
                    del self._busy[owner]
            if len(self._helpers) > self._workers:  # `configure` made the pool smaller meanwhile
                self._helpers.remove(helper)
                helper.stop()
            else:
                self._idle.append(helper)
            self._admit()

    def close(self) -> None:
        """Stop the idle helpers (a busy one finishes its check); the next check starts one again."""
        with self._lock:
            for helper in self._idle:
                helper.stop()


# One pool per process, shared by every app in it (tests run many); sized from the settings.
CHECKER = MediaChecker()
