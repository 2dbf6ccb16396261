"""The demo node's inputs: base64 strings and URLs turned into files, as upstream does."""

from __future__ import annotations

import base64
import re
import threading
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from .asgi import CHUNK

_IMAGE_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "png",
    b"\xff\xd8\xff": "jpg",
    b"GIF87a": "gif",
    b"GIF89a": "gif",
}
_AUDIO_SIGNATURES = {
    b"ID3": "mp3",
    b"\xff\xfb": "mp3",
    b"\xff\xf3": "mp3",
    b"\xff\xf2": "mp3",
    b"OggS": "ogg",
    b"fLaC": "flac",
}


def looks_like_base64(value: str, kind: str) -> bool:
    """Upstream's test: a data URL, or valid base64 whose first bytes are a known file type."""
    if value.startswith(f"data:{kind}/"):
        return True
    if len(value) % 4:
        return False
    try:
        base64.b64decode(value, validate=True)
        head = base64.b64decode(value[:100])
    except ValueError:
        return False
    if kind == "image":
        return head.startswith(tuple(_IMAGE_SIGNATURES)) or head[8:12] == b"WEBP"
    return (
        head.startswith(tuple(_AUDIO_SIGNATURES))
        or (head.startswith(b"RIFF") and b"WAVE" in head[:12])
        or head[:4] in (b"ftyp", b"\x00\x00\x00\x20", b"\x00\x00\x00\x18")
    )


def save_base64(value: str, kind: str, directory: Path) -> Path:
    extension = None
    match = re.match(rf"data:{kind}/(\w+);base64,(.+)", value)
    if match:
        extension, value = match.group(1), match.group(2)
    try:
        data = base64.b64decode(value)
    except ValueError as exc:
        raise ValueError(f"Invalid base64 data: {exc}") from exc
    if extension is None:
        signatures = _IMAGE_SIGNATURES if kind == "image" else _AUDIO_SIGNATURES
        extension = next((ext for sig, ext in signatures.items() if data.startswith(sig)), None)
        if extension is None:
            if kind == "image" and data[8:12] == b"WEBP":
                extension = "webp"
            elif kind == "audio" and data.startswith(b"RIFF") and b"WAVE" in data[:12]:
                extension = "wav"
            else:
                extension = "png" if kind == "image" else "mp3"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{uuid.uuid4()}.{extension}"
    path.write_bytes(data)
    return path


def download(url: str, kind: str, directory: Path, stop: threading.Event) -> Path:
    """Fetch an input URL like upstream: 3 attempts, retrying connection errors and 5xx."""
    parsed = urlsplit(url)
    if not parsed.scheme or not parsed.netloc:
        raise ValueError(f"Invalid URL format: {url}")
    name = Path(parsed.path).name or f"{uuid.uuid4()}.{'jpg' if kind == 'image' else 'mp3'}"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    last_error: Exception | None = None
    delay = 1.0
    timeout = httpx.Timeout(connect=10.0, read=30.0, write=10.0, pool=5.0)
    with httpx.Client(verify=False, timeout=timeout, follow_redirects=True) as client:
        for attempt in range(3):
            try:
                with client.stream("GET", url) as response:
                    if response.status_code == 200:
                        with path.open("wb") as out:
                            for chunk in response.iter_bytes(CHUNK):
                                out.write(chunk)
                        return path
                    if response.status_code < 500:
                        raise ValueError(f"HTTP error for {url}: Client error {response.status_code}")
                    last_error = RuntimeError(f"Server returned {response.status_code}")
            except httpx.HTTPError as exc:
                last_error = exc
            if attempt < 2 and stop.wait(delay):
                break
            delay *= 2
    raise ValueError(
        f"Failed to connect to {url}: All 3 connection attempts failed for {url}: {last_error}"
    )


async def url_accessible(url: str) -> bool:
    """Upstream's submit-time check of an image URL: a HEAD answered below 400 within 5 s."""
    parsed = urlsplit(url)
    if not parsed.scheme or not parsed.netloc:
        return False
    try:
        async with httpx.AsyncClient(verify=False, timeout=5.0) as client:
            response = await client.head(url, follow_redirects=True)
    except (httpx.HTTPError, ValueError):
        return False
    return response.status_code < 400

