"""Real input files made at test time: PNG portraits, WAV voice-overs (small or huge)."""

from __future__ import annotations

import math
import struct
import wave
import zlib
from pathlib import Path

from PIL import Image, ImageDraw


def make_png(path: Path, size: tuple[int, int] = (96, 128), color: tuple[int, int, int] = (200, 120, 80)) -> Path:
    image = Image.new("RGB", size, color)
    draw = ImageDraw.Draw(image)
    draw.ellipse((size[0] // 4, size[1] // 6, 3 * size[0] // 4, size[1] // 2), fill=(240, 210, 180))
    image.save(path, "PNG")
    return path


def make_wav(path: Path, seconds: float = 1.0, rate: int = 16000, tone: float = 440.0) -> Path:
    frames = b"".join(
        struct.pack("<h", int(8000 * math.sin(2 * math.pi * tone * i / rate)))
        for i in range(int(seconds * rate))
    )
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(frames)
    return path


def make_big_wav(path: Path, megabytes: int) -> Path:
    """A valid WAV of about `megabytes` MiB, written in chunks (never whole in memory)."""
    rate = 48000
    second = b"".join(struct.pack("<hh", int(3000 * math.sin(2 * math.pi * 220 * i / rate)), 0) for i in range(rate))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(rate)
        for _ in range(megabytes * 1024 * 1024 // len(second) + 1):
            out.writeframes(second)
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with its length and a correct CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def make_raw_png(path: Path, width: int, height: int, idat: bytes | None = None, extra: bytes = b"") -> Path:
    """A 1-bit greyscale PNG written chunk by chunk: `idat` instead of its real pixel data,
    `extra` chunks before it. Its checksums are right, whatever its content."""
    if idat is None:
        row = b"\x00" + b"\x00" * ((width + 7) // 8)  # filter byte, then the row's bits
        compressor = zlib.compressobj(9)
        idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + extra
                     + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))
    return path
