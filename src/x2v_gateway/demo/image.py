"""The demo node's "generated" images: a small PNG for t2i (a card with the prompt) or i2i (the
input image, recoloured and framed), at the request's aspect ratio."""

from __future__ import annotations

import colorsys
import os
import random
import textwrap
import uuid
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from .video import _fit, _font


def aspect(ratio: str) -> tuple[int, int]:
    """`16:9` -> (16, 9); anything unreadable -> upstream's default, 16:9."""
    try:
        width, height = (int(part) for part in str(ratio).split(":"))
        if width > 0 and height > 0:
            return width, height
    except ValueError:
        pass
    return 16, 9


def render_image(
    dest: Path, *, image: Path | None, prompt: str, seed: int, aspect_ratio: str = "16:9",
    max_side: int = 320,
) -> None:
    """Write a PNG to `dest`: the prompt on a card (no image), or the image made over (i2i).
    The file appears at `dest` only once it is complete."""
    width, height = _fit(*aspect(aspect_ratio), max_side)
    rng = random.Random(seed)
    if image is not None:
        with Image.open(image) as original:
            picture = ImageOps.exif_transpose(original).convert("RGB")
        picture = ImageOps.fit(picture, (width, height), Image.Resampling.LANCZOS)
        # The seed picks the tint, so two seeds give visibly different images.
        tint = tuple(round(c * 255) for c in colorsys.hsv_to_rgb(rng.random(), 0.6, 0.9))
        picture = Image.blend(picture, Image.new("RGB", (width, height), tint), 0.35)
    else:
        background = tuple(round(c * 255) for c in colorsys.hsv_to_rgb(rng.random(), 0.55, 0.55))
        picture = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(picture)
    font = _font(max(10, height // 12))
    line_height = font.size + 4 if hasattr(font, "size") else 14
    lines = textwrap.wrap(prompt or "(empty prompt)", max(8, int(width / (line_height * 0.5))))
    lines = lines[: max(1, height // line_height - 2)]
    y = (height - line_height * len(lines)) // 2
    for line in lines:
        draw.text((width // 2, y), line, font=font, fill=(255, 255, 255), anchor="ma")
        y += line_height
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        picture.save(partial, format="PNG")
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
