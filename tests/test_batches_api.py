"""The batches API for scripts, against a real gateway and its demo node: a batch made from one
JSON request (all or nothing, idempotent), listed, read with its progress, and downloaded."""

from __future__ import annotations

import base64
import csv
import io
import zipfile

import httpx
import pytest

from gateway_proc import GatewayProcess, wait_for


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    root = tmp_path_factory.mktemp("batches-gw")
    started = GatewayProcess(root / "data", X2V_DEMO_JOB_SECONDS="0.2").start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def admin(gateway):
    with gateway.client() as client:
        yield client


@pytest.fixture(scope="module")
def alice(gateway, admin):
    key = admin.post("/api/v1/keys", json={"name": "alice"}).json()["key"]
    with gateway.client(key=key) as client:
        yield client


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def job_count(client: httpx.Client) -> int:
    return len(client.get("/api/v1/jobs", params={"limit": 500}).json()["jobs"])


def test_a_batch_from_one_request_runs_and_downloads_as_a_zip(alice, media):
    face = b64(media["face"])
    made = alice.post("/api/v1/batches", json={"name": "launch", "jobs": [
        {"task": "t2v", "prompt": "a red car"},
        {"task": "i2v", "prompt": "zoom in", "image": face, "seed": 4},
        {"task": "i2v", "prompt": "zoom out", "image": face},
    ]})
    assert made.status_code == 201, made.text
    batch = made.json()
    assert made.headers["location"] == f"/api/v1/batches/{batch['id']}"
    assert batch["name"] == "launch" and batch["total"] == 3 and batch["task"] is None  # mixed
    assert [j["params"]["prompt"] for j in batch["jobs"]] == ["a red car", "zoom in", "zoom out"]
    assert {j["batch_id"] for j in batch["jobs"]} == {batch["id"]}
    assert batch["jobs"][1]["params"]["seed"] == 4
    # The portrait sent twice was fetched, checked and stored once.
    assert batch["jobs"][1]["inputs"]["image"] == batch["jobs"][2]["inputs"]["image"]

    for job in batch["jobs"]:
        assert wait_for(alice, job["id"], {"succeeded", "failed"})["state"] == "succeeded"
    done = alice.get(f"/api/v1/batches/{batch['id']}").json()
    assert done["counts"]["succeeded"] == 3 and done["done"] == 3 and done["progress"] == 1.0
    assert done["eta_seconds"] is None and done["zip_url"] == f"/api/v1/batches/{batch['id']}/zip"

    response = alice.get(done["zip_url"])
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert sorted(archive.namelist()) == ["0001.mp4", "0002.mp4", "0003.mp4", "manifest.csv"]
    rows = list(csv.DictReader(io.StringIO(archive.read("manifest.csv").decode())))
    assert [r["prompt"] for r in rows] == ["a red car", "zoom in", "zoom out"]


@pytest.mark.parametrize(("jobs", "status", "field"), [
    ([{"task": "t2v", "prompt": "ok"}, {"task": "t2v", "prompt": "ok"}, {"task": "t2v"}], 422, "jobs[2].prompt"),
    ([{"task": "t2v", "prompt": "ok", "colour": "red"}], 422, "jobs[0].colour"),
    ([{"task": "t2v", "prompt": "ok"}, {"task": "i2v", "prompt": "x"}], 422, "jobs[1].image"),
    ([{"task": "t2v", "prompt": "ok", "batch_id": "mine"}], 422, "jobs[0].batch_id"),
    ([{"task": "t2v", "prompt": "ok"}, 7], 422, "jobs[1]"),
    ([{"task": "t2v", "prompt": "ok", "infer_steps": 900}], 422, "jobs[0].infer_steps"),
    ([{"task": "t2v", "prompt": "ok", "webhook_url": "https://hooks.example.com/x"}], 422, "jobs[0].webhook_url"),
    ([], 422, "jobs"),
    ([{"task": "t2v", "prompt": "x"}] * 2001, 422, "jobs"),
])
def test_a_bad_job_refuses_the_whole_batch_naming_its_index_and_field(alice, jobs, status, field):
    before = job_count(alice)
    response = alice.post("/api/v1/batches", json={"name": "bad", "jobs": jobs})
    assert response.status_code == status, response.text
    assert response.json()["error"]["field"] == field
    assert job_count(alice) == before  # nothing of it was made


def test_the_batch_webhook_is_checked_as_a_jobs_is(alice):
    response = alice.post("/api/v1/batches", json={
        "webhook_url": "http://127.0.0.1:9/hook", "jobs": [{"task": "t2v", "prompt": "ok"}],
    })
    assert response.status_code == 422 and response.json()["error"]["field"] == "webhook_url", response.text


def test_an_input_that_is_not_what_it_claims_refuses_the_batch_after_fetching(alice, media):
    before = job_count(alice)
    response = alice.post("/api/v1/batches", json={"jobs": [
        {"task": "i2v", "prompt": "fine", "image": b64(media["face"])},
        {"task": "i2v", "prompt": "not a picture", "image": b64(media["not_image"])},
    ]})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "jobs[1].image"
    assert "not a readable image" in response.json()["error"]["message"]
    assert job_count(alice) == before


@pytest.mark.parametrize(("body", "status"), [(b"{not json", 400), (b"[1, 2]", 400), (b'{"jobs": "x"}', 422)])
def test_a_body_that_is_not_a_batch_is_refused(alice, body, status):
    response = alice.post("/api/v1/batches", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text


def test_idempotency_key_makes_a_resent_batch_the_same_batch(alice):
    body = {"name": "once", "jobs": [{"task": "t2v", "prompt": "only once"}] * 2}
    first = alice.post("/api/v1/batches", json=body, headers={"Idempotency-Key": "run-42"})
    again = alice.post("/api/v1/batches", json=body, headers={"Idempotency-Key": "run-42"})
    assert (first.status_code, again.status_code) == (201, 200), again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert [j["id"] for j in again.json()["jobs"]] == [j["id"] for j in first.json()["jobs"]]
    other = alice.post("/api/v1/batches", json={**body, "name": "other"}, headers={"Idempotency-Key": "run-42"})
    assert other.status_code == 409 and other.json()["error"]["field"] == "Idempotency-Key"


def test_batches_are_listed_newest_first_a_page_at_a_time_each_key_its_own(gateway, admin, alice):
    ids = [alice.post("/api/v1/batches", json={"name": f"list {n}", "jobs": [{"task": "t2v", "prompt": "p"}]}).json()["id"]
           for n in range(3)]
    mine = admin.post("/api/v1/batches", json={"name": "admin's", "jobs": [{"task": "t2v", "prompt": "p"}]}).json()["id"]

    seen, cursor = [], None
    while True:
        page = alice.get("/api/v1/batches", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        assert len(page["batches"]) <= 2
        seen += [b["id"] for b in page["batches"]]
        if not (cursor := page["next_cursor"]):
            break
    assert seen[:3] == ids[::-1] and mine not in seen and len(seen) == len(set(seen))
    assert all(b["total"] == sum(b["counts"].values()) for b in alice.get("/api/v1/batches").json()["batches"])
    # An admin key sees every key's batches.
    everyone = [b["id"] for b in admin.get("/api/v1/batches", params={"limit": 100}).json()["batches"]]
    assert everyone[0] == mine and set(ids) <= set(everyone)
    # Another key's batch is not found, as one that does not exist.
    assert alice.get(f"/api/v1/batches/{mine}").status_code == 404
    assert alice.get(f"/api/v1/batches/{mine}/zip").status_code == 404
    assert alice.get("/api/v1/batches", params={"cursor": "bm9wZQ"}).json()["error"]["field"] == "cursor"


def test_the_client_downloads_a_batch_of_images_and_videos_under_their_own_extensions(gateway, admin, tmp_path):
    from test_client import client as run_client

    made = admin.post("/api/v1/batches", json={"jobs": [
        {"task": "t2i", "prompt": "a still"}, {"task": "t2v", "prompt": "a clip"},
    ]}).json()
    out = tmp_path / "out"
    done = run_client(gateway, "download", made["id"], str(out), "--quiet", cwd=tmp_path)
    assert done.code == 0, done.stderr
    first, second = (job["id"] for job in made["jobs"])
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        f"0001_{first}.png", f"0002_{second}.mp4", "manifest.csv",
    ]



def test_store_lists_batches_a_page_at_a_time_and_keeps_a_batch_jobs_pin(store_location):
    """Both backends: the batches API's list (newest first, an owner's own, after a cursor) and a
    batch job pinned to its upstream."""
    import asyncio

    from x2v_gateway.store import BatchJobSpec, JobStore

    backend = JobStore.backend_for(store_location)
    # Methods other helpers added are not all ported to PostgreSQL yet; none is used here.
    concrete = type("Concrete", (backend,), {})
    concrete.__abstractmethods__ = frozenset()

    async def scenario() -> tuple[list, list, list, str | None]:
        store = concrete(store_location)
        try:
            for n, owner in enumerate(["k1", "k2", "k1"]):
                spec = BatchJobSpec(task="t2i", params={"prompt": "p"}, inputs={}, files={}, pinned="gpu1")
                await store.create_batch(f"b{n}", [spec], batch={"name": f"n{n}", "mode": "api"}, owner=owner)
            mine = await store.read(lambda r: r.list_batches(owner="k1", limit=1))
            after = (mine[0]["created_at"], mine[0]["id"])
            rest = await store.read(lambda r: r.list_batches(owner="k1", before=after, limit=5))
            everyone = await store.read(lambda r: r.list_batches(limit=5))
            (job,) = await store.read(lambda r: r.list_jobs(batch_id="b0", limit=5))
            return mine, rest, everyone, job.pinned
        finally:
            store.close()

    mine, rest, everyone, pinned = asyncio.run(scenario())
    assert [b["id"] for b in mine] == ["b2"] and [b["id"] for b in rest] == ["b0"]
    assert [b["id"] for b in everyone] == ["b2", "b1", "b0"] and mine[0]["form"] == {}
    assert pinned == "gpu1"


def test_the_client_submits_image_tasks_and_keeps_their_images(gateway, media, tmp_path):
    from test_client import client as run_client

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red kite\na blue kite\n")
    stills = run_client(gateway, "submit", "--task", "t2i", "--prompts", str(prompts), "--seeds", "1",
                        "--out", str(tmp_path / "stills"), "--quiet", cwd=tmp_path)
    assert stills.code == 0, stills.stderr
    assert sorted(p.suffix for p in (tmp_path / "stills").iterdir() if p.is_file() and not p.name.startswith(".")) == [
        ".csv", ".png", ".png",
    ]
    edits = run_client(gateway, "submit", "--task", "i2i", str(media["face"]), "--prompt", "as a sketch",
                       "--out", str(tmp_path / "edits"), "--quiet", cwd=tmp_path)
    assert edits.code == 0, edits.stderr
    assert (tmp_path / "edits" / "0001_face.png").is_file()
    none = run_client(gateway, "submit", "--task", "t2i", "--out", str(tmp_path / "none"), cwd=tmp_path)
    assert none.code == 2 and "t2i jobs render their prompt" in none.stderr
