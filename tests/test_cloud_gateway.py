"""The gateway with the hosted LightX2V cloud as its upstream: a real gateway process, configured
only with `LIGHTX2V_ACCESS_TOKEN` and `LIGHTX2V_BASE_URL`, against the cloud double (a real HTTP
server on 127.0.0.1 that keeps the contract's limits and quirks).

Each test ends by scanning everything it produced (every answer the gateway gave, its log, its
SQLite file, its blobs, the double's files) for the access token.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

import loopback
from cloud_double import CloudDouble, make_token
from gateway_proc import GatewayProcess, free_port, until, wait_for
from x2v_gateway.media import probe_video

# The gateway's own admin key (its access control), not to be confused with the cloud's token.
ADMIN_KEY = "cloud-test-admin-key-0123456789"
LIMIT_WORDS = ("too many", "too frequently", "rate limit", "maximum of active", "queue is full", "daily")


class Client(httpx.Client):
    """An API client that keeps every answer it got, for the token scan."""

    def __init__(self, base_url: str) -> None:
        self.seen: list[bytes] = []
        super().__init__(
            base_url=base_url, timeout=60, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            event_hooks={"response": [self._keep]},
        )

    def _keep(self, response: httpx.Response) -> None:
        response.read()
        self.seen.append(str(response.headers).encode() + b"\n" + response.content)


def cloud_gateway(root: Path, double: CloudDouble, token: str | None = None, **settings: str) -> GatewayProcess:
    return GatewayProcess(
        root / "data", nodes="", LIGHTX2V_ACCESS_TOKEN=token or double.token,
        LIGHTX2V_BASE_URL=double.url, X2V_POLL_INTERVAL="0.2", X2V_ADMIN_KEY=ADMIN_KEY, **settings,
    )


def secret_parts(token: str, size: int = 24) -> list[bytes]:
    """The token, and every `size`-character slice of its JWT payload and signature: any
    fragment of twice that length (a truncated echo, a cut log line) holds one of them. The
    header is left out: every HS256 token starts with the same one."""
    pieces = [token]
    for part in token.split(".")[1:]:
        pieces += [part[i:i + size] for i in range(0, len(part) - size + 1, size)]
    return [p.encode() for p in pieces]


def assert_token_never_leaked(tokens: list[str], client: Client, root: Path) -> None:
    """No trace of a token in anything a user or an operator can see, nor on disk."""
    # Read every view there is, so that those answers are scanned too.
    for path in ("/metrics", "/readyz", "/healthz", "/api/v1/nodes", "/api/v1/models",
                 "/schema/openapi.json", "/ui/", "/ui/jobs", "/ui/nodes"):
        client.get(path)
    for job in client.get("/api/v1/jobs", params={"limit": 500}).json()["jobs"]:
        client.get(f"/api/v1/jobs/{job['id']}")
        client.get(f"/ui/jobs/{job['id']}")
    secrets = [s for token in tokens for s in secret_parts(token)]
    for body in client.seen:
        for secret in secrets:
            assert secret not in body, f"a token is in an answer: {body[:300]!r}"
    files = [p for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "gateway.db" for p in files) and any(p.name.endswith("gateway.log") for p in files)
    for path in files:
        data = path.read_bytes()
        for secret in secrets:
            assert secret not in data, f"a token is in {path}"


def submit(client: Client, **fields) -> dict:
    response = client.post("/api/v1/jobs", json=fields)
    assert response.status_code == 201, response.text
    return response.json()


def assert_playable(client: Client, job: dict, tmp_path: Path) -> None:
    video = client.get(job["result"]["url"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    path = tmp_path / f"{job['id']}.mp4"
    path.write_bytes(video.content)
    assert probe_video(path).duration > 0


def cloud_task(double: CloudDouble, task_id: str) -> dict:
    """The cloud's own view of a task, asked with the account's token."""
    return loopback.get(
        f"{double.url}/api/v1/task/query", params={"task_id": task_id},
        headers={"Authorization": f"Bearer {double.token}"},
    ).json()


def submit_answers(double: CloudDouble) -> Counter:
    """How the cloud answered the submits: 200, or the refusal's message."""
    return Counter(
        200 if r["status"] == 200 else r.get("message", str(r["status"]))
        for r in double.requests() if r["path"] == "/api/v1/task/submit"
    )


def assert_within_the_limits(double: CloudDouble, tasks: int) -> None:
    """One cloud task per job, and the gateway kept to 3 active tasks per account itself (two
    submits may still arrive too close together: the adapter sends such a one again)."""
    answers = submit_answers(double)
    assert answers[200] == tasks, answers
    assert not [a for a in answers if a != 200 and "visit too frequently" not in a], answers


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One worker, 1 s jobs, the contract's limits on."""
    root = tmp_path_factory.mktemp("cloud-gw")
    double = CloudDouble(root / "double", workers=1, job_seconds=1.0, ping_seconds=0.1).start()
    gateway = cloud_gateway(root, double).start()
    client = Client(gateway.url)
    yield root, double, gateway, client
    client.close()
    gateway.stop()
    double.stop()


@pytest.fixture(scope="module")
def file_server(media):
    """Serves the media files over http, counting requests (to see what was fetched)."""
    directory = next(iter(media.values())).parent
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(directory), **kwargs)

        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()


def test_s2v_i2v_and_t2v_jobs_run_end_to_end_through_the_cloud(shared, media, tmp_path):
    root, double, gateway, client = shared
    # Only the cloud: with a token and no X2V_NODES, no demo node is started.
    nodes = client.get("/api/v1/nodes").json()
    assert [(n["name"], n["kind"]) for n in nodes] == [("cloud", "cloud")]
    assert "demo node" not in gateway.log()
    deadline = time.monotonic() + 10
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").text
        time.sleep(0.1)

    response = client.post(
        "/api/v1/jobs", data={"task": "s2v", "prompt": "a presenter talking", "seed": "7"},
        files={"image": media["face"].open("rb"), "audio": media["voice"].open("rb")},
    )
    assert response.status_code == 201, response.text
    s2v = response.json()
    image_b64 = base64.b64encode(media["face2"].read_bytes()).decode()
    i2v = submit(client, task="i2v", prompt="the portrait turns", image=image_b64,
                 negative_prompt="blurry", target_shape=[480, 832])
    t2v = submit(client, task="t2v", prompt="a red car on a road")
    jobs = [s2v, i2v, t2v]

    # One cloud worker: the later jobs wait in the cloud's queue, and say where and how long.
    seen_queue = None
    deadline = time.monotonic() + 30
    while seen_queue is None and time.monotonic() < deadline:
        for job in jobs:
            view = client.get(f"/api/v1/jobs/{job['id']}").json()
            queue = view["queue"] or {}
            if view["state"] == "submitted" and queue.get("where") == "upstream" and {
                "position", "pending_seconds"
            } <= queue.keys():
                seen_queue = queue
        time.sleep(0.05)
    assert seen_queue is not None, "no job showed the cloud's queue position and estimates"
    assert seen_queue["position"] >= 1 and seen_queue["pending_seconds"] >= 0
    # The cloud's placeholder run time (its 3600 s timeout, until it has measured a run) is
    # not shown as an estimate.
    assert seen_queue.get("running_seconds") is None or 0 < seen_queue["running_seconds"] < 3600

    done = [wait_for(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=30) for job in jobs]
    assert [j["state"] for j in done] == ["succeeded"] * 3, [j["error"] for j in done]
    for job in done:
        assert job["upstream"] == "cloud" and job["attempts"] == 1 and job["error"] is None
        assert_playable(client, job, tmp_path)

    journal = {e["task_id"]: e for e in double.journal()}
    s2v_task, i2v_task, t2v_task = (journal[j["upstream_task_id"]] for j in done)
    assert (s2v_task["task"], s2v_task["model_cls"], s2v_task["stage"]) == ("s2v", "SekoTalk", "single_stage")
    assert (i2v_task["task"], i2v_task["model_cls"]) == ("i2v", "wan2.2-14B-480P")
    assert (t2v_task["task"], t2v_task["model_cls"]) == ("t2v", "wan2.2-T2V-A14B")
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert s2v_task["inputs"]["input_image"]["sha256"] == sha(media["face"])
    assert s2v_task["inputs"]["input_audio"]["sha256"] == sha(media["voice"])
    assert i2v_task["inputs"]["input_image"]["sha256"] == sha(media["face2"])
    # Parameters pass through; the seed fixed at acceptance is the one the cloud got.
    assert s2v_task["params"]["seed"] == 7
    assert i2v_task["params"]["negative_prompt"] == "blurry" and i2v_task["params"]["custom_shape"] == [480, 832]
    assert t2v_task["params"]["seed"] == done[2]["params"]["seed"]
    assert all(e["params"]["x2v_job"] == j["id"] for e, j in zip((s2v_task, i2v_task, t2v_task), done))
    assert_token_never_leaked([double.token], client, root)


def test_models_are_listed_and_a_job_may_choose_one(shared):
    root, double, gateway, client = shared
    (cloud,) = client.get("/api/v1/models").json()["upstreams"]
    assert cloud["upstream"] == "cloud" and cloud["kind"] == "cloud" and cloud["error"] is None
    choices = {(m["task"], m["model"]): m["default"] for m in cloud["models"]}
    assert choices[("s2v", "SekoTalk")] is True
    assert choices[("i2v", "wan2.2-I2V-A14B-distill")] is False
    assert {m["task"] for m in cloud["models"]} == {"s2v", "i2v", "t2v", "flf2v", "t2i", "i2i", "animate"}
    assert {m["stage"] for m in cloud["models"]} == {"single_stage"}

    job = submit(client, task="t2v", prompt="a fast one", model="self-forcing-dmd")
    assert job["params"]["model_cls"] == "self-forcing-dmd"
    done = wait_for(client, job["id"], {"succeeded", "failed"}, timeout=30)
    assert done["state"] == "succeeded", done["error"]
    assert {e["task_id"]: e for e in double.journal()}[done["upstream_task_id"]]["model_cls"] == "self-forcing-dmd"


def test_prompt_and_model_are_refused_with_a_422_before_any_file_is_fetched(shared, media, file_server):
    root, double, gateway, client = shared
    base, hits = file_server
    image_url = f"{base}/{media['face'].name}"
    before = len(double.journal())
    for body, field in [
        ({"task": "t2v", "prompt": ""}, "prompt"),
        ({"task": "i2v", "prompt": "   ", "image": image_url}, "prompt"),
        ({"task": "i2v", "image": image_url}, "prompt"),
        ({"task": "i2v", "prompt": "walks", "image": image_url, "model": "no-such-model"}, "model"),
        ({"task": "t2v", "prompt": "drives", "model": "SekoTalk"}, "model"),
    ]:
        response = client.post("/api/v1/jobs", json=body)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["field"] == field, error
    bad_model = client.post("/api/v1/jobs", json={"task": "t2v", "prompt": "x", "model": "no-such-model"}).json()
    message = bad_model["error"]["message"]
    assert "no-such-model" in message and "wan2.2-T2V-A14B" in message  # what it offers instead
    assert "model_pipeline.json" not in message and "/opt/" not in message
    response = client.post(
        "/api/v1/jobs", data={"task": "s2v", "prompt": ""},
        files={"image": media["face"].open("rb"), "audio": media["voice"].open("rb")},
    )
    assert response.status_code == 422 and response.json()["error"]["field"] == "prompt"
    assert hits == []  # refused before the gateway fetched a single input
    assert len(double.journal()) == before  # and nothing reached the cloud


def test_model_is_refused_when_the_job_may_go_to_a_self_hosted_node(tmp_path):
    double = CloudDouble(tmp_path / "double", workers=1, job_seconds=0.3, ping_seconds=0.1).start()
    # A node that runs t2v only (down here: it is never reached, only configured).
    gateway = cloud_gateway(
        tmp_path, double, X2V_NODES=f"n1=http://127.0.0.1:{free_port()}", X2V_NODE_TASKS="n1=t2v",
    ).start()
    try:
        with Client(gateway.url) as client:
            mixed = client.post("/api/v1/jobs", json={"task": "t2v", "prompt": "p", "model": "self-forcing-dmd"})
            assert mixed.status_code == 422, mixed.text
            assert mixed.json()["error"]["field"] == "model" and "n1" in mixed.json()["error"]["message"]
            pinned = submit(client, task="t2v", prompt="pinned", model="self-forcing-dmd", upstream="cloud")
            done = wait_for(client, pinned["id"], {"succeeded", "failed"}, timeout=30)
            assert done["state"] == "succeeded" and done["upstream"] == "cloud"
            # i2v can only go to the cloud: its prompt is required; so is a t2v job's, on n1 too
            # (text to video without text: one rule for every upstream).
            assert client.post("/api/v1/jobs", json={"task": "i2v", "image": "aGVsbG8="}).status_code == 422
            no_prompt = client.post("/api/v1/jobs", json={"task": "t2v", "upstream": "n1"})
            assert no_prompt.status_code == 422 and no_prompt.json()["error"]["field"] == "prompt", no_prompt.text
            assert_token_never_leaked([double.token], client, tmp_path)
        assert [e["model_cls"] for e in double.journal()] == ["self-forcing-dmd"]
    finally:
        gateway.stop()
        double.stop()


def test_cancel_and_retry_resume_the_same_cloud_task(shared):
    root, double, gateway, client = shared
    job = submit(client, task="t2v", prompt="cancel me while running")
    running = wait_for(client, job["id"], {"running"}, timeout=30)
    task_id = running["upstream_task_id"]
    cancelled = client.delete(f"/api/v1/jobs/{job['id']}").json()
    assert cancelled["state"] == "cancelled"
    deadline = time.monotonic() + 10
    while cloud_task(double, task_id)["status"] != "CANCEL":
        assert time.monotonic() < deadline, "the cloud never got the cancel"
        time.sleep(0.05)
    submits = len(double.journal())

    retried = client.post(f"/api/v1/jobs/{job['id']}/retry")
    assert retried.status_code == 200, retried.text
    resumed = retried.json()
    assert resumed["state"] == "submitted" and resumed["upstream_task_id"] == task_id and resumed["run"] == 1
    done = wait_for(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=30)
    assert done["state"] == "succeeded" and done["upstream_task_id"] == task_id and done["attempts"] == 1
    assert any("resumed on cloud" in e["detail"] for e in done["events"])

    # A task the cloud failed (here: its running timeout), retried once the cause is gone.
    with double.configured(running_timeout=0.3):
        job = submit(client, task="t2v", prompt="times out the first time")
        failed = wait_for(client, job["id"], {"succeeded", "failed"}, timeout=30)
    assert failed["state"] == "failed" and "RUNNING timeout" in failed["error"], failed["error"]
    assert client.post(f"/api/v1/jobs/{job['id']}/retry").json()["upstream_task_id"] == failed["upstream_task_id"]
    done = wait_for(client, job["id"], {"succeeded", "failed"}, timeout=30)
    assert done["state"] == "succeeded" and done["error"] is None
    # Two jobs, two retries, and the only new submit is the second job's own.
    assert len(double.journal()) == submits + 1
    assert Counter(r["status"] for r in double.requests() if r["path"] == "/api/v1/task/resume") == {200: 2}
    assert_token_never_leaked([double.token], client, root)


def cancels_of(double: CloudDouble, task_id: str) -> list[int]:
    """The statuses the cloud answered to cancel requests for `task_id`."""
    return [r["status"] for r in double.requests()
            if r["path"] == "/api/v1/task/cancel" and r["query"].get("task_id") == task_id]


def test_cancel_while_the_submission_is_in_flight_cancels_the_cloud_task_and_frees_its_slot(tmp_path):
    # No worker: a task stays PENDING, holding one of the account's 3 active slots, until it is
    # cancelled. The cloud creates each task at once but holds its answer until released.
    double = CloudDouble(tmp_path / "double", workers=0, max_active=3, submit_delay=20.0).start()
    gateway = cloud_gateway(tmp_path, double).start()
    try:
        with Client(gateway.url) as client:
            job = submit(client, task="t2v", prompt="cancelled while its submit is in flight")
            (created,) = until(double.journal, what="the cloud created the task")
            cancelled = client.delete(f"/api/v1/jobs/{job['id']}")
            assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
            assert cancelled.json()["upstream_task_id"] is None  # the gateway cannot know it yet
            double.configure(submit_delay=0.0)  # the answer, with the task id, arrives now

            until(lambda: cloud_task(double, created["task_id"])["status"] == "CANCEL", 15,
                  "the cloud task cancelled")
            assert cancels_of(double, created["task_id"]) == [200]
            after = client.get(f"/api/v1/jobs/{job['id']}").json()
            assert after["state"] == "cancelled" and after["upstream_task_id"] == created["task_id"]
            assert after["result"] is None

            # Its slot is free again: three new jobs are three active cloud tasks, none refused.
            ids = [submit(client, task="t2v", prompt=f"after the cancel {i}")["id"] for i in range(3)]
            until(lambda: all(client.get(f"/api/v1/jobs/{i}").json()["upstream_task_id"] for i in ids),
                  30, "three new cloud tasks")
            assert_within_the_limits(double, 4)  # never "too many active tasks"
            assert client.get(f"/api/v1/jobs/{job['id']}").json()["state"] == "cancelled"
            assert_token_never_leaked([double.token], client, tmp_path)
    finally:
        gateway.stop()
        double.stop()


def test_cancel_in_flight_reaches_the_cloud_task_after_a_gateway_crash(tmp_path):
    # The user cancels while the submit is in flight, then the gateway dies before the answer:
    # nothing in memory survives, yet the task it never learned the id of is found and stopped.
    double = CloudDouble(tmp_path / "double", workers=0, submit_delay=20.0).start()
    gateway = cloud_gateway(tmp_path, double).start()
    try:
        with Client(gateway.url) as client:
            job = submit(client, task="t2v", prompt="cancelled, then the gateway dies")
            (created,) = until(double.journal, what="the cloud created the task")
            assert client.delete(f"/api/v1/jobs/{job['id']}").json()["state"] == "cancelled"
        gateway.kill()
        double.configure(submit_delay=0.0)
        gateway.start()
        with Client(gateway.url) as client:
            until(lambda: cloud_task(double, created["task_id"])["status"] == "CANCEL", 30,
                  "the cloud task cancelled after the restart")
            after = client.get(f"/api/v1/jobs/{job['id']}").json()
            assert after["state"] == "cancelled" and after["upstream_task_id"] == created["task_id"]
            assert_token_never_leaked([double.token], client, tmp_path)
        assert len(double.journal()) == 1  # found, not sent again
    finally:
        gateway.stop()
        double.stop()


def test_twenty_jobs_at_once_through_one_token_all_succeed_without_a_limit_error(tmp_path):
    # The contract's limits: 3 active tasks per user, 0.05 s between two submits.
    double = CloudDouble(tmp_path / "double", workers=3, job_seconds=0.3, ping_seconds=0.1,
                         max_active=3, visit_gap=0.05).start()
    gateway = cloud_gateway(tmp_path, double).start()
    try:
        with Client(gateway.url) as client, ThreadPoolExecutor(20) as pool:
            bodies = [{"task": "t2v", "prompt": f"job {i} of a batch", "batch_id": "twenty"} for i in range(20)]
            responses = list(pool.map(lambda b: client.post("/api/v1/jobs", json=b), bodies))
            assert [r.status_code for r in responses] == [201] * 20
            ids = [r.json()["id"] for r in responses]
            done = [wait_for(client, job_id, {"succeeded", "failed", "cancelled"}, timeout=60) for job_id in ids]
            assert [j["state"] for j in done] == ["succeeded"] * 20, [j["error"] for j in done]
            for job in done:
                assert job["error"] is None and job["attempts"] == 1
                details = [e["detail"] for e in job["events"]]
                assert not [d for d in details if any(w in d.lower() for w in LIMIT_WORDS)], details
            assert_token_never_leaked([double.token], client, tmp_path)
        assert_within_the_limits(double, 20)
        assert Counter(e["params"]["x2v_job"] for e in double.journal()) == Counter(ids)
    finally:
        gateway.stop()
        double.stop()


def test_several_tokens_are_several_upstreams_each_with_its_own_limits(tmp_path):
    double = CloudDouble(tmp_path / "double", users=2, workers=4, job_seconds=0.4, ping_seconds=0.1).start()
    tokens = list(double.tokens)
    gateway = cloud_gateway(
        tmp_path, double, token=",".join(tokens), LIGHTX2V_MODELS="t2v=self-forcing-dmd,i2v=no-such-model",
    ).start()
    try:
        with Client(gateway.url) as client:
            nodes = {n["name"]: n for n in client.get("/api/v1/nodes").json()}
            assert set(nodes) == {"cloud1", "cloud2"} and nodes["cloud1"]["slots"] == 3
            ids = [submit(client, task="t2v", prompt=f"spread {i}")["id"] for i in range(8)]
            done = [wait_for(client, job_id, {"succeeded", "failed"}, timeout=60) for job_id in ids]
            assert [j["state"] for j in done] == ["succeeded"] * 8
            assert {j["upstream"] for j in done} == {"cloud1", "cloud2"}
            # A default the cloud does not offer is refused up front, like a model a job names.
            refused = client.post("/api/v1/jobs", json={"task": "i2v", "prompt": "p", "image": "aGVsbG8="})
            assert refused.status_code == 422 and refused.json()["error"]["field"] == "model"
            assert_token_never_leaked(tokens, client, tmp_path)
        assert {e["user_id"] for e in double.journal()} == {"github_12345", "github_12346"}
        assert {e["model_cls"] for e in double.journal()} == {"self-forcing-dmd"}  # LIGHTX2V_MODELS
        assert_within_the_limits(double, 8)
    finally:
        gateway.stop()
        double.stop()


def test_gateway_sigkill_during_submission_leaves_no_duplicate_cloud_task(tmp_path):
    # The cloud creates each task, then takes 3 s to answer: the gateway dies in between.
    double = CloudDouble(tmp_path / "double", workers=2, job_seconds=0.3, ping_seconds=0.1,
                         submit_delay=3.0).start()
    gateway = cloud_gateway(tmp_path, double).start()
    try:
        with Client(gateway.url) as client:
            ids = [submit(client, task="t2v", prompt=f"survives a crash {i}")["id"] for i in range(5)]
            deadline = time.monotonic() + 15
            while len(double.journal()) < 3:  # the 3 slots' tasks exist; no answer has come back
                assert time.monotonic() < deadline, double.journal()
                time.sleep(0.02)
            gateway.kill()
        double.configure(submit_delay=0.0)
        # And the first submit after the restart is created but its answer is lost.
        double.inject("/api/v1/task/submit", drop=True)
        gateway.start()
        with Client(gateway.url) as client:
            done = [wait_for(client, job_id, {"succeeded", "failed", "cancelled"}, timeout=60) for job_id in ids]
            assert [j["state"] for j in done] == ["succeeded"] * 5, [j["error"] for j in done]
            assert_token_never_leaked([double.token], client, tmp_path)
        journal = double.journal()
        assert Counter(e["params"]["x2v_job"] for e in journal) == Counter(ids)  # one task per job
        by_marker = {e["params"]["x2v_job"]: e["task_id"] for e in journal}
        assert {j["id"]: j["upstream_task_id"] for j in done} == by_marker
        assert sum(1 for r in double.requests() if r["path"] == "/api/v1/task/list") >= 4
    finally:
        gateway.stop()
        double.stop()


def test_refused_token_keeps_jobs_waiting_and_readyz_down_until_a_valid_one(tmp_path):
    double = CloudDouble(tmp_path / "double", workers=1, job_seconds=0.3, ping_seconds=0.1).start()
    bad = make_token("github_12345", secret=b"some-other-key")  # well formed, wrongly signed
    gateway = cloud_gateway(tmp_path, double, token=bad).start()
    try:
        with Client(gateway.url) as client:
            deadline = time.monotonic() + 10
            while (node := client.get("/api/v1/nodes").json()[0])["state"] != "down":
                assert time.monotonic() < deadline, node
                time.sleep(0.1)
            assert "token rejected" in node["last_error"] and "LIGHTX2V_ACCESS_TOKEN" in node["last_error"]
            ready = client.get("/readyz")
            assert ready.status_code == 503 and not ready.json()["checks"]["upstreams"]["ok"]

            job = submit(client, task="t2v", prompt="waits for a valid token")
            time.sleep(1.5)
            waiting = client.get(f"/api/v1/jobs/{job['id']}").json()
            assert waiting["state"] == "queued" and waiting["error"] is None
            assert "token rejected" in gateway.log()
            assert_token_never_leaked([bad], client, tmp_path)
        assert double.journal() == []

        # The operator sets a valid token and restarts: the job that waited runs.
        gateway.stop()
        gateway.env["LIGHTX2V_ACCESS_TOKEN"] = double.token
        gateway.start()
        with Client(gateway.url) as client:
            done = wait_for(client, job["id"], {"succeeded", "failed"}, timeout=30)
            assert done["state"] == "succeeded" and done["attempts"] == 1
            assert client.get("/readyz").status_code == 200
            assert_token_never_leaked([bad, double.token], client, tmp_path)
    finally:
        gateway.stop()
        double.stop()


def test_dashboard_batch_for_the_cloud_only_needs_a_prompt(tmp_path):
    # A batch from the dashboard gets the same up-front rule as the API: the cloud refuses a job
    # without a prompt, so the whole batch is refused, naming the field, before anything is queued.
    import asyncio

    from x2v_gateway.app import Gateway
    from x2v_gateway.schemas import ApiError
    from x2v_gateway.settings import load_settings
    from x2v_gateway.store import BatchJobSpec

    settings = load_settings(
        {"X2V_DATA_DIR": str(tmp_path), "LIGHTX2V_ACCESS_TOKEN": "tok-" + "x" * 28,
         "LIGHTX2V_BASE_URL": "http://127.0.0.1:9"},
        env_file=None,
    )
    gateway = Gateway(settings)
    specs = [
        BatchJobSpec(task="t2v", params={"prompt": "a red car"}, inputs={}, files={}),
        BatchJobSpec(task="t2v", params={"prompt": "  "}, inputs={}, files={}),
    ]
    preview = asyncio.run(gateway.jobs.plan_batch({"task": "t2v", "mode": "grid", "prompt": "", "seeds": "1,2"}, []))
    assert preview.jobs and all(
        any("Prompt: required" in e for e in job.errors) for job in preview.jobs
    ), [job.errors for job in preview.jobs]
    with pytest.raises(ApiError) as refused:
        asyncio.run(gateway.jobs.submit_batch("b-cloud", specs))
    assert refused.value.status == 422 and refused.value.field == "prompt"
    assert asyncio.run(gateway.store.counts_by_state())["queued"] == 0
    gateway.store.close()
