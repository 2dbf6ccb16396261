"""A job's files through a real gateway on each blob backend: the data directory, and a bucket on
a real S3 server (SeaweedFS on loopback). Uploads kept once, results mirrored and checked, videos
downloaded with Range, inputs sent on to the node from where they are kept, files purged."""

from __future__ import annotations

import base64
import hashlib
import secrets
import signal
from pathlib import Path

import pytest

from gateway_proc import GatewayProcess, until
from media import make_png
from x2v_gateway.media import probe_video


class Backend:
    """One gateway on one blob backend, and a way to list the blobs it keeps."""

    def __init__(self, gateway: GatewayProcess, keys) -> None:
        self.gateway, self.keys = gateway, keys

    def shas(self) -> set[str]:
        return {Path(key).name for key in self.keys()}


@pytest.fixture(scope="module", params=["local", "s3"])
def backend(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"blobs-{request.param}")
    # Every input goes to the node through its /form route, read from the blob store (not sent
    # on while the upload arrives): the path that streams a kept file out.
    settings = {"X2V_FORM_THRESHOLD_MB": "0", "X2V_FORWARD_UPLOADS": "false"}
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        prefix = f"gw-{secrets.token_hex(4)}"
        settings.update(server.settings(prefix))
        keys = lambda: server.keys(prefix)  # noqa: E731
    else:
        keys = lambda: {str(p) for p in (root / "data" / "blobs").glob("??/*")}  # noqa: E731
    gateway = GatewayProcess(root / "data", **settings).start()
    yield Backend(gateway, keys)
    gateway.stop()


def _s2v(client, media, image: str = "face"):
    files = {"image": media[image].open("rb"), "audio": media["voice"].open("rb")}
    response = client.post("/api/v1/jobs?wait=60", data={"task": "s2v", "prompt": "talking"}, files=files)
    assert response.status_code == 201, response.text
    return response.json()


def test_an_upload_runs_and_its_video_is_kept_checked_and_seekable(backend, media):
    with backend.gateway.client() as client:
        job = _s2v(client, media)
        assert job["state"] == "succeeded", job
        assert job["result"]["duration"] > 0  # probed before it was kept
        video = client.get(job["result"]["url"])
        assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
        part = client.get(job["result"]["url"], headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == video.content[100:200]
        assert part.headers["content-range"] == f"bytes 100-199/{len(video.content)}"
        assert client.get(job["result"]["url"], headers={"Range": f"bytes={len(video.content)}-"}).status_code == 416
        # The dashboard's audio player reads the kept input, seeking too.
        voice = media["voice"].read_bytes()
        audio = client.get(f"/ui/jobs/{job['id']}/inputs/audio", headers={"Range": "bytes=0-99"})
        assert audio.status_code == 206 and audio.content == voice[:100]
    kept = backend.shas()
    for data in (media["face"].read_bytes(), voice, video.content):
        assert hashlib.sha256(data).hexdigest() in kept


def test_the_same_file_uploaded_twice_is_kept_once(backend, media):
    with backend.gateway.client() as client:
        _s2v(client, media, "face2")
        before = backend.shas()
        again = _s2v(client, media, "face2")
        assert again["state"] == "succeeded"
    face2 = hashlib.sha256(media["face2"].read_bytes()).hexdigest()
    assert face2 in before
    assert len(backend.shas() - before) <= 1  # the second run's video, if it differs; no input


def test_a_purged_job_loses_its_files_but_a_shared_input_stays(backend, media, tmp_path):
    unique = tmp_path / "unique.png"
    make_png(unique, color=(1, 2, secrets.randbelow(250)))
    with backend.gateway.client() as client:
        files = {"image": unique.open("rb"), "audio": media["voice"].open("rb")}
        job = client.post("/api/v1/jobs?wait=60", data={"task": "s2v", "prompt": "bye"}, files=files).json()
        assert job["state"] == "succeeded", job
        video = client.get(job["result"]["url"]).content
        kept = backend.shas()
        assert hashlib.sha256(unique.read_bytes()).hexdigest() in kept
        purged = client.delete(f"/api/v1/jobs/{job['id']}?purge=true")
        assert purged.status_code == 200, purged.text
        assert client.get(job["result"]["url"]).status_code == 410
    left = backend.shas()
    assert hashlib.sha256(unique.read_bytes()).hexdigest() not in left
    assert hashlib.sha256(video).hexdigest() not in left
    # The voice-over is every other job's input too: it stays.
    assert hashlib.sha256(media["voice"].read_bytes()).hexdigest() in left


def test_downloads_redirect_to_a_presigned_url_when_asked(s3_server, media, tmp_path):
    # JSON submissions (the default threshold) carry inputs as base64 read from the bucket.
    prefix = f"presign-{secrets.token_hex(4)}"
    gateway = GatewayProcess(tmp_path / "data", **s3_server.settings(prefix, X2V_S3_PRESIGN_MINUTES="5")).start()
    try:
        with gateway.client() as client:
            job = _s2v(client, media)
            assert job["state"] == "succeeded", job
            redirect = client.get(job["result"]["url"], follow_redirects=False)
            assert redirect.status_code == 302
            url = redirect.headers["location"]
            assert url.startswith(s3_server.endpoint) and "X-Amz-Signature=" in url
            assert s3_server.secret_access_key not in url
            video = client.get(url)
            assert video.status_code == 200 and hashlib.sha256(video.content).hexdigest() in {
                Path(k).name for k in s3_server.keys(prefix)
            }
            ranged = client.get(url, headers={"Range": "bytes=0-9"})
            assert ranged.status_code == 206 and ranged.content == video.content[:10]
    finally:
        gateway.stop()
    assert "blobs: kept in s3://" in gateway.log()
    # Stopped by SIGTERM, as uvicorn ends: not the abort Python's teardown meets after obstore.
    assert gateway.proc.returncode == -signal.SIGTERM


def test_a_bucket_refusing_the_key_turns_uploads_away_without_a_trace_of_the_secret(s3_server, media, tmp_path):
    wrong = "s3-wrong-secret-" + secrets.token_urlsafe(16)
    settings = s3_server.settings(f"refused-{secrets.token_hex(4)}", X2V_S3_SECRET_ACCESS_KEY=wrong, X2V_LOG_LEVEL="DEBUG")
    gateway = GatewayProcess(tmp_path / "data", **settings).start()  # starts anyway, and says so
    try:
        with gateway.client() as client:
            files = {"image": media["face"].open("rb"), "audio": media["voice"].open("rb")}
            refused = client.post("/api/v1/jobs", data={"task": "s2v", "prompt": "x"}, files=files)
            assert refused.status_code == 503, refused.text
            assert "file store" in refused.json()["error"]["message"]
            assert wrong not in refused.text
            # A text job needs no file to start; its video waits on the node, the job unfailed.
            text = client.post("/api/v1/jobs", json={"task": "t2v", "prompt": "words only"}).json()
            until(lambda: f"job {text['id']}: result waits for the blob store" in gateway.log(), what="a kept video")
            assert client.get(f"/api/v1/jobs/{text['id']}").json()["state"] == "running"
    finally:
        gateway.stop()
    log = gateway.log()
    assert "the S3 blob store could not" in log and "the store does not answer yet" in log
    assert wrong not in log
    assert not list((tmp_path / "data" / "blobs" / "tmp").iterdir())  # nothing left half-kept


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_retention_deletes_a_finished_jobs_files_from_where_they_are_kept(kind, media, tmp_path, request):
    # 0.002 h: files of jobs finished 7.2 s ago go, swept every 1.8 s.
    settings = {"X2V_RETENTION_HOURS": "0.002"}
    if kind == "s3":
        server = request.getfixturevalue("s3_server")
        prefix = f"retention-{secrets.token_hex(4)}"
        settings.update(server.settings(prefix))
        shas = lambda: {Path(k).name for k in server.keys(prefix)}  # noqa: E731
    else:
        shas = lambda: {p.name for p in (tmp_path / "data" / "blobs").glob("??/*")}  # noqa: E731
    gateway = GatewayProcess(tmp_path / "data", **settings).start()
    try:
        with gateway.client() as client:
            job = _s2v(client, media)
            assert job["state"] == "succeeded", job
            assert hashlib.sha256(media["face"].read_bytes()).hexdigest() in shas()
            until(lambda: not shas(), timeout=40, what="the expired job's files deleted")
            expired = client.get(f"/api/v1/jobs/{job['id']}").json()
            assert expired["files_expired"] is True
            assert client.get(job["result"]["url"]).status_code == 410
    finally:
        gateway.stop()


def test_a_pipeline_reads_its_clips_and_audio_from_where_they_are_kept(backend, media, tmp_path):
    # A scene's last frame, the voice-over's length and the join all need local files: on S3,
    # copies made for the while (BlobStore.local_path).
    b64 = lambda path: base64.b64encode(path.read_bytes()).decode()  # noqa: E731
    doc = {"scenes": [
        {"task": "i2v", "prompt": "a face", "image": b64(media["face"]), "duration": 1},
        {"task": "i2v", "prompt": "it goes on", "first_frame": "previous", "duration": 1},
        {"task": "s2v", "prompt": "it speaks", "image": b64(media["face2"]), "audio": b64(media["voice"])},
    ], "output": {"fps": 16, "resolution": "320x180"}}
    with backend.gateway.client() as client:
        created = client.post("/api/v1/pipelines", json=doc)
        assert created.status_code == 201, created.text
        pipeline_id = created.json()["id"]
        until(lambda: client.get(f"/api/v1/pipelines/{pipeline_id}").json()["state"] in ("succeeded", "failed"),
              timeout=90, what="the pipeline done")
        pipeline = client.get(f"/api/v1/pipelines/{pipeline_id}").json()
        assert pipeline["state"] == "succeeded", pipeline
        video = client.get(pipeline["result"]["url"])
        assert video.status_code == 200
    (tmp_path / "joined.mp4").write_bytes(video.content)
    info = probe_video(tmp_path / "joined.mp4")
    assert info.duration == pytest.approx(3.5, abs=0.1) and info.has_audio
    assert hashlib.sha256(video.content).hexdigest() in backend.shas()
    assert not list((backend.gateway.data_dir / "blobs" / "tmp").glob("copy-*"))  # the copies went
