"""The services this gateway replaces, driven by clients written as their documents show them
(../shared/seeds/000_3c77aeec386dfce0.txt: curl lines; 003_86838572c3112641.txt: JSON with a
Bearer key, as its Postman guide sets up), with only the base URL (and key) changed."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import requests

from gateway_proc import headerless_gateway, remember_secret

HEADERLESS = "s2v-page"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    # The S2V service had no authentication: its clients send no header (X2V_HEADERLESS_KEY).
    gw = headerless_gateway(tmp_path_factory.mktemp("seeds") / "data", HEADERLESS, X2V_DEMO_JOB_SECONDS="0.5")
    with gw.client() as admin:
        user = admin.post("/api/v1/keys", json={"name": "t2v-user"})
        gw.user_key = remember_secret(user.json()["key"])
    yield gw
    gw.stop()


def curl(*args: str) -> dict:
    """Run a curl line of the S2V service's README; its JSON answer."""
    out = subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def test_s2v_service_curl_lines_submit_poll_list_and_cancel(gateway, media):
    base = gateway.url
    # "提交任务", exactly as the README writes it (its file paths are ours).
    submitted = curl(
        "-X", "POST", f"{base}/api/submit",
        "-F", "prompt=根据音频生成对应视频",
        "-F", "negative_prompt=色调艳丽，过曝",
        "-F", "cfg_scale=5",
        "-F", "duration=7",
        "-F", f"image=@{media['face']}",
        "-F", f"audio=@{media['voice']}",
        "-F", "wait_for_completion=false",
    )
    assert submitted["status"] == "CREATED"
    task_id = submitted["task_id"]

    deadline = time.monotonic() + 60
    while (task := curl(f"{base}/api/task/{task_id}"))["status"] not in ("SUCCEED", "FAILED", "CANCELLED"):
        assert task["status"] in ("PENDING", "PROCESSING")
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert task["status"] == "SUCCEED" and task["prompt"] == "根据音频生成对应视频"
    assert task["api_status"] == "SUCCEED" and task["task_id"] == task_id
    video = requests.get(task["result_url"])  # an absolute URL, as the cloud's was
    assert video.status_code == 200 and video.content[4:8] == b"ftyp"
    with gateway.client() as admin:
        job = admin.get(f"/api/v1/jobs/{task_id}").json()
    assert job["task"] == "s2v" and job["params"]["video_duration"] == 7

    listed = curl(f"{base}/api/tasks?limit=50&offset=0")
    assert listed["limit"] == 50 and listed["offset"] == 0 and listed["total"] >= 1
    assert listed["tasks"][0]["task_id"] == task_id

    # wait_for_completion=true blocks until the task has ended.
    waited = curl("-X", "POST", f"{base}/api/submit", "-F", "prompt=等待完成", "-F", f"image=@{media['face']}",
                  "-F", f"audio=@{media['voice']}", "-F", "wait_for_completion=true")
    assert waited["status"] == "SUCCEED"

    second = curl("-X", "POST", f"{base}/api/submit", "-F", "prompt=取消", "-F", f"image=@{media['face']}",
                  "-F", f"audio=@{media['voice']}")
    cancelled = curl("-X", "DELETE", f"{base}/api/task/{second['task_id']}")
    assert cancelled == {"success": True, "task_id": second["task_id"]}
    assert curl(f"{base}/api/task/{second['task_id']}")["status"] == "CANCELLED"
    assert curl(f"{base}/api/tasks?limit=1&offset=1")["tasks"][0]["task_id"] == waited["task_id"]


def test_s2v_service_refusals_are_fastapi_shaped(gateway, media):
    base = gateway.url
    no_prompt = requests.post(f"{base}/api/submit", files={"image": media["face"].open("rb")})
    assert no_prompt.status_code == 422 and no_prompt.json()["detail"][0]["loc"] == ["body", "prompt"]
    no_audio = requests.post(f"{base}/api/submit", data={"prompt": "x"}, files={"image": media["face"].open("rb")})
    assert no_audio.status_code == 422 and no_audio.json()["detail"][0]["loc"] == ["body", "audio"]
    bad_duration = requests.post(f"{base}/api/submit", data={"prompt": "x", "duration": "long"})
    assert bad_duration.status_code == 422 and bad_duration.json()["detail"][0]["loc"] == ["body", "duration"]
    assert requests.get(f"{base}/api/task/nope").json() == {"detail": "Task not found"}
    assert requests.delete(f"{base}/api/task/nope").status_code == 404
    zero = requests.get(f"{base}/api/tasks?limit=0")
    assert zero.status_code == 422 and zero.json()["detail"][0]["loc"] == ["query", "limit"]
    assert requests.get(f"{base}/api/tasks?offset=-1").status_code == 422


def test_wan_t2v_service_submit_status_cancel_as_its_guide_shows(gateway):
    base = gateway.url
    headers = {"Authorization": f"Bearer {gateway.user_key}", "Content-Type": "application/json"}
    body = {"model": "Wan2.1-T2V-1.3B", "prompt": "A beautiful sunset over the mountains",
            "image_size": "480x832", "num_frames": 81, "guidance_scale": 5.0, "infer_steps": 50}
    submitted = requests.post(f"{base}/video/submit", headers=headers, data=json.dumps(body))
    assert submitted.status_code == 202, submitted.text
    request_id = submitted.json()["requestId"]

    deadline = time.monotonic() + 60
    while True:
        status = requests.post(f"{base}/video/status", headers=headers, data=json.dumps({"requestId": request_id})).json()
        if status["status"] in ("Succeed", "Failed"):
            break
        assert status["status"] in ("InQueue", "InProgress") and time.monotonic() < deadline
        time.sleep(0.2)
    assert status["status"] == "Succeed"
    video = requests.get(status["results"]["videos"][0]["url"], headers={"Authorization": headers["Authorization"]})
    assert video.status_code == 200 and video.content[4:8] == b"ftyp"
    assert status["results"]["timings"]["inference"] >= 0
    with requests.get(f"{base}/api/v1/jobs/{request_id}", headers=headers) as job:
        params = job.json()["params"]
    assert params["target_shape"] == [832, 480] and params["target_video_length"] == 81 and params["infer_steps"] == 50

    other = requests.post(f"{base}/video/submit", headers=headers, data=json.dumps({**body, "seed": 7}))
    other_id = other.json()["requestId"]
    cancelled = requests.post(f"{base}/video/cancel", headers=headers, data=json.dumps({"requestId": other_id}))
    assert cancelled.json() == {"status": "Succeed"}
    after = requests.post(f"{base}/video/status", headers=headers, data=json.dumps({"requestId": other_id})).json()
    assert after["status"] == "Failed" and after["reason"] == "cancelled"
    # The Postman guide's DELETE works too.
    third = requests.post(f"{base}/video/submit", headers=headers, data=json.dumps(body)).json()["requestId"]
    assert requests.delete(f"{base}/video/cancel", headers=headers, data=json.dumps({"requestId": third})).json() == {"status": "Succeed"}


@pytest.mark.parametrize(("field", "value"), [
    ("prompt", "too short"), ("image_size", "1280x720"), ("num_frames", 23), ("num_frames", 121),
    ("guidance_scale", 0.5), ("guidance_scale", 20.5), ("infer_steps", 19), ("infer_steps", 101),
    ("seed", -1), ("seed", 2147483648),
])
def test_wan_t2v_service_422s_for_values_outside_its_ranges(gateway, field, value):
    headers = {"Authorization": f"Bearer {gateway.user_key}"}
    body = {"prompt": "A beautiful sunset over the mountains", "image_size": "832x480", "num_frames": 81,
            "guidance_scale": 5.0, "infer_steps": 50, field: value}
    refused = requests.post(f"{gateway.url}/video/submit", headers=headers, json=body)
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["loc"] == ["body", field]


def test_wan_t2v_service_needs_its_fields_and_a_valid_key(gateway):
    headers = {"Authorization": f"Bearer {gateway.user_key}"}
    missing = requests.post(f"{gateway.url}/video/submit", headers=headers, json={"prompt": "A beautiful sunset"})
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"][0] == "body"
    unknown = requests.post(f"{gateway.url}/video/status", headers=headers, json={"requestId": "nope"})
    assert unknown.status_code == 404 and unknown.json() == {"detail": "Task not found"}
    wrong_key = requests.post(f"{gateway.url}/video/status", headers={"Authorization": "Bearer x2v_wrong"},
                              json={"requestId": "nope"})
    assert wrong_key.status_code == 401 and "detail" in wrong_key.json()


def test_s2v_service_model_cls_other_than_sekotalk_needs_the_cloud(gateway, media):
    with media["face"].open("rb") as image, media["voice"].open("rb") as audio:
        refused = requests.post(f"{gateway.url}/api/submit", data={"prompt": "x", "model_cls": "OtherTalk"},
                                files={"image": image, "audio": audio})
    # Only a hosted cloud chooses models; this gateway's demo node runs its own.
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "model_cls"]
    staged = requests.post(f"{gateway.url}/api/submit", data={"prompt": "x", "stage": "multi_stage"})
    assert staged.status_code == 422 and staged.json()["detail"][0]["loc"] == ["body", "stage"]
