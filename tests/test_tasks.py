"""Every task the upstreams run, through a real gateway: images (t2i, i2i) on the demo node and on
the cloud double, animate (an image driven by a video) on the cloud double, flf2v anywhere.

A job of an image task makes an image: stored, checked to decode, served as `image/png` on
`/api/v1/jobs/{id}/image`, and put in batch zips under its own extension.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from PIL import Image

import loopback
from cloud_double import CloudDouble, render_mp4
from gateway_proc import GatewayProcess, wait_for
from servers import NodeProcess
from test_cloud_gateway import Client, cloud_gateway
from x2v_gateway.upstream.base import RemoteState, SubmitRequest
from x2v_gateway.upstream.selfhosted import SelfHostedNode


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def image_of(response: httpx.Response) -> Image.Image:
    picture = Image.open(io.BytesIO(response.content))
    picture.load()  # every pixel decodes
    return picture


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A gateway with its built-in demo node (every task a self-hosted node runs)."""
    root = tmp_path_factory.mktemp("tasks-gw")
    gateway = GatewayProcess(root / "data").start()
    with gateway.client() as client:
        yield gateway, client
    gateway.stop()


def node_journal(gateway: GatewayProcess) -> dict[str, dict]:
    """What reached the demo node, by task id (the gateway's job id on the JSON route)."""
    journal = gateway.data_dir / "demo-node" / "submissions.jsonl"
    entries = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    return {entry["task_id"]: entry for entry in entries}


def test_t2i_job_makes_a_png_served_as_an_image(demo):
    gateway, client = demo
    made = client.post("/api/v1/jobs?wait=60", json={"task": "t2i", "prompt": "a lighthouse at dusk", "seed": 3})
    assert made.status_code == 201, made.text
    job = made.json()
    assert job["state"] == "succeeded", job
    assert job["progress"] == 1.0
    result = job["result"]
    assert result["kind"] == "image" and result["media_type"] == "image/png"
    assert result["url"] == f"/api/v1/jobs/{job['id']}/image"
    assert result["duration"] is None and result["width"] > result["height"]  # 16:9, the node's default

    served = client.get(result["url"])
    assert served.status_code == 200 and served.headers["content-type"] == "image/png"
    assert served.headers["content-disposition"] == f'inline; filename="{job["id"]}.png"'
    picture = image_of(served)
    assert picture.format == "PNG" and (picture.width, picture.height) == (result["width"], result["height"])
    # Its poster (for lists and the gallery) is a JPEG thumbnail of it.
    poster = client.get(f"/api/v1/jobs/{job['id']}/poster")
    assert poster.status_code == 200 and poster.headers["content-type"] == "image/jpeg"
    assert image_of(poster).size == picture.size  # 320 wide: already within a poster's size
    # It went to the node's image route, which took the gateway's id and seed.
    sent = node_journal(gateway)[job["id"]]
    assert sent["route"] == "/v1/tasks/image/" and sent["request"]["seed"] == 3

    # An image job has no video, and says where its image is.
    video = client.get(f"/api/v1/jobs/{job['id']}/video")
    assert video.status_code == 404 and f"/api/v1/jobs/{job['id']}/image" in video.json()["error"]["message"]


def test_i2i_upload_makes_a_new_image_at_the_asked_aspect_ratio(demo, media):
    gateway, client = demo
    made = client.post(
        "/api/v1/jobs?wait=60",
        data={"task": "i2i", "prompt": "as a watercolour", "aspect_ratio": "1:1", "i2i_denoise_strength": "0.6"},
        files={"image": media["face"].open("rb")},
    )
    assert made.status_code == 201, made.text
    job = made.json()
    assert job["state"] == "succeeded", job
    assert job["params"]["aspect_ratio"] == "1:1" and job["params"]["i2i_denoise_strength"] == 0.6
    picture = image_of(client.get(job["result"]["url"]))
    assert picture.width == picture.height
    sent = node_journal(gateway)[job["id"]]["request"]
    assert sent["aspect_ratio"] == "1:1" and sent["i2i_denoise_strength"] == 0.6 and sent["image_path"]


@pytest.mark.parametrize(("body", "field"), [
    ({"task": "t2i"}, "prompt"),  # a text-to-image job with no text
    ({"task": "i2i", "prompt": "x"}, "image"),
    ({"task": "t2v", "prompt": "x", "i2i_denoise_strength": 0.5}, "i2i_denoise_strength"),
    ({"task": "i2i", "prompt": "x", "image": "aGk=", "i2i_denoise_strength": 2}, "i2i_denoise_strength"),
    ({"task": "t2i", "prompt": "x", "aspect_ratio": "wide"}, "aspect_ratio"),
    ({"task": "animate", "prompt": "x"}, "image"),  # and no upstream here runs it anyway
])
def test_image_task_mistakes_are_a_422_naming_the_field(demo, body, field):
    _, client = demo
    response = client.post("/api/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field


def test_animate_is_refused_where_no_upstream_runs_it(demo, media):
    _, client = demo
    response = client.post("/api/v1/jobs", json={
        "task": "animate", "prompt": "dance", "image": b64(media["face"]),
        "video": base64.b64encode(render_mp4(1)).decode(),
    })
    assert response.status_code == 422 and response.json()["error"]["field"] == "task", response.text


def test_models_list_image_tasks_of_the_demo_node(demo):
    _, client = demo
    (node,) = client.get("/api/v1/models").json()["upstreams"]
    assert {m["task"] for m in node["models"]} == {"s2v", "i2v", "t2v", "flf2v", "t2i", "i2i"}


def test_node_image_form_route_carries_a_large_i2i_input(tmp_path, media):
    """Inputs over the form threshold go to `/v1/tasks/image/form`, whose fields differ from
    the video form's; the result is `<id>.png`, fetched as the node serves it."""

    async def run() -> tuple[bytes, list[dict]]:
        with NodeProcess(tmp_path / "node") as node:
            adapter = SelfHostedNode("n", node.url, form_threshold=0)
            request = SubmitRequest(
                job_id="j1", task_id="j1", task="i2i", params={"prompt": "form", "seed": 5, "aspect_ratio": "4:3"},
                inputs={"image": media["face"]}, filenames={"image": "image.png"},
            )
            try:
                assert await adapter.submit(request) == "j1"
                for _ in range(200):
                    status = (await adapter.poll(["j1"]))["j1"]
                    if status is not None and status.state is RemoteState.SUCCEEDED:
                        break
                    await asyncio.sleep(0.05)
                dest = tmp_path / "out"
                await adapter.fetch_result("j1", dest, kind="image")
                return dest.read_bytes(), node.submissions()
            finally:
                await adapter.aclose()

    data, submissions = asyncio.run(run())
    (sent,) = submissions
    assert sent["route"] == "/v1/tasks/image/form"
    assert sent["request"]["seed"] == 5 and sent["request"]["aspect_ratio"] == "4:3"
    picture = Image.open(io.BytesIO(data))
    assert picture.format == "PNG" and abs(picture.width / picture.height - 4 / 3) < 0.05


# -- the hosted cloud ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks-cloud")
    double = CloudDouble(root / "double", workers=2, job_seconds=0.3, ping_seconds=0.1).start()
    gateway = cloud_gateway(root, double).start()
    client = Client(gateway.url)
    yield double, client
    client.close()
    gateway.stop()
    double.stop()


def test_cloud_runs_t2i_and_i2i_on_qwen_image_models_and_keeps_their_images(cloud, media):
    double, client = cloud
    t2i = client.post("/api/v1/jobs", json={"task": "t2i", "prompt": "a red kite", "aspect_ratio": "1:1"}).json()
    i2i = client.post("/api/v1/jobs", json={"task": "i2i", "prompt": "in snow", "image": b64(media["face"])}).json()
    for job in (t2i, i2i):
        done = wait_for(client, job["id"], {"succeeded", "failed"}, timeout=60)
        assert done["state"] == "succeeded", done["error"]
        served = client.get(done["result"]["url"])
        # The cloud sends `application/octet-stream` and `filename="output_image"`: the gateway
        # says what it is.
        assert served.headers["content-type"] == "image/png"
        assert image_of(served).format == "PNG"
    journal = {entry["task"]: entry for entry in double.journal()}
    assert journal["t2i"]["model_cls"] == "qwen-image" and journal["t2i"]["params"]["aspect_ratio"] == "1:1"
    assert journal["i2i"]["model_cls"] == "qwen-image-2509" and set(journal["i2i"]["inputs"]) == {"input_image"}
    # The result was asked for by its name among the task's outputs.
    asked = [r["query"].get("name") for r in double.requests() if r["path"] == "/api/v1/task/result_url"]
    assert "output_image" in asked


def test_cloud_animate_takes_an_image_and_a_checked_driving_video(cloud, media, tmp_path):
    double, client = cloud
    driving = render_mp4(11)
    made = client.post(
        "/api/v1/jobs", data={"task": "animate", "prompt": "make it dance"},
        files={"image": media["face"].open("rb"), "video": ("moves.mp4", driving, "video/mp4")},
    )
    assert made.status_code == 201, made.text
    done = wait_for(client, made.json()["id"], {"succeeded", "failed"}, timeout=60)
    assert done["state"] == "succeeded", done["error"]
    assert done["result"]["kind"] == "video" and set(done["inputs"]) == {"image", "video"}
    assert client.get(done["result"]["url"]).headers["content-type"] == "video/mp4"
    entry = next(e for e in double.journal() if e["task"] == "animate")
    assert entry["model_cls"] == "wan2.2_animate"
    assert entry["inputs"]["input_video"]["bytes"] == len(driving)

    # A driving video that is not one is refused before anything reaches the cloud.
    bad = client.post(
        "/api/v1/jobs", data={"task": "animate", "prompt": "x"},
        files={"image": media["face"].open("rb"), "video": ("moves.mp4", b"not a video" * 100, "video/mp4")},
    )
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "video", bad.text
    # And a video where an image belongs is not an image.
    swapped = client.post("/api/v1/jobs", json={
        "task": "animate", "prompt": "x", "image": base64.b64encode(driving).decode(),
        "video": base64.b64encode(driving).decode(),
    })
    assert swapped.status_code == 422 and swapped.json()["error"]["field"] == "image"


def test_cloud_models_offer_every_task(cloud):
    _, client = cloud
    (account,) = client.get("/api/v1/models").json()["upstreams"]
    defaults = {m["task"]: m["model"] for m in account["models"] if m["default"]}
    assert defaults == {
        "s2v": "SekoTalk", "i2v": "wan2.2-14B-480P", "t2v": "wan2.2-T2V-A14B", "flf2v": "wan2.2-14B-480P",
        "t2i": "qwen-image", "i2i": "qwen-image-2509", "animate": "wan2.2_animate",
    }


def test_batch_zip_holds_images_under_their_own_extension(demo, media):
    """A batch of image jobs downloads as PNGs, named as the videos are."""
    _, client = demo
    made = client.post("/api/v1/batches", json={"name": "stills", "jobs": [
        {"task": "t2i", "prompt": "one"}, {"task": "t2v", "prompt": "two"},
    ]})
    assert made.status_code == 201, made.text
    batch = made.json()
    for job in batch["jobs"]:
        wait_for(client, job["id"], {"succeeded"}, timeout=60)
    archive = zipfile.ZipFile(io.BytesIO(client.get(f"/api/v1/batches/{batch['id']}/zip").content))
    names = sorted(archive.namelist())
    assert names == ["0001.png", "0002.mp4", "manifest.csv"], names
    Image.open(io.BytesIO(archive.read("0001.png"))).load()


# -- the demo node's image routes, as the real server answers -----------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with NodeProcess(tmp_path_factory.mktemp("image-node")) as started:
        yield started


def _finished(client: httpx.Client, task_id: str) -> dict:
    for _ in range(200):
        status = client.get(f"/v1/tasks/{task_id}/status").json()
        if status["status"] in ("completed", "failed"):
            return status
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} did not finish: {status}")


def test_demo_node_image_route_answers_as_the_real_server(node):
    with loopback.client(base_url=node.url) as client:
        submitted = client.post("/v1/tasks/image/", json={"prompt": "a bridge", "aspect_ratio": "1:1"})
        assert submitted.status_code == 200
        body = submitted.json()
        assert body["task_status"] == "pending" and body["save_result_path"] == body["task_id"]
        status = _finished(client, body["task_id"])
        assert status["status"] == "completed" and status["save_result_path"] == f"{body['task_id']}.png"
        result = client.get(f"/v1/tasks/{body['task_id']}/result")
        assert result.headers["content-type"] == "image/png"
        assert result.headers["content-disposition"] == f'attachment; filename="{body["task_id"]}.png"'
        assert image_of(result).size == (320, 320)
        assert client.get(f"/v1/files/download/{body['task_id']}.png").content == result.content

        # Without its trailing slash the route matches DELETE /v1/tasks/{task_id}: 405.
        bare = client.post("/v1/tasks/image", json={"prompt": "x"})
        assert (bare.status_code, bare.headers["allow"]) == (405, "DELETE")
        wrong = client.post("/v1/tasks/image/", json={"prompt": "x", "aspect_ratio": 169, "i2i_denoise_strength": "x"})
        assert wrong.status_code == 422
        assert [(e["loc"], e["type"]) for e in wrong.json()["detail"]] == [
            (["body", "aspect_ratio"], "string_type"), (["body", "i2i_denoise_strength"], "float_parsing"),
        ]
        # The image form takes no image at all (t2i), and defaults the seed to 42.
        form = client.post("/v1/tasks/image/form", data={"prompt": "from a form"})
        assert form.status_code == 200, form.text
        assert _finished(client, form.json()["task_id"])["status"] == "completed"
    sent = {s["task_id"]: s for s in node.submissions()}[form.json()["task_id"]]
    assert sent["route"] == "/v1/tasks/image/form" and sent["request"]["seed"] == 42
    assert sent["request"]["aspect_ratio"] == "16:9"


def test_cloud_progress_is_the_finished_stages_of_a_multi_stage_task():
    """Neither upstream reports a percentage; a multi_stage cloud task's subtasks say which of its
    stages have finished, which the adapter reports as progress (cloud.md §5's shape)."""
    from x2v_gateway.upstream.cloud_answers import to_status

    def task(*states: str) -> dict:
        return {"status": "RUNNING", "subtasks": [
            {"status": s, "worker_name": w, "estimated_running_secs": 3600}
            for s, w in zip(states, ("text_encoder", "dit", "vae_decoder"))
        ]}

    assert to_status(task("SUCCEED", "RUNNING", "CREATED"), ()).progress == pytest.approx(1 / 3)
    assert to_status(task("SUCCEED", "SUCCEED", "PENDING"), ()).progress == pytest.approx(2 / 3)
    assert to_status(task("RUNNING"), ()).progress is None  # single_stage, placeholder estimate: nothing to say

    def running(ran: float, average: float | None) -> dict:
        return {"status": "RUNNING", "subtasks": [{"status": "RUNNING", "elapses": {"PENDING-RUNNING": 0.9, "RUNNING-": ran},
                                                  "estimated_running_secs": average}]}

    # A running stage's time so far against the queue's measured average run: never whole before SUCCEED.
    assert to_status(running(30, 120.0), ()).progress == pytest.approx(0.25)
    assert to_status(running(500, 120.0), ()).progress == pytest.approx(0.95)
    assert to_status(running(30, None), ()).progress is None


def test_cloud_job_reports_progress_while_it_runs_once_the_cloud_has_measured_a_run(tmp_path):
    double = CloudDouble(tmp_path / "double", workers=1, job_seconds=1.5, ping_seconds=0.1).start()
    gateway = cloud_gateway(tmp_path, double).start()
    try:
        with Client(gateway.url) as client:
            first = client.post("/api/v1/jobs", json={"task": "t2v", "prompt": "first"}).json()
            # Before any run is measured the cloud's estimate is a placeholder: no progress to show.
            seen_first = _progress_seen(client, first["id"])
            second = client.post("/api/v1/jobs", json={"task": "t2v", "prompt": "second"}).json()
            seen_second = _progress_seen(client, second["id"])
    finally:
        gateway.stop()
        double.stop()
    assert seen_first == []
    assert seen_second and all(0 < p <= 0.95 for p in seen_second), seen_second
    assert seen_second == sorted(seen_second)  # it only goes forward


def _progress_seen(client: Client, job_id: str) -> list[float]:
    """The progress a running job showed, polled until it finished."""
    seen = []
    for _ in range(300):
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["state"] == "succeeded":
            assert job["progress"] == 1
            return seen
        if job["state"] == "running" and job["progress"] is not None:
            seen.append(job["progress"])
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def test_nodes_are_routed_image_tasks_by_their_model_class_and_settings():
    from x2v_gateway.settings import SettingsError, load_settings
    from x2v_gateway.upstream.selfhosted import tasks_for_model

    assert tasks_for_model("qwen_image") == {"t2i", "i2i"}
    assert tasks_for_model("z_image_turbo") == {"t2i", "i2i"}
    assert tasks_for_model("wan2.1") == {"t2v", "i2v", "flf2v"}
    assert tasks_for_model("seko_talk") == {"s2v"}
    assert tasks_for_model("hunyuan3d") == frozenset()  # 3D: nothing the gateway sends fits
    env = {"X2V_NODES": "a=http://127.0.0.1:9,b=http://127.0.0.1:10", "X2V_NODE_TASKS": "a=t2i+i2i,b=t2v"}
    assert load_settings(env, env_file=None).node_tasks == {"a": {"t2i", "i2i"}, "b": {"t2v"}}
    # A self-hosted server has no route for animate; the cloud's models are set per task type.
    with pytest.raises(SettingsError, match="animate"):
        load_settings({**env, "X2V_NODE_TASKS": "a=animate"}, env_file=None)
    assert load_settings({"LIGHTX2V_MODELS": "t2i=qwen-image-fast"}, env_file=None).cloud_models == {"t2i": "qwen-image-fast"}


def test_image_jobs_go_to_the_node_that_runs_image_tasks(tmp_path):
    with NodeProcess(tmp_path / "img") as images, NodeProcess(tmp_path / "vid") as videos:
        gateway = GatewayProcess(
            tmp_path / "data", nodes=f"img={images.url},vid={videos.url}", X2V_NODE_TASKS="img=t2i+i2i,vid=t2v",
        ).start()
        try:
            with gateway.client() as client:
                t2i = client.post("/api/v1/jobs", json={"task": "t2i", "prompt": "still"}).json()
                t2v = client.post("/api/v1/jobs", json={"task": "t2v", "prompt": "moving"}).json()
                assert wait_for(client, t2i["id"], {"succeeded"})["upstream"] == "img"
                assert wait_for(client, t2v["id"], {"succeeded"})["upstream"] == "vid"
                refused = client.post("/api/v1/jobs", json={"task": "i2v", "prompt": "x", "image": "aGk="})
                assert refused.status_code == 422 and refused.json()["error"]["field"] == "task"
        finally:
            gateway.stop()
    assert [s["route"] for s in images.submissions()] == ["/v1/tasks/image/"]
    assert [s["route"] for s in videos.submissions()] == ["/v1/tasks/video/"]
