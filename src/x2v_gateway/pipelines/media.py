"""A pipeline's media work, with PyAV: a long speech split at its silences, a clip's last frame,
clips joined into one MP4. Each function runs in a helper process (`MediaPool`), never on the
event loop nor in the gateway itself: it decodes whole files, and FFmpeg reading what a client
or an upstream sent can crash or hang.

No numpy here (the gateway does not ship it): samples are handled as bytes and `array`s.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing
import os
import select
import threading
import time
import wave
from array import array
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("x2v_gateway.pipelines")

# The silence search works on a small copy of the sound: mono, this many samples a second,
# in windows of this many seconds.
_ANALYSIS_RATE = 4000
_WINDOW = 0.05
# A cut goes where the sound is quietest between half and all of a part's longest length.
_EARLIEST_CUT = 0.5
# The joined video's sound: AAC at 48 kHz, stereo (a clip's own sound, or a speech's, resampled).
_OUT_RATE = 48000
_BYTES_PER_SAMPLE = 4  # s16, two channels
# Parts of one audio whose offsets and spans (rounded to the millisecond) meet within this many
# samples follow on from each other.
_CONTINUOUS = _OUT_RATE // 100


class MediaPool:
    """One helper process for a pipeline's media work: one split or join at a time, so that a
    burst of pipelines finishing at once costs one core, not all of them."""

    def __init__(self, workers: int = 1) -> None:
        self._workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._lock = asyncio.Lock()

    async def run(self, fn: Callable[..., T], *args: Any, timeout: float = 120.0) -> T:
        """`fn(*args)` in the helper; ValueError if it fails, crashes the helper, or takes more
        than `timeout` seconds (the helper is killed: a file that hangs FFmpeg holds no pipeline
        up for long)."""
        async with self._lock:  # one at a time; the others wait here, on the loop
            if self._pool is None:
                # spawn, not fork: a fork of a process that runs threads and a loop is not safe.
                self._pool = ProcessPoolExecutor(
                    self._workers, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_end_with, initargs=(os.getpid(),),
                )
            try:
                return await asyncio.wait_for(
                    asyncio.get_running_loop().run_in_executor(self._pool, fn, *args), timeout,
                )
            except BrokenProcessPool:
                self.close()
                raise ValueError("the media helper crashed on this file") from None
            except TimeoutError:
                log.warning("pipelines: %s took longer than %g s; stopping its helper", fn.__name__, timeout)
                self.close()
                raise ValueError(f"took longer than {timeout:g} s") from None

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            # The executor has no way to stop a running call: its process goes.
            for process in list(getattr(pool, "_processes", {}).values()):
                process.kill()
            pool.shutdown(wait=False, cancel_futures=True)


def _end_with(gateway: int) -> None:  # in the helper, as it starts
    """End the helper when the gateway process ends, however it ends.

    A pool's worker holds both ends of the pipe its calls come through, so it never reads the
    end of it: after a SIGKILL or an OOM kill of the gateway, it would wait for a call forever,
    and every restart would leave one more behind. A thread waits for the gateway's exit (a
    pidfd; where there is none, it looks once a second) and ends the process.
    """

    def watch() -> None:
        try:
            gone = os.pidfd_open(gateway)
        except (AttributeError, OSError):  # no pidfds here, or the gateway has ended already
            while os.getppid() == gateway:
                time.sleep(1.0)
        else:
            select.select([gone], [], [])
        os._exit(0)

    threading.Thread(target=watch, name="end-with-gateway", daemon=True).start()


def _plain_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """What a helper's work raises comes back to the gateway as ValueError (or FileNotFoundError
    for a file that is gone): FFmpeg's own exceptions do not all survive the trip between
    processes, and one that does not would break the pool."""

    @functools.wraps(fn)
    def run(*args: Any) -> T:
        try:
            return fn(*args)
        except (ValueError, FileNotFoundError):
            raise
        except Exception as exc:
            raise ValueError(f"{type(exc).__name__}: {exc}") from None

    return run


# -- splitting a long speech ---------------------------------------------------------------------


@_plain_errors
def split_speech(audio: Path, out_dir: Path, max_seconds: float, max_total: float) -> dict[str, Any]:
    """Where to cut `audio` so that no part is longer than `max_seconds`, cutting at its quietest
    moments; with more than one part, each written as a WAV in `out_dir`.

    Returns {"seconds": its length, "parts": [[start, end, wav path or None], ...]}. ValueError
    when it is longer than `max_total` seconds (found before all of it is decoded).
    """
    energies, seconds = _energies(audio, max_total)
    cuts = plan_cuts(energies, _WINDOW, seconds, max_seconds)
    bounds = list(zip([0.0, *cuts], [*cuts, seconds]))
    if len(bounds) == 1:
        return {"seconds": seconds, "parts": [[0.0, seconds, None]]}
    paths = _write_parts(audio, out_dir, cuts)
    return {"seconds": seconds, "parts": [[a, b, str(p)] for (a, b), p in zip(bounds, paths)]}


def plan_cuts(energies: list[float], window: float, seconds: float, max_seconds: float) -> list[float]:
    """Cut times (seconds) that leave no part longer than `max_seconds`: each in the quietest
    window between `_EARLIEST_CUT` and all of `max_seconds` after the previous cut."""
    cuts: list[float] = []
    start = 0.0
    while seconds - start > max_seconds:
        first = int((start + max_seconds * _EARLIEST_CUT) / window)
        last = max(first, int((start + max_seconds) / window) - 1)
        # The latest of the quietest: parts come out as long as they may be, so fewer of them.
        quietest = min(range(first, min(last, len(energies) - 1) + 1), key=lambda i: (energies[i], -i))
        cut = round((quietest + 0.5) * window, 3)
        cuts.append(cut)
        start = cut
    return cuts


def _energies(audio: Path, max_total: float) -> tuple[list[float], float]:
    """The mean square of each `_WINDOW` of the sound, and its length in seconds."""
    import av

    per_window = int(_ANALYSIS_RATE * _WINDOW)
    energies: list[float] = []
    pending = array("h")
    samples = 0
    with av.open(str(audio)) as container:
        stream = container.streams.audio[0]
        if stream.duration is not None and stream.time_base is not None:
            if float(stream.duration * stream.time_base) > max_total + 1:
                raise ValueError(f"is {float(stream.duration * stream.time_base):.0f} s long; at most {max_total:g} s")
        resampler = av.AudioResampler(format="s16", layout="mono", rate=_ANALYSIS_RATE)
        for frame in _decoded(container, stream, resampler):
            chunk = array("h", bytes(frame.planes[0])[: frame.samples * 2])
            samples += len(chunk)
            if samples > max_total * _ANALYSIS_RATE:
                raise ValueError(f"is longer than {max_total:g} s")
            pending.extend(chunk)
            while len(pending) >= per_window:
                window = pending[:per_window]
                del pending[:per_window]
                energies.append(sum(v * v for v in window) / per_window)
    if pending:
        energies.append(sum(v * v for v in pending) / len(pending))
    if samples == 0:
        raise ValueError("has no sound")
    return energies, samples / _ANALYSIS_RATE


def _decoded(container: Any, stream: Any, resampler: Any) -> Iterator[Any]:
    """The stream's frames through `resampler`, flushed at the end."""
    for frame in container.decode(stream):
        frame.pts = None
        yield from resampler.resample(frame)
    yield from resampler.resample(None)


def _write_parts(audio: Path, out_dir: Path, cuts: list[float]) -> list[Path]:
    """The sound cut at `cuts`, as 16-bit mono WAVs at its own rate (48 kHz at most)."""
    import av

    out_dir.mkdir(parents=True, exist_ok=True)
    with av.open(str(audio)) as container:
        stream = container.streams.audio[0]
        rate = min(stream.rate or _OUT_RATE, _OUT_RATE)
        resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        ends = [round(c * rate) for c in cuts] + [None]
        paths = [out_dir / f"part-{i:03d}.wav" for i in range(len(ends))]
        part, written = 0, 0
        out = _wav(paths[0], rate)
        try:
            for frame in _decoded(container, stream, resampler):
                data = bytes(frame.planes[0])[: frame.samples * 2]
                while data:
                    end = ends[part]
                    take = len(data) // 2 if end is None else min(len(data) // 2, end - written)
                    out.writeframes(data[: take * 2])
                    data, written = data[take * 2:], written + take
                    if end is not None and written >= end:
                        out.close()
                        part += 1
                        out = _wav(paths[part], rate)
        finally:
            out.close()
    return paths


def _wav(path: Path, rate: int) -> wave.Wave_write:
    out = wave.open(str(path), "wb")
    out.setnchannels(1)
    out.setsampwidth(2)
    out.setframerate(rate)
    return out


# -- a clip's last frame -------------------------------------------------------------------------


@_plain_errors
def last_frame(video: Path, dest: Path) -> None:
    """The last picture of `video`, as a PNG at `dest` (the next scene's first frame)."""
    import av

    picture = None
    with av.open(str(video)) as container:
        for frame in container.decode(container.streams.video[0]):
            picture = frame
    if picture is None:
        raise ValueError("the clip has no picture")
    picture.to_image().save(dest, "PNG")


# -- joining clips -------------------------------------------------------------------------------


def frame_counts(seconds: list[float], fps: int) -> list[int]:
    """Frames of each part at `fps`, rounded on the running total so that the whole is
    round(sum * fps) and no rounding error piles up."""
    counts, total = [], 0.0
    for s in seconds:
        counts.append(round((total + s) * fps) - round(total * fps))
        total += s
    return counts


def join_timeout(parts: list[dict[str, Any]], size: list[int] | None) -> float:
    """Seconds a join may take: generous (a core encodes a 640x360 frame in a few ms), so that
    only a hung one is stopped."""
    pixels = size[0] * size[1] if size else 1280 * 720
    return 300.0 + 2.0 * sum(p["seconds"] for p in parts) * max(1.0, pixels / (640 * 360))


@_plain_errors
def join_clips(parts: list[dict[str, Any]], dest: Path, fps: int, size: list[int] | None) -> dict[str, Any]:
    """Join clips into one H.264/AAC MP4 at `dest`: each part is {"video": path, "seconds": its
    span, "audio": path or None, "offset": seconds into that audio}. Every clip is fitted into
    `size` ([width, height]; None: the first clip's) with black bars where its shape differs, and
    retimed to `fps` (a frame held where a clip is shorter than its span). The sound is each
    part's audio from its offset, silence where it has none; no sound track when no part has audio.

    Returns {"seconds", "frames", "width", "height", "has_audio"}.
    """
    import av

    width, height = size if size else _first_size(Path(parts[0]["video"]))
    counts = frame_counts([p["seconds"] for p in parts], fps)
    has_audio = any(p.get("audio") for p in parts)
    sound = _Soundtrack(parts) if has_audio else None
    frames = 0
    try:
        with av.open(str(dest), mode="w", format="mp4", options={"movflags": "+faststart"}) as out:
            video = out.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "23"})
            video.width, video.height, video.pix_fmt = width, height, "yuv420p"
            video.codec_context.gop_size = 2 * fps
            track = sound.open(out) if sound is not None else None
            for part, count in zip(parts, counts):
                for picture in _retimed(Path(part["video"]), count, fps, width, height):
                    if track is not None:
                        track.write_until((frames + 1) / fps)
                    picture.pts = frames
                    picture.time_base = Fraction(1, fps)
                    out.mux(video.encode(picture))
                    frames += 1
            out.mux(video.encode(None))
            if track is not None:
                track.write_until(sum(p["seconds"] for p in parts))
                track.flush()
    finally:
        if sound is not None:
            sound.close()
    return {"seconds": frames / fps, "frames": frames, "width": width, "height": height, "has_audio": has_audio}


def _first_size(video: Path) -> tuple[int, int]:
    import av

    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        return stream.codec_context.width // 2 * 2, stream.codec_context.height // 2 * 2


def _retimed(video: Path, count: int, fps: int, width: int, height: int) -> Iterator[Any]:
    """`count` frames of `video` at `fps`, fitted into width x height: at each output time, the
    clip's latest frame shown by then (its last, held, once it has ended)."""
    import av

    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        decoded = container.decode(stream)
        current = next(decoded, None)
        if current is None:
            raise ValueError(f"{video.name} has no picture")
        upcoming = next(decoded, None)
        for k in range(count):
            t = k / fps + 1e-6
            while upcoming is not None and upcoming.time is not None and upcoming.time <= t:
                current, upcoming = upcoming, next(decoded, None)
            yield _fitted(current, width, height)


def _fitted(frame: Any, width: int, height: int) -> Any:
    """The frame in width x height, scaled to fit, with black bars where its shape differs."""
    import av
    from PIL import Image

    if (frame.width, frame.height) == (width, height):
        return frame.reformat(format="yuv420p")
    scale = min(width / frame.width, height / frame.height)
    w, h = max(2, round(frame.width * scale)), max(2, round(frame.height * scale))
    canvas = Image.new("RGB", (width, height))
    canvas.paste(frame.reformat(width=w, height=h, format="rgb24").to_image(), ((width - w) // 2, (height - h) // 2))
    return av.VideoFrame.from_image(canvas).reformat(format="yuv420p")


class _Soundtrack:
    """The joined video's sound, part after part: each part's audio from its offset (decoded
    once per file however many parts read it in order), silence where a part has none."""

    def __init__(self, parts: list[dict[str, Any]]) -> None:
        self._parts = parts
        # Each part's first and last sample in the output, rounded on the running total.
        self._bounds: list[tuple[int, int]] = []
        total = 0.0
        for p in parts:
            self._bounds.append((round(total * _OUT_RATE), round((total + p["seconds"]) * _OUT_RATE)))
            total += p["seconds"]
        self._sources: dict[str, _Source] = {}
        self.total = self._bounds[-1][1]  # samples

    def open(self, out: Any) -> _SoundWriter:
        return _SoundWriter(self, out)

    def samples(self, start: int, end: int) -> bytes:
        """Output samples [start, end) as s16 stereo bytes."""
        data = bytearray()
        for (first, last), part in zip(self._bounds, self._parts):
            lo, hi = max(start, first), min(end, last)
            if lo >= hi:
                continue
            path = part.get("audio")
            if not path:
                data += bytes((hi - lo) * _BYTES_PER_SAMPLE)
                continue
            source = self._sources.get(path)
            at = round(part.get("offset", 0.0) * _OUT_RATE) + (lo - first)
            if source is not None and abs(at - source.position) <= _CONTINUOUS:
                at = source.position  # the next part of one speech: its sound goes on, sample for sample
            if source is None or source.position > at:
                if source is not None:
                    source.close()
                source = self._sources[path] = _Source(Path(path))
            data += source.read(at, hi - lo)
        return bytes(data)

    def close(self) -> None:
        for source in self._sources.values():
            source.close()


class _Source:
    """One audio file as s16 stereo 48 kHz bytes, read forward from any sample on."""

    def __init__(self, path: Path) -> None:
        import av

        self._container = av.open(str(path))
        stream = self._container.streams.audio[0]
        resampler = av.AudioResampler(format="s16", layout="stereo", rate=_OUT_RATE)
        self._frames = _decoded(self._container, stream, resampler)
        self._buffer = bytearray()
        self.position = 0  # the sample at the start of the buffer

    def read(self, at: int, n: int) -> bytes:
        """Samples [at, at + n), silence past the end."""
        skip = (at - self.position) * _BYTES_PER_SAMPLE
        want = skip + n * _BYTES_PER_SAMPLE
        while len(self._buffer) < want:
            frame = next(self._frames, None)
            if frame is None:
                break
            self._buffer += bytes(frame.planes[0])[: frame.samples * _BYTES_PER_SAMPLE]
        data = bytes(self._buffer[skip:want])
        del self._buffer[:want]
        self.position = at + n
        return data + bytes(n * _BYTES_PER_SAMPLE - len(data))

    def close(self) -> None:
        self._container.close()


class _SoundWriter:
    """The AAC track, written as far as the pictures so far (interleaved, as players expect)."""

    def __init__(self, sound: _Soundtrack, out: Any) -> None:
        import av

        self._sound = sound
        self._out = out
        self._stream = out.add_stream("aac", rate=_OUT_RATE, layout="stereo")
        # The AAC encoder wants planar float in frames of exactly 1024 samples.
        self._resampler = av.AudioResampler(format="fltp", layout="stereo", rate=_OUT_RATE, frame_size=1024)
        self._taken = 0  # samples taken from the soundtrack
        self._written = 0  # samples encoded

    def write_until(self, seconds: float) -> None:
        import av

        # The pictures may run up to half a frame past the sound's end: the sound stops there.
        target = min(round(seconds * _OUT_RATE), self._sound.total)
        while self._taken < target:
            n = min(target - self._taken, 4800)
            frame = av.AudioFrame(format="s16", layout="stereo", samples=n)
            frame.planes[0].update(self._sound.samples(self._taken, self._taken + n))
            frame.sample_rate = _OUT_RATE
            self._taken += n
            self._encode(self._resampler.resample(frame))

    def flush(self) -> None:
        self._encode(self._resampler.resample(None))
        self._out.mux(self._stream.encode(None))

    def _encode(self, frames: list[Any]) -> None:
        for frame in frames:
            frame.pts = self._written
            frame.time_base = Fraction(1, _OUT_RATE)
            self._written += frame.samples
            self._out.mux(self._stream.encode(frame))
