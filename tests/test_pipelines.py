"""Pipelines end to end: scenes joined into one video, chains, long speech, against a real gateway
process and its built-in demo node; a SIGKILL mid-pipeline; and the planning, splitting and
joining in-process."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
import wave
from pathlib import Path

import av
import pytest

from gateway_proc import GatewayProcess, until
from servers import NodeProcess
from media import make_png, make_wav
from x2v_gateway.demo.video import render_video
from x2v_gateway.media import probe_video
from x2v_gateway.pipelines.media import frame_counts, join_clips, last_frame, plan_cuts, split_speech


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def make_speech(path: Path, phrases: int, talk: float = 2.7, pause: float = 0.4, rate: int = 16000) -> Path:
    """A voice-over of `phrases` tones, each followed by a pause: its silences are where to cut."""
    tone = b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * 300 * i / rate))) for i in range(int(talk * rate)))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        for _ in range(phrases):
            out.writeframes(tone)
            out.writeframes(bytes(int(pause * rate) * 2))
    return path


def wait_pipeline(client, pipeline_id: str, states: set[str], timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    pipeline: dict = {}
    while time.monotonic() < deadline:
        pipeline = client.get(f"/api/v1/pipelines/{pipeline_id}").json()
        if pipeline.get("state") in states:
            return pipeline
        time.sleep(0.1)
    raise AssertionError(f"pipeline {pipeline_id} still {pipeline.get('state')} after {timeout}s: {pipeline}")


def frames_of(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(container.streams.video[0]))


def download(client, url: str, dest: Path) -> Path:
    response = client.get(url)
    assert response.status_code == 200, response.text
    dest.write_bytes(response.content)
    return dest


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    # Parts of at most 6 s: a 20 s voice-over is a long speech here.
    # Demo jobs take 0.4 s, one at a time: a test can catch a step before it has finished.
    gateway = GatewayProcess(root / "data", X2V_SPEECH_PART_SECONDS="6", X2V_DEMO_JOB_SECONDS="0.4").start()
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def api(gateway):
    with gateway.client() as client:
        yield client


# -- end to end, on the demo node ----------------------------------------------------------------


def test_scenes_are_joined_into_one_video_with_the_speech_under_its_scene(api, media, tmp_path):
    doc = {
        "name": "three scenes",
        "scenes": [
            {"task": "t2v", "prompt": "an immortal realm sky, a golden scroll", "duration": 2},
            {"task": "i2v", "prompt": "a calm cultivator", "image": b64(media["face"]), "duration": 1.5},
            {"task": "s2v", "prompt": "the cultivator speaks", "image": b64(media["face2"]), "audio": b64(media["voice"])},
        ],
        "output": {"fps": 16, "resolution": "320x180"},
        "seed": 7,
    }
    response = api.post("/api/v1/pipelines", json=doc)
    assert response.status_code == 201, response.text
    assert response.headers["location"] == f"/api/v1/pipelines/{response.json()['id']}"
    pipeline = wait_pipeline(api, response.json()["id"], {"succeeded", "failed"})
    assert pipeline["state"] == "succeeded", pipeline
    assert [s["task"] for s in pipeline["steps"]] == ["t2v", "i2v", "s2v"]
    assert all(s["state"] == "succeeded" and s["result"]["url"] for s in pipeline["steps"])
    # The voice-over is 1.5 s: the video lasts 2 + 1.5 + 1.5 s, at 16 frames a second.
    video = download(api, pipeline["result"]["url"], tmp_path / "joined.mp4")
    info = probe_video(video)
    assert info.duration == pytest.approx(5.0, abs=0.07)
    assert (info.width, info.height) == (320, 180)
    assert info.has_audio
    assert frames_of(video) == 80 == pipeline["result"]["frames"]
    # Every step's own output downloads as a job's does.
    clip = download(api, pipeline["steps"][1]["result"]["url"], tmp_path / "step1.mp4")
    assert probe_video(clip).duration > 1.4
    # Each step is an ordinary job, in the pipeline's batch.
    jobs = api.get("/api/v1/jobs", params={"batch_id": pipeline["id"]}).json()["jobs"]
    assert sorted(j["id"] for j in jobs) == sorted(s["job_id"] for s in pipeline["steps"])
    assert all(j["params"]["seed"] == 7 for j in jobs)


def test_a_scene_starts_from_the_last_frame_of_the_one_before(api, media, tmp_path):
    doc = {"scenes": [
        {"task": "i2v", "prompt": "a face", "image": b64(media["face"]), "duration": 1},
        {"task": "i2v", "prompt": "it goes on", "first_frame": "previous", "duration": 1},
    ]}
    response = api.post("/api/v1/pipelines", json=doc)
    assert response.status_code == 201, response.text
    first = response.json()["steps"]
    assert first[1]["state"] == "waiting" and first[1]["takes"] == {"image": "steps[0]'s last frame"}
    pipeline = wait_pipeline(api, response.json()["id"], {"succeeded", "failed"})
    assert pipeline["state"] == "succeeded", pipeline
    clip = download(api, pipeline["steps"][0]["result"]["url"], tmp_path / "first.mp4")
    last_frame(clip, tmp_path / "last.png")
    second = api.get(f"/api/v1/jobs/{pipeline['steps'][1]['job_id']}").json()
    assert second["inputs"]["image"]["sha256"] == hashlib.sha256((tmp_path / "last.png").read_bytes()).hexdigest()
    video = download(api, pipeline["result"]["url"], tmp_path / "joined.mp4")
    assert probe_video(video).duration == pytest.approx(2.0, abs=0.07)
    assert not probe_video(video).has_audio  # no scene has sound


def test_long_speech_is_split_at_silences_run_in_parallel_and_joined_with_its_audio(api, media, tmp_path):
    speech = make_speech(tmp_path / "speech.wav", phrases=6)  # 18.6 s
    doc = {"scenes": [{"task": "s2v", "prompt": "a long talk", "image": b64(media["face"]), "audio": b64(speech)}],
           "seed": 99}
    response = api.post("/api/v1/pipelines", json=doc)
    assert response.status_code == 201, response.text
    steps = response.json()["steps"]
    assert len(steps) >= 4 and [s["segment"] for s in steps] == list(range(len(steps)))
    assert all(s["seconds"] <= 6 for s in steps)
    assert sum(s["seconds"] for s in steps) == pytest.approx(18.6, abs=0.01)
    pipeline = wait_pipeline(api, response.json()["id"], {"succeeded", "failed"})
    assert pipeline["state"] == "succeeded", pipeline
    jobs = [api.get(f"/api/v1/jobs/{s['job_id']}").json() for s in pipeline["steps"]]
    # The same portrait and seed, each with its own part of the audio.
    assert {j["inputs"]["image"]["sha256"] for j in jobs} == {hashlib.sha256(media["face"].read_bytes()).hexdigest()}
    assert {j["params"]["seed"] for j in jobs} == {99}
    assert len({j["inputs"]["audio"]["sha256"] for j in jobs}) == len(jobs)
    video = download(api, pipeline["result"]["url"], tmp_path / "talk.mp4")
    info = probe_video(video)
    assert info.has_audio and info.duration == pytest.approx(18.6, abs=0.07)
    with av.open(str(video)) as container:
        sound = container.streams.audio[0]
        assert float(sound.duration * sound.time_base) == pytest.approx(18.6, abs=0.05)
    assert frames_of(video) == round(18.6 * 16)


def test_cancel_and_retry_of_one_step(api, media):
    doc = {"scenes": [
        {"task": "t2v", "prompt": "first", "duration": 1},
        {"task": "t2v", "prompt": "second", "duration": 1},
    ]}
    pipeline = api.post("/api/v1/pipelines", json=doc).json()
    wait_pipeline(api, pipeline["id"], {"succeeded"})
    # A finished pipeline's steps are not retried.
    refused = api.post(f"/api/v1/pipelines/{pipeline['id']}/steps/0/retry")
    assert refused.status_code == 409, refused.text

    pipeline = api.post("/api/v1/pipelines", json=doc).json()
    second = until(lambda: api.get(f"/api/v1/pipelines/{pipeline['id']}").json()["steps"][1]["job_id"])
    api.delete(f"/api/v1/jobs/{second}")  # one step's job cancelled by hand: that step failed
    failed = wait_pipeline(api, pipeline["id"], {"failed"})
    assert failed["error"].startswith("steps[1] (scenes[1]) cancelled") and failed["steps"][1]["state"] == "cancelled"
    until(lambda: api.get(f"/api/v1/pipelines/{pipeline['id']}").json()["steps"][0]["state"] == "succeeded")
    retried = api.post(f"/api/v1/pipelines/{pipeline['id']}/steps/1/retry")
    assert retried.status_code == 200, retried.text
    done = wait_pipeline(api, pipeline["id"], {"succeeded"})
    first_job = api.get(f"/api/v1/jobs/{done['steps'][0]['job_id']}").json()
    assert first_job["run"] == 0 and first_job["attempts"] == 1  # the step that succeeded was not run again
    assert api.get(f"/api/v1/jobs/{second}").json()["run"] == 1

    # A failed step's job retried through the jobs API moves its pipeline on just as well.
    pipeline = api.post("/api/v1/pipelines", json=doc).json()
    second = until(lambda: api.get(f"/api/v1/pipelines/{pipeline['id']}").json()["steps"][1]["job_id"])
    api.delete(f"/api/v1/jobs/{second}")
    wait_pipeline(api, pipeline["id"], {"failed"})
    assert api.post(f"/api/v1/jobs/{second}/retry").status_code == 200
    assert wait_pipeline(api, pipeline["id"], {"succeeded"})["error"] is None

    pipeline = api.post("/api/v1/pipelines", json={"scenes": [
        {"task": "i2v", "prompt": "a", "image": b64(media["face"]), "duration": 3},
        {"task": "i2v", "prompt": "b", "first_frame": "previous", "duration": 3},
    ]}).json()
    cancelled = api.delete(f"/api/v1/pipelines/{pipeline['id']}").json()
    assert cancelled["state"] == "cancelled"
    time.sleep(0.5)
    after = api.get(f"/api/v1/pipelines/{pipeline['id']}").json()
    assert after["state"] == "cancelled" and after["steps"][1]["job_id"] is None  # never started
    assert after["steps"][0]["state"] in ("cancelled", "succeeded")
    assert api.get(f"/api/v1/pipelines/{pipeline['id']}/video").status_code == 404


@pytest.mark.parametrize(("doc", "field"), [
    ({"scenes": []}, "scenes"),
    ({"scenes": [{"task": "t2v", "prompt": "x"}]}, "scenes[0].duration"),
    ({"scenes": [{"task": "t2v", "prompt": "x", "duration": 31}]}, "scenes[0].duration"),
    ({"scenes": [{"task": "t2v", "prompt": "x", "duration": 2, "target_fps": 24}]}, "scenes[0].target_fps"),
    ({"scenes": [{"task": "i2v", "prompt": "x", "duration": 2, "first_frame": "previous"}]}, "scenes[0].first_frame"),
    ({"scenes": [{"task": "i2v", "prompt": "x", "duration": 2}]}, "scenes[0].image"),
    ({"scenes": [{"task": "t2v", "duration": 2}]}, "scenes[0].prompt"),
    ({"scenes": [{"task": "t2v", "prompt": "x", "duration": 2, "colour": 1}]}, "scenes[0].colour"),
    ({"scenes": [{"task": "t2v", "prompt": "x", "duration": 2}] * 51}, "scenes"),
    ({"scenes": [{"task": "t2v", "prompt": "x", "duration": 30}] * 21}, "scenes"),
    ({"scenes": [{"task": "t2v", "prompt": "x", "duration": 2}], "output": {"resolution": "321x180"}}, "output.resolution"),
    ({"scenes": [{"task": "t2v", "prompt": "x", "duration": 2}], "output": {"fps": 0}}, "output.fps"),
    ({"scenes": [{"task": "i2v", "prompt": "x", "duration": 2, "image": "!!!"}]}, "scenes[0].image"),
])
def test_a_bad_pipeline_is_refused_naming_the_field(api, doc, field):
    response = api.post("/api/v1/pipelines", json=doc)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field, response.text


def test_speech_longer_than_a_pipeline_takes_is_refused(api, media, tmp_path):
    long = tmp_path / "long.wav"
    with wave.open(str(long), "wb") as out:  # 601 s of silence, small: 2,000 samples a second
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(2000)
        out.writeframes(bytes(601 * 2000 * 2))
    doc = {"scenes": [{"task": "s2v", "image": b64(media["face"]), "audio": b64(long)}]}
    response = api.post("/api/v1/pipelines", json=doc)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "scenes[0].audio"
    assert "600" in response.json()["error"]["message"]


def test_idempotency_key_makes_one_pipeline_however_often_it_is_sent(api):
    doc = {"scenes": [{"task": "t2v", "prompt": "once", "duration": 1}]}
    first = api.post("/api/v1/pipelines", json=doc, headers={"Idempotency-Key": "story-1"})
    again = api.post("/api/v1/pipelines", json=doc, headers={"Idempotency-Key": "story-1"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.headers["idempotent-replayed"] == "true" and again.json()["id"] == first.json()["id"]
    other = api.post("/api/v1/pipelines", json={**doc, "seed": 3}, headers={"Idempotency-Key": "story-1"})
    assert other.status_code == 409 and other.json()["error"]["field"] == "Idempotency-Key"


def test_another_keys_pipeline_is_not_found(gateway, api):
    pipeline = api.post("/api/v1/pipelines", json={"scenes": [{"task": "t2v", "prompt": "mine", "duration": 1}]}).json()
    key = api.post("/api/v1/keys", json={"name": "someone-else"}).json()["key"]
    with gateway.client(key=key) as other:
        assert other.get(f"/api/v1/pipelines/{pipeline['id']}").status_code == 404
        assert other.delete(f"/api/v1/pipelines/{pipeline['id']}").status_code == 404
        assert other.get("/api/v1/pipelines").json()["pipelines"] == []
    listed = api.get("/api/v1/pipelines", params={"limit": 1}).json()
    assert listed["pipelines"][0]["id"] == pipeline["id"] and listed["next_cursor"]


def test_pipeline_runs_in_parallel_across_nodes_and_survives_gateway_sigkill(tmp_path, media):
    # Two nodes, one job at a time each, 1.5 s a job: the kill lands with steps done and others running.
    nodes = [NodeProcess(tmp_path / name, job_seconds=1.5).start() for name in ("a", "b")]
    gateway = GatewayProcess(tmp_path / "data", nodes=f"a={nodes[0].url},b={nodes[1].url}", X2V_LOOKAHEAD="0").start()
    try:
        with gateway.client() as api:
            doc = {"scenes": [
                {"task": "i2v", "prompt": "one", "image": b64(media["face"]), "duration": 1},
                {"task": "i2v", "prompt": "two", "image": b64(media["face2"]), "duration": 1},
                {"task": "i2v", "prompt": "three", "first_frame": "previous", "duration": 1},
                {"task": "t2v", "prompt": "four", "duration": 1},
            ]}
            pipeline_id = api.post("/api/v1/pipelines", json=doc).json()["id"]

            def some_done_some_running():
                steps = api.get(f"/api/v1/pipelines/{pipeline_id}").json()["steps"]
                states = [s["state"] for s in steps]
                return steps if "succeeded" in states and {"queued", "submitted", "running"} & set(states) else None

            before = until(some_done_some_running, timeout=60, what="a step done and another under way")
        gateway.kill()
        gateway.start()
        with gateway.client() as api:
            done = wait_pipeline(api, pipeline_id, {"succeeded", "failed"})
            assert done["state"] == "succeeded", done
            for old, new in zip(before, done["steps"]):
                assert old["job_id"] is None or old["job_id"] == new["job_id"]
            jobs = api.get("/api/v1/jobs", params={"batch_id": pipeline_id}).json()["jobs"]
            assert len(jobs) == 4  # one job per step, none made twice
            assert all(j["attempts"] == 1 and j["run"] == 0 for j in jobs), jobs  # none sent twice
            assert {j["upstream"] for j in jobs} == {"a", "b"}  # the pool shared the steps
            video = download(api, done["result"]["url"], tmp_path / "joined.mp4")
            assert probe_video(video).duration == pytest.approx(4.0, abs=0.07)
            assert frames_of(video) == 64
    finally:
        gateway.stop()
        for node in nodes:
            node.stop()


def test_cli_submits_a_document_naming_local_files_and_downloads_the_video(gateway, media, tmp_path):
    shutil.copy(media["face"], tmp_path / "face.png")
    shutil.copy(media["voice"], tmp_path / "voice.wav")
    (tmp_path / "story.json").write_text(json.dumps({"scenes": [
        {"task": "t2v", "prompt": "a title card", "duration": 1},
        {"task": "s2v", "prompt": "hello", "image": "face.png", "audio": "voice.wav"},
    ]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("X2V_")}
    done = subprocess.run(
        [sys.executable, "-m", "x2v_gateway.cli", "pipeline", "submit", "story.json", "--json"],
        cwd=tmp_path, env={**env, "X2V_URL": gateway.url, "X2V_KEY": gateway.admin_key},
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["state"] == "succeeded" and [s["task"] for s in answer["steps"]] == ["t2v", "s2v"]
    info = probe_video(tmp_path / "story.mp4")
    assert info.has_audio and info.duration == pytest.approx(2.5, abs=0.07)
    assert gateway.admin_key not in done.stdout + done.stderr
    # Run again (say after a Ctrl-C): the same pipeline, not a second one.
    again = subprocess.run(
        [sys.executable, "-m", "x2v_gateway.cli", "pipeline", "submit", "story.json", "--json", "--no-wait"],
        cwd=tmp_path, env={**env, "X2V_URL": gateway.url, "X2V_KEY": gateway.admin_key},
        capture_output=True, text=True, timeout=120,
    )
    assert json.loads(again.stdout)["id"] == answer["id"]

    (tmp_path / "bad.json").write_text(json.dumps({"scenes": [{"task": "i2v", "image": "nope.png", "duration": 1}]}))
    refused = subprocess.run(
        [sys.executable, "-m", "x2v_gateway.cli", "pipeline", "submit", "bad.json"],
        cwd=tmp_path, env={**env, "X2V_URL": gateway.url, "X2V_KEY": gateway.admin_key},
        capture_output=True, text=True, timeout=60,
    )
    assert refused.returncode == 2 and "scenes[0].image" in refused.stderr


# -- in-process: planning cuts, splitting, joining -----------------------------------------------


def test_cuts_fall_in_the_quietest_window_and_no_part_is_too_long():
    window = 0.05
    # 20 s of sound with a silence every 3.1 s (2.7 s of talk, 0.4 s of pause).
    energies = [0.0 if (i * window) % 3.1 >= 2.7 else 1.0 for i in range(400)]
    cuts = plan_cuts(energies, window, 20.0, 6.0)
    bounds = list(zip([0.0, *cuts], [*cuts, 20.0]))
    assert all(b - a <= 6.0 for a, b in bounds)
    assert all(c % 3.1 >= 2.7 for c in cuts)  # every cut in a pause
    assert plan_cuts(energies, window, 5.0, 6.0) == []


def test_frame_counts_add_up_without_rounding_drift():
    assert frame_counts([1.03] * 10, 16) == [16, 17, 16, 17, 16, 17, 16, 17, 16, 17] or sum(frame_counts([1.03] * 10, 16)) == round(10.3 * 16)
    assert sum(frame_counts([0.33] * 30, 24)) == round(9.9 * 24)


def test_split_speech_keeps_every_sample(tmp_path):
    speech = make_speech(tmp_path / "speech.wav", phrases=5)
    found = split_speech(speech, tmp_path / "parts", 6.0, 600.0)
    assert found["seconds"] == pytest.approx(15.5)
    total = 0
    for start, end, path in found["parts"]:
        with wave.open(path) as part:
            assert part.getnframes() == pytest.approx((end - start) * 16000, abs=1)
            total += part.getnframes()
    assert total == 15.5 * 16000
    with pytest.raises(ValueError, match="at most 10 s"):
        split_speech(speech, tmp_path / "parts", 6.0, 10.0)


def test_join_fits_every_clip_to_one_size_and_frame_rate_and_keeps_the_sound(tmp_path):
    face = make_png(tmp_path / "face.png", size=(96, 128))
    voice = make_wav(tmp_path / "voice.wav", seconds=1.25)
    render_video(tmp_path / "card.mp4", image=None, audio=None, prompt="a card", seed=1, seconds=2, fps=24)
    render_video(tmp_path / "talk.mp4", image=face, audio=voice, prompt="", seed=1, seconds=1, fps=16)
    info = join_clips([
        {"video": str(tmp_path / "card.mp4"), "seconds": 2.0},
        {"video": str(tmp_path / "talk.mp4"), "seconds": 1.25, "audio": str(voice), "offset": 0.0},
    ], tmp_path / "joined.mp4", 20, [240, 136])
    assert info == {"seconds": 3.25, "frames": 65, "width": 240, "height": 136, "has_audio": True}
    probed = probe_video(tmp_path / "joined.mp4")
    assert (probed.width, probed.height, probed.has_audio) == (240, 136, True)
    assert probed.duration == pytest.approx(3.25, abs=0.06)
    assert frames_of(tmp_path / "joined.mp4") == 65


def test_retention_keeps_a_pipelines_video_until_its_own_time_is_up(tmp_path):
    from x2v_gateway.store import JobStore, Pipeline, PipelineStep, new_pipeline_id

    async def run() -> tuple[list[str], list[str], bool]:
        store = JobStore(tmp_path / "gateway.db")
        try:
            pipeline = Pipeline(id=new_pipeline_id(), output={"fps": 16}, steps=[PipelineStep(
                n=0, scene=0, kind="clip", task="t2v", params={"prompt": "x"}, inputs={}, needs={}, seconds=1.0,
            )])
            await store.create_pipeline(pipeline)
            await store.record_blob("a" * 64, 10, "mp4")
            assert await store.finish_pipeline(pipeline.id, "a" * 64, {"seconds": 1.0})
            now = time.time()
            kept = await store.expire_files(now - 60, grace=0)  # finished after the cutoff: kept
            gone = await store.expire_files(now + 60, grace=0)  # finished before it: deleted
            return kept, gone, (await store.pipeline(pipeline.id)).files_expired
        finally:
            store.close()

    kept, gone, expired = asyncio.run(run())
    assert "a" * 64 not in kept and "a" * 64 in gone and expired


def test_a_scene_with_an_image_prompt_waits_for_the_image_made_first():
    from x2v_gateway.pipelines.plan import check_scenes, parse_request, plan_steps
    from x2v_gateway.schemas import ApiError

    request = parse_request(json.dumps({"scenes": [
        {"task": "t2v", "prompt": "a title", "duration": 2},
        {"task": "s2v", "prompt": "she speaks", "image_prompt": "a portrait of a storyteller", "audio": "x"},
    ], "seed": 5}).encode())
    no_prompt_needed = lambda task, prompt: None  # noqa: E731
    check_scenes(request, {"t2v", "s2v", "t2i"}, no_prompt_needed)
    with pytest.raises(ApiError) as refused:
        check_scenes(request, {"t2v", "s2v"}, no_prompt_needed)
    assert refused.value.field == "scenes[1].image_prompt"
    speech = {1: {"seconds": 10.0, "parts": [[0.0, 5.0, "p0"], [5.0, 10.0, "p1"]]}}
    steps = plan_steps(request, [{}, {"audio": "whole"}], speech)
    assert [(s.kind, s.task) for s in steps] == [("clip", "t2v"), ("image", "t2i"), ("clip", "s2v"), ("clip", "s2v")]
    assert steps[1].params == {"prompt": "a portrait of a storyteller", "seed": 5}
    # Both parts of the speech start from the one portrait made first, with the same seed.
    assert steps[2].needs == steps[3].needs == {"image": {"step": 1, "take": "output"}}
    assert [s.inputs["audio"] for s in steps[2:]] == ["p0", "p1"]
    assert {s.params["seed"] for s in steps} == {5}
    assert [s.audio for s in steps[2:]] == [{"sha256": "whole", "offset": 0.0}, {"sha256": "whole", "offset": 5.0}]


def test_a_hung_media_helper_is_stopped_and_the_next_work_gets_a_new_one():
    from x2v_gateway.pipelines.media import MediaPool

    async def run() -> tuple[str, int]:
        pool = MediaPool()
        try:
            with pytest.raises(ValueError, match="longer than 0.5 s") as hung:
                await pool.run(time.sleep, 30, timeout=0.5)
            return str(hung.value), await pool.run(len, "four", timeout=30)
        finally:
            pool.close()

    started = time.monotonic()
    _, answer = asyncio.run(run())
    assert answer == 4 and time.monotonic() - started < 20


def test_a_pipeline_over_the_keys_daily_quota_is_refused_before_its_inputs_are_fetched(gateway, api, media):
    key = api.post("/api/v1/keys", json={"name": "two-a-day", "daily_quota": 2}).json()["key"]
    doc = {"scenes": [{"task": "i2v", "prompt": "x", "image": b64(media["face"]), "duration": 1}] * 3}
    with gateway.client(key=key) as limited:
        refused = limited.post("/api/v1/pipelines", json=doc)
        assert refused.status_code == 429 and refused.json()["error"]["field"] == "quota"
        assert limited.get("/api/v1/me").json()["jobs_today"] == 0  # nothing counted
        assert limited.post("/api/v1/pipelines", json={"scenes": doc["scenes"][:2]}).status_code == 201


def test_a_generated_image_starts_a_scene_and_a_generated_portrait_speaks(api, media, tmp_path):
    doc = {"scenes": [
        {"task": "i2v", "prompt": "the castle in the mist", "image_prompt": "a castle at dawn", "duration": 1},
        {"task": "s2v", "prompt": "she speaks", "image_prompt": "a portrait of a storyteller", "audio": b64(media["voice"])},
    ], "seed": 11}
    response = api.post("/api/v1/pipelines", json=doc)
    assert response.status_code == 201, response.text
    pipeline = wait_pipeline(api, response.json()["id"], {"succeeded", "failed"})
    assert pipeline["state"] == "succeeded", pipeline
    steps = pipeline["steps"]
    assert [(s["kind"], s["task"]) for s in steps] == [("image", "t2i"), ("clip", "i2v"), ("image", "t2i"), ("clip", "s2v")]
    assert steps[1]["takes"] == {"image": "steps[0]'s output"} and steps[3]["takes"] == {"image": "steps[2]'s output"}
    # Each image step's output is an image, downloaded as a job's; the scene after it starts from it.
    image = api.get(steps[0]["result"]["url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    clip_job = api.get(f"/api/v1/jobs/{steps[1]['job_id']}").json()
    assert clip_job["inputs"]["image"]["sha256"] == hashlib.sha256(image.content).hexdigest()
    portrait_job = api.get(f"/api/v1/jobs/{steps[2]['job_id']}").json()
    assert portrait_job["params"] == {"prompt": "a portrait of a storyteller", "seed": 11}
    video = download(api, pipeline["result"]["url"], tmp_path / "joined.mp4")
    info = probe_video(video)
    assert info.has_audio and info.duration == pytest.approx(2.5, abs=0.07)
    assert frames_of(video) == 40


def test_a_step_whose_earlier_output_was_deleted_fails_the_pipeline_saying_why(tmp_path):
    import gateway_proc
    from x2v_gateway.store import JobStore, Pipeline, PipelineStep, new_pipeline_id

    if gateway_proc.database_for is not None:
        pytest.skip("the store is seeded as a SQLite file")
    data = tmp_path / "data"
    data.mkdir()

    async def seed() -> str:
        # Step 0 finished, then its video was purged before step 1 took its last frame (a
        # pipeline left failed for longer than X2V_RETENTION_HOURS, then moved on).
        store = JobStore(data / "gateway.db")
        try:
            clip = {"params": {"prompt": "x"}, "inputs": {}, "seconds": 1.0}
            pipeline = Pipeline(id=new_pipeline_id(), output={"fps": 16}, steps=[
                PipelineStep(n=0, scene=0, kind="clip", task="t2v", needs={}, **clip),
                PipelineStep(n=1, scene=1, kind="clip", task="i2v", needs={"image": {"step": 0, "take": "last_frame"}}, **clip),
            ])
            await store.create_pipeline(pipeline)
            job, _ = await store.create_step_job(pipeline.id, 0, task="t2v", params={"prompt": "x"}, inputs={})
            await store.record_blob("ab" * 32, 10, "mp4")
            assert await store.succeed(job.id, "ab" * 32, {"duration": 1.0})
            assert await store.purge_files([job.id], "test", job.id) == ["ab" * 32]
            return pipeline.id
        finally:
            store.close()

    pipeline_id = asyncio.run(seed())
    gateway = GatewayProcess(data).start()
    try:
        with gateway.client() as api:
            failed = wait_pipeline(api, pipeline_id, {"failed", "succeeded"}, timeout=30)
        assert failed["state"] == "failed"
        assert failed["error"] == ("steps[1] could not take its image from steps[0]: its output was deleted"
                                   " (expired or purged); submit the pipeline again")
        assert failed["steps"][1]["job_id"] is None and failed["steps"][1]["state"] == "waiting"
    finally:
        gateway.stop()


def test_an_image_made_then_refined_starts_a_scene(api, media, tmp_path):
    doc = {"scenes": [
        {"task": "i2v", "prompt": "the castle wakes", "image_prompt": "a castle at dawn",
         "image_refine": "the same castle, painted in watercolour", "duration": 1},
        {"task": "i2v", "prompt": "a face turns", "image": b64(media["face"]), "image_refine": "as a charcoal drawing",
         "duration": 1},
    ], "seed": 3}
    response = api.post("/api/v1/pipelines", json=doc)
    assert response.status_code == 201, response.text
    pipeline = wait_pipeline(api, response.json()["id"], {"succeeded", "failed"})
    assert pipeline["state"] == "succeeded", pipeline
    steps = pipeline["steps"]
    assert [(s["kind"], s["task"]) for s in steps] == [
        ("image", "t2i"), ("image", "i2i"), ("clip", "i2v"), ("image", "i2i"), ("clip", "i2v")]
    assert steps[1]["takes"] == {"image": "steps[0]'s output"} and steps[2]["takes"] == {"image": "steps[1]'s output"}
    made, refined, clip = (api.get(f"/api/v1/jobs/{steps[n]['job_id']}").json() for n in range(3))
    assert refined["params"] == {"prompt": "the same castle, painted in watercolour", "seed": 3}
    assert refined["inputs"]["image"]["sha256"] == made["result"]["sha256"]
    assert clip["inputs"]["image"]["sha256"] == refined["result"]["sha256"] != made["result"]["sha256"]
    # A given image is refined as it is, and the scene starts from the refined one.
    given, scene = (api.get(f"/api/v1/jobs/{steps[n]['job_id']}").json() for n in (3, 4))
    assert given["inputs"]["image"]["sha256"] == hashlib.sha256(media["face"].read_bytes()).hexdigest()
    assert scene["inputs"]["image"]["sha256"] == given["result"]["sha256"]
    video = download(api, pipeline["result"]["url"], tmp_path / "joined.mp4")
    assert probe_video(video).duration == pytest.approx(2.0, abs=0.07)


@pytest.mark.parametrize(("scene", "field"), [
    ({"task": "i2v", "prompt": "x", "duration": 1, "image_refine": "y"}, "scenes[0].image_refine"),
    ({"task": "t2v", "prompt": "x", "duration": 1, "image_refine": "y"}, "scenes[0].image_refine"),
    ({"task": "i2v", "prompt": "x", "duration": 1, "image": "a", "image_refine": ""}, "scenes[0].image_refine"),
])
def test_a_refine_without_an_image_to_refine_is_refused(scene, field):
    from x2v_gateway.pipelines.plan import check_scenes, parse_request
    from x2v_gateway.schemas import ApiError

    with pytest.raises(ApiError) as refused:
        check_scenes(parse_request(json.dumps({"scenes": [scene]}).encode()), {"i2v", "t2v", "t2i", "i2i"},
                     lambda task, prompt: None)
    assert refused.value.field == field
    with pytest.raises(ApiError) as no_i2i:
        check_scenes(parse_request(json.dumps({"scenes": [
            {"task": "i2v", "prompt": "x", "duration": 1, "image": "a", "image_refine": "y"}]}).encode()),
            {"i2v", "t2i"}, lambda task, prompt: None)
    assert no_i2i.value.field == "scenes[0].image_refine" and "i2i" in no_i2i.value.message
