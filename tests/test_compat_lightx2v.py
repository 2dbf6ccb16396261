"""The LightX2V server API over the pool, driven as LightX2V's own client scripts drive a node.

`post_async_t2i_and_wait.py` runs as it is (tests/clients/lightx2v/, Apache-2.0, see NOTICE.md).
The other requests are made exactly as `scripts/server/post.py`, `post_i2v.py`,
`check_status.py`, `post_async_t2i_and_wait.py` and `post_multi_servers.py` of ModelTC/LightX2V
(Apache-2.0) make them, with `requests` and no header: only the base URL is the gateway's. The
gateway names the key such clients act as (X2V_HEADERLESS_KEY).
"""

from __future__ import annotations

import base64
import importlib.util
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from gateway_proc import headerless_gateway, remember_secret
from x2v_gateway.schemas import TASK_INPUTS

# Image jobs (t2i, i2i) come with the task types of issue 16's first part: until this gateway
# has them, their routes refuse, and these tests wait for them.
needs_image_tasks = pytest.mark.skipif("t2i" not in TASK_INPUTS, reason="this gateway has no image tasks yet")


HEADERLESS = "lightx2v-clients"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    gw = headerless_gateway(tmp_path_factory.mktemp("lx") / "data", HEADERLESS, X2V_DEMO_JOB_SECONDS="0.5")
    yield gw
    gw.stop()


# LightX2V's own client functions, from the vendored script (tests/clients/lightx2v/).
_spec = importlib.util.spec_from_file_location(
    "post_async_t2i_and_wait", Path(__file__).parent / "clients" / "lightx2v" / "post_async_t2i_and_wait.py",
)
lightx2v_client = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lightx2v_client)


def _wait_done(url: str, task_id: str) -> dict:
    """Its `wait_task_done`: poll /status until completed (raises on failed or cancelled)."""
    return lightx2v_client.wait_task_done(url, task_id, timeout_seconds=60, poll_interval=0.2)


def test_post_py_renders_a_t2v_video_and_its_file_downloads_by_save_result_path(gateway):
    # scripts/server/post.py: JSON to /v1/tasks/video/, an empty image_path, a save_result_path.
    message = {
        "prompt": "Two anthropomorphic cats in comfy boxing gear fight on a spotlighted stage.",
        "negative_prompt": "镜头晃动，色调艳丽，过曝",
        "image_path": "",
        "seed": 42,
        "save_result_path": "./cat_boxing_seed42.mp4",
    }
    response = requests.post(f"{gateway.url}/v1/tasks/video/", json=message)
    assert response.status_code == 200, response.text
    submitted = response.json()
    assert set(submitted) == {"task_id", "task_status", "save_result_path"}
    assert submitted["task_status"] == "pending"
    assert submitted["save_result_path"] == "./cat_boxing_seed42.mp4"

    done = _wait_done(gateway.url, submitted["task_id"])
    assert set(done) == {"task_id", "status", "start_time", "end_time", "error", "error_type", "save_result_path"}
    assert done["save_result_path"] == "cat_boxing_seed42.mp4"
    assert done["error"] is None and done["error_type"] == ""
    assert "T" in done["start_time"] and not done["start_time"].endswith("Z")  # naive local time
    assert done["end_time"] >= done["start_time"]

    result = requests.get(f"{gateway.url}/v1/tasks/{submitted['task_id']}/result")
    assert result.status_code == 200
    assert result.headers["content-type"] == "video/mp4"
    assert result.headers["content-disposition"] == 'attachment; filename="cat_boxing_seed42.mp4"'
    assert result.content[4:8] == b"ftyp"
    by_name = requests.get(f"{gateway.url}/v1/files/download/cat_boxing_seed42.mp4")
    assert by_name.status_code == 200 and by_name.content == result.content

    # The job is the gateway's: the same video on the gateway's own API, t2v with the seed.
    with gateway.client() as admin:
        job = admin.get(f"/api/v1/jobs/{submitted['task_id']}").json()
    assert job["task"] == "t2v" and job["params"]["seed"] == 42 and job["state"] == "succeeded"


def test_post_i2v_py_on_the_deprecated_route_makes_an_i2v_job(gateway, media):
    # scripts/server/post_i2v.py: POST /v1/tasks/ with the image as base64 in image_path.
    message = {
        "prompt": "Summer beach vacation style, a white cat wearing sunglasses sits on a surfboard.",
        "negative_prompt": "镜头晃动",
        "image_path": base64.b64encode(media["face"].read_bytes()).decode("utf-8"),
    }
    response = requests.post(f"{gateway.url}/v1/tasks/", json=message)
    assert response.status_code == 200, response.text
    task_id = response.json()["task_id"]
    assert response.json()["save_result_path"] == task_id
    done = _wait_done(gateway.url, task_id)
    assert done["save_result_path"] == f"{task_id}.mp4"
    with gateway.client() as admin:
        assert admin.get(f"/api/v1/jobs/{task_id}").json()["task"] == "i2v"


def test_form_route_uploads_make_an_s2v_job_with_the_servers_form_defaults(gateway, media):
    with media["face"].open("rb") as image, media["voice"].open("rb") as audio:
        response = requests.post(f"{gateway.url}/v1/tasks/video/form", files={
            "image_file": ("face.png", image, "image/png"), "audio_file": ("voice.wav", audio, "audio/wav"),
        }, data={"prompt": "form video", "infer_steps": "4", "video_duration": "2"})
    assert response.status_code == 200, response.text
    task_id = response.json()["task_id"]
    _wait_done(gateway.url, task_id)
    with gateway.client() as admin:
        job = admin.get(f"/api/v1/jobs/{task_id}").json()
    assert job["task"] == "s2v"
    # The server's form routes pass every field: seed 42 and the other defaults when not sent.
    assert job["params"]["seed"] == 42 and job["params"]["infer_steps"] == 4
    assert job["params"]["target_video_length"] == 81 and job["params"]["video_duration"] == 2


def test_client_chosen_task_id_is_the_tasks_id_and_a_second_use_is_503(gateway):
    message = {"task_id": "my-task-0001", "prompt": "client chosen id", "save_result_path": "custom_name.mp4",
               "target_shape": [64, 96]}
    first = requests.post(f"{gateway.url}/v1/tasks/video/", json=message)
    assert first.json() == {"task_id": "my-task-0001", "task_status": "pending", "save_result_path": "custom_name.mp4"}
    again = requests.post(f"{gateway.url}/v1/tasks/video/", json=message)
    assert again.status_code == 503
    assert again.json() == {"detail": "Task ID my-task-0001 already exists"}
    done = _wait_done(gateway.url, "my-task-0001")
    assert done["task_id"] == "my-task-0001" and done["save_result_path"] == "custom_name.mp4"
    # check_status.py: the service, the task list, one task.
    listed = requests.get(f"{gateway.url}/v1/tasks/").json()
    assert listed["my-task-0001"]["status"] == "completed"
    assert requests.get(f"{gateway.url}/v1/files/download/custom_name.mp4").status_code == 200


def test_check_status_py_answers_in_the_servers_shapes(gateway):
    service = requests.get(f"{gateway.url}/v1/service/status")
    assert service.status_code == 200
    assert set(service.json()) == {"service_status", "current_task", "active_tasks", "pending_tasks",
                                   "queue_size", "total_tasks", "completed_tasks", "failed_tasks"}
    assert service.json()["service_status"] in ("idle", "busy")
    tasks = requests.get(f"{gateway.url}/v1/tasks/")
    assert tasks.status_code == 200 and isinstance(tasks.json(), dict)
    unknown = requests.get(f"{gateway.url}/v1/tasks/test_task_001/status")
    assert unknown.status_code == 404 and unknown.json() == {"detail": "Task not found"}
    metadata = requests.get(f"{gateway.url}/v1/service/metadata").json()
    assert set(metadata) == {"nproc_per_node", "model_cls", "model_path"}
    queue = requests.get(f"{gateway.url}/v1/tasks/queue/status").json()
    assert set(queue) == {"is_processing", "current_task", "pending_count", "active_count", "queue_size",
                          "queue_available"}
    # The header-less key opens the compatible routes only: the gateway's own API still needs a key.
    assert requests.get(f"{gateway.url}/api/v1/jobs").status_code == 401


def test_cancel_answers_as_the_server_and_stays_cancelled(gateway):
    response = requests.post(f"{gateway.url}/v1/tasks/video/", json={"prompt": "to be stopped", "task_id": "stop-me"})
    assert response.status_code == 200
    stopped = requests.delete(f"{gateway.url}/v1/tasks/stop-me")
    assert stopped.status_code == 200
    assert stopped.json() == {"stop_status": "success", "reason": "Task stopped successfully."}
    # Idempotent for a cancelled task, as on the server.
    assert requests.delete(f"{gateway.url}/v1/tasks/stop-me").json()["stop_status"] == "success"
    status = requests.get(f"{gateway.url}/v1/tasks/stop-me/status").json()
    assert status["status"] == "cancelled" and status["error"] == "Task cancelled by user"
    assert status["end_time"] is not None
    not_done = requests.get(f"{gateway.url}/v1/tasks/stop-me/result")
    assert not_done.status_code == 404 and not_done.json() == {"detail": "Task not completed"}
    for index in range(3):
        requests.post(f"{gateway.url}/v1/tasks/video/", json={"prompt": "all of these", "task_id": f"all-{index}"})
    stopped_all = requests.delete(f"{gateway.url}/v1/tasks/all/running")
    assert stopped_all.json() == {"stop_status": "success", "reason": "All tasks stopped successfully."}
    states = [requests.get(f"{gateway.url}/v1/tasks/all-{i}/status").json()["status"] for i in range(3)]
    # The first may have ended on a busy machine before the DELETE; the third waited behind it.
    assert set(states) <= {"cancelled", "completed"} and states[2] == "cancelled"
    unknown = requests.delete(f"{gateway.url}/v1/tasks/no-such-task")
    assert unknown.status_code == 200
    assert unknown.json() == {"stop_status": "do_nothing", "reason": "Task not found or already completed."}
    time.sleep(1.5)  # the demo node would have finished it: the gateway's cancel is final
    assert requests.get(f"{gateway.url}/v1/tasks/stop-me/status").json()["status"] == "cancelled"


def test_bad_requests_get_fastapi_422s_naming_the_field(gateway):
    url = f"{gateway.url}/v1/tasks/video/"
    not_json = requests.post(url, data=b"{bad json", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 422 and not_json.json()["detail"][0]["type"] == "json_invalid"
    array = requests.post(url, json=[1, 2])
    assert array.status_code == 422 and array.json()["detail"][0]["type"] == "model_attributes_type"
    wrong_type = requests.post(url, json={"prompt": "x", "infer_steps": "many"})
    assert wrong_type.status_code == 422
    assert wrong_type.json()["detail"][0]["loc"] == ["body", "infer_steps"]
    zero = requests.post(url, json={"prompt": "x", "sr_ratio": 0})
    assert zero.status_code == 422 and zero.json()["detail"][0]["loc"] == ["body", "sr_ratio"]
    server_path = requests.post(url, json={"prompt": "x", "image_path": "assets/inputs/imgs/img_0.jpg"})
    assert server_path.status_code == 422
    assert server_path.json()["detail"][0]["loc"] == ["body", "image_path"]
    audio_alone = requests.post(url, json={"prompt": "x", "audio_path": base64.b64encode(b"RIFF").decode()})
    assert audio_alone.status_code == 422
    no_image = requests.post(f"{gateway.url}/v1/tasks/video/form", data={"prompt": "x"},
                             files={"audio_file": ("a.wav", b"RIFF0000", "audio/wav")})
    assert no_image.status_code == 422
    assert no_image.json()["detail"][0]["loc"] == ["body", "image_file"]
    traversal = requests.get(f"{gateway.url}/v1/files/download/..%2F..%2Fetc%2Fpasswd")
    assert traversal.status_code in (403, 404)
    missing = requests.get(f"{gateway.url}/v1/files/download/does-not-exist.mp4")
    assert missing.status_code == 404 and missing.json() == {"detail": "File not found: does-not-exist.mp4"}


def test_post_multi_servers_logic_spreads_tasks_over_the_pool(gateway):
    # post_multi_servers.py's loop: wait for an idle server via /v1/service/status, one thread
    # per task posting to /v1/tasks/ and polling /status every 0.5 s until completed.
    url = gateway.url
    results: list[bool] = []

    def send_and_monitor(message: dict) -> None:
        task_id = requests.post(f"{url}/v1/tasks/", json=message).json().get("task_id")
        while True:
            status = requests.get(f"{url}/v1/tasks/{task_id}/status").json().get("status")
            if status in ("completed", "failed"):
                results.append(status == "completed")
                return
            time.sleep(0.5)

    threads = []
    for index in range(3):
        while requests.get(f"{url}/v1/service/status").json()["service_status"] != "idle":
            time.sleep(0.2)
        thread = threading.Thread(target=send_and_monitor, args=({"prompt": f"multi {index}", "seed": index},))
        thread.start()
        threads.append(thread)
        time.sleep(0.5)
    for thread in threads:
        thread.join(timeout=60)
    assert results == [True, True, True]


def test_a_task_survives_a_gateway_sigkill_and_is_found_by_its_task_id(tmp_path, media):
    gw = headerless_gateway(tmp_path / "data", HEADERLESS, X2V_DEMO_JOB_SECONDS="0.5", X2V_REQUEST_TIMEOUT="2")
    try:
        message = {"task_id": "durable-0001", "prompt": "survive", "save_result_path": "durable.mp4",
                   "image_path": base64.b64encode(media["face"].read_bytes()).decode()}
        assert requests.post(f"{gw.url}/v1/tasks/video/", json=message).status_code == 200
        gw.kill()
        gw.start()
        done = _wait_done(gw.url, "durable-0001")
        assert done["save_result_path"] == "durable.mp4"
        assert requests.get(f"{gw.url}/v1/files/download/durable.mp4").content[4:8] == b"ftyp"
        again = requests.post(f"{gw.url}/v1/tasks/video/", json=message)
        assert again.status_code == 503  # the id is kept too
    finally:
        gw.stop()


def test_a_bearer_keys_rate_limit_is_a_fastapi_429(gateway):
    with gateway.client() as admin:
        made = admin.post("/api/v1/keys", json={"name": "lx-slow", "rate_per_min": 1})
    key = remember_secret(made.json()["key"])
    headers = {"Authorization": f"Bearer {key}"}
    assert requests.get(f"{gateway.url}/v1/tasks/", headers=headers).status_code == 200
    refused = requests.get(f"{gateway.url}/v1/tasks/", headers=headers)
    assert refused.status_code == 429 and "rate limit" in refused.json()["detail"]
    assert int(refused.headers["retry-after"]) > 0


@needs_image_tasks
def test_post_async_t2i_and_wait_py_makes_a_png(gateway, tmp_path):
    # scripts/server/post_async_t2i_and_wait.py: submit_t2i_task, wait_task_done, download_result.
    payload = {"prompt": "a red fox in snow", "negative_prompt": "", "infer_steps": 30, "seed": 42,
               "aspect_ratio": "16:9", "save_result_path": "", "use_prompt_enhancer": False}
    response = requests.post(f"{gateway.url.rstrip('/')}/v1/tasks/image/", json=payload, timeout=30)
    assert response.status_code == 200, response.text
    task_id = response.json().get("task_id")
    status = _wait_done(gateway.url, task_id)
    assert status["save_result_path"] == f"{task_id}.png"
    result = requests.get(f"{gateway.url.rstrip('/')}/v1/tasks/{task_id}/result", timeout=120)
    assert result.status_code == 200 and result.headers["content-type"] == "image/png"
    output = tmp_path / "save_results" / "t2i_result.png"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(result.content)
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with gateway.client() as admin:
        job = admin.get(f"/api/v1/jobs/{task_id}").json()
    assert job["task"] == "t2i" and job["params"]["aspect_ratio"] == "16:9"


@needs_image_tasks
def test_image_form_with_a_file_makes_an_i2i_job(gateway, media):
    with media["face"].open("rb") as image:
        response = requests.post(f"{gateway.url}/v1/tasks/image/form", files={"image_file": ("face.png", image, "image/png")},
                                 data={"prompt": "make it blue", "save_result_path": "blue"})
    assert response.status_code == 200, response.text
    task_id = response.json()["task_id"]
    assert _wait_done(gateway.url, task_id)["save_result_path"] == "blue.png"
    assert requests.get(f"{gateway.url}/v1/files/download/blue.png").headers["content-type"] == "image/png"
    with gateway.client() as admin:
        job = admin.get(f"/api/v1/jobs/{task_id}").json()
    assert job["task"] == "i2i" and job["params"]["seed"] == 42 and job["params"]["infer_steps"] == 5


@needs_image_tasks
def test_lightx2v_own_t2i_script_runs_unmodified_against_the_gateway(gateway, tmp_path):
    script = Path(__file__).parent / "clients" / "lightx2v" / "post_async_t2i_and_wait.py"
    output = tmp_path / "t2i_result.png"
    run = subprocess.run(
        [sys.executable, str(script), "--url", gateway.url, "--prompt", "a lighthouse at dusk",
         "--infer_steps", "4", "--poll_interval", "0.2", "--timeout_seconds", "60", "--output", str(output)],
        capture_output=True, text=True, timeout=90,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Task completed" in run.stdout and output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_image_tasks
def test_post_sync_t2i_base64_py_gets_the_png_in_the_answer(gateway):
    # scripts/server/post_sync_t2i_base64.py: request_t2i_sync, as written.
    payload = {"prompt": "a red fox", "negative_prompt": "", "infer_steps": 4, "seed": 42, "aspect_ratio": "16:9",
               "save_result_path": "", "use_prompt_enhancer": False}
    endpoint = f"{gateway.url.rstrip('/')}/v1/tasks/image/sync?timeout_seconds={60}&poll_interval_seconds={0.5}"
    response = requests.post(endpoint, json=payload, timeout=60 + 30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["content-disposition"] == 'inline; filename="result.png"'
    assert response.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_sync_image_route_refuses_what_the_server_refuses_and_what_it_will_not_do(gateway):
    url = f"{gateway.url}/v1/tasks/image/sync"
    zero = requests.post(f"{url}?timeout_seconds=0", json={"prompt": "x"})
    assert zero.status_code == 400 and zero.json() == {"detail": "timeout_seconds must be > 0"}
    presigned = requests.post(url, json={"prompt": "x", "presigned_url": "https://bucket.example/put-here"})
    assert presigned.status_code == 422 and presigned.json()["detail"][0]["loc"] == ["body", "presigned_url"]
