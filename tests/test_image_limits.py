"""An image must decode, every pixel, within `X2V_MAX_IMAGE_MEGAPIXELS`; its structure is
bounded before a decoder walks it. Through the API of an in-process gateway and its real
media checkers."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
from litestar.testing import TestClient

from media import make_png, make_raw_png, make_wav, png_chunk
from x2v_gateway.app import create_app
from x2v_gateway.settings import load_settings

ADMIN_KEY = "x2v_image-limits-admin-key-0123456789"


def _client(tmp_path: Path, **env: str) -> TestClient:
    # A node that never answers but says it runs i2v and s2v: jobs are accepted and wait.
    settings = load_settings({
        "X2V_DATA_DIR": str(tmp_path / "data"), "X2V_NODES": "n=http://127.0.0.1:9",
        "X2V_NODE_TASKS": "n=s2v+i2v", "X2V_ADMIN_KEY": ADMIN_KEY, **env,
    }, env_file=None)
    client = TestClient(create_app(settings))
    client.headers["Authorization"] = f"Bearer {ADMIN_KEY}"
    return client


def _submit(client: TestClient, image: Path):
    with image.open("rb") as handle:
        return client.post("/api/v1/jobs", data={"task": "i2v", "prompt": "a wave"},
                           files={"image": (image.name, handle)})


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    row = b"\x00" + b"\x00" * 13  # a 100-pixel-wide 1-bit row: its filter byte, then its bits
    pixels = zlib.compress(row * 100)
    return {
        "good": make_raw_png(root / "good.png", 100, 100),
        # Checksums right, so verify() passes; the compressed pixels are garbage.
        "broken": make_raw_png(root / "broken.png", 100, 100, idat=pixels[:6] + b"\xff" * 12 + pixels[18:]),
        # 100 megapixels, 12 KB: a header Pillow would decode into 1.25 GB of pixels (as RGB, 30 GB).
        "huge": make_raw_png(root / "huge.png", 10_000, 10_000),
        "45mp": make_raw_png(root / "45mp.png", 7500, 6000),
        # 120,000 empty chunks before the pixels: Pillow walks them one by one in Python.
        "chunky": make_raw_png(root / "chunky.png", 100, 100, extra=png_chunk(b"quIt", b"") * 120_000),
        "portrait": make_png(root / "portrait.png", (800, 800)),
    }


def test_an_image_that_does_not_decode_or_is_too_large_is_refused_naming_the_field(tmp_path, files):
    with _client(tmp_path) as client:
        assert _submit(client, files["good"]).status_code == 201
        for name, says in [
            ("broken", "image is not a readable image"),
            ("huge", "image has more pixels than the 40 megapixels an image may have: scale it down"),
            ("45mp", "image is 7500x6000 pixels (45 megapixels); images may have at most 40 megapixels"),
            ("chunky", "image is a PNG of more than 100,000 chunks; save it again"),
        ]:
            answer = _submit(client, files[name])
            assert answer.status_code == 422, (name, answer.text)
            error = answer.json()["error"]
            assert error["field"] == "image" and error["message"].startswith(says), (name, error)


def test_the_megapixel_limit_is_a_setting(tmp_path, files):
    with _client(tmp_path / "strict", X2V_MAX_IMAGE_MEGAPIXELS="0.5") as client:
        refused = _submit(client, files["portrait"])
        assert refused.status_code == 422
        assert "800x800 pixels (1 megapixels); images may have at most 0.5 megapixels" in refused.json()["error"]["message"]
    with _client(tmp_path / "default") as client:
        assert _submit(client, files["portrait"]).status_code == 201


def test_a_dropped_file_that_does_not_decode_is_refused_on_the_batch_form(tmp_path, files):
    with _client(tmp_path) as client:
        for name, says in [("broken", "broken.png is not a readable image"),
                           ("huge", "huge.png has more pixels than the 40 megapixels")]:
            with files[name].open("rb") as handle:
                answer = client.post(f"/ui/uploads?name={name}.png", data={"name": f"{name}.png"},
                                     files={"image": (f"{name}.png", handle)})
            assert answer.status_code == 422 and says in answer.text, answer.text
        voice = make_wav(tmp_path / "voice.wav", seconds=0.2)
        with voice.open("rb") as handle:
            kept = client.post("/ui/uploads?name=voice.wav", data={"name": "voice.wav"},
                               files={"audio": ("voice.wav", handle)})
        assert kept.status_code == 200, kept.text
