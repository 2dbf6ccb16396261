"""The demo node's "generated" clips: small, fast H.264/AAC MP4s rendered with PyAV.

A slow Ken Burns zoom over the input image (with the input audio muxed in for s2v), or a
coloured card with the prompt when there is no image (t2v).
"""

from __future__ import annotations

import colorsys
import math
import os
import random
import textwrap
import uuid
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
from PIL import Image, ImageDraw, ImageFont, ImageOps

from ..media import duration_seconds

# A demo clip never runs longer than this, however long the audio: renders stay fast and
# an enormous audio upload is only read up to here.
MAX_SECONDS = 30.0
MIN_SECONDS = 1.0
# The Ken Burns zoom ends this much closer than it starts.
_ZOOM = 1.15
# Sample rates the AAC encoder takes as they are; anything else is resampled to 48 kHz.
_AAC_RATES = {8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000}


def render_video(
    dest: Path,
    *,
    image: Path | None,
    audio: Path | None,
    prompt: str,
    seed: int,
    seconds: float,
    fps: int = 16,
    max_side: int = 320,
) -> None:
    """Write an H.264/AAC MP4 to `dest`: the image zooming slowly, or a prompt card without one.

    With `audio`, the clip lasts as long as the audio (between 1 and 30 s) and `seconds` is
    ignored. The file appears at `dest` only once it is complete.
    """
    fps = max(1, int(fps))
    audio_source = _AudioSource(audio) if audio is not None else None
    try:
        if audio_source is not None:
            seconds = audio_source.seconds
        seconds = min(max(float(seconds), MIN_SECONDS), MAX_SECONDS)
        frame_count = max(1, round(seconds * fps))
        if image is not None:
            frames = _ken_burns_frames(image, frame_count, seed=seed, max_side=max_side)
        else:
            frames = _card_frames(prompt, seed, frame_count, max_side=max_side)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Render next to the destination and rename, so nobody downloads a half-written file.
        partial = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            _encode(partial, frames, fps=fps, audio=audio_source, seconds=frame_count / fps)
            os.replace(partial, dest)
        finally:
            partial.unlink(missing_ok=True)
    finally:
        if audio_source is not None:
            audio_source.close()


def _encode(
    path: Path,
    frames: Iterator[Image.Image],
    *,
    fps: int,
    audio: _AudioSource | None,
    seconds: float,
) -> None:
    first = next(frames)
    # +faststart puts the index first, so a browser can start playing and seek before the end.
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as out:
        video = out.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "crf": "28"})
        video.width, video.height = first.size
        video.pix_fmt = "yuv420p"
        # A keyframe every 2 s keeps seeking precise in a long clip.
        video.codec_context.gop_size = 2 * fps
        audio_track = audio.open_output(out) if audio is not None else None

        def write_frame(index: int, picture: Image.Image) -> None:
            if audio_track is not None:
                # Interleave: audio up to the end of this frame goes in before the frame.
                audio_track.write_until((index + 1) / fps)
            frame = av.VideoFrame.from_image(picture).reformat(format="yuv420p")
            frame.pts = index
            frame.time_base = Fraction(1, fps)
            out.mux(video.encode(frame))

        write_frame(0, first)
        for index, picture in enumerate(frames, start=1):
            write_frame(index, picture)
        out.mux(video.encode(None))
        if audio_track is not None:
            audio_track.write_until(seconds)
            audio_track.flush()


def _ken_burns_frames(
    image: Path, frame_count: int, *, seed: int, max_side: int
) -> Iterator[Image.Image]:
    with Image.open(image) as original:
        # JPEG draft mode decodes a huge photo at a fraction of its size: fast and small.
        original.draft("RGB", (max_side * 2, max_side * 2))
        picture = ImageOps.exif_transpose(original).convert("RGB")
    width, height = _fit(picture.width, picture.height, max_side)
    # Work from a copy just large enough for the widest view, so each frame is a cheap resize.
    base = picture.resize(
        (max(2, round(width * _ZOOM)), max(2, round(height * _ZOOM))), Image.Resampling.LANCZOS
    )
    del picture
    # The seed picks where the camera drifts to, so two seeds give visibly different clips.
    rng = random.Random(seed)
    drift_x, drift_y = rng.uniform(-1, 1), rng.uniform(-1, 1)
    for index in range(frame_count):
        progress = index / (frame_count - 1) if frame_count > 1 else 0.0
        eased = 0.5 - 0.5 * math.cos(math.pi * progress)
        zoom = 1.0 + (_ZOOM - 1.0) * eased
        box_w, box_h = base.width / zoom, base.height / zoom
        centre_x = base.width / 2 + drift_x * (base.width - box_w) / 2
        centre_y = base.height / 2 + drift_y * (base.height - box_h) / 2
        box = (
            centre_x - box_w / 2,
            centre_y - box_h / 2,
            centre_x + box_w / 2,
            centre_y + box_h / 2,
        )
        yield base.resize((width, height), Image.Resampling.BILINEAR, box=box)


def _card_frames(
    prompt: str, seed: int, frame_count: int, *, max_side: int
) -> Iterator[Image.Image]:
    width, height = _fit(16, 9, max_side)
    hue = random.Random(seed).random()
    background = tuple(round(c * 255) for c in colorsys.hsv_to_rgb(hue, 0.55, 0.55))
    card = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(card)
    font = _font(max(10, height // 12))
    small = _font(max(8, height // 18))
    line_height = font.size + 4 if hasattr(font, "size") else 14
    chars_per_line = max(8, int(width / (line_height * 0.5)))
    max_lines = max(1, height // line_height - 2)
    lines = textwrap.wrap(prompt or "(empty prompt)", chars_per_line)[:max_lines]
    y = (height - line_height * len(lines)) // 2 - line_height // 2
    for line in lines:
        draw.text((width // 2, y), line, font=font, fill=(255, 255, 255), anchor="ma")
        y += line_height
    draw.text((6, height - 6), f"seed {seed}", font=small, fill=(230, 230, 230), anchor="ld")
    # A bar sweeping along the bottom makes it a moving picture, and shows where you are.
    bar_y = height - 3
    for index in range(frame_count):
        frame = card.copy()
        progress = (index + 1) / frame_count
        bar = (0, bar_y, round(width * progress), height)
        ImageDraw.Draw(frame).rectangle(bar, fill=(255, 255, 255))
        yield frame


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (AttributeError, OSError):  # Pillow built without FreeType: the bitmap font.
        return ImageFont.load_default()


def _fit(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The size with the longer side at `max_side`, both sides even (yuv420p needs that)."""
    scale = max_side / max(width, height)
    return max(16, round(width * scale) // 2 * 2), max(16, round(height * scale) // 2 * 2)


class _AudioSource:
    """The input audio, read frame by frame: never more than one decoded frame in memory."""

    def __init__(self, path: Path) -> None:
        try:
            self._container = av.open(str(path), mode="r")
        except FileNotFoundError:
            raise
        except av.FFmpegError as exc:
            raise ValueError(f"audio does not open: {exc}") from exc
        if not self._container.streams.audio:
            self._container.close()
            raise ValueError(f"no audio stream in {path.name}")
        self._stream = self._container.streams.audio[0]
        known = duration_seconds(self._container, self._stream)
        # Some raw formats carry no duration: count the samples (streaming, up to the cap).
        self.seconds = min(known if known else self._count_seconds(), MAX_SECONDS)
        self.rate = self._stream.rate if self._stream.rate in _AAC_RATES else 48000
        self.layout = "mono" if self._stream.channels == 1 else "stereo"

    def _count_seconds(self) -> float:
        samples = 0
        for frame in self._container.decode(self._stream):
            samples += frame.samples
            if samples >= MAX_SECONDS * frame.sample_rate:
                break
        rate = self._stream.rate or 1
        self._container.seek(0)
        return samples / rate

    def open_output(self, out: av.container.OutputContainer) -> _AudioTrack:
        return _AudioTrack(self, out)

    def frames(self) -> Iterator[av.AudioFrame]:
        yield from self._container.decode(self._stream)

    def close(self) -> None:
        self._container.close()


class _AudioTrack:
    """The AAC track being written: decodes, resamples and encodes only as far as asked."""

    def __init__(self, source: _AudioSource, out: av.container.OutputContainer) -> None:
        self._out = out
        self._rate = source.rate
        self._stream = out.add_stream("aac", rate=source.rate, layout=source.layout)
        # The AAC encoder wants planar float in frames of exactly 1024 samples.
        self._resampler = av.AudioResampler(
            format="fltp", layout=source.layout, rate=source.rate, frame_size=1024
        )
        self._input = source.frames()
        self._limit = round(source.seconds * source.rate)
        self._written = 0
        self._done = False

    def write_until(self, seconds: float) -> None:
        target = min(round(seconds * self._rate), self._limit)
        while not self._done and self._written < target:
            frame = next(self._input, None)
            if frame is None:
                self._done = True
                break
            frame.pts = None  # our own sample counter is the clock of the output
            self._encode(self._resampler.resample(frame))

    def flush(self) -> None:
        self._encode(self._resampler.resample(None))
        self._out.mux(self._stream.encode(None))

    def _encode(self, frames: list[av.AudioFrame]) -> None:
        for frame in frames:
            if self._written >= self._limit:
                return
            frame.pts = self._written
            frame.time_base = Fraction(1, self._rate)
            self._written += frame.samples
            self._out.mux(self._stream.encode(frame))
