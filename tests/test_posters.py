"""Poster frames: made once when a result is checked, kept with the job's files, served as JPEG,
and made on first request for jobs that finished before posters existed. A real gateway process
with its demo node; the backfill case is a job whose record has no poster, as older ones have."""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from PIL import Image

from gateway_proc import GatewayProcess, wait_for
from media import make_png, make_wav
from x2v_gateway.demo.video import render_video
from x2v_gateway.media import POSTER_MAX_SIDE, probe_video

FINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> GatewayProcess:
    gw = GatewayProcess(tmp_path_factory.mktemp("posters") / "data", X2V_DEMO_JOB_SECONDS="0.2").start()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def portrait(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    # Red on top, blue below: the poster shows the picture the video starts with.
    image = Image.new("RGB", (480, 640), (220, 30, 30))
    image.paste((30, 30, 220), (0, 320, 480, 640))
    image.save(root / "portrait.png")
    return {"image": root / "portrait.png", "voice": make_wav(root / "voice.wav", seconds=1.0)}


def _jpeg(body: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(body))
    assert image.format == "JPEG"
    return image.convert("RGB")


def test_a_finished_video_has_a_poster_of_its_first_frame(gateway, portrait):
    with gateway.client() as client:
        made = client.post("/api/v1/jobs", data={"task": "s2v", "prompt": "a portrait speaks"}, files={
            "image": portrait["image"].open("rb"), "audio": portrait["voice"].open("rb"),
        })
        assert made.status_code == 201, made.text
        job = wait_for(client, made.json()["id"], FINAL)
        assert job["state"] == "succeeded"
        assert job["result"]["poster_url"] == f"/api/v1/jobs/{job['id']}/poster"
        poster = client.get(job["result"]["poster_url"])
        assert poster.status_code == 200
        assert poster.headers["content-type"] == "image/jpeg"
        assert "max-age" in poster.headers["cache-control"]
        image = _jpeg(poster.content)
        # The frame of the video, in its proportions, no larger than allowed.
        assert max(image.size) <= POSTER_MAX_SIDE
        assert abs(image.width / image.height - job["result"]["width"] / job["result"]["height"]) < 0.05
        top = image.getpixel((image.width // 2, image.height // 8))
        bottom = image.getpixel((image.width // 2, image.height * 7 // 8))
        assert top[0] > 150 and top[2] < 100, top
        assert bottom[2] > 150 and bottom[0] < 100, bottom
        assert len(poster.content) < 100_000


def test_a_job_without_a_video_has_no_poster(gateway):
    with gateway.client() as client:
        assert client.get("/api/v1/jobs/jnothere/poster").status_code == 404
        job = client.post("/api/v1/jobs", json={"task": "t2v", "prompt": "x"}).json()
        assert client.delete(f"/api/v1/jobs/{job['id']}").json()["state"] == "cancelled"
        missing = client.get(f"/api/v1/jobs/{job['id']}/poster")
        assert missing.status_code == 404
        assert "cancelled" in missing.json()["error"]["message"]


def test_a_job_finished_before_posters_existed_gets_one_on_first_request(gateway):
    with gateway.client() as client:
        job = client.post("/api/v1/jobs", json={"task": "t2v", "prompt": "an old job"}).json()
        wait_for(client, job["id"], {"succeeded"})
        # As a job that finished before posters existed: no poster in its record.
        with closing(sqlite3.connect(gateway.data_dir / "gateway.db")) as db, db:
            db.execute("UPDATE jobs SET result_meta = json_remove(result_meta, '$.poster') WHERE id = ?", (job["id"],))
        poster = client.get(f"/api/v1/jobs/{job['id']}/poster")
        assert poster.status_code == 200, poster.text
        _jpeg(poster.content)
        # Made once: the record keeps it now.
        with closing(sqlite3.connect(gateway.data_dir / "gateway.db")) as db:
            (meta,) = db.execute("SELECT result_meta FROM jobs WHERE id = ?", (job["id"],)).fetchone()
        assert json.loads(meta)["poster"] == hashlib.sha256(poster.content).hexdigest()
        # Purged with the job's files.
        assert client.delete(f"/api/v1/jobs/{job['id']}?purge=true").status_code == 200
        assert client.get(f"/api/v1/jobs/{job['id']}/poster").status_code == 410


def test_probe_writes_a_bounded_poster_and_no_file_for_a_video_it_refuses(tmp_path):
    video = tmp_path / "big.mp4"
    render_video(video, image=make_png(tmp_path / "wide.png", (1600, 900)), audio=None, prompt="wide",
                 seed=1, seconds=1, max_side=1600)
    poster = tmp_path / "poster.jpg"
    info = probe_video(video, poster=poster)
    image = Image.open(poster)
    assert max(image.size) == POSTER_MAX_SIDE and abs(image.width / image.height - info.width / info.height) < 0.02
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video" * 100)
    with pytest.raises(ValueError):
        probe_video(broken, poster=tmp_path / "none.jpg")
    assert not (tmp_path / "none.jpg").exists()
