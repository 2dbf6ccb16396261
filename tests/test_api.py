"""The JSON API against a real gateway process and its built-in demo node."""

from __future__ import annotations

import asyncio
import base64
import http.server
import struct
import threading
import time
import zlib

import httpx
import pytest

import loopback
from gateway_proc import wait_for
from x2v_gateway.media import probe_video


@pytest.fixture(scope="module")
def api(demo_gateway):
    with demo_gateway.client() as client:
        yield client


@pytest.fixture(scope="module")
def node_url(api) -> str:
    (node,) = api.get("/api/v1/nodes").json()
    return node["url"]


@pytest.fixture(scope="module")
def file_server(media):
    """Serves the media files over http on 127.0.0.1, for URL inputs."""
    directory = next(iter(media.values())).parent

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(directory), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def s2v_files(media) -> dict:
    return {"image": media["face"].open("rb"), "audio": media["voice"].open("rb")}


def test_s2v_upload_runs_to_a_playable_seekable_video(api, media, tmp_path):
    response = api.post("/api/v1/jobs?wait=60", data={"task": "s2v", "prompt": "talking"}, files=s2v_files(media))
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["state"] == "succeeded", job
    assert job["attempts"] == 1 and job["upstream"] == "demo"
    assert job["result"]["duration"] > 0

    video = api.get(job["result"]["url"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    path = tmp_path / "out.mp4"
    path.write_bytes(video.content)
    info = probe_video(path)
    assert info.duration > 0 and info.has_audio

    # A browser seeks with Range requests.
    part = api.get(job["result"]["url"], headers={"Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 100-199/{len(video.content)}"
    assert part.content == video.content[100:200]
    tail = api.get(job["result"]["url"], headers={"Range": "bytes=-10"})
    assert tail.content == video.content[-10:]
    beyond = api.get(job["result"]["url"], headers={"Range": f"bytes={len(video.content)}-"})
    assert beyond.status_code == 416


def test_json_inputs_as_data_url_base64_and_url(api, media, file_server):
    data_url = "data:image/png;base64," + base64.b64encode(media["face"].read_bytes()).decode()
    i2v = api.post("/api/v1/jobs", json={"task": "i2v", "prompt": "zoom", "image": data_url, "seed": 7})
    assert i2v.status_code == 201, i2v.text
    s2v = api.post("/api/v1/jobs", json={
        "task": "s2v",
        "image": base64.b64encode(media["face"].read_bytes()).decode(),
        "audio": f"{file_server}/voice.wav",
    })
    assert s2v.status_code == 201, s2v.text
    # The same portrait sent twice, two ways, is stored once.
    assert i2v.json()["inputs"]["image"]["sha256"] == s2v.json()["inputs"]["image"]["sha256"]
    for job in (i2v.json(), s2v.json()):
        assert wait_for(api, job["id"], {"succeeded", "failed"})["state"] == "succeeded"
    assert i2v.json()["params"]["seed"] == 7


def test_t2v_job(api):
    job = api.post("/api/v1/jobs?wait=60", json={"task": "t2v", "prompt": "a red car on a road"}).json()
    assert job["state"] == "succeeded", job
    assert job["result"]["width"] > 0


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


# A few bytes that claim 20000x20000 pixels: Pillow refuses to decode it (decompression bomb).
_HUGE_PNG = base64.b64encode(_png_header(20000, 20000)).decode()


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"prompt": "no task"}, 422, "task"),
        ({"task": "v2v"}, 422, "task"),
        ({"task": "t2v", "colour": "red"}, 422, "colour"),
        ({"task": "t2v", "seed": "abc"}, 422, "seed"),
        ({"task": "t2v", "seed": -1}, 422, "seed"),
        ({"task": "t2v", "infer_steps": 0}, 422, "infer_steps"),
        ({"task": "t2v", "target_shape": [480]}, 422, "target_shape"),
        ({"task": "t2v", "prompt": "x" * 5000}, 422, "prompt"),
        ({"task": "s2v", "image": "aGVsbG8="}, 422, "audio"),
        ({"task": "t2v", "image": "aGVsbG8="}, 422, "image"),
        ({"task": "i2v", "image": "!!!not base64!!!"}, 422, "image"),
        ({"task": "i2v", "image": "aGVsbG8gd29ybGQsIG5vdCBhbiBpbWFnZQ=="}, 422, "image"),
        ({"task": "i2v", "image": "http://127.0.0.1:9/nope.png"}, 422, "image"),
        ({"task": "i2v", "image": _HUGE_PNG}, 422, "image"),
        ({"task": "t2v", "upstream": "nowhere"}, 422, "upstream"),
    ],
)
def test_client_mistakes_get_a_4xx_naming_the_field(api, body, status, field):
    response = api.post("/api/v1/jobs", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["field"] == field, response.text


def test_malformed_requests_get_a_4xx_not_a_500(api):
    bad_json = api.post("/api/v1/jobs", content=b"{nope", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    wrong_type = api.post("/api/v1/jobs", content=b"task=t2v", headers={"content-type": "text/plain"})
    assert wrong_type.status_code == 415
    assert api.get("/api/v1/jobs?state=done").json()["error"]["field"] == "state"
    assert api.get("/api/v1/jobs?cursor=garbage").json()["error"]["field"] == "cursor"
    assert api.get("/api/v1/jobs?limit=0").status_code == 400
    assert api.get("/api/v1/jobs/jnope").status_code == 404
    assert api.get("/api/v1/jobs/jnope/video").status_code == 404
    shape = api.post("/api/v1/jobs", data={"task": "t2v", "target_shape": "wide"})
    assert shape.status_code == 422 and shape.json()["error"]["field"] == "target_shape"


def test_a_text_file_named_png_is_refused_and_nothing_is_kept(api, demo_gateway, media):
    blob_dir = demo_gateway.data_dir / "blobs"
    before = sorted(p.name for p in blob_dir.rglob("*") if p.is_file())
    response = api.post(
        "/api/v1/jobs", data={"task": "s2v"},
        files={"image": media["not_image"].open("rb"), "audio": media["voice"].open("rb")},
    )
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "image"
    assert "not a readable image" in response.json()["error"]["message"]
    after = sorted(p.name for p in blob_dir.rglob("*") if p.is_file())
    assert after == before


def test_idempotency_key_makes_a_retried_submit_safe(api):
    headers = {"Idempotency-Key": f"batch-7-row-{time.time()}"}
    first = api.post("/api/v1/jobs", json={"task": "t2v", "prompt": "once"}, headers=headers)
    again = api.post("/api/v1/jobs", json={"task": "t2v", "prompt": "once"}, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.headers["idempotent-replayed"] == "true"
    assert first.json()["id"] == again.json()["id"]
    other = api.post("/api/v1/jobs", json={"task": "t2v", "prompt": "twice"}, headers=headers)
    assert other.status_code == 409 and other.json()["error"]["field"] == "Idempotency-Key"


def test_list_filters_by_state_and_pages_with_a_cursor(api):
    ids = [api.post("/api/v1/jobs", json={"task": "t2v", "prompt": f"page {i}", "batch_id": "paging"}).json()["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        page = api.get("/api/v1/jobs", params={"batch_id": "paging", "limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(ids))
    for job_id in ids:
        wait_for(api, job_id, {"succeeded"})
    states = {j["state"] for j in api.get("/api/v1/jobs?state=succeeded&limit=500").json()["jobs"]}
    assert states == {"succeeded"}


def test_cancel_queued_job_never_reaches_the_node(api, node_url):
    jobs = [api.post("/api/v1/jobs", json={"task": "t2v", "prompt": f"fill {i}"}).json() for i in range(4)]
    last = jobs[-1]
    cancelled = api.delete(f"/api/v1/jobs/{last['id']}").json()
    assert cancelled["state"] == "cancelled"
    for job in jobs[:-1]:
        wait_for(api, job["id"], {"succeeded"})
    node_tasks = loopback.get(f"{node_url}/v1/tasks/").json()
    assert last["id"] not in node_tasks
    assert api.get(f"/api/v1/jobs/{last['id']}").json()["state"] == "cancelled"


def test_cancel_running_task_stays_cancelled_when_node_later_reports_completed(api, node_url):
    job = api.post("/api/v1/jobs", json={"task": "t2v", "prompt": "cancel me while running"}).json()
    wait_for(api, job["id"], {"running"})
    assert api.delete(f"/api/v1/jobs/{job['id']}").json()["state"] == "cancelled"
    # LightX2V keeps rendering a cancelled running task and then reports it `completed`.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        node_status = loopback.get(f"{node_url}/v1/tasks/{job['id']}/status").json()
        if node_status["status"] == "completed":
            break
        time.sleep(0.1)
    assert node_status["status"] == "completed"
    time.sleep(1.0)  # several poll ticks of the gateway after the node said completed
    final = api.get(f"/api/v1/jobs/{job['id']}").json()
    assert final["state"] == "cancelled" and final["result"] is None
    assert api.get(f"/api/v1/jobs/{job['id']}/video").status_code == 404


def test_failed_job_says_why_and_retry_runs_it_again(api):
    job = api.post("/api/v1/jobs?wait=60", json={"task": "t2v", "prompt": "please FAIL now"}).json()
    assert job["state"] == "failed"
    assert "RuntimeError" in job["error"] and "FAIL" in job["error"]
    assert api.post(f"/api/v1/jobs/{job['id']}/retry").json()["state"] == "queued"
    again = wait_for(api, job["id"], {"failed", "succeeded"})
    assert again["run"] == 1 and again["upstream_task_id"] == f"{job['id']}-r1"
    assert api.post(f"/api/v1/jobs/{job['id']}/retry").status_code == 200
    done = api.post("/api/v1/jobs?wait=60", json={"task": "t2v", "prompt": "fine"}).json()
    assert api.post(f"/api/v1/jobs/{done['id']}/retry").status_code == 409


def test_job_page_has_a_timeline(api):
    job = api.post("/api/v1/jobs?wait=60", json={"task": "t2v", "prompt": "timeline"}).json()
    events = api.get(f"/api/v1/jobs/{job['id']}").json()["events"]
    assert [e["state"] for e in events] == ["queued", "submitted", "running", "succeeded"]


def test_operations_endpoints(api):
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"]
    metrics = api.get("/metrics").text
    assert 'x2v_jobs{state="succeeded"}' in metrics
    assert 'x2v_upstream_up{upstream="demo"} 1.0' in metrics
    assert "x2v_upstream_request_seconds_bucket" in metrics
    assert "x2v_queue_depth" in metrics
    schema = api.get("/schema/openapi.json").json()
    assert "/api/v1/jobs" in schema["paths"]
    assert "multipart/form-data" in schema["paths"]["/api/v1/jobs"]["post"]["requestBody"]["content"]


def test_retention_deletes_files_of_finished_jobs_and_the_job_says_so(tmp_path):
    from gateway_proc import GatewayProcess

    gateway = GatewayProcess(tmp_path / "data", X2V_RETENTION_HOURS="0.0005").start()  # 1.8 s
    try:
        with gateway.client() as client:
            job = client.post("/api/v1/jobs?wait=60", json={"task": "t2v", "prompt": "short-lived"}).json()
            assert job["state"] == "succeeded"
            blob = gateway.data_dir / "blobs" / job["result"]["sha256"][:2] / job["result"]["sha256"]
            assert blob.is_file()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not client.get(f"/api/v1/jobs/{job['id']}").json()["files_expired"]:
                time.sleep(0.2)
            expired = client.get(f"/api/v1/jobs/{job['id']}").json()
            assert expired["files_expired"] and expired["result"] is None
            assert client.get(f"/api/v1/jobs/{job['id']}/video").status_code == 410
            assert client.post(f"/api/v1/jobs/{job['id']}/retry").status_code in (409, 410)
        assert not blob.exists()
    finally:
        gateway.stop()


def test_job_waiting_in_the_gateway_shows_its_place_and_an_eta(api):
    api.post("/api/v1/jobs?wait=60", json={"task": "t2v", "prompt": "measure a run"})
    ids = [api.post("/api/v1/jobs", json={"task": "t2v", "prompt": f"line {i}"}).json()["id"] for i in range(5)]
    last = api.get(f"/api/v1/jobs/{ids[-1]}").json()
    assert last["state"] == "queued"
    assert last["queue"]["where"] == "gateway" and last["queue"]["position"] >= 1
    assert last["queue"]["pending_seconds"] > 0 and last["queue"]["running_seconds"] > 0
    for job_id in ids:
        wait_for(api, job_id, {"succeeded"})


def test_flf2v_job_with_first_and_last_frame(api, media):
    first = base64.b64encode(media["face"].read_bytes()).decode()
    last = base64.b64encode(media["face2"].read_bytes()).decode()
    job = api.post("/api/v1/jobs?wait=60", json={"task": "flf2v", "prompt": "morph", "image": first, "last_frame": last}).json()
    assert job["state"] == "succeeded", job
    assert set(job["inputs"]) == {"image", "last_frame"}
    missing = api.post("/api/v1/jobs", json={"task": "flf2v", "image": first})
    assert missing.status_code == 422 and missing.json()["error"]["field"] == "last_frame"


def test_input_urls_may_not_reach_private_addresses_by_default(tmp_path, file_server):
    from gateway_proc import GatewayProcess

    gateway = GatewayProcess(tmp_path / "data").start()  # defaults: public URLs only
    try:
        with gateway.client() as client:
            direct = client.post("/api/v1/jobs", json={"task": "i2v", "image": f"{file_server}/face.png"})
            assert direct.status_code == 422 and direct.json()["error"]["field"] == "image"
            assert "private or local address" in direct.json()["error"]["message"]
            # The cloud metadata address, the usual target of such a request.
            metadata = client.post("/api/v1/jobs", json={"task": "i2v", "image": "http://169.254.169.254/latest"})
            assert metadata.status_code == 422 and "private or local" in metadata.json()["error"]["message"]
    finally:
        gateway.stop()


def test_input_url_is_fetched_from_the_address_that_was_checked(media):
    # DNS rebinding: a name that resolves to a public address when checked, then to an internal
    # one when connected. The transport connects to the address it checked and never resolves
    # the name again. Here the name resolves only through the transport's own resolver, and
    # 127.0.0.1 stands in for the public address it allows.
    import ipaddress

    from x2v_gateway.inputs import NotPublic, PublicOnlyTransport

    face = media["face"].read_bytes()
    hosts: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hosts.append(self.headers["Host"])
            if self.path == "/old":
                self.send_response(302)
                self.send_header("Location", "/face.png")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(face)))
            self.end_headers()
            self.wfile.write(face)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    name = f"files.rebind.test:{server.server_address[1]}"
    lookups: list[str] = []

    async def fetch(answer: list[str]) -> httpx.Response:
        async def resolve(host: str, port: int) -> list[str]:
            lookups.append(host)
            return answer

        transport = PublicOnlyTransport(allowed=lambda ip: ip == ipaddress.ip_address("127.0.0.1"), resolve=resolve)
        async with httpx.AsyncClient(transport=transport) as client:
            return await client.get(f"http://{name}/old", follow_redirects=True)

    try:
        response = asyncio.run(fetch(["127.0.0.1"]))
        assert response.status_code == 200 and response.content == face
        # Each hop, the redirect included, was checked, and asked for by its name.
        assert lookups == ["files.rebind.test"] * 2 and hosts == [name] * 2
        assert str(response.url) == f"http://{name}/face.png"
        # One address that is not allowed among the answers refuses the URL.
        with pytest.raises(NotPublic):
            asyncio.run(fetch(["127.0.0.1", "10.0.0.1"]))
        assert len(hosts) == 2
    finally:
        server.shutdown()



def _in_process_app(tmp_path):
    """The gateway app in this process, with one node that is not there (jobs stay queued)."""
    from gateway_proc import ADMIN_KEY, free_port
    from x2v_gateway.app import create_app
    from x2v_gateway.settings import load_settings
    from x2v_gateway.upstream.selfhosted import SelfHostedNode

    settings = load_settings({"X2V_DATA_DIR": str(tmp_path / "data"), "X2V_ADMIN_KEY": ADMIN_KEY}, env_file=None)
    app = create_app(settings, upstreams=[SelfHostedNode("n1", f"http://127.0.0.1:{free_port()}", slots=2)])
    return app, {"authorization": f"Bearer {ADMIN_KEY}"}


def test_requests_never_run_a_store_query_on_the_event_loop(tmp_path):
    """What a request reads (its key, a job, a page of 500, the dashboard's pages) is read on the
    store's reader threads: a slow read then holds up that request only, never the event loop
    that answers everyone else (/healthz took 1.1 s under a burst of list requests)."""
    from litestar.testing import TestClient

    from gateway_proc import ADMIN_KEY

    app, headers = _in_process_app(tmp_path)
    store = app.state.gateway.store
    with TestClient(app) as client:
        loop_thread = client.blocking_portal.call(threading.current_thread).name
        created = client.post("/api/v1/jobs", json={"task": "t2v", "prompt": "a cat"}, headers=headers)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        client.post("/ui/sign-in", data={"key": ADMIN_KEY})
        for path in ("/api/v1/jobs?limit=500", f"/api/v1/jobs/{job_id}", "/api/v1/nodes", "/api/v1/me",
                     "/api/v1/keys", "/api/v1/audit", "/metrics", "/ui/", "/ui/jobs", f"/ui/jobs/{job_id}"):
            assert client.get(path, headers=headers).status_code == 200, path
        owners = {name for name, _ in store._conns}  # the threads that opened a connection
    assert loop_thread not in owners, owners
    assert any(name.startswith("x2v-store-reader") for name in owners), owners


def test_metrics_are_written_on_the_event_loop_a_slice_at_a_time_as_prometheus_client_writes_them(
    tmp_path, monkeypatch,
):
    """With 1,000 nodes `/metrics` is 89,000 lines, 0.7-0.9 s of CPU: written in one go on the
    event loop, each scrape held every request and every node's follow loop that long; written
    on a thread, 0.4-0.5 s all the same (`Metrics.render`)."""
    from litestar.testing import TestClient
    from prometheus_client import generate_latest

    from x2v_gateway.metrics import Metrics

    async def scenario() -> tuple[bytes, int]:
        metrics = Metrics()
        for i in range(1000):
            metrics.add_upstream(f"n{i:04d}", ("health", "poll", "submit", "result"))
        metrics.upstream_latency.labels("n0001", "poll").observe(0.07)
        metrics.upstream_errors.labels('odd "name"\\with\nbreaks', "poll", "Unavailable").inc(2)
        metrics.jobs_taken_over.inc()
        metrics.dispatch_round.observe(0.003)
        monkeypatch.setattr("x2v_gateway.metrics.SLICE", 0.0)  # a turn of the loop every 64 lines
        turns, writing = 0, True

        async def turn() -> None:
            nonlocal turns
            while writing:
                turns += 1
                await asyncio.sleep(0)

        turning = asyncio.create_task(turn())
        text = await metrics.render({"queued": 3, "succeeded": 40})
        writing = False
        await turning
        assert text == generate_latest(metrics.registry)  # byte for byte
        return text, turns

    text, turns = asyncio.run(scenario())
    assert text.count(b"\n") > 89_000 and turns >= 89_000 // 64
    assert b'x2v_upstream_errors_total{kind="Unavailable",operation="poll",upstream="odd \\"name\\"\\\\with\\nbreaks"} 2.0' in text
    assert b'x2v_jobs{state="succeeded"} 40.0' in text

    app, headers = _in_process_app(tmp_path)
    app.state.gateway.dispatcher.metrics.add_upstream("n0999", ("poll",))
    with TestClient(app) as client:
        shown = client.get("/metrics", headers=headers).text
    assert 'x2v_upstream_request_seconds_count{operation="poll",upstream="n0999"} 0.0' in shown


def test_a_queued_job_counts_its_queue_position_once(tmp_path):
    """GET of a queued job shows its place and a wait estimate from it: one count of the queue
    ahead, not one for the place and another inside the estimate."""
    from litestar.testing import TestClient

    from x2v_gateway.store.sqlite import READER_THREADS

    app, headers = _in_process_app(tmp_path)
    store = app.state.gateway.store
    with TestClient(app) as client:
        ids = [client.post("/api/v1/jobs", json={"task": "t2v", "prompt": f"cat {i}"}, headers=headers).json()["id"]
               for i in range(3)]
        # Every reader thread opens its connection now (each waits for the others), so that all
        # of them can be traced.
        barrier = threading.Barrier(READER_THREADS)

        async def open_all() -> None:
            await asyncio.gather(*(store.read(lambda r: barrier.wait(10)) for _ in range(READER_THREADS)))

        client.blocking_portal.call(open_all)
        statements: list[str] = []
        for _, conn in store._conns.items():
            conn.set_trace_callback(statements.append)
        job = client.get(f"/api/v1/jobs/{ids[2]}", headers=headers).json()
        for conn in store._conns.values():
            conn.set_trace_callback(None)
    assert job["queue"]["position"] == 3
    assert any(ids[2] in sql for sql in statements), statements  # the job's read was traced
    counts = [sql for sql in statements if "count(*) FROM jobs WHERE state = 'queued'" in sql]
    assert len(counts) == 1, counts
