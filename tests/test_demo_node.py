"""The demo node reproduces the LightX2V self-hosted contract; the misbehaving node misbehaves.

Every node here is a real subprocess on 127.0.0.1, spoken to over real sockets.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import io
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

import loopback
from media import make_big_wav, make_png, make_wav
from servers import MisbehavingNode, NodeProcess, free_port
from x2v_gateway.demo.video import render_video
from x2v_gateway.media import probe_video

TASK_ID = re.compile(r"^[A-Z0-9]{4}(-[A-Z0-9]{4}){4}$")
# 16 frames at 16 fps: a one-second render, a few tens of milliseconds.
SHORT = {"target_video_length": 16}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    with NodeProcess(tmp_path_factory.mktemp("node")) as started:
        yield started


@pytest.fixture(scope="module")
def slow_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """Every task takes a second and at most 3 are active, so queues and cancels can be seen."""
    with NodeProcess(tmp_path_factory.mktemp("slow"), job_seconds=1.0, max_queue_size=3) as started:
        yield started


@pytest.fixture
def client(node: NodeProcess) -> Iterator[httpx.Client]:
    with loopback.client(base_url=node.url, timeout=10) as c:
        yield c


@pytest.fixture
def slow(slow_node: NodeProcess) -> Iterator[httpx.Client]:
    with loopback.client(base_url=slow_node.url, timeout=10) as c:
        yield c
        # The next test starts with an idle node: cancel what is queued, let the running one end.
        c.delete("/v1/tasks/all/running")
        _wait_until(lambda: c.get("/v1/service/status").json()["service_status"] == "idle")


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def _wait_status(client: httpx.Client, task_id: str, *statuses: str) -> dict:
    found: dict = {}

    def reached() -> bool:
        found.update(client.get(f"/v1/tasks/{task_id}/status").json())
        return found.get("status") in statuses

    _wait_until(reached)
    return found


def _submit(client: httpx.Client, **fields) -> str:
    response = client.post("/v1/tasks/video/", json={**SHORT, **fields})
    assert response.status_code == 200, response.text
    return response.json()["task_id"]


def _raw_get(url: str, path: str) -> tuple[int, bytes]:
    """A GET with the path sent exactly as written (httpx would normalise `..` away)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# --- routes and trailing slashes


def test_submit_without_trailing_slash_is_405_allowing_only_delete(client: httpx.Client) -> None:
    response = client.post("/v1/tasks/video", json={"prompt": "x"})
    assert response.status_code == 405
    assert response.json() == {"detail": "Method Not Allowed"}
    assert response.headers["allow"] == "DELETE"


def test_trailing_slash_redirects_follow_fastapi(client: httpx.Client, node: NodeProcess) -> None:
    listing = client.get("/v1/tasks")
    assert listing.status_code == 307
    assert listing.headers["location"] == f"{node.url}/v1/tasks/"
    status = client.get("/v1/tasks/SOME-TASK/status/")
    assert status.status_code == 307
    assert status.headers["location"] == f"{node.url}/v1/tasks/SOME-TASK/status"
    root = client.get("/")
    assert (root.status_code, root.headers["location"]) == (307, "/docs")
    unknown = client.get("/metrics")
    assert (unknown.status_code, unknown.json()) == (404, {"detail": "Not Found"})


def test_misc_routes_answer_like_upstream(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/v1/service/metadata").json() == {
        "nproc_per_node": 1,
        "model_cls": "demo",
        "model_path": "/models/demo",
    }


# --- submitting and following a task


def test_submit_says_task_status_and_status_route_says_status(client: httpx.Client) -> None:
    response = client.post("/v1/tasks/video/", json={"prompt": "a cat surfing", "seed": 42, **SHORT})
    assert response.status_code == 200
    body = response.json()
    assert list(body) == ["task_id", "task_status", "save_result_path"]
    assert TASK_ID.match(body["task_id"])
    assert body["task_status"] == "pending"
    # Before completion the path is the request value, which defaults to the task id.
    assert body["save_result_path"] == body["task_id"]

    done = _wait_status(client, body["task_id"], "completed")
    assert list(done) == [
        "task_id", "status", "start_time", "end_time", "error", "error_type", "save_result_path"
    ]
    assert done["save_result_path"] == f"{body['task_id']}.mp4"
    assert (done["error"], done["error_type"]) == (None, "")
    # Naive local timestamps, no timezone.
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?", done["end_time"])


def test_deprecated_alias_accepts_client_chosen_id_and_result_name(client: httpx.Client) -> None:
    body = {"task_id": "my-task-0001", "prompt": "client chosen id", "save_result_path": "custom_name.mp4"}
    response = client.post("/v1/tasks/", json={**body, **SHORT})
    assert response.json() == {
        "task_id": "my-task-0001",
        "task_status": "pending",
        "save_result_path": "custom_name.mp4",
    }
    assert _wait_status(client, "my-task-0001", "completed")["save_result_path"] == "custom_name.mp4"
    assert client.get("/v1/files/download/custom_name.mp4").status_code == 200


def test_unknown_task_is_404_task_not_found(client: httpx.Client) -> None:
    for path in ("/v1/tasks/NOPE/status", "/v1/tasks/NOPE/result"):
        response = client.get(path)
        assert (response.status_code, response.json()) == (404, {"detail": "Task not found"})


def test_json_seed_is_random_when_omitted(client: httpx.Client, node: NodeProcess) -> None:
    task_id = _submit(client, prompt="no seed")
    request = next(s["request"] for s in node.submissions() if s["task_id"] == task_id)
    assert 0 <= request["seed"] < 2**32
    # Only the fields the client set are forwarded, plus the seed: infer_steps' default is not.
    assert "infer_steps" not in request


def test_malformed_json_gets_pydantic_422s(client: httpx.Client) -> None:
    def detail(**kwargs) -> list[dict]:
        response = client.post("/v1/tasks/video/", **kwargs)
        assert response.status_code == 422, response.text
        return response.json()["detail"]

    invalid = detail(content=b'{"prompt": "x",}', headers={"content-type": "application/json"})
    assert invalid == [{
        "type": "json_invalid",
        "loc": ["body", 15],
        "msg": "JSON decode error",
        "input": {},
        "ctx": {"error": "Expecting property name enclosed in double quotes"},
    }]
    assert detail() == [{"type": "missing", "loc": ["body"], "msg": "Field required", "input": None}]
    wrong = detail(json={"prompt": 123, "infer_steps": "abc", "seed": "x"})
    assert [(e["type"], e["loc"]) for e in wrong] == [
        ("string_type", ["body", "prompt"]),
        ("int_parsing", ["body", "infer_steps"]),
        ("int_parsing", ["body", "seed"]),
    ]
    assert wrong[0]["msg"] == "Input should be a valid string" and wrong[0]["input"] == 123
    array = detail(json=[1, 2])
    assert array == [{
        "type": "model_attributes_type",
        "loc": ["body"],
        "msg": "Input should be a valid dictionary or object to extract fields from",
        "input": [1, 2],
    }]
    form_encoded = detail(data={"prompt": "hello"})
    assert form_encoded[0]["type"] == "model_attributes_type"
    assert form_encoded[0]["input"] == "prompt=hello"
    assert detail(json={"sr_ratio": 0}) == [{
        "type": "greater_than",
        "loc": ["body", "sr_ratio"],
        "msg": "Input should be greater than 0",
        "input": 0,
        "ctx": {"gt": 0.0},
    }]


def test_only_unknown_fields_still_creates_a_task(client: httpx.Client) -> None:
    response = client.post("/v1/tasks/video/", json={"no_such_field": 1})
    assert response.status_code == 200
    assert response.json()["task_status"] == "pending"


def test_unreachable_image_url_is_the_wrapped_500(client: httpx.Client) -> None:
    response = client.post("/v1/tasks/video/", json={"image_path": "http://127.0.0.1:9/nope.png"})
    assert response.status_code == 500
    assert response.json() == {"detail": "400: Image URL is not accessible: http://127.0.0.1:9/nope.png"}


def test_failing_prompt_ends_failed_with_runtime_error(client: httpx.Client) -> None:
    task_id = _submit(client, prompt="please FAIL now")
    failed = _wait_status(client, task_id, "failed", "completed")
    assert failed["status"] == "failed"
    assert failed["error"] == f"stub inference failure for task {task_id}: prompt contains 'FAIL'"
    assert failed["error_type"] == "RuntimeError"
    assert failed["save_result_path"] == task_id
    result = client.get(f"/v1/tasks/{task_id}/result")
    assert (result.status_code, result.json()) == (404, {"detail": "Task not completed"})


# --- the form route


def test_form_defaults_seed_42_and_saves_uploads_under_inputs(
    client: httpx.Client, node: NodeProcess, tmp_path: Path
) -> None:
    image = make_png(tmp_path / "first.png")
    audio = make_wav(tmp_path / "voice.wav", seconds=1.0)
    with image.open("rb") as image_file, audio.open("rb") as audio_file:
        response = client.post(
            "/v1/tasks/video/form",
            files={"image_file": ("first.png", image_file), "audio_file": ("voice.wav", audio_file)},
            data={"prompt": "form video", "target_video_length": "16"},
        )
    assert response.status_code == 200, response.text
    task_id = response.json()["task_id"]
    request = next(s["request"] for s in node.submissions() if s["task_id"] == task_id)
    assert request["seed"] == 42
    assert (request["infer_steps"], request["video_duration"], request["target_fps"]) == (5, 5, 16)
    assert Path(request["image_path"]).parent == node.data_dir.resolve() / "inputs" / "imgs"
    assert Path(request["image_path"]).suffix == ".png"
    assert Path(request["audio_path"]).read_bytes() == audio.read_bytes()

    _wait_status(client, task_id, "completed")
    video = tmp_path / "result.mp4"
    video.write_bytes(client.get(f"/v1/tasks/{task_id}/result").content)
    info = probe_video(video)
    assert info.has_audio
    assert 0.9 <= info.duration <= 1.3  # as long as the 1 s voice-over


def test_form_without_image_file_is_422_missing(client: httpx.Client) -> None:
    response = client.post("/v1/tasks/video/form", data={"prompt": "no image"}, files={"x": ("x.txt", b"x")})
    assert response.status_code == 422
    assert response.json() == {
        "detail": [{"type": "missing", "loc": ["body", "image_file"], "msg": "Field required", "input": None}]
    }


# --- results and files


def test_result_ignores_range_and_refuses_head(client: httpx.Client) -> None:
    task_id = _submit(client, prompt="range")
    _wait_status(client, task_id, "completed")
    full = client.get(f"/v1/tasks/{task_id}/result")
    ranged = client.get(f"/v1/tasks/{task_id}/result", headers={"range": "bytes=0-99"})
    assert ranged.status_code == 200
    assert ranged.content == full.content and len(full.content) > 100
    assert ranged.headers["accept-ranges"] == "bytes"
    assert ranged.headers["content-type"] == "video/mp4"
    assert ranged.headers["content-disposition"] == f'attachment; filename="{task_id}.mp4"'
    assert int(ranged.headers["content-length"]) == len(full.content)
    head = client.head(f"/v1/tasks/{task_id}/result")
    assert (head.status_code, head.headers["allow"]) == (405, "GET")


def test_download_blocks_path_traversal(node: NodeProcess, client: httpx.Client) -> None:
    forbidden = [
        "/v1/files/download/../../../etc/passwd",
        "/v1/files/download/..%2F..%2F..%2Fetc%2Fpasswd",
        "/v1/files/download/%2Fetc%2Fpasswd",
        "/v1/files/download//etc/passwd",
        "/v1/files/download/../inputs/imgs",
    ]
    for path in forbidden:
        assert _raw_get(node.url, path) == (403, b'{"detail":"Access to this file is not allowed"}'), path
    missing = client.get("/v1/files/download/does-not-exist.mp4")
    outputs = node.data_dir.resolve() / "outputs"
    assert missing.status_code == 404
    assert missing.json() == {"detail": f"File not found: {outputs}/does-not-exist.mp4"}


def test_rendered_s2v_video_is_playable_with_audio(client: httpx.Client, tmp_path: Path) -> None:
    image = base64.b64encode(make_png(tmp_path / "face.png").read_bytes()).decode()
    audio = base64.b64encode(make_wav(tmp_path / "voice.wav", seconds=1.5).read_bytes()).decode()
    # A data-URL image and a bare base64 WAV, both decoded by the node into inputs/.
    task_id = _submit(
        client, prompt="talking", image_path=f"data:image/png;base64,{image}", audio_path=audio
    )
    assert _wait_status(client, task_id, "completed", "failed")["status"] == "completed"
    video = tmp_path / "s2v.mp4"
    video.write_bytes(client.get(f"/v1/files/download/{task_id}.mp4").content)
    info = probe_video(video)
    assert info.has_audio and info.duration > 1.0
    assert info.width % 2 == 0 and info.height % 2 == 0


def test_probe_video_rejects_what_is_not_a_video(tmp_path: Path) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 100)
    with pytest.raises(ValueError):
        probe_video(junk)
    with pytest.raises(ValueError):
        probe_video(make_wav(tmp_path / "sound.wav"))


def test_render_uses_only_the_first_30_seconds_of_huge_audio(tmp_path: Path) -> None:
    audio = make_big_wav(tmp_path / "long.wav", megabytes=20)  # about 110 s
    video = tmp_path / "capped.mp4"
    image = make_png(tmp_path / "p.png")
    render_video(video, image=image, audio=audio, prompt="", seed=1, seconds=5, fps=4, max_side=64)
    info = probe_video(video)
    assert info.has_audio and 29.5 <= info.duration <= 30.5


# --- queue, cancel and restart quirks (a node whose tasks take a second)


def test_queue_full_and_duplicate_task_id_are_503(slow: httpx.Client) -> None:
    first = _submit(slow, task_id="dup-1")
    _wait_status(slow, first, "processing")
    _submit(slow)
    _submit(slow)
    full = slow.post("/v1/tasks/video/", json=SHORT)
    assert (full.status_code, full.json()) == (503, {"detail": "Task queue is full (max 3 tasks)"})
    queue = slow.get("/v1/tasks/queue/status").json()
    assert queue == {
        "is_processing": True,
        "current_task": first,
        "pending_count": 2,
        "active_count": 3,
        "queue_size": 3,
        "queue_available": 0,
    }
    stopped = slow.delete("/v1/tasks/all/running").json()
    assert stopped == {"stop_status": "success", "reason": "All tasks stopped successfully."}
    # The running inference goes on, but nothing counts as active any more.
    queue = slow.get("/v1/tasks/queue/status").json()
    assert (queue["is_processing"], queue["active_count"], queue["queue_available"]) == (True, 0, 3)
    duplicate = slow.post("/v1/tasks/video/", json={"task_id": "dup-1"})
    assert (duplicate.status_code, duplicate.json()) == (503, {"detail": "Task ID dup-1 already exists"})


def test_cancelled_running_task_later_reports_completed(slow: httpx.Client) -> None:
    task_id = _submit(slow, prompt="cancel me while running")
    _wait_status(slow, task_id, "processing")
    stop = slow.delete(f"/v1/tasks/{task_id}")
    assert stop.json() == {"stop_status": "success", "reason": "Task stopped successfully."}
    cancelled = slow.get(f"/v1/tasks/{task_id}/status").json()
    assert (cancelled["status"], cancelled["error"]) == ("cancelled", "Task cancelled by user")
    # The inference goes on: the node is busy although nothing counts as active any more.
    service = slow.get("/v1/service/status").json()
    assert service["service_status"] == "busy" and service["current_task"] == task_id
    assert service["active_tasks"] == []
    assert slow.get("/v1/tasks/queue/status").json()["active_count"] == 0

    completed = _wait_status(slow, task_id, "completed", "failed")
    assert completed["status"] == "completed"
    assert completed["error"] == "Task cancelled by user"
    assert completed["save_result_path"] == f"{task_id}.mp4"
    assert slow.get(f"/v1/tasks/{task_id}/result").status_code == 200


def test_cancelled_pending_task_never_runs(slow: httpx.Client) -> None:
    running = _submit(slow, prompt="runs")
    pending = _submit(slow, prompt="never runs")
    assert slow.get(f"/v1/tasks/{pending}/status").json()["status"] == "pending"
    assert slow.delete(f"/v1/tasks/{pending}").json()["stop_status"] == "success"
    first_end = slow.get(f"/v1/tasks/{pending}/status").json()["end_time"]
    # Cancelling again succeeds again and moves end_time.
    time.sleep(0.01)
    assert slow.delete(f"/v1/tasks/{pending}").json()["stop_status"] == "success"
    assert slow.get(f"/v1/tasks/{pending}/status").json()["end_time"] > first_end

    _wait_status(slow, running, "completed")
    time.sleep(0.3)
    assert slow.get(f"/v1/tasks/{pending}/status").json()["status"] == "cancelled"
    result = slow.get(f"/v1/tasks/{pending}/result")
    assert (result.status_code, result.json()) == (404, {"detail": "Task not completed"})
    do_nothing = {"stop_status": "do_nothing", "reason": "Task not found or already completed."}
    assert slow.delete(f"/v1/tasks/{running}").json() == do_nothing
    assert slow.delete("/v1/tasks/NO-SUCH-TASK").json() == do_nothing


def test_task_moves_to_end_of_listing_when_it_starts(slow: httpx.Client) -> None:
    first = _submit(slow)
    _wait_status(slow, first, "processing")
    second, third = _submit(slow), _submit(slow)
    assert list(slow.get("/v1/tasks/").json())[-3:] == [first, second, third]
    _wait_status(slow, second, "processing")
    assert list(slow.get("/v1/tasks/").json())[-3:] == [first, third, second]


def test_restarted_node_forgets_tasks_but_serves_old_files(tmp_path: Path) -> None:
    with NodeProcess(tmp_path / "node") as node, loopback.client(base_url=node.url, timeout=10) as client:
        task_id = _submit(client, prompt="before restart")
        _wait_status(client, task_id, "completed")
        node.restart()
        gone = client.get(f"/v1/tasks/{task_id}/status")
        assert (gone.status_code, gone.json()) == (404, {"detail": "Task not found"})
        assert client.get("/v1/tasks/").json() == {}
        download = client.get(f"/v1/files/download/{task_id}.mp4")
        assert download.status_code == 200 and download.headers["content-type"] == "video/mp4"
        assert [s["task_id"] for s in node.submissions()] == [task_id]


# --- the misbehaving node


@pytest.fixture(scope="module")
def bad_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MisbehavingNode]:
    with MisbehavingNode(tmp_path_factory.mktemp("bad")) as started:
        yield started


@pytest.fixture
def bad(bad_node: MisbehavingNode) -> Iterator[httpx.Client]:
    with loopback.client(base_url=bad_node.url, timeout=5) as c:
        yield c
    bad_node.clear_faults()


def test_misbehaving_node_answers_500_on_the_next_n_requests(
    bad_node: MisbehavingNode, bad: httpx.Client
) -> None:
    task_id = _submit(bad)
    bad_node.fault("error", route="status", times=2)
    codes = [bad.get(f"/v1/tasks/{task_id}/status").status_code for _ in range(3)]
    assert codes == [500, 500, 200]
    assert [(f["action"], f["fired"]) for f in bad_node.faults()] == [("error", 2)]


def test_misbehaving_node_answers_queue_full_on_submit(
    bad_node: MisbehavingNode, bad: httpx.Client
) -> None:
    before = len(bad_node.submissions())
    bad_node.fault("queue_full")
    refused = bad.post("/v1/tasks/video/", json=SHORT)
    assert refused.status_code == 503
    assert refused.json() == {"detail": "Task queue is full (max 10 tasks)"}
    assert len(bad_node.submissions()) == before
    assert bad.post("/v1/tasks/video/", json=SHORT).status_code == 200


def test_misbehaving_node_hangs_until_the_client_times_out(
    bad_node: MisbehavingNode, bad: httpx.Client
) -> None:
    bad_node.fault("hang", route="status")
    with pytest.raises(httpx.ReadTimeout):
        bad.get("/v1/tasks/ANY/status", timeout=0.3)
    assert bad.get("/v1/tasks/ANY/status").status_code == 404
    # With seconds, a slow node rather than a dead one: the real answer, late.
    bad_node.fault("hang", route="health", seconds=0.4)
    started = time.monotonic()
    assert bad.get("/health").json() == {"status": "ok"}
    assert time.monotonic() - started >= 0.4


def test_misbehaving_node_resets_connections(
    bad_node: MisbehavingNode, bad: httpx.Client
) -> None:
    bad_node.fault("reset", route="status")
    with pytest.raises(httpx.ReadError, match="reset"):
        bad.get("/v1/tasks/ANY/status")
    assert bad.get("/v1/tasks/ANY/status").status_code == 404


def test_misbehaving_node_can_accept_a_submission_then_reset(
    bad_node: MisbehavingNode, bad: httpx.Client
) -> None:
    before = len(bad_node.submissions())
    bad_node.fault("reset", route="submit", phase="after")
    with pytest.raises(httpx.ReadError):
        bad.post("/v1/tasks/video/", json={"task_id": "ambiguous-1", **SHORT})
    # The client saw a reset, yet the node took the task.
    assert len(bad_node.submissions()) == before + 1
    assert _wait_status(bad, "ambiguous-1", "completed")["status"] == "completed"


def test_misbehaving_node_closes_without_answering(
    bad_node: MisbehavingNode, bad: httpx.Client
) -> None:
    bad_node.fault("close", route="any")
    with pytest.raises(httpx.RemoteProtocolError):
        bad.get("/health")
    assert bad.get("/health").status_code == 200


def test_misbehaving_node_restart_forgets_tasks(
    bad_node: MisbehavingNode, bad: httpx.Client
) -> None:
    task_id = _submit(bad, prompt="forgotten")
    _wait_status(bad, task_id, "completed")
    # Down long enough for the next request to find it down on a busy machine; then back up.
    bad_node.forget_tasks(downtime=3)
    with pytest.raises(httpx.ConnectError):
        loopback.get(f"{bad_node.url}/health", timeout=1)
    bad_node.wait_ready()
    gone = bad.get(f"/v1/tasks/{task_id}/status")
    assert (gone.status_code, gone.json()) == (404, {"detail": "Task not found"})
    assert bad.get(f"/v1/files/download/{task_id}.mp4").status_code == 200


# --- the synchronous image routes: /v1/tasks/image/sync and the OpenAI-style ones


def _png(content: bytes) -> tuple[str, tuple[int, int]]:
    with Image.open(io.BytesIO(content)) as picture:
        return picture.format, picture.size


def test_sync_image_route_answers_the_png_and_writes_nothing(client: httpx.Client, node: NodeProcess) -> None:
    response = client.post(
        "/v1/tasks/image/sync?timeout_seconds=60&poll_interval_seconds=0.05",
        json={"task_id": "sync-one", "prompt": "a lighthouse", "aspect_ratio": "1:1"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["content-disposition"] == 'inline; filename="result.png"'
    assert _png(response.content) == ("PNG", (320, 320))
    # The result stayed in memory: the task completed, yet no file is in outputs/.
    assert client.get("/v1/tasks/sync-one/status").json()["status"] == "completed"
    assert not (node.data_dir / "outputs" / "sync-one.png").exists()
    assert client.get("/v1/tasks/sync-one/result").status_code == 404
    assert {s["task_id"]: s["route"] for s in node.submissions()}["sync-one"] == "/v1/tasks/image/sync"


def test_sync_image_route_refuses_as_upstream(client: httpx.Client) -> None:
    zero = client.post("/v1/tasks/image/sync?timeout_seconds=0", json={"prompt": "x"})
    assert (zero.status_code, zero.json()) == (400, {"detail": "timeout_seconds must be > 0"})
    unreadable = client.post("/v1/tasks/image/sync?poll_interval_seconds=soon", json={"prompt": "x"})
    assert unreadable.status_code == 422
    assert [(e["loc"], e["type"]) for e in unreadable.json()["detail"]] == [
        (["query", "poll_interval_seconds"], "float_parsing")
    ]
    bad_url = client.post("/v1/tasks/image/sync", json={"prompt": "x", "presigned_url": "ftp://bucket/x.png"})
    assert (bad_url.status_code, bad_url.json()) == (400, {"detail": "Invalid presigned_url: ftp://bucket/x.png"})
    failed = client.post("/v1/tasks/image/sync", json={"task_id": "sync-fail", "prompt": "please FAIL"})
    assert failed.status_code == 500
    assert failed.json() == {"detail": "stub inference failure for task sync-fail: prompt contains 'FAIL'"}
    assert client.post("/v1/tasks/image/sync/", json={"prompt": "x"}).status_code == 307


def test_sync_image_times_out_with_504_and_cancels_its_task(slow: httpx.Client, slow_node: NodeProcess) -> None:
    _submit(slow, prompt="ahead")  # a second of work ahead: the sync task waits past its timeout
    started = time.monotonic()
    response = slow.post("/v1/tasks/image/sync?timeout_seconds=1&poll_interval_seconds=0.05", json={"prompt": "late"})
    assert response.status_code == 504
    assert 1.0 <= time.monotonic() - started < 5
    task_id = [s for s in slow_node.submissions() if s["route"] == "/v1/tasks/image/sync"][-1]["task_id"]
    assert response.json() == {"detail": f"Task {task_id} timed out after 1 seconds"}
    assert slow.get(f"/v1/tasks/{task_id}/status").json()["status"] == "cancelled"


def test_sync_image_client_that_leaves_cancels_its_task(slow: httpx.Client, slow_node: NodeProcess) -> None:
    _submit(slow, prompt="ahead")
    with pytest.raises(httpx.ReadTimeout):
        slow.post("/v1/tasks/image/sync", json={"prompt": "impatient"}, timeout=0.3)
    task_id = [s for s in slow_node.submissions() if s["route"] == "/v1/tasks/image/sync"][-1]["task_id"]
    assert _wait_status(slow, task_id, "cancelled")["error"] == "Task cancelled by user"


def test_sync_image_uploads_to_a_presigned_url(client: httpx.Client) -> None:
    received: dict = {}

    class Bucket(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            received["type"] = self.headers["content-type"]
            received["body"] = self.rfile.read(int(self.headers["content-length"]))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    bucket = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Bucket)
    threading.Thread(target=bucket.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{bucket.server_port}/bucket/out.png?X-Amz-Signature=abc"
        response = client.post("/v1/tasks/image/sync", json={"task_id": "sync-up", "prompt": "up", "presigned_url": url})
    finally:
        bucket.shutdown()
        bucket.server_close()
    assert response.status_code == 200, response.text
    assert response.json() == {
        "task_id": "sync-up", "task_status": "completed", "uploaded_to_presigned_url": True, "presigned_url": url,
    }
    assert received["type"] == "image/png" and _png(received["body"])[0] == "PNG"


def test_openai_sdk_generates_an_image_on_the_node(node: NodeProcess) -> None:
    # The node has no authentication: any key will do, as with the real server.
    with openai.OpenAI(api_key="unused", base_url=f"{node.url}/v1", max_retries=0) as sdk:
        made = sdk.images.generate(prompt="a red kite", size="64x48", response_format="b64_json")
        assert _png(base64.b64decode(made.data[0].b64_json)) == ("PNG", (320, 240))
        assert (made.output_format, made.size) == ("png", "64x48")
        assert made.usage.output_tokens == made.usage.total_tokens == 320 * 240 // 256
        # FastAPI's {"detail"} bodies, not OpenAI's error shape: the SDK says only the code.
        with pytest.raises(openai.BadRequestError) as two:
            sdk.images.generate(prompt="two", n=2)
        assert two.value.response.json() == {"detail": "Only n=1 is currently supported"}
        with pytest.raises(openai.UnprocessableEntityError) as link:
            sdk.images.generate(prompt="as a link", response_format="url")
        assert [e["type"] for e in link.value.response.json()["detail"]] == ["literal_error"]
    sent = [s for s in node.submissions() if s["route"] == "/v1/images/generations"][0]["request"]
    assert sent["task"] == "t2i" and sent["target_shape"] == [48, 64]
    bare = loopback.post(f"{node.url}/v1/images/generations", json={"prompt": "no size"}, timeout=30)
    assert bare.status_code == 200 and bare.json()["size"] is None


def test_openai_sdk_edits_an_image_into_a_url_the_node_serves(node: NodeProcess, tmp_path: Path) -> None:
    first, second = make_png(tmp_path / "first.png"), make_png(tmp_path / "second.png", color=(10, 200, 10))
    with openai.OpenAI(api_key="unused", base_url=f"{node.url}/v1", max_retries=0) as sdk:
        with first.open("rb") as image:
            edited = sdk.images.edit(image=image, prompt="make it blue")
        url = edited.data[0].url
        assert url.startswith(f"{node.url}/v1/files/download/") and url.endswith(".png")
        served = loopback.get(url)
        assert served.headers["content-type"] == "image/png" and _png(served.content)[0] == "PNG"
        # Two images go as `image[]`; the runner gets both paths, comma-joined.
        with first.open("rb") as one, second.open("rb") as two:
            both = sdk.images.edit(image=[one, two], prompt="blend", response_format="b64_json")
        assert _png(base64.b64decode(both.data[0].b64_json))[0] == "PNG"
        with pytest.raises(openai.BadRequestError) as blank, first.open("rb") as image:
            sdk.images.edit(image=image, prompt="  ")
        assert blank.value.response.json() == {"detail": "prompt is required"}
    edits = [s["request"] for s in node.submissions() if s["route"] == "/v1/images/edits"]
    assert edits[0]["task"] == "i2i" and len(edits[1]["image_path"].split(",")) == 2
    none = loopback.post(f"{node.url}/v1/images/edits", data={"prompt": "nothing to edit"}, files={"x": ("x", b"x")})
    assert (none.status_code, none.json()) == (400, {"detail": "At least one image is required"})


def test_sensenova_vision_routes_refuse_on_this_node(client: httpx.Client) -> None:
    for path in ("/v1/tasks/sensenova-vision/", "/v1/tasks/sensenova-vision/sync"):
        refused = client.post(path, json={"prompt": "x"})
        assert refused.status_code == 409
        assert refused.json() == {
            "detail": "The SenseNova-Vision API requires a server started with --model_cls sensenova_vision."
        }
