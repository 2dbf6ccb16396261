"""The cloud double answers as the captures in shared/lightx2v/cloud.md say the real server does.

If the double drifts from the contract, every cloud test after it proves nothing; these tests pin
its statuses and messages to the captured ones.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import time
from pathlib import Path

import av
import httpx
import pytest

import loopback
from cloud_double import CloudDouble, make_token
from media import make_png, make_wav

UNKNOWN = "00000000-0000-0000-0000-000000000000"


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    """One worker, short jobs; users github_12345.. each with their own limits."""
    expired = make_token("github_12345")
    double = CloudDouble(tmp_path_factory.mktemp("cloud"), users=8, workers=1, job_seconds=0.4,
                         ping_seconds=0.1, expired_token=[expired], no_limits=["github_12352"])
    double.expired = expired
    with double:
        yield double


@pytest.fixture(scope="module")
def stalled(tmp_path_factory):
    """No worker at all: every task stays PENDING."""
    with CloudDouble(tmp_path_factory.mktemp("stalled"), users=3, workers=0) as double:
        yield double


@pytest.fixture(scope="module")
def b64(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("inputs")
    return {
        "png": base64.b64encode(make_png(root / "face.png").read_bytes()).decode(),
        "wav": base64.b64encode(make_wav(root / "voice.wav", seconds=0.5).read_bytes()).decode(),
    }


class Api:
    """One user's client, leaving the cloud's 0.05 s between submits unless told not to."""

    def __init__(self, double: CloudDouble, user: str) -> None:
        self.user = user
        self.http = loopback.client(base_url=double.url, headers={"Authorization": f"Bearer {double.token_for(user)}"})
        self.last_submit = 0.0

    def submit(self, body: dict | bytes, *, wait: bool = True) -> httpx.Response:
        if wait:
            time.sleep(max(0.0, self.last_submit + 0.07 - time.monotonic()))
        if isinstance(body, bytes):
            response = self.http.post("/api/v1/task/submit", content=body)
        else:
            response = self.http.post("/api/v1/task/submit", json=body)
        # From the answer, not the sending: the cloud counts its gap from when the last request
        # arrived, which a busy machine may delay past the next one's sending.
        self.last_submit = time.monotonic()
        return response

    def get(self, path: str, **params) -> httpx.Response:
        return self.http.get(path, params=params)

    def query(self, task_id: str) -> dict:
        response = self.get("/api/v1/task/query", task_id=task_id)
        assert response.status_code == 200, response.text
        return response.json()

    def wait(self, task_id: str, *statuses: str, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            task = self.query(task_id)
            if task["status"] in statuses or time.monotonic() > deadline:
                assert task["status"] in statuses, task
                return task
            time.sleep(0.03)


def t2v(prompt: str = "a red car on a road", **extra) -> dict:
    return {"task": "t2v", "model_cls": "wan2.2-T2V-A14B", "stage": "single_stage", "prompt": prompt, **extra}


def message(response: httpx.Response) -> str:
    return response.json()["message"]


def test_auth_errors_match_the_captures(cloud):
    url = f"{cloud.url}/api/v1/model/list"
    assert loopback.get(url).status_code == 401
    assert loopback.get(url).json() == {"message": "Not authenticated"}
    assert loopback.get(url, headers={"Authorization": "Basic dXNlcjpwYXNz"}).json() == {"message": "Not authenticated"}
    garbage = loopback.get(url, headers={"Authorization": "Bearer garbage"})
    assert (garbage.status_code, garbage.json()) == (401, {"message": "Could not validate credentials"})
    expired = loopback.get(url, headers={"Authorization": f"Bearer {cloud.expired}"})
    assert (expired.status_code, expired.json()) == (401, {"message": "Token has expired"})
    worker = loopback.post(f"{cloud.url}/api/v1/worker/fetch", headers={"Authorization": f"Bearer {cloud.token}"})
    assert (worker.status_code, worker.json()) == (403, {"message": "Invalid worker token"})


def test_model_list_is_the_shipped_one(cloud):
    models = Api(cloud, "github_12345").get("/api/v1/model/list").json()["models"]
    assert len(models) == 16
    assert {"task": "s2v", "model_cls": "SekoTalk", "stage": "single_stage"} in models
    assert {"task": "flf2v", "model_cls": "Wan2.2-I2V-A14B-distill", "stage": "single_stage"} in models


def test_submit_mistakes_are_500s_with_the_captured_messages(cloud, b64):
    api = Api(cloud, "github_12352")  # exempt from the limits, so no pauses are needed
    i2v = {"task": "i2v", "model_cls": "wan2.2-14B-480P", "stage": "single_stage", "prompt": "the cat walks"}
    s2v = {"task": "s2v", "model_cls": "SekoTalk", "stage": "single_stage", "prompt": "a person talking",
           "input_image": {"type": "base64", "data": b64["png"]}}
    not_image = base64.b64encode(b"hello world, not an image" * 3).decode()
    exact = [
        (b"{bad json", "error: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)!"),
        ({"model_cls": "wan2.2-T2V-A14B", "stage": "single_stage", "prompt": "x"}, "error: 'task'!"),
        (t2v(prompt=""), "error: valid prompt is required!"),
        ({k: v for k, v in t2v().items() if k != "prompt"}, "error: 'prompt'!"),
        (i2v, "error: Input input_image not found in params!"),
        ({**i2v, "input_image": {"type": "base64", "data": "!!!not base64!!!"}},
         "error: Failed to read input_image, type=base64, val=!!!not base64!!!: Invalid base64-encoded string: "
         "number of data characters (9) cannot be 1 more than a multiple of 4!!"),
        ({**i2v, "input_image": {"type": "file", "data": "/etc/passwd"}},
         "error: Failed to read input_image, type=file, val=/etc/passwd: "
         "cannot read input_image[IMAGE] which type is file!!!"),
        ({**i2v, "input_image": "just a string"}, "error: string indices must be integers, not 'str'!"),
    ]
    for body, expected in exact:
        response = api.submit(body, wait=False)
        assert (response.status_code, message(response)) == (500, expected)

    unknown_model = message(api.submit(t2v(model_cls="no-such-model"), wait=False))
    assert re.fullmatch(r"error: \['t2v', 'no-such-model', 'single_stage'\] are not in /\S+/configs/model_pipeline\.json!!",
                        unknown_model)
    unknown_task = message(api.submit({**t2v(), "task": "v2v"}, wait=False))
    assert unknown_task.startswith("error: ['v2v', 'wan2.2-T2V-A14B', 'single_stage'] are not in /")

    prefixed = message(api.submit({**i2v, "input_image": {"type": "base64", "data": "data:image/png;base64," + b64["png"]}},
                                  wait=False))
    echoed = ("data:image/png;base64," + b64["png"])[:100]
    assert prefixed == f"error: Failed to read input_image, type=base64, val={echoed}: Incorrect padding!!"

    not_an_image = message(api.submit({**i2v, "input_image": {"type": "base64", "data": not_image}}, wait=False))
    assert re.fullmatch(rf"error: Failed to read input_image, type=base64, val={not_image[:100]}: "
                        r"cannot identify image file <_io\.BytesIO object at 0x[0-9a-f]+>!!", not_an_image)

    not_audio = api.submit({**s2v, "input_audio": {"type": "base64", "data": base64.b64encode(b"RIFF....not really a wav file" * 3).decode()}},
                           wait=False)
    assert not_audio.status_code == 500
    assert message(not_audio).startswith("error: Failed to read input_audio, type=base64, val=UklGRi4uLi5ub3QgcmVhbGx5")
    assert "media to wav failed: ffmpeg version" in message(not_audio) and len(message(not_audio)) > 2000


def test_accepted_submits_answer_as_captured_and_are_journaled(cloud, b64):
    api = Api(cloud, "github_12346")
    s2v = api.submit({"task": "s2v", "model_cls": "SekoTalk", "stage": "single_stage", "prompt": "a person talking",
                      "input_image": {"type": "base64", "data": b64["png"]},
                      "input_audio": {"type": "base64", "data": b64["wav"]}})
    assert s2v.status_code == 200, s2v.text
    body = s2v.json()
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}", body["task_id"])
    assert body["workers"] == {"pipeline": {"inputs": ["input_image", "input_audio"], "outputs": ["output_video"],
                                            "previous": [], "queue": "s2v-SekoTalk-single_stage-pipeline"}}
    assert body["params"] == {"prompt": "a person talking"}
    assert body["wait_time"] == 0.0

    extra = api.submit(t2v("extra params", seed=42, negative_prompt="blurry", custom_shape=[480, 832], aspect_ratio="16:9"))
    assert extra.json()["params"] == {"prompt": "extra params", "seed": 42, "negative_prompt": "blurry",
                                      "custom_shape": [480, 832], "aspect_ratio": "16:9"}
    journal = {entry["task_id"]: entry for entry in cloud.journal()}
    assert journal[body["task_id"]]["inputs"]["input_image"]["sha256"] == \
        hashlib.sha256(base64.b64decode(b64["png"])).hexdigest()
    assert journal[extra.json()["task_id"]]["params"]["seed"] == 42


def test_two_submits_within_50_ms_get_the_visit_limit(cloud):
    api = Api(cloud, "github_12347")
    first = api.submit(t2v("rate"))
    second = api.submit(t2v("rate"), wait=False)
    assert first.status_code == 200
    assert second.status_code == 400
    assert re.fullmatch(r"error: User github_12347 visit too frequently, 0\.0\d s vs 0\.05 s!", message(second))


def test_fourth_active_task_is_refused_until_one_ends(stalled):
    api = Api(stalled, "github_12345")
    ids = [api.submit(t2v(f"task {i}")).json()["task_id"] for i in range(3)]
    fourth = api.submit(t2v("one too many"))
    assert (fourth.status_code, message(fourth)) == (400, "error: User github_12345 has too many active tasks, 3 vs 3!")
    assert api.get("/api/v1/task/cancel", task_id=ids[0]).json() == {"msg": "Task cancelled successfully"}
    assert api.submit(t2v("room again")).status_code == 200


def test_daily_limit_and_queue_busy(tmp_path):
    with CloudDouble(tmp_path, users=2, workers=0, max_daily=2, queue_capacity=2) as double:
        first, second = Api(double, "github_12345"), Api(double, "github_12346")
        for i in range(2):
            task_id = first.submit(t2v(f"day {i}")).json()["task_id"]
        first.get("/api/v1/task/cancel", task_id=task_id)  # not active, still counted for the day
        daily = first.submit(t2v("third today"))
        assert (daily.status_code, message(daily)) == (400, "error: User github_12345 has too many daily tasks, 2 vs 2!")
        second.submit(t2v("fills the queue"))
        busy = second.submit(t2v("queue is full"))
        assert (busy.status_code, message(busy)) == (500, "error: Queue busy, please try again later!")


def test_pending_task_reports_queue_position_and_estimates(stalled):
    api = Api(stalled, "github_12346")
    task = api.query(api.submit(t2v("nobody will run me", model_cls="self-forcing-dmd")).json()["task_id"])
    assert task["status"] == "PENDING"
    assert "start_t" in task["extra_info"]
    (sub,) = task["subtasks"]
    assert sub["worker_name"] == "pipeline" and sub["fail_msg"] is None
    assert set(sub["elapses"]) == {"CREATED-PENDING", "PENDING-"}
    assert (sub["estimated_pending_order"], sub["estimated_running_secs"], sub["ready_worker_count"]) == (1, 3600, 0)
    assert sub["estimated_pending_secs"] == 3600.0

    multi = api.query(api.submit(t2v("multi", stage="multi_stage")).json()["task_id"])
    assert multi["status"] == "PENDING"
    assert [(s["worker_name"], s["status"]) for s in multi["subtasks"]] == [
        ("text_encoder", "PENDING"), ("dit", "CREATED"), ("vae_decoder", "CREATED")]


def test_one_unknown_id_fails_the_whole_multi_query(cloud):
    api = Api(cloud, "github_12348")
    ids = [api.submit(t2v(f"multi {i}")).json()["task_id"] for i in range(2)]
    both = api.get("/api/v1/task/query", task_ids=",".join(ids))
    assert [t["task_id"] for t in both.json()["tasks"]] == ids
    mixed = api.get("/api/v1/task/query", task_ids=",".join([*ids, UNKNOWN]))
    assert (mixed.status_code, message(mixed)) == (500, "error: cannot unpack non-iterable NoneType object!")
    single = api.get("/api/v1/task/query", task_id=UNKNOWN)
    assert (single.status_code, message(single)) == (500, "error: cannot unpack non-iterable NoneType object!")
    assert message(api.get("/api/v1/task/query")) == "error: 'task_id'!"
    # Another user's task is as unknown as a made-up one.
    other = Api(cloud, "github_12349").get("/api/v1/task/query", task_id=ids[0])
    assert other.status_code == 500


def test_cancelled_running_task_stays_cancel(cloud):
    api = Api(cloud, "github_12349")
    # Long enough to be seen running on a busy machine (0.4 s was missed once under a full
    # suite); the tasks after it run at the module's pace again.
    with cloud.configured(job_seconds=3.0):
        task_id = api.submit(t2v("cancel me while running")).json()["task_id"]
        api.wait(task_id, "RUNNING")
    assert api.get("/api/v1/task/cancel", task_id=task_id).json() == {"msg": "Task cancelled successfully"}
    task = api.query(task_id)
    assert task["status"] == "CANCEL" and "active_elapse" in task["extra_info"]
    assert set(task["subtasks"][0]["elapses"]) == {"CREATED-PENDING", "PENDING-RUNNING", "RUNNING-CANCEL"}
    # The one worker lets go of it and runs the next task to its end, so the cancelled one's
    # end has passed too: the worker's late report does not revive it.
    following = api.submit(t2v("after the cancelled one")).json()["task_id"]
    assert api.wait(following, "SUCCEED", "FAILED")["status"] == "SUCCEED"
    assert api.query(task_id)["status"] == "CANCEL"

    again = api.get("/api/v1/task/cancel", task_id=task_id)
    assert (again.status_code, message(again)) == (400, (
        f"error: {{'error': 'Task {task_id} cancel failed: Task {task_id} is not in active status "
        f"(current status: TaskStatus.CANCEL). {' ' * 24}Only tasks with status CREATED, PENDING, or RUNNING "
        "can be cancelled.'}!"))
    unknown = api.get("/api/v1/task/cancel", task_id=UNKNOWN)
    assert (unknown.status_code, message(unknown)) == (
        400, f"error: {{'error': 'Task {UNKNOWN} cancel failed: unknown cancel error'}}!")
    post = api.http.post("/api/v1/task/cancel", params={"task_id": task_id})
    assert (post.status_code, post.json()) == (405, {"detail": "Method Not Allowed"})


def test_resume_requeues_failed_task_under_the_same_id(cloud):
    api = Api(cloud, "github_12350")
    failed_id = api.submit(t2v("please FAIL this one")).json()["task_id"]
    failed = api.wait(failed_id, "FAILED")
    assert failed["subtasks"][0]["fail_msg"] == "worker failed"
    with cloud.configured(job_seconds=2.0):  # still active at the next two requests, on a busy machine too
        assert api.get("/api/v1/task/resume", task_id=failed_id).json() == {"msg": "ok"}
        resumed = api.query(failed_id)
        assert resumed["status"] in ("PENDING", "RUNNING") and resumed["subtasks"][0]["fail_msg"] is None
        active = api.get("/api/v1/task/resume", task_id=failed_id)
        assert (active.status_code, message(active)) == (
            400, f"error: Task {failed_id} resume failed: Active task cannot be resumed!")
    api.wait(failed_id, "FAILED")

    ok_id = api.submit(t2v("fine")).json()["task_id"]
    api.wait(ok_id, "SUCCEED")
    succeed = api.get("/api/v1/task/resume", task_id=ok_id)
    assert (succeed.status_code, message(succeed)) == (
        400, f"error: Task {ok_id} resume failed: Succeed task cannot be resumed!")
    unknown = api.get("/api/v1/task/resume", task_id=UNKNOWN)
    assert (unknown.status_code, message(unknown)) == (500, "error: 'NoneType' object is not subscriptable!")


def test_relative_result_url_downloads_an_mp4_with_header_or_query_token(cloud):
    api = Api(cloud, "github_12351")
    task_id = api.submit(t2v("a result")).json()["task_id"]
    early = api.get("/api/v1/task/result_url", task_id=task_id, name="output_video")
    assert (early.status_code, message(early)) == (500, f"error: Task {task_id} not succeed!")
    api.wait(task_id, "SUCCEED")

    url = api.get("/api/v1/task/result_url", task_id=task_id, name="output_video").json()["url"]
    assert url == f"./assets/task/result?task_id={task_id}&name=output_video"
    download = api.http.get(url.removeprefix("."))
    assert download.status_code == 200
    assert download.headers["content-type"] == "application/octet-stream"
    assert download.headers["content-disposition"] == 'attachment; filename="output_video"'
    assert download.content[4:12] == b"ftypisom"
    with av.open(io.BytesIO(download.content)) as container:
        assert [(s.type, s.codec_context.name) for s in container.streams] == [("video", "h264"), ("audio", "aac")]
        assert sum(1 for _ in container.decode(video=0)) == 16

    by_query = loopback.get(f"{cloud.url}{url.removeprefix('.')}&token={cloud.token_for('github_12351')}")
    assert by_query.status_code == 200 and by_query.content == download.content
    anonymous = loopback.get(f"{cloud.url}{url.removeprefix('.')}")
    assert (anonymous.status_code, anonymous.json()) == (401, {"message": "Could not validate credentials"})

    wrong_name = api.get("/api/v1/task/result_url", task_id=task_id, name="output_image")
    assert message(wrong_name) == f"error: Output output_image not found in task {task_id}!"
    assert message(api.get("/api/v1/task/result_url", task_id=UNKNOWN, name="output_video")) == \
        f"error: Task {UNKNOWN} not found!"


def test_absolute_result_url_works_without_token_and_refuses_one(tmp_path):
    with CloudDouble(tmp_path, workers=1, job_seconds=0.1, absolute_urls=True) as double:
        api = Api(double, "github_12345")
        task_id = api.submit(t2v("signed")).json()["task_id"]
        api.wait(task_id, "SUCCEED")
        url = api.get("/api/v1/task/result_url", task_id=task_id, name="output_video").json()["url"]
        assert url.startswith(f"{double.url}/presigned/{task_id}-output_video.mp4?")
        plain = loopback.get(url)
        assert plain.status_code == 200 and plain.content[4:12] == b"ftypisom"
        assert loopback.get(url, headers={"Authorization": f"Bearer {double.token}"}).status_code == 400
        assert loopback.get(url.replace("Signature=", "Signature=0")).status_code == 403


def test_list_is_newest_first_and_delete_hides_the_task(cloud):
    api = Api(cloud, "github_12352")
    first = api.submit(t2v("first")).json()["task_id"]
    second = api.submit(t2v("second")).json()["task_id"]
    listed = api.get("/api/v1/task/list", page=1, page_size=2).json()
    assert [t["task_id"] for t in listed["tasks"]] == [second, first]
    assert listed["tasks"][0]["subtasks"][0]["status"] in (1, 2, 3, 4)  # raw PostgreSQL rows
    total = listed["pagination"]["total"]
    assert api.get("/api/v1/task/list", page=99, page_size=10).json() == {
        "tasks": [], "pagination": {"page": 99, "page_size": 10, "total": total, "total_pages": (total + 9) // 10}}
    assert message(api.get("/api/v1/task/list", status="CANCELLED")) == "error: 'CANCELLED'!"

    api.wait(first, "SUCCEED")
    assert api.http.delete("/api/v1/task/delete", params={"task_id": first}).json() == {"message": "Task deleted successfully"}
    assert api.get("/api/v1/task/query", task_id=first).status_code == 500
    assert first not in [t["task_id"] for t in api.get("/api/v1/task/list", page_size=100).json()["tasks"]]
    missing = api.http.delete("/api/v1/task/delete", params={"task_id": UNKNOWN})
    assert (missing.status_code, message(missing)) == (404, "error: Task not found!")


def test_unknown_get_paths_fall_into_the_spa_catch_all(cloud):
    for path in ("/api/v1/task/submit", "/api/v1/does/not/exist"):
        response = loopback.get(f"{cloud.url}{path}")
        assert (response.status_code, response.text) == (404, "<h1>Frontend not found</h1>")


def test_request_log_records_auth_kind_but_never_the_token(cloud):
    token = cloud.token_for("github_12351")
    url = f"{cloud.url}/api/v1/model/list"
    for headers in ({}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": f"Bearer {token}"}):
        loopback.get(url, headers=headers)
    assert not any(token in line for line in (Path(cloud.state_dir) / "requests.jsonl").read_text().splitlines())
    kinds = {r["auth"] for r in cloud.requests()}
    assert {"bearer", "none", "basic"} <= kinds
