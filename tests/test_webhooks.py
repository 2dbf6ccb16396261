"""Webhooks through a real receiver on 127.0.0.1, verified by `standardwebhooks` as a receiver
would: signatures, retries with backoff, a gateway SIGKILLed with deliveries pending, event
filters, a key's default webhook, secret rotation, redaction, and refused targets."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from x2v_gateway.webhooks import (
    DEFAULT_EVENTS, MAX_RETRY_GAP, job_event, parse_events, redact, retry_delay, signed_headers,
)
from x2v_gateway.schemas import ApiError

from gateway_proc import GatewayProcess, free_port, remember_secret, wait_for

FIRST_RETRY = 0.3
HOOK_SETTINGS = {
    "X2V_PRIVATE_URLS": "true",  # the receiver is on 127.0.0.1
    "X2V_DEMO_JOB_SECONDS": "0.3",
    "X2V_WEBHOOK_FIRST_RETRY": str(FIRST_RETRY),
    "X2V_WEBHOOK_TIMEOUT": "1",
}


class Receiver:
    """A webhook receiver: an HTTP server on 127.0.0.1 that keeps every request and answers each
    path as told (a status, or "slow": an answer after the gateway's timeout), then 200."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[dict] = []
        self.plans: dict[str, list[int | str]] = {}
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with receiver._lock:
                    receiver.requests.append({
                        "path": self.path, "headers": dict(self.headers.items()), "body": body,
                        "at": time.monotonic(),
                    })
                    plan = receiver.plans.get(self.path.split("?")[0]) or []
                    answer = plan.pop(0) if plan else 200
                if answer == "slow":
                    time.sleep(2.5)
                    answer = 200
                try:
                    self.send_response(int(answer))
                    self.send_header("content-length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:  # the gateway gave up waiting and hung up
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[dict]:
        with self._lock:
            return [r for r in self.requests if r["path"].split("?")[0] == path.split("?")[0]]

    def wait(self, path: str, n: int, timeout: float = 30.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(found := self.at(path)) >= n:
                return found
            time.sleep(0.05)
        raise AssertionError(f"{path}: {len(self.at(path))} requests after {timeout}s, wanted {n}")

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def verify(secret: str, request: dict) -> dict:
    """What a receiver does: check the signature with standardwebhooks, then read the message."""
    return Webhook(secret).verify(request["body"], request["headers"])


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    gw = GatewayProcess(tmp_path_factory.mktemp("hooks") / "data", **HOOK_SETTINGS).start()
    yield gw
    gw.stop()


def make_key(gateway: GatewayProcess, name: str, **fields) -> tuple[str, str]:
    """A new key through the API: (the key, its webhook secret)."""
    with gateway.client() as admin:
        made = admin.post("/api/v1/keys", json={"name": name, **fields})
    assert made.status_code == 201, made.text
    body = made.json()
    assert body["webhook_secret"].startswith("whsec_")
    return remember_secret(body["key"]), remember_secret(body["webhook_secret"])


def deliveries(api: httpx.Client, job_id: str, done: Callable[[list[dict]], bool], timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = api.get(f"/api/v1/jobs/{job_id}/webhooks").json()["deliveries"]
        if done(found):
            return found
        time.sleep(0.1)
    raise AssertionError(f"deliveries of {job_id} after {timeout}s: {found}")


def all_delivered(n: int) -> Callable[[list[dict]], bool]:
    return lambda found: len(found) == n and all(d["delivered_at"] for d in found)


# -- through a running gateway --------------------------------------------------------------------


def test_job_events_arrive_signed_and_verify_with_standardwebhooks(gateway, receiver):
    key, secret = make_key(gateway, "hooks-signed")
    with gateway.client(key=key) as api:
        job = api.post("/api/v1/jobs", json={
            "task": "t2v", "prompt": "a lighthouse at dusk", "webhook_url": receiver.url("/signed"),
            "webhook_events": ["queued", "started", "succeeded"],
        }).json()
        wait_for(api, job["id"], {"succeeded"})
        got = receiver.wait("/signed", 3)
        # Sent side by side, they may arrive in any order: `timestamp` orders them.
        messages = sorted((verify(secret, r) for r in got), key=lambda m: m["timestamp"])
        assert [m["type"] for m in messages] == ["job.queued", "job.started", "job.succeeded"]
        assert all(m["data"]["id"] == job["id"] for m in messages)
        done = messages[-1]["data"]
        assert done["state"] == "succeeded" and done["result"]["url"] == f"/api/v1/jobs/{job['id']}/video"
        assert len({r["headers"]["webhook-id"] for r in got}) == 3
        # Another secret does not verify: the signature is what a receiver trusts.
        with pytest.raises(WebhookVerificationError):
            Webhook("whsec_" + "A" * 32).verify(got[0]["body"], got[0]["headers"])
        shown = deliveries(api, job["id"], all_delivered(3))
        assert [d["type"] for d in shown] == ["job.queued", "job.started", "job.succeeded"]
        assert [d["attempts"] for d in shown] == [1, 1, 1] and {d["last_status"] for d in shown} == {200}
        assert {d["id"] for d in shown} == {r["headers"]["webhook-id"] for r in got}
        assert api.get(f"/api/v1/jobs/{job['id']}").json()["webhooks_pending"] == 0
        assert api.get(f"/api/v1/jobs/{job['id']}/webhooks").json()["webhook"] == {
            "url": receiver.url("/signed"), "events": ["queued", "started", "succeeded"],
        }


def test_failing_receiver_gets_retries_with_growing_gaps_and_the_same_id(gateway, receiver):
    key, secret = make_key(gateway, "hooks-retry")
    receiver.plans["/flaky"] = [500, 500, 503]
    with gateway.client(key=key) as api:
        job = api.post("/api/v1/jobs", json={
            "task": "t2v", "prompt": "rain on a window", "webhook_url": receiver.url("/flaky"),
        }).json()
        got = receiver.wait("/flaky", 4)
        assert len({r["headers"]["webhook-id"] for r in got}) == 1  # one message, four attempts
        assert {r["body"] for r in got} == {got[0]["body"]}  # the same body, signed anew each time
        assert verify(secret, got[-1])["type"] == "job.succeeded"
        gaps = [b["at"] - a["at"] for a, b in zip(got, got[1:])]
        # Each wait is drawn between half and all of FIRST_RETRY, doubled per attempt.
        assert gaps[0] >= FIRST_RETRY * 0.5 - 0.05 and gaps[2] >= FIRST_RETRY * 2 - 0.05, gaps
        (shown,) = deliveries(api, job["id"], all_delivered(1))
        assert shown["attempts"] == 4 and shown["last_status"] == 200 and shown["next_attempt_at"] is None
    with gateway.client() as admin:
        metrics = admin.get("/metrics").text
    counted = {line.split('"')[1]: float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("x2v_webhook_attempts_total{")}
    assert counted["failed"] >= 3 and counted["delivered"] >= 1, counted


def test_receiver_that_does_not_answer_in_time_is_tried_again(gateway, receiver):
    key, secret = make_key(gateway, "hooks-slow")
    receiver.plans["/slow"] = ["slow"]
    with gateway.client(key=key) as api:
        job = api.post("/api/v1/jobs", json={
            "task": "t2v", "prompt": "a slow river", "webhook_url": receiver.url("/slow"),
        }).json()
        failed = deliveries(api, job["id"], lambda d: len(d) == 1 and d[0]["attempts"] >= 1)
        assert failed[0]["last_error"] == "no answer within 1 s" or failed[0]["delivered_at"], failed
        (shown,) = deliveries(api, job["id"], all_delivered(1))
        assert shown["attempts"] == 2
        assert verify(secret, receiver.at("/slow")[-1])["data"]["id"] == job["id"]


def test_events_filter_and_a_batch_finishing_once(gateway, receiver):
    key, secret = make_key(gateway, "hooks-filter")
    with gateway.client(key=key) as api:
        # Only failures: a job that succeeds sends nothing.
        quiet = api.post("/api/v1/jobs", json={
            "task": "t2v", "prompt": "a calm sea", "webhook_url": receiver.url("/failures"),
            "webhook_events": ["failed"],
        }).json()
        jobs = [api.post("/api/v1/jobs", json={
            "task": "t2v", "prompt": f"scene {n}", "batch_id": "hooks-b1", "webhook_url": receiver.url("/batch"),
            "webhook_events": ["batch.finished"],
        }).json() for n in range(3)]
        # A multipart form says the same, its events comma-separated.
        form = api.post("/api/v1/jobs", data={
            "task": "t2v", "prompt": "a form", "webhook_url": receiver.url("/multipart"),
            "webhook_events": "started, succeeded",
        }, files={"x": ("", b"")}).json()
        for job in [quiet, form, *jobs]:
            wait_for(api, job["id"], {"succeeded"})
        assert sorted(verify(secret, r)["type"] for r in receiver.wait("/multipart", 2)) == ["job.started", "job.succeeded"]
        (finished,) = receiver.wait("/batch", 1)
        message = verify(secret, finished)
        assert message["type"] == "batch.finished"
        assert message["data"]["batch_id"] == "hooks-b1" and message["data"]["jobs"] == 3
        assert message["data"]["counts"]["succeeded"] == 3
        time.sleep(1.0)  # no second batch.finished, and nothing for the successful job
        assert len(receiver.at("/batch")) == 1 and receiver.at("/failures") == []
        assert api.get(f"/api/v1/jobs/{quiet['id']}/webhooks").json()["deliveries"] == []


def test_a_replay_with_another_webhook_is_a_conflict(gateway, receiver):
    key, _ = make_key(gateway, "hooks-idem")
    body = {"task": "t2v", "prompt": "once", "webhook_url": receiver.url("/idem")}
    with gateway.client(key=key) as api:
        first = api.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": "idem-1"})
        again = api.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": "idem-1"})
        other = api.post("/api/v1/jobs", json={**body, "webhook_url": receiver.url("/idem2")},
                         headers={"Idempotency-Key": "idem-1"})
    assert (first.status_code, again.status_code, other.status_code) == (201, 200, 409)
    assert again.json()["id"] == first.json()["id"]


def test_key_default_webhook_is_used_when_a_job_names_none(gateway, receiver, tmp_path):
    key, secret = make_key(gateway, "hooks-default", webhook_url=receiver.url("/default"),
                           webhook_events=["succeeded"])
    with gateway.client() as admin:
        listed = {k["name"]: k for k in admin.get("/api/v1/keys").json()}["hooks-default"]
    assert listed["webhook_url"] == receiver.url("/default") and listed["has_webhook_secret"]
    assert "webhook_secret" not in listed
    with gateway.client(key=key) as api:
        job = api.post("/api/v1/jobs", json={"task": "t2v", "prompt": "a default"}).json()
        (got,) = receiver.wait("/default", 1)
        assert verify(secret, got)["data"]["id"] == job["id"]
    # Removed with the CLI, on the server: the next job sends nothing (within the 2 s cache).
    env = {**gateway.env, "X2V_NODES": ""}
    cli = subprocess.run(
        [sys.executable, "-m", "x2v_gateway.cli", "keys", "update", "hooks-default", "--webhook", "",
         "--env-file", "/nonexistent"],
        env=env, capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    time.sleep(2.2)
    with gateway.client(key=key) as api:
        job = api.post("/api/v1/jobs?wait=30", json={"task": "t2v", "prompt": "no default"}).json()
        assert job["state"] == "succeeded"
        assert api.get(f"/api/v1/jobs/{job['id']}/webhooks").json() == {"webhook": None, "deliveries": []}


def test_rotated_secret_signs_with_both_until_the_old_one_ends(gateway, receiver):
    key, old = make_key(gateway, "hooks-rotate")
    with gateway.client(key=key) as api:
        made = api.post("/api/v1/me/webhook-secret?keep_previous_hours=1")
        assert made.status_code == 201
        new = remember_secret(made.json()["webhook_secret"])
        assert new != old and made.json()["previous_valid_until"]
        api.post("/api/v1/jobs", json={"task": "t2v", "prompt": "two keys", "webhook_url": receiver.url("/rotate")})
        (got,) = receiver.wait("/rotate", 1)
        assert len(got["headers"]["webhook-signature"].split(" ")) == 2
        assert verify(old, got) == verify(new, got)
        # Ended at once: only the newest secret signs.
        newest = remember_secret(api.post("/api/v1/me/webhook-secret?keep_previous_hours=0").json()["webhook_secret"])
        api.post("/api/v1/jobs", json={"task": "t2v", "prompt": "one key", "webhook_url": receiver.url("/rotate2")})
        (got,) = receiver.wait("/rotate2", 1)
        verify(newest, got)
        with pytest.raises(WebhookVerificationError):
            verify(new, got)


def test_secrets_in_the_url_are_not_shown(gateway, receiver):
    key, secret = make_key(gateway, "hooks-redact")
    token = remember_secret("tok" + "%06d" % random.randrange(10**6) + "secretvalue")
    url = f"http://user:{token}@127.0.0.1:{receiver.port}/redact?token={token}&x=1"
    with gateway.client(key=key) as api:
        job = api.post("/api/v1/jobs", json={"task": "t2v", "prompt": "hidden", "webhook_url": url}).json()
        (got,) = receiver.wait("/redact", 1)
        assert got["path"] == f"/redact?token={token}&x=1"  # sent as given
        shown = api.get(f"/api/v1/jobs/{job['id']}/webhooks").text
        assert token not in shown
        assert f"http://***@127.0.0.1:{receiver.port}/redact?token=***&x=***" in shown
    assert token not in gateway.log()


@pytest.mark.parametrize(("body", "field"), [
    ({"webhook_url": "ftp://example.com/hook"}, "webhook_url"),
    ({"webhook_url": "http:///no-host"}, "webhook_url"),
    ({"webhook_url": "http://example.com:99999/"}, "webhook_url"),
    ({"webhook_url": "http://h.example/" + "a" * 2100}, "webhook_url"),
    ({"webhook_url": "http://example.com/", "webhook_events": ["finished"]}, "webhook_events"),
    ({"webhook_url": "http://example.com/", "webhook_events": "succeeded"}, "webhook_events"),
    ({"webhook_events": ["failed"]}, "webhook_events"),
])
def test_bad_webhook_is_a_422_naming_the_field(gateway, body, field):
    key, _ = make_key(gateway, f"hooks-bad-{random.randrange(10**9)}")
    with gateway.client(key=key) as api:
        answer = api.post("/api/v1/jobs", json={"task": "t2v", "prompt": "x", **body})
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["field"] == field
        form = api.post("/api/v1/jobs", data={"task": "t2v", "prompt": "x", "webhook_events": "succeeded,nope",
                                               "webhook_url": "http://example.com/"}, files={"x": ("", b"")})
        assert form.status_code == 422 and form.json()["error"]["field"] == "webhook_events", form.text


def test_private_webhook_target_is_refused_when_urls_must_be_public(tmp_path, receiver):
    gw = GatewayProcess(tmp_path / "data", X2V_WEBHOOK_FIRST_RETRY="0.3").start()
    try:
        key, _ = make_key(gw, "hooks-public")
        with gw.client(key=key) as api:
            answer = api.post("/api/v1/jobs", json={"task": "t2v", "prompt": "x", "webhook_url": receiver.url("/private")})
        assert answer.status_code == 422
        assert answer.json()["error"]["field"] == "webhook_url"
        assert "private or local address" in answer.json()["error"]["message"]
        # A key's default is held to the same rule.
        with gw.client() as admin:
            me = admin.get("/api/v1/me").json()
            patched = admin.patch(f"/api/v1/keys/{me['id']}", json={"webhook_url": receiver.url("/private")})
            assert patched.status_code == 422 and patched.json()["error"]["field"] == "webhook_url"
            # X2V_ADMIN_KEY's key has no secret until it asks for one: nothing could sign its webhooks.
            assert not me["has_webhook_secret"]
            patched = admin.patch(f"/api/v1/keys/{me['id']}", json={"webhook_url": "https://1.1.1.1/hook"})
            assert patched.status_code == 409 and "webhook-secret" in patched.json()["error"]["message"]
            made = admin.post("/api/v1/keys", json={"name": "hooks-public2", "webhook_url": "http://10.1.2.3/"})
            assert made.status_code == 422 and made.json()["error"]["field"] == "webhook_url"
    finally:
        gw.stop()


def test_deliveries_survive_a_gateway_sigkill(tmp_path, receiver):
    gw = GatewayProcess(tmp_path / "data", **{**HOOK_SETTINGS, "X2V_WEBHOOK_FIRST_RETRY": "0.5"}).start()
    try:
        key, secret = make_key(gw, "hooks-crash")
        receiver.plans["/crash"] = [500] * 1000  # down until told otherwise
        with gw.client(key=key) as api:
            job = api.post("/api/v1/jobs", json={
                "task": "t2v", "prompt": "a storm", "webhook_url": receiver.url("/crash"),
            }).json()
            before = receiver.wait("/crash", 2)
            pending = api.get(f"/api/v1/jobs/{job['id']}").json()
            assert pending["state"] == "succeeded" and pending["webhooks_pending"] == 1
        gw.kill()
        receiver.plans["/crash"] = []  # the receiver is back
        gw.start()
        got = receiver.wait("/crash", len(before) + 1)
        assert {r["headers"]["webhook-id"] for r in got} == {before[0]["headers"]["webhook-id"]}
        assert verify(secret, got[-1])["data"]["id"] == job["id"]
        with gw.client(key=key) as api:
            (shown,) = deliveries(api, job["id"], all_delivered(1))
        assert shown["attempts"] >= 3
    finally:
        gw.stop()


# -- pure logic ----------------------------------------------------------------------------------


def test_retry_delay_doubles_with_jitter_and_is_capped():
    rand = random.Random(7)
    for attempts, full in [(1, 5), (2, 10), (3, 20), (10, 2560)]:
        for _ in range(50):
            assert full / 2 <= retry_delay(attempts, 5, rand) <= full
    assert max(retry_delay(40, 5, rand) for _ in range(50)) <= MAX_RETRY_GAP
    # An hour at most, for the whole 24 hours: ~35 attempts, not thousands nor a handful.
    t, n = 0.0, 0
    while t < 24 * 3600:
        n += 1
        t += retry_delay(n, 5, rand)
    assert 20 < n < 60


def test_redact_hides_userinfo_and_query_values():
    assert redact("https://u:p@h.example:8443/x?a=1&token=s") == "https://***@h.example:8443/x?a=***&token=***"
    assert redact("http://h.example/hook") == "http://h.example/hook"
    assert redact("http://[::1]:80/x") == "http://[::1]:80/x"


def test_events_filter_parsing_and_job_events():
    assert parse_events(None) == DEFAULT_EVENTS
    assert parse_events("failed, queued") == ("queued", "failed")
    with pytest.raises(ApiError) as refused:
        parse_events(["done"])
    assert refused.value.field == "webhook_events" and refused.value.status == 422
    assert job_event("queued", "accepted") == "queued"
    assert job_event("queued", "accepted (a new run of j1)") == "queued"
    assert job_event("queued", "retry requested") == "queued"
    assert job_event("queued", "node full") is None  # the gateway's own requeue is no news
    assert job_event("submitted", "sent to demo") is None
    assert job_event("running", "started") == "started"
    assert job_event("cancelled", "cancelled by user") == "cancelled"


def test_both_secrets_sign_during_a_rotation():
    old, new = "whsec_" + "MTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0", "whsec_" + "YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4"
    body = json.dumps({"type": "job.failed"}).encode()
    headers = signed_headers([new, old], "msg_1", time.time(), body)
    assert Webhook(old).verify(body, headers) == Webhook(new).verify(body, headers) == {"type": "job.failed"}
    with pytest.raises(WebhookVerificationError):
        Webhook(new).verify(body + b" ", headers)


def test_private_target_is_refused_before_anything_is_sent():
    import asyncio

    from x2v_gateway.webhooks import check_url

    for url in ("http://127.0.0.1:9/x", "http://10.0.0.5/x", "http://[::ffff:192.168.1.1]/x", "http://localhost/x"):
        with pytest.raises(ApiError) as refused:
            asyncio.run(check_url(url, private_ok=False))
        assert refused.value.field == "webhook_url" and "private or local" in refused.value.message
    assert asyncio.run(check_url("http://127.0.0.1:9/x", private_ok=True)) == "http://127.0.0.1:9/x"


# -- the dashboard --------------------------------------------------------------------------------


def test_batch_form_webhook_sends_each_job_and_the_batch_finishing(gateway, receiver):
    key, secret = make_key(gateway, "hooks-form")
    with gateway.client(key=key) as client:  # the form's own route, as the browser posts it
        bad = client.post("/ui/batches", data={
            "task": "t2v", "mode": "grid", "prompts": "a\nb", "webhook_url": "gopher://x/",
        })
        assert bad.status_code == 422 and "webhook_url must be an http:// or https:// URL" in bad.text
        made = client.post("/ui/batches", data={
            "task": "t2v", "mode": "grid", "prompts": "a red kite\na blue kite", "name": "kites",
            "webhook_url": receiver.url("/form"), "webhook_events": "succeeded,batch.finished",
        })
        assert made.status_code == 200, made.text
        batch_id = made.headers["hx-redirect"].rsplit("/", 1)[-1]
        got = receiver.wait("/form", 3)
        messages = sorted((verify(secret, r) for r in got), key=lambda m: m["type"])
        assert [m["type"] for m in messages] == ["batch.finished", "job.succeeded", "job.succeeded"]
        assert messages[0]["data"] == {
            "batch_id": batch_id, "name": "kites", "jobs": 2,
            "counts": {"queued": 0, "submitted": 0, "running": 0, "succeeded": 2, "failed": 0, "cancelled": 0},
        }
        assert {m["data"]["batch_id"] for m in messages[1:]} == {batch_id}


def test_api_batch_webhook_goes_to_every_job_and_the_batch_finishing(gateway, receiver):
    key, secret = make_key(gateway, "hooks-api-batch")
    with gateway.client(key=key) as api:
        refused = api.post("/api/v1/batches", json={
            "jobs": [{"task": "t2v", "prompt": "a", "webhook_url": receiver.url("/x")}],
        })
        assert refused.status_code == 422 and refused.json()["error"]["field"] == "jobs[0].webhook_url"
        made = api.post("/api/v1/batches", json={
            "name": "api kites", "webhook_url": receiver.url("/api-batch"),
            "webhook_events": ["succeeded", "batch.finished"],
            "jobs": [{"task": "t2v", "prompt": "a green kite"}, {"task": "t2v", "prompt": "a grey kite"}],
        })
        assert made.status_code == 201, made.text
    messages = sorted((verify(secret, r) for r in receiver.wait("/api-batch", 3)), key=lambda m: m["type"])
    assert [m["type"] for m in messages] == ["batch.finished", "job.succeeded", "job.succeeded"]
    assert messages[0]["data"]["name"] == "api kites" and messages[0]["data"]["counts"]["succeeded"] == 2


def test_job_page_shows_deliveries_and_their_retries(gateway, receiver):
    from test_dashboard import CHROMIUM, CHROMIUM_ARGS, LAPTOP, SCREENSHOTS

    if not Path(CHROMIUM).exists():
        pytest.skip("needs Debian's chromium (./dev test installs it)")
    from playwright.sync_api import expect, sync_playwright

    key, _ = make_key(gateway, "hooks-page")
    # Two attempts that time out, then an answer: the page is open before the first ends.
    receiver.plans["/page"] = ["slow", "slow"]
    cookie = gateway.sign_in(key)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport=LAPTOP)
            context.add_cookies([{"name": "x2v_session", "value": cookie, "url": gateway.url}])
            page = context.new_page()
            with gateway.client(key=key) as api:
                job = api.post("/api/v1/jobs", json={
                    "task": "t2v", "prompt": "a page", "webhook_url": receiver.url("/page?token=hidden-in-page"),
                }).json()
            page.goto(f"{gateway.url}/ui/jobs/{job['id']}")
            section = page.locator("#job-webhooks")
            expect(section.get_by_role("heading", name="Webhooks")).to_be_visible()
            expect(section).to_contain_text(f"http://127.0.0.1:{receiver.port}/page?token=***")
            row = section.locator("tbody tr")
            expect(row).to_have_count(1)
            expect(row).to_contain_text("job.succeeded")
            # Delivered at the third attempt: the section refreshes itself until then.
            expect(row.locator("td").nth(1)).to_have_text("3", timeout=30_000)
            expect(row.locator("td").nth(2)).to_have_text("200")
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            section.screenshot(path=str(SCREENSHOTS / "job-webhooks.png"))
            with gateway.responses_path.open("a", encoding="utf-8") as seen:
                seen.write(page.content())
            assert "hidden-in-page" not in page.content()
        finally:
            browser.close()


def test_jobs_of_a_batch_finishing_together_make_one_batch_finished(store_location):
    """Events read in one round, on a real store: the batch's last event alone sends it; a job
    of it run again makes the batch busy, and its end finishes the batch again."""
    import asyncio

    from x2v_gateway.store import JobStore, JobWebhook
    from x2v_gateway.webhook_worker import _read_round

    async def scenario() -> list[list[str]]:
        store = JobStore(store_location)
        rounds = []

        async def round_() -> None:
            found = await store.read(_read_round)
            await store.record_deliveries(found.deliveries, found.cursor)
            rounds.append(sorted(d["type"] for d in found.deliveries))

        try:
            hook = JobWebhook("http://127.0.0.1:9/b", ("succeeded", "batch.finished"), "k1")
            ids = [(await store.create_job(task="t2v", params={}, inputs={}, batch_id="b", owner="k1",
                                           webhook=hook))[0].id for _ in range(3)]
            # Another key's batch of the same name is another batch: its queued job does not count.
            await store.create_job(task="t2v", params={}, inputs={}, batch_id="b", owner="k2")
            await store.succeed(ids[0], "0" * 64, {})
            await store.succeed(ids[1], "0" * 64, {})
            await store.fail(ids[2], "node lost it")
            await round_()
            await store.retry(ids[2])
            await round_()
            await store.succeed(ids[2], "0" * 64, {})
            await round_()
            await round_()  # nothing new: nothing sent twice
        finally:
            store.close()
        return rounds

    assert asyncio.run(scenario()) == [
        ["batch.finished", "job.succeeded", "job.succeeded"],
        [],  # the retried job is queued (not in the filter), and the batch is busy again
        ["batch.finished", "job.succeeded"],
        [],
    ]


def test_a_name_that_now_resolves_to_a_private_address_is_refused_at_delivery(tmp_path, store_location, receiver):
    """Accepted as public, the target's name later points inside the network (DNS rebinding): the
    attempt is refused before anything is sent, and retried later (the name may change back)."""
    import asyncio

    from x2v_gateway.dispatch import Notifier
    from x2v_gateway.inputs import PublicOnlyTransport
    from x2v_gateway.metrics import Metrics
    from x2v_gateway.settings import Settings
    from x2v_gateway.store import JobStore, JobWebhook
    from x2v_gateway.webhook_worker import WebhookWorker

    async def rebound(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]  # where the receiver listens

    async def scenario() -> dict:
        store = JobStore(store_location)
        worker = WebhookWorker(Settings(data_dir=tmp_path), store, Notifier(), Metrics(),
                               transport=PublicOnlyTransport(resolve=rebound))
        try:
            await store.create_key({"id": "k1", "name": "k1", "key_hash": "h", "prefix": "", "admin": False,
                                    "daily_quota": None, "max_concurrent": None, "rate_per_min": None,
                                    "source": "test", "webhook_secret": "whsec_" + "A" * 32}, "test")
            url = f"http://hooks.example.com:{receiver.port}/rebound"
            job, _ = await store.create_job(task="t2v", params={}, inputs={}, owner="k1",
                                            webhook=JobWebhook(url, ("queued",), "k1"))
            for _ in range(50):
                await worker.round()
                found = await store.job_deliveries(job.id)
                if found and found[0]["attempts"]:
                    return found[0]
                await asyncio.sleep(0.05)
            raise AssertionError("no attempt was made")
        finally:
            await worker.stop()
            store.close()

    attempted = asyncio.run(scenario())
    assert attempted["last_error"] == (
        "hooks.example.com is a private or local address; webhooks go to public addresses only"
    )
    assert attempted["next_attempt_at"] and not attempted["gave_up_at"]
    assert receiver.at("/rebound") == []


def test_replicas_sharing_a_store_send_each_message_once(tmp_path, receiver):
    from collections import Counter

    from replica_cluster import Cluster

    cluster = Cluster(tmp_path, replicas=2, nodes=1, job_seconds=0.1, **HOOK_SETTINGS).start()
    try:
        key, secret = make_key(cluster.replicas[0], "hooks-replicas")
        ids = []
        for n in range(12):  # half through each replica
            with cluster.replicas[n % 2].client(key=key) as api:
                ids.append(api.post("/api/v1/jobs", json={
                    "task": "t2v", "prompt": f"replica {n}", "webhook_url": receiver.url("/replicas"),
                    "webhook_events": ["queued", "succeeded"],
                }).json()["id"])
        got = receiver.wait("/replicas", 24)
        time.sleep(1.5)  # anything sent twice would have come by now
        got = receiver.at("/replicas")
        sent = Counter(r["headers"]["webhook-id"] for r in got)
        assert len(sent) == 24 and set(sent.values()) == {1}, sent.most_common(3)
        messages = Counter((m["data"]["id"], m["type"]) for m in (verify(secret, r) for r in got))
        assert set(messages) == {(i, t) for i in ids for t in ("job.queued", "job.succeeded")}
    finally:
        cluster.stop()


def test_a_slow_receiver_does_not_hold_up_another(tmp_path, store_location, receiver):
    """Two slots, three messages to a receiver that takes 2.5 s to answer, queued first: it gets
    one slot at a time, and the other receiver's message goes through the other one at once."""
    import asyncio

    from x2v_gateway.dispatch import Notifier
    from x2v_gateway.metrics import Metrics
    from x2v_gateway.settings import Settings
    from x2v_gateway.store import JobStore, JobWebhook
    from x2v_gateway.webhook_worker import WebhookWorker

    slow = Receiver()
    slow.plans["/slow"] = ["slow"] * 3

    async def scenario() -> float:
        store = JobStore(store_location)
        settings = Settings(data_dir=tmp_path, private_urls=True, webhook_concurrency=2, webhook_timeout=3)
        worker = WebhookWorker(settings, store, Notifier(), Metrics())
        try:
            await store.create_key({"id": "k1", "name": "k1", "key_hash": "h", "prefix": "", "admin": False,
                                    "daily_quota": None, "max_concurrent": None, "rate_per_min": None,
                                    "source": "test", "webhook_secret": "whsec_" + "A" * 32}, "test")
            for url in [slow.url("/slow")] * 3 + [receiver.url("/beside-slow")]:
                await store.create_job(task="t2v", params={}, inputs={}, owner="k1",
                                       webhook=JobWebhook(url, ("queued",), "k1"))
            started = time.monotonic()
            await worker.start()
            while not receiver.at("/beside-slow"):
                assert time.monotonic() - started < 10
                await asyncio.sleep(0.02)
            return time.monotonic() - started
        finally:
            await worker.stop()
            store.close()

    try:
        waited = asyncio.run(scenario())
    finally:
        slow.stop()
    assert waited < 2.0, f"the fast receiver's message waited {waited:.1f} s behind the slow one's"
    assert len(slow.at("/slow")) <= 1  # one slot for it at most, the other free for everyone else
