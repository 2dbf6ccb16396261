"""What a media file really is, judged by its content (never by its name): the checks of
uploaded images and audio, the probe of result videos, and what they answer.

The checks run in the media checker's helper processes (checker.py), never in the gateway
itself. The gateway imports this module only for MediaError and VideoInfo, so PyAV and Pillow
(about 25 MiB, and large C code bases reading untrusted files) are imported inside the checks.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    import av
    from PIL import Image

MIN_IMAGE_SIDE = 16
# Pillow reads a PNG's chunks one by one in Python: 8 million empty ones (a 96 MB file) kept a
# checker busy for 60 s. A real PNG has a few dozen; Pillow writes its pixels in 64 KiB chunks
# and libpng in 8 KiB ones, so even the largest image accepted stays far below this.
MAX_PNG_CHUNKS = 100_000
# A JPEG's segments before its pixels (Pillow reads them one by one in Python), and the scans
# of a progressive JPEG (libjpeg decodes every pixel again for each): real files have tens.
MAX_JPEG_SEGMENTS = 1_000
MAX_JPEG_SCANS = 200

# PyAV container names -> the extension a node's loaders expect.
_AUDIO_EXT = {"wav": "wav", "mp3": "mp3", "flac": "flac", "ogg": "ogg", "aac": "aac",
              "mov,mp4,m4a,3gp,3g2,mj2": "m4a", "matroska,webm": "webm"}


class MediaError(ValueError):
    """The file is not what its field needs; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class ImageInfo:
    format: str  # the extension its content is: png, jpg, webp...
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class VideoInfo:
    duration: float
    width: int
    height: int
    has_audio: bool


def inspect_image(path: Path, max_pixels: int = 40_000_000) -> str:
    """Check that `path` decodes, every pixel, as an image of a usable size; return its extension."""
    from PIL import Image, UnidentifiedImageError

    # The bomb guard of Pillow itself, at our limit: it refuses at open a header claiming more
    # than twice this many pixels, before any plugin allocates for them.
    Image.MAX_IMAGE_PIXELS = max_pixels
    # Between one and two times the limit, Pillow only warns; the check below refuses those.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    try:
        with path.open("rb") as handle:
            _check_structure(handle)
        with Image.open(path) as image:
            image.verify()  # the container: chunk checksums, truncation
        with Image.open(path) as image:
            fmt, (width, height) = image.format, image.size
            if width * height > max_pixels:
                raise MediaError(
                    f"is {width}x{height} pixels ({width * height / 1e6:.0f} megapixels); images may"
                    f" have at most {max_pixels / 1e6:g} megapixels: scale it down"
                )
            if min(width, height) < MIN_IMAGE_SIDE:
                raise MediaError(
                    f"is {width}x{height} pixels; images need at least {MIN_IMAGE_SIDE} pixels on each side"
                )
            # verify() reads no pixel: a PNG whose compressed data is broken passes it, and then
            # fails on the node. Decoding the first frame proves the image is one.
            image.load()
    except MediaError:
        raise
    except Image.DecompressionBombError:
        raise MediaError(
            f"has more pixels than the {max_pixels / 1e6:g} megapixels an image may have: scale it down"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise MediaError(f"is not a readable image ({type(exc).__name__})") from None
    return (fmt or "png").lower().replace("jpeg", "jpg")


def _check_structure(handle: BinaryIO) -> None:
    """Refuse a PNG or JPEG whose structure is absurd, before a decoder walks it."""
    head = handle.read(8)
    if head == b"\x89PNG\r\n\x1a\n":
        _check_png(handle)
    elif head[:2] == b"\xff\xd8":
        handle.seek(2)
        _check_jpeg(handle)


def _check_png(handle: BinaryIO) -> None:
    for _ in range(MAX_PNG_CHUNKS):
        header = handle.read(8)
        if len(header) < 8 or header[4:] == b"IEND":
            return  # the end (or a truncated file: verify() says so)
        length = int.from_bytes(header[:4], "big")
        handle.seek(length + 4, io.SEEK_CUR)  # the data and its CRC
    raise MediaError(f"is a PNG of more than {MAX_PNG_CHUNKS:,} chunks; save it again")


def _check_jpeg(handle: BinaryIO) -> None:
    segments = scans = 0
    while True:
        marker = handle.read(2)
        if len(marker) < 2 or marker[0] != 0xFF or marker[1] == 0xD9:
            return  # the end, or not a marker where one belongs: Pillow says what is wrong
        # Every marker counts, fill bytes included, so that this walk stays short too.
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise MediaError(f"is a JPEG of more than {MAX_JPEG_SEGMENTS:,} segments; save it again")
        kind = marker[1]
        if kind == 0xFF:  # a fill byte before the marker
            handle.seek(-1, io.SEEK_CUR)
            continue
        if kind == 0x01 or 0xD0 <= kind <= 0xD7:  # markers without a length
            continue
        size = handle.read(2)
        if len(size) < 2:
            return
        handle.seek(int.from_bytes(size, "big") - 2, io.SEEK_CUR)
        if kind == 0xDA:  # a scan: its compressed data runs to the next marker
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise MediaError(f"is a JPEG of more than {MAX_JPEG_SCANS} scans; save it again")
            if not _skip_scan_data(handle):
                return


# In a scan's data, 0xFF is followed by 0x00 (a stuffed byte), a restart marker or a fill byte;
# anything else after it is the next marker.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def _skip_scan_data(handle: BinaryIO) -> bool:
    """Move to the marker after a scan's compressed data; False at the end of the file."""
    carry = b""
    while block := handle.read(1024 * 1024):
        data = carry + block
        if found := _NEXT_MARKER.search(data):
            handle.seek(found.start() - len(data), io.SEEK_CUR)
            return True
        carry = data[-1:]  # a 0xFF at the end pairs with the next block's first byte
    return False


def inspect_audio(path: Path) -> str:
    """Check that `path` holds a decodable audio stream; return its extension."""
    import av

    try:
        with av.open(str(path)) as container:
            streams = container.streams.audio
            if not streams:
                raise MediaError("has no audio stream")
            # Decoding one frame catches files whose header looks fine but whose data is not.
            for _ in container.decode(streams[0]):
                break
            else:
                raise MediaError("has an audio stream with no decodable sound")
            name = container.format.name
    except MediaError:
        raise
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise MediaError(f"is not readable audio ({type(exc).__name__})") from None
    return _AUDIO_EXT.get(name, name.split(",")[0])


# A poster frame is at most this many pixels on its longer side: enough for a gallery tile or a
# table thumbnail on a high-density screen, and a JPEG of some 20-60 KB.
POSTER_MAX_SIDE = 640
POSTER_QUALITY = 80


def probe_video(path: Path, poster: Path | None = None) -> VideoInfo:
    """What a video file holds; ValueError if it is not a playable video.

    Playable means: a container FFmpeg can open, a video stream, a duration above zero and a
    first frame that decodes (a truncated upload can have valid headers and no pictures).
    A missing file raises FileNotFoundError, not ValueError.

    With `poster`, that first frame is also written there as a JPEG (at most POSTER_MAX_SIDE
    pixels a side), from the same decode: the result's check and its poster cost one read. A
    frame that cannot be saved leaves no file, and the video is no less playable.
    """
    import av

    try:
        container = av.open(str(path), mode="r")
    except FileNotFoundError:
        raise
    except (av.FFmpegError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a video file: {exc}") from exc
    with container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        duration = duration_seconds(container, stream)
        if duration is None or duration <= 0:
            raise ValueError("video duration is not above zero")
        try:
            frame = next(container.decode(stream), None)
        except av.FFmpegError as exc:
            raise ValueError(f"video does not decode: {exc}") from exc
        if frame is None:
            raise ValueError("video stream has no frames")
        if poster is not None:
            save_poster(frame, poster)
        return VideoInfo(
            duration=duration,
            width=frame.width,
            height=frame.height,
            has_audio=bool(container.streams.audio),
        )


def save_poster(frame: av.VideoFrame | Image.Image, dest: Path) -> None:
    """`frame` (or a picture) as a JPEG at `dest`, scaled down to POSTER_MAX_SIDE; nothing when
    it cannot be."""
    try:
        image = frame.to_image() if hasattr(frame, "to_image") else frame.convert("RGB")
        image.thumbnail((POSTER_MAX_SIDE, POSTER_MAX_SIDE))
        image.save(dest, "JPEG", quality=POSTER_QUALITY, optimize=True)
    except Exception:  # an odd pixel format, a full disk: the video has no poster, nothing worse
        dest.unlink(missing_ok=True)


def duration_seconds(
    container: av.container.InputContainer, stream: av.stream.Stream
) -> float | None:
    """A stream's duration in seconds, else its container's; None when neither says."""
    import av

    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def probe_image(path: Path, max_pixels: int = 40_000_000, poster: Path | None = None) -> ImageInfo:
    """What an image result holds; MediaError when it does not decode, every pixel (an upstream
    that sent a truncated PNG must not make a job succeed). With `poster`, a JPEG of it at most
    POSTER_MAX_SIDE a side is written there, as a video's first frame is."""
    kind = inspect_image(path, max_pixels)
    from PIL import Image

    with Image.open(path) as image:
        if poster is not None:
            image.load()
            save_poster(image, poster)
        return ImageInfo(kind, image.width, image.height)


# A driving video (animate) longer than this is refused: a model animates seconds, not hours.
MAX_INPUT_VIDEO_SECONDS = 600.0
_VIDEO_EXT = {"mov,mp4,m4a,3gp,3g2,mj2": "mp4", "matroska,webm": "webm", "avi": "avi"}
# The kinds a checked video input is stored as (mp4 and webm can be audio too: the upload's role decides).
VIDEO_KINDS = frozenset(_VIDEO_EXT.values())


def inspect_video(path: Path, max_pixels: int = 40_000_000) -> str:
    """Check that `path` is a playable video of a bounded length and frame size (the driving
    video of an animate job); return its extension."""
    import av

    try:
        info = probe_video(path)
        with av.open(str(path)) as container:
            name = container.format.name
    except MediaError:
        raise
    except (ValueError, av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise MediaError(f"is not a playable video ({str(exc)[:80] or type(exc).__name__})") from None
    if info.duration > MAX_INPUT_VIDEO_SECONDS:
        raise MediaError(f"is {info.duration:.0f} s long; a video input may last at most"
                         f" {MAX_INPUT_VIDEO_SECONDS:.0f} s")
    if info.width * info.height > max_pixels:
        raise MediaError(f"has {info.width}x{info.height} frames; frames may have at most"
                         f" {max_pixels / 1e6:g} megapixels")
    return _VIDEO_EXT.get(name, name.split(",")[0])


INSPECTORS = {"image": inspect_image, "last_frame": inspect_image, "audio": inspect_audio,
              "video": inspect_video}
