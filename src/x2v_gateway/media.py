"""What an input file really is, judged by its content (never by its name).

These run in the media checker's helper process (checker.py), never in the gateway itself.
"""

from __future__ import annotations

from pathlib import Path

import av
from PIL import Image, UnidentifiedImageError

from .checker import MediaError

MIN_IMAGE_SIDE = 16

# PyAV container names -> the extension a node's loaders expect.
_AUDIO_EXT = {"wav": "wav", "mp3": "mp3", "flac": "flac", "ogg": "ogg", "aac": "aac",
              "mov,mp4,m4a,3gp,3g2,mj2": "m4a", "matroska,webm": "webm"}


def inspect_image(path: Path) -> str:
    """Check that `path` decodes as an image of a usable size; return its extension."""
    try:
        with Image.open(path) as image:
            image.verify()
            fmt, (width, height) = image.format, image.size
    except Image.DecompressionBombError:
        # Pillow refuses a header claiming more pixels than it would decode (a zip bomb, or a
        # real image far larger than any model takes).
        raise MediaError("has too many pixels to be decoded safely; scale it down") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise MediaError(f"is not a readable image ({type(exc).__name__})") from None
    if min(width, height) < MIN_IMAGE_SIDE:
        raise MediaError(
            f"is {width}x{height} pixels; images need at least {MIN_IMAGE_SIDE} pixels on each side"
        )
    return (fmt or "png").lower().replace("jpeg", "jpg")


def inspect_audio(path: Path) -> str:
    """Check that `path` holds a decodable audio stream; return its extension."""
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


INSPECTORS = {"image": inspect_image, "last_frame": inspect_image, "audio": inspect_audio}
