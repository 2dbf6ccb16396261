"""Event streams (Server-Sent Events) and `Prefer: wait`, against a real gateway process and its
demo node: a client follows its jobs, reconnects with Last-Event-ID (across a restart too) and
gets exactly what it missed, sees only its own jobs, and is told when a wait ended early."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from gateway_proc import GatewayProcess, remember_secret, wait_for
from x2v_gateway.auth import Caller
from x2v_gateway.notify import Notifier
from x2v_gateway.store import BatchJobSpec, JobStore
from x2v_gateway.streams import REPLAY_PART, EventStream, Scope

FINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> GatewayProcess:
    """Demo jobs take 0.6 s and the demo node runs one at a time: a third job queues."""
    root = tmp_path_factory.mktemp("events")
    gw = GatewayProcess(
        root / "data", X2V_DEMO_JOB_SECONDS="0.6", X2V_EVENT_KEEPALIVE="0.3", X2V_EVENT_STREAMS="3",
        X2V_MAX_WAIT="5",
    ).start()
    yield gw
    gw.stop()


class Events:
    """An SSE client: each `next()` is one event (or comment) as a dict; None when the stream ends."""

    def __init__(self, client: httpx.Client, url: str, last_id: str | None = None) -> None:
        headers = {"Last-Event-ID": last_id} if last_id is not None else {}
        self._cm = client.stream("GET", url, headers=headers, timeout=httpx.Timeout(10, read=10))
        self.response = self._cm.__enter__()
        self._lines = self.response.iter_lines()

    def next(self) -> dict | None:
        event: dict = {}
        for line in self._lines:
            if line == "":
                if event:
                    return event
                continue
            if line.startswith(":"):
                event["comment"] = line[1:].strip()
                continue
            name, _, value = line.partition(":")
            event[name] = value[1:] if value.startswith(" ") else value
        return None

    def states(self, until_final: bool = True) -> list[dict]:
        """The `state` events until the final one (or the end of the stream), with their ids."""
        found = []
        while (event := self.next()) is not None:
            if event.get("event") == "state":
                data = json.loads(event["data"])
                found.append({**data, "id": int(event["id"])})
                if until_final and data["final"]:
                    break
        return found

    def close(self) -> None:
        self._cm.__exit__(None, None, None)

    def __enter__(self) -> Events:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def submit(client: httpx.Client, prompt: str = "a lighthouse at dusk", **fields) -> dict:
    response = client.post("/api/v1/jobs", json={"task": "t2v", "prompt": prompt, **fields})
    assert response.status_code == 201, response.text
    return response.json()


def make_key(admin: httpx.Client, name: str) -> str:
    response = admin.post("/api/v1/keys", json={"name": f"{name}-{time.monotonic_ns()}"})
    assert response.status_code == 201, response.text
    return remember_secret(response.json()["key"])


# -- a job's stream ---------------------------------------------------------------------------


def test_job_stream_sends_each_state_change_in_order_then_ends(gateway):
    with gateway.client() as client:
        job = submit(client)
        with Events(client, f"/api/v1/jobs/{job['id']}/events") as stream:
            assert stream.response.status_code == 200
            assert stream.response.headers["content-type"].startswith("text/event-stream")
            states = stream.states()
            # The stream ends by itself after the final state: the server closes it.
            assert stream.next() is None
    assert [s["state"] for s in states] == ["queued", "submitted", "running", "succeeded"]
    assert [s["id"] for s in states] == sorted(s["id"] for s in states)
    assert states[-1]["final"] and not any(s["final"] for s in states[:-1])
    assert {s["job_id"] for s in states} == {job["id"]}
    assert states[-1]["url"] == f"/api/v1/jobs/{job['id']}"


def test_reconnect_with_last_event_id_gets_only_what_was_missed(gateway):
    with gateway.client() as client:
        job = submit(client)
        with Events(client, f"/api/v1/jobs/{job['id']}/events") as stream:
            event = stream.next()
            while event.get("event") != "state":
                event = stream.next()
            first = int(event["id"])
        # Disconnected while the job runs on; it finishes meanwhile.
        wait_for(client, job["id"], FINAL)
        with Events(client, f"/api/v1/jobs/{job['id']}/events", last_id=str(first)) as stream:
            missed = stream.states()
        assert [s["state"] for s in missed] == ["submitted", "running", "succeeded"]
        assert all(s["id"] > first for s in missed)
        # Nothing after the final event: 204, which tells an EventSource to stop reconnecting.
        with Events(client, f"/api/v1/jobs/{job['id']}/events", last_id=str(missed[-1]["id"])) as stream:
            assert stream.response.status_code == 204


def test_a_queued_job_hears_its_place_in_the_queue_move_up(gateway):
    with gateway.client() as client:
        ahead = [submit(client, f"ahead {n}") for n in range(3)]
        job = submit(client, "the last one")
        with Events(client, f"/api/v1/jobs/{job['id']}/events") as stream:
            positions, states = [], []
            while (event := stream.next()) is not None:
                if event.get("event") == "progress":
                    assert "id" not in event  # not history: a reconnection does not replay it
                    data = json.loads(event["data"])
                    if data["queue"] and data["queue"].get("where") == "gateway":
                        positions.append(data["queue"]["position"])
                elif event.get("event") == "state":
                    states.append(json.loads(event["data"])["state"])
        for other in ahead:
            wait_for(client, other["id"], FINAL)
    assert positions and positions == sorted(positions, reverse=True), positions
    assert len(set(positions)) >= 2, positions  # it moved up while the jobs ahead left
    assert states[-1] == "succeeded"


def test_unknown_job_and_bad_last_event_id_are_clear_4xx(gateway):
    with gateway.client() as client:
        missing = client.get("/api/v1/jobs/jnothere/events")
        assert missing.status_code == 404
        job = submit(client)
        for bad in ("abc", "-1", "1.5", "9" * 30):
            response = client.get(f"/api/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": bad})
            assert response.status_code == 400, (bad, response.text)
            assert response.json()["error"]["field"] == "Last-Event-ID"
        wait_for(client, job["id"], FINAL)


# -- a batch's and a key's streams ---------------------------------------------------------------


def test_batch_stream_shows_only_the_keys_jobs_and_ends_when_the_batch_has(gateway):
    batch = f"b-events-{time.monotonic_ns()}"
    with gateway.client() as admin:
        alice = make_key(admin, "alice")
        bob = make_key(admin, "bob")
    with gateway.client(key=alice) as a, gateway.client(key=bob) as b:
        mine = [submit(a, f"alice {n}", batch_id=batch) for n in range(2)]
        with Events(a, f"/api/v1/batches/{batch}/events", last_id="0") as stream:
            # Bob's job in a batch of the same name is Bob's: Alice's stream never shows it.
            theirs = submit(b, "bob's", batch_id=batch)
            states = stream.states(until_final=False)
        assert {s["job_id"] for s in states} == {j["id"] for j in mine}
        finals = [s for s in states if s["final"]]
        assert {s["job_id"] for s in finals} == {j["id"] for j in mine}
        # Another key's batch (with none of this key's jobs) is "not found".
        assert b.get(f"/api/v1/batches/b-none-{time.monotonic_ns()}/events").status_code == 404
        wait_for(b, theirs["id"], FINAL)


def test_key_stream_follows_every_job_of_the_key_and_keeps_a_quiet_stream_alive(gateway):
    with gateway.client() as admin:
        carol = make_key(admin, "carol")
        dave = make_key(admin, "dave")
    with gateway.client(key=carol) as c, gateway.client(key=dave) as d:
        with Events(c, "/api/v1/events") as stream:
            comments = 0
            while comments < 2:  # X2V_EVENT_KEEPALIVE=0.3: comments keep a quiet stream open
                event = stream.next()
                comments += event.get("comment") == "keep-alive"
            other = submit(d, "dave's")
            job = submit(c, "carol's")
            states = []
            while not states or not states[-1]["final"]:
                states += stream.states(until_final=True)
        assert {s["job_id"] for s in states} == {job["id"]}
        wait_for(d, other["id"], FINAL)


def test_open_streams_per_key_are_limited(gateway):
    with gateway.client() as admin:
        erin = make_key(admin, "erin")
    with gateway.client(key=erin) as client:
        streams = [Events(client, "/api/v1/events") for _ in range(3)]  # X2V_EVENT_STREAMS=3
        try:
            for stream in streams:
                assert stream.response.status_code == 200
                assert stream.next()["comment"] == "x2v-gateway events"
            refused = client.get("/api/v1/events")
            assert refused.status_code == 429
            assert "3 event streams" in refused.json()["error"]["message"]
        finally:
            streams.pop().close()
        # A closed stream gives its slot back.
        deadline = time.monotonic() + 10
        while (again := Events(client, "/api/v1/events")).response.status_code == 429:
            again.close()
            assert time.monotonic() < deadline, "the closed stream's slot never came back"
            time.sleep(0.1)
        again.close()
        for stream in streams:
            stream.close()


def test_a_revoked_keys_stream_ends(gateway):
    with gateway.client() as admin:
        made = admin.post("/api/v1/keys", json={"name": f"frank-{time.monotonic_ns()}"}).json()
        frank = remember_secret(made["key"])
        with gateway.client(key=frank) as client, Events(client, "/api/v1/events") as stream:
            assert stream.next()["comment"] == "x2v-gateway events"
            assert admin.delete(f"/api/v1/keys/{made['info']['id']}").status_code == 200
            started = time.monotonic()
            while (event := stream.next()) is not None:  # keep-alives until it is noticed
                assert event.get("comment") == "keep-alive"
            assert time.monotonic() - started < 5


def test_key_stream_resumes_across_a_gateway_restart(tmp_path):
    gw = GatewayProcess(tmp_path / "data", X2V_DEMO_JOB_SECONDS="0.3").start()
    try:
        with gw.client() as client:
            with Events(client, "/api/v1/events") as stream:
                first = submit(client, "before the restart")
                seen = stream.states()
            wait_for(client, first["id"], FINAL)
            last = seen[-1]["id"]
            second = submit(client, "while the client was away")
            wait_for(client, second["id"], FINAL)
        gw.restart()
        with gw.client() as client, Events(client, "/api/v1/events", last_id=str(last)) as stream:
            missed = stream.states()
        assert [s["job_id"] for s in missed] == [second["id"]] * 4
        assert [s["state"] for s in missed] == ["queued", "submitted", "running", "succeeded"]
    finally:
        gw.stop()


# -- Prefer: wait -----------------------------------------------------------------------------


def test_prefer_wait_on_submit_and_get_says_what_was_applied_and_when_it_ran_out(gateway):
    with gateway.client() as client:
        done = client.post("/api/v1/jobs", json={"task": "t2v", "prompt": "wait for me"},
                           headers={"Prefer": "wait=4"})
        assert done.status_code == 201
        assert done.headers["preference-applied"] == "wait=4"
        assert done.json()["state"] == "succeeded"
        assert "x2v-wait" not in done.headers

        # The wait ran out before the job ended: the job as it is, and a header that says so.
        blockers = [submit(client, f"blocker {n}") for n in range(3)]
        job = submit(client, "queued behind")
        started = time.monotonic()
        got = client.get(f"/api/v1/jobs/{job['id']}", headers={"Prefer": "respond-async, wait=1"})
        assert 0.9 < time.monotonic() - started < 4
        assert got.status_code == 200
        assert got.headers["preference-applied"] == "wait=1"
        assert got.headers["x2v-wait"] == "timeout"
        assert got.json()["state"] not in FINAL

        # More than X2V_MAX_WAIT (5): the wait applied is the most allowed, and says so.
        capped = client.get(f"/api/v1/jobs/{job['id']}", headers={"Prefer": "wait=3600"})
        assert capped.headers["preference-applied"] == "wait=5"
        assert capped.json()["state"] in FINAL or capped.headers["x2v-wait"] == "timeout"

        # `?wait=` says the same.
        via_query = client.get(f"/api/v1/jobs/{job['id']}?wait=5")
        assert via_query.json()["state"] in FINAL or via_query.headers["x2v-wait"] == "timeout"
        for other in blockers:
            wait_for(client, other["id"], FINAL)


def test_malformed_prefer_is_ignored_as_rfc_7240_says(gateway):
    with gateway.client() as client:
        job = submit(client)
        for prefer in ("wait=soon", "wait=-1", "wait", "wait=1.5", "wait=" + "9" * 40):
            response = client.get(f"/api/v1/jobs/{job['id']}", headers={"Prefer": prefer})
            assert response.status_code == 200, (prefer, response.text)
            assert "preference-applied" not in response.headers
            assert "x2v-wait" not in response.headers
        wait_for(client, job["id"], FINAL)


# -- in-process: a long replay ------------------------------------------------------------------


def test_a_long_replay_is_sent_whole_without_waiting_for_a_change(tmp_path):
    """6,000 missed events (more than one part of a replay) come at once, in order, on a real
    SQLite store; nothing changes meanwhile, so a replay that waited for a change would stall."""
    async def replay() -> list[int]:
        store = JobStore(tmp_path / "gateway.db")
        try:
            spec = BatchJobSpec(task="t2v", params={"prompt": "x"}, inputs={}, files={})
            await store.create_batch("long", [spec] * 6000, owner="k1")
            who = Caller(key_id="k1", name="one key", admin=False)
            stream = EventStream(Scope(who, batch_id="long"), store, Notifier(), None, 60.0, 0)
            assert await stream.opening()
            ids: list[int] = []
            messages = stream.messages(lambda: None)
            async for message in messages:
                if message.event == "state":
                    ids.append(int(message.id))
                if len(ids) == 6000:
                    break
            await messages.aclose()
            return ids
        finally:
            store.close()

    ids = asyncio.run(asyncio.wait_for(replay(), 20))
    assert 6000 > REPLAY_PART and ids == sorted(ids) and len(set(ids)) == 6000
