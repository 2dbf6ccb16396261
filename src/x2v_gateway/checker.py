"""Media checks in a helper process: the gateway never parses an untrusted file itself.

Every upload is checked by its content (Pillow for images, FFmpeg through PyAV for audio) and
every result is probed before a job succeeds. Those are large C code bases reading whatever a
client or an upstream sent. In a helper process, a file that crashes or hangs them costs a
refused file and a new helper, not the gateway with every upload and job it holds. It also keeps
their libraries (about 25 MiB) out of the gateway's memory.

One helper per gateway process, started on first use (or by `warm()`), one check at a time; a
check that takes longer than `timeout` seconds kills it, and the next check starts a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MediaError(ValueError):
    """The file is not what its field needs; the message says what is wrong."""


class CheckFailed(MediaError):
    """The checker crashed or ran out of time on a file: it is refused as unreadable."""


@dataclass(frozen=True, slots=True)
class VideoInfo:
    duration: float
    width: int
    height: int
    has_audio: bool


def _serve(conn: Connection) -> None:  # the helper process
    from . import media, render

    checks = {**media.INSPECTORS, "video": render.probe_video}
    while True:
        try:
            name, path = conn.recv()
        except (EOFError, OSError):
            return  # the gateway is gone
        try:
            reply: tuple[str, Any] = ("ok", checks[name](Path(path)))
        except FileNotFoundError as exc:
            reply = ("missing", str(exc))
        except ValueError as exc:  # MediaError included: what is wrong with the file
            reply = ("bad", str(exc))
        except Exception as exc:  # anything else a library raised on this file
            reply = ("bad", f"could not be checked ({type(exc).__name__})")
        conn.send(reply)


class MediaChecker:
    def __init__(self, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self._lock = threading.Lock()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None

    async def inspect(self, role: str, path: Path) -> str:
        """The extension of an `image`, `last_frame` or `audio` input; MediaError if it is not one."""
        return await asyncio.to_thread(self._check, role, path)

    async def probe_video(self, path: Path) -> VideoInfo:
        """What a video holds; ValueError when it is not a playable video (see render.probe_video)."""
        return await asyncio.to_thread(self._check, "video", path)

    @property
    def pid(self) -> int | None:
        """The helper's process id while one runs."""
        process = self._process
        return process.pid if process is not None and process.is_alive() else None

    def warm(self) -> None:
        """Start the helper in the background, so that the first upload does not wait for it."""
        threading.Thread(target=self._ensure_started, name="media-checker-start", daemon=True).start()

    def _ensure_started(self) -> Connection:
        with self._lock:
            return self._started()

    def _started(self) -> Connection:
        if self._process is not None and self._process.is_alive() and self._conn is not None:
            return self._conn
        self._stop()
        # spawn, not fork: a fork of a process that runs threads and an event loop is not safe.
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        process = context.Process(target=_serve, args=(theirs,), name="x2v-media-checker", daemon=True)
        process.start()
        theirs.close()
        self._process, self._conn = process, ours
        return ours

    def _check(self, name: str, path: Path) -> Any:
        with self._lock:
            # A helper that died since the last check (killed, out of memory) costs no file a
            # refusal: the check runs again in a new one. Twice in a row, the file is the cause.
            for attempt in (1, 2):
                conn = self._started()
                try:
                    conn.send((name, str(path)))
                    if not conn.poll(self.timeout):
                        log.warning("media checker: no answer on %s after %g s; restarting it", path.name, self.timeout)
                        self._stop()
                        raise CheckFailed(f"could not be checked within {self.timeout:g} s")
                    kind, value = conn.recv()
                    break
                except (EOFError, OSError):
                    log.warning("media checker died while checking %s; restarting it", path.name)
                    self._stop()
                    if attempt == 2:
                        raise CheckFailed("could not be checked (it made the media checker crash)") from None
        if kind == "ok":
            return value
        if kind == "missing":
            raise FileNotFoundError(value)
        raise MediaError(value)

    def _stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._process is not None:
            with contextlib.suppress(Exception):
                self._process.kill()
                self._process.join(5)
        self._process = self._conn = None

    def close(self) -> None:
        with self._lock:
            self._stop()


# One helper per process, shared by every app in it (tests run many).
CHECKER = MediaChecker()
