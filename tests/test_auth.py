"""Access control and limits against real gateway processes: keys, sign-in, CSRF, quotas, rate
limits, concurrency caps, upload limits, CORS, purge and the audit log."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from x2v_gateway.auth import CALLER_CACHE_SECONDS

import loopback
from gateway_proc import ADMIN_KEY, GatewayProcess, remember_secret, wait_for
from media import make_png

# The routes anyone may call: probes, the front door's redirect, the sign-in page, static files
# and the API documentation. The README's "Keys and sign-in" section says the same.
OPEN_ROUTES = {("GET", "/"), ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/ui/sign-in"),
               ("POST", "/ui/sign-in")}
OPEN_PREFIXES = ("/schema", "/static/")


def app_routes(tmp_path: Path) -> list[tuple[str, str]]:
    """Every (method, path) the app serves, read from the app itself: a route added later is
    covered without touching this file."""
    from x2v_gateway.app import create_app
    from x2v_gateway.settings import load_settings

    settings = load_settings({"X2V_DATA_DIR": str(tmp_path / "routes"), "X2V_ADMIN_KEY": ADMIN_KEY}, env_file=None)
    app = create_app(settings)
    try:
        return sorted(
            (method, route.path) for route in app.routes for method in getattr(route, "methods", ())
            if method not in ("OPTIONS", "HEAD")
        )
    finally:
        app.state.gateway.store.close()


def is_open(method: str, path: str) -> bool:
    return (method, path) in OPEN_ROUTES or path.startswith(OPEN_PREFIXES)


def fill(path: str, **values: str) -> str:
    """`/api/v1/jobs/{job_id:str}` -> a real path, with `values` for the parameters (else "x")."""
    return re.sub(r"\{(\w+):(\w+)\}", lambda m: values.get(m.group(1), "0" if m.group(2) == "int" else "x"), path)


@pytest.fixture(scope="module")
def gw(tmp_path_factory) -> GatewayProcess:
    gateway = GatewayProcess(tmp_path_factory.mktemp("auth") / "data", X2V_DEMO_JOB_SECONDS="0.3").start()
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def admin(gw):
    with gw.client() as client:
        yield client


def make_key(admin: httpx.Client, name: str, **limits) -> str:
    response = admin.post("/api/v1/keys", json={"name": f"{name}-{time.monotonic_ns()}", **limits})
    assert response.status_code == 201, response.text
    return remember_secret(response.json()["key"])


def csrf_token(page: str) -> str:
    return re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)


@contextmanager
def browser(gw: GatewayProcess, key: str | None = None) -> Iterator[tuple[httpx.Client, str]]:
    """A signed-in browser: a client with the session cookie, and the page's CSRF token."""
    cookie = gw.sign_in(key)
    with gw.client(key=None) as client:
        client.cookies.set("x2v_session", cookie)
        home = client.get("/ui/")
        assert home.status_code == 200, home.text
        yield client, csrf_token(home.text)


# -- closed by default ---------------------------------------------------------------------------


def test_every_route_without_credentials_is_401_except_the_open_ones(gw, tmp_path):
    routes = app_routes(tmp_path)
    assert ("POST", "/api/v1/jobs") in routes and any(p.startswith("/ui/") for _, p in routes)
    refused, wrong = [], []
    with gw.client(key=None) as anonymous:
        for method, path in routes:
            url = fill(path, file_path="dashboard.css")
            answer = anonymous.request(method, url, json={} if method != "GET" else None)
            if is_open(method, path):
                assert answer.status_code != 401, (method, path, answer.text)
            elif answer.status_code == 401:
                refused.append((method, path))
            else:
                wrong.append((method, path, answer.status_code))
        # A key that is not one, or not sent as a Bearer token, is refused the same way.
        bad = anonymous.get("/api/v1/jobs", headers={"Authorization": "Bearer x2v_not-a-real-key"})
        assert bad.status_code == 401 and "not valid" in bad.json()["error"]["message"]
        basic = anonymous.get("/api/v1/jobs", headers={"Authorization": f"Basic {ADMIN_KEY}"})
        assert basic.status_code == 401
    assert not wrong, f"answered without credentials: {wrong}"
    assert len(refused) > 20


def test_unauthenticated_upload_is_refused_before_its_body_is_sent(gw):
    # Headers that announce 2 GiB, and not a byte of body: the answer comes anyway.
    status = raw_post_status(gw, "/api/v1/jobs", 2 * 1024**3)
    assert status == 401


def raw_post_status(gw: GatewayProcess, path: str, length: int, key: str | None = None) -> int:
    """POST only the headers of a multipart upload of `length` bytes; the status the gateway
    answers with before any of the body arrives."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}"
            f"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: {length}\r\n\r\n".encode()
        )
        head = sock.recv(4096).decode("latin-1")
    return int(head.split(" ", 2)[1])


def test_metrics_need_an_admin_key(gw, admin):
    user = make_key(admin, "metrics-user")
    with gw.client(key=None) as anonymous, gw.client(key=user) as client:
        assert anonymous.get("/metrics").status_code == 401
        assert client.get("/metrics").status_code == 403
    assert admin.get("/metrics").status_code == 200


# -- each key its own jobs -----------------------------------------------------------------------


def test_another_keys_job_is_404_everywhere_and_an_admin_sees_it(gw, admin, tmp_path):
    alice, bob = make_key(admin, "alice"), make_key(admin, "bob")
    with gw.client(key=alice) as a, gw.client(key=bob) as b:
        job = a.post("/api/v1/jobs?wait=30", json={"task": "t2v", "prompt": "alice's", "batch_id": "alice-batch"}).json()
        assert job["state"] == "succeeded", job
        not_found = []
        for method, path in app_routes(tmp_path):
            if "{job_id" not in path or not path.startswith("/api/"):
                continue
            answer = b.request(method, fill(path, job_id=job["id"]))
            if answer.status_code != 404:
                not_found.append((method, path, answer.status_code))
        assert not not_found, f"another key's job was not a 404: {not_found}"
        assert job["id"] not in [j["id"] for j in b.get("/api/v1/jobs?limit=500").json()["jobs"]]
        assert b.delete("/api/v1/batches/alice-batch").status_code == 404
        assert job["id"] in [j["id"] for j in a.get("/api/v1/jobs?limit=500").json()["jobs"]]
        # The same Idempotency-Key from two keys makes two jobs: keys never share one.
        headers = {"Idempotency-Key": f"row-7-{time.monotonic_ns()}"}
        mine = a.post("/api/v1/jobs", json={"task": "t2v", "prompt": "same"}, headers=headers)
        theirs = b.post("/api/v1/jobs", json={"task": "t2v", "prompt": "same"}, headers=headers)
        assert (mine.status_code, theirs.status_code) == (201, 201)
        assert mine.json()["id"] != theirs.json()["id"]
    assert admin.get(f"/api/v1/jobs/{job['id']}").status_code == 200
    assert job["id"] in [j["id"] for j in admin.get("/api/v1/jobs?limit=500").json()["jobs"]]


def test_another_keys_job_is_404_in_the_dashboard(gw, admin, tmp_path):
    alice, bob = make_key(admin, "alice-ui"), make_key(admin, "bob-ui")
    with gw.client(key=alice) as a:
        job = a.post("/api/v1/jobs?wait=30", json={"task": "t2v", "prompt": "alice's", "batch_id": "alice-ui-batch"}).json()
    with browser(gw, bob) as (page, token):
        leaks = []
        for method, path in app_routes(tmp_path):
            if not path.startswith("/ui/") or ("{job_id" not in path and "{batch_id" not in path):
                continue
            url = fill(path, job_id=job["id"], batch_id="alice-ui-batch", role="image")
            answer = page.request(method, url, headers={"X-CSRFToken": token})
            if answer.status_code != 404:
                leaks.append((method, path, answer.status_code))
        assert not leaks, f"another key's job or batch answered in the dashboard: {leaks}"


def test_non_admin_keys_may_not_manage_keys_nodes_or_read_the_audit(gw, admin):
    user = make_key(admin, "plain")
    with gw.client(key=user) as client:
        assert client.get("/api/v1/nodes").status_code == 200  # looking is fine
        assert client.post("/api/v1/nodes", json={"name": "n9", "url": "http://127.0.0.1:9"}).status_code == 403
        assert client.post("/api/v1/nodes/demo/drain").status_code == 403
        assert client.get("/api/v1/keys").status_code == 403
        assert client.post("/api/v1/keys", json={"name": "escalate", "admin": True}).status_code == 403
        assert client.get("/api/v1/audit").status_code == 403
        me = client.get("/api/v1/me").json()
        assert me["admin"] is False and "key" not in me


def test_revoked_key_stops_working_at_once(gw, admin):
    key = make_key(admin, "short-lived")
    with gw.client(key=key) as client:
        assert client.get("/api/v1/jobs").status_code == 200
        key_id = client.get("/api/v1/me").json()["id"]
        assert admin.delete(f"/api/v1/keys/{key_id}").status_code == 200
        assert client.get("/api/v1/jobs").status_code == 401
    listed = {k["id"]: k for k in admin.get("/api/v1/keys").json()}
    assert listed[key_id]["revoked_at"] is not None


# -- dashboard sign-in ---------------------------------------------------------------------------


def test_sign_in_gives_a_session_cookie_that_scripts_cannot_read(gw):
    with loopback.client(base_url=gw.url) as client:
        form = client.get("/ui/sign-in")
        token = re.search(r'name="_sign_in_token" value="([^"]+)"', form.text).group(1)
        data = {"_sign_in_token": token, "key": ADMIN_KEY, "next": "/ui/jobs"}
        answer = client.post("/ui/sign-in", data=data)
        assert answer.status_code == 303 and answer.headers["location"] == "/ui/jobs"
        cookie = answer.headers["set-cookie"]
        remember_secret(client.cookies["x2v_session"])
        cookie = cookie.split(", x2v_sign_in", 1)[0]  # the sign-in form's cookie is cleared too
        assert "HttpOnly" in cookie and "samesite=lax" in cookie.lower() and "Path=/;" in cookie
        assert "Secure" not in cookie  # plain http: a Secure cookie would never come back
        # Behind an https proxy (X-Forwarded-Proto from 127.0.0.1, which uvicorn trusts): Secure.
        form = client.get("/ui/sign-in")
        token = re.search(r'name="_sign_in_token" value="([^"]+)"', form.text).group(1)
        behind = client.post("/ui/sign-in", data={**data, "_sign_in_token": token},
                             headers={"X-Forwarded-Proto": "https"})
        assert behind.status_code == 303 and "Secure" in behind.headers["set-cookie"]
        remember_secret(behind.cookies["x2v_session"])


def test_sign_in_refuses_bad_keys_forged_forms_and_other_sites(gw):
    with loopback.client(base_url=gw.url) as client:
        form = client.get("/ui/sign-in")
        token = re.search(r'name="_sign_in_token" value="([^"]+)"', form.text).group(1)
        wrong = client.post("/ui/sign-in", data={"_sign_in_token": token, "key": "x2v_guess"})
        assert wrong.status_code == 401 and "not valid" in wrong.text and "x2v_session" not in client.cookies
        # A form posted from another site has no sign-in token cookie to match: refused.
        with loopback.client(base_url=gw.url) as elsewhere:
            forged = elsewhere.post("/ui/sign-in", data={"_sign_in_token": token, "key": ADMIN_KEY})
            assert forged.status_code == 403 and "x2v_session" not in elsewhere.cookies
        # After signing in, it only ever sends the browser back to this gateway.
        form = client.get("/ui/sign-in")
        token = re.search(r'name="_sign_in_token" value="([^"]+)"', form.text).group(1)
        away = client.post("/ui/sign-in", data={"_sign_in_token": token, "key": ADMIN_KEY, "next": "//evil.example/x"})
        assert away.status_code == 303 and away.headers["location"] == "/ui/"
        remember_secret(client.cookies["x2v_session"])


def test_a_signed_out_page_shows_the_sign_in_form_and_htmx_is_sent_there(gw):
    with gw.client(key=None) as anonymous:
        page = anonymous.get("/ui/jobs?state=failed")
        assert page.status_code == 401 and 'action="/ui/sign-in"' in page.text
        assert 'name="next" value="/ui/jobs?state=failed"' in page.text
        fragment = anonymous.get("/ui/jobs/rows", headers={"HX-Request": "true", "HX-Current-URL": f"{gw.url}/ui/jobs"})
        assert fragment.status_code == 401
        assert fragment.headers["hx-redirect"] == "/ui/sign-in?next=/ui/jobs"


def test_dashboard_change_without_csrf_token_is_403(gw, admin, tmp_path):
    with browser(gw) as (page, token):
        changes = [(m, p) for m, p in app_routes(tmp_path)
                   if m not in ("GET", "HEAD") and not is_open(m, p) and p not in ("/ui/sign-out",)]
        assert any(p.startswith("/ui/") for _, p in changes)
        accepted = []
        for method, path in changes:
            for headers in ({}, {"X-CSRFToken": "not-the-token"}):
                answer = page.request(method, fill(path), headers=headers)
                if answer.status_code != 403 or "CSRF" not in answer.text:
                    accepted.append((method, path, headers, answer.status_code))
        assert not accepted, f"changed without the CSRF token: {accepted}"
        # With the token the request goes through (here: cancel a job through the API).
        job = admin.post("/api/v1/jobs", json={"task": "t2v", "prompt": "cancel from the dashboard"}).json()
        done = page.delete(f"/api/v1/jobs/{job['id']}", headers={"X-CSRFToken": token})
        assert done.status_code == 200 and done.json()["state"] in ("cancelled", "succeeded")
        # Sign-out is a plain form: the token travels as a field.
        assert page.post("/ui/sign-out", data={}).status_code == 403
        out = page.post("/ui/sign-out", data={"_csrf_token": token})
        assert out.status_code == 303
        assert page.get("/ui/").status_code == 401


def test_revoking_a_key_ends_its_dashboard_sessions(gw, admin):
    key = make_key(admin, "dashboard-user")
    with browser(gw, key) as (page, _):
        assert page.get("/ui/jobs").status_code == 200
        key_id = next(k["id"] for k in admin.get("/api/v1/keys").json() if k["prefix"] == key[:12])
        assert admin.delete(f"/api/v1/keys/{key_id}").status_code == 200
        ended = page.get("/ui/jobs")
        assert ended.status_code == 401 and "session has ended" in ended.text


# -- limits --------------------------------------------------------------------------------------


def test_over_the_rate_limit_is_429_with_retry_after(gw, admin):
    key = make_key(admin, "chatty", rate_per_min=5)
    other = make_key(admin, "quiet", rate_per_min=5)
    with gw.client(key=key) as client, gw.client(key=other) as neighbour:
        answers = [client.get("/api/v1/jobs?limit=1") for _ in range(6)]
        assert [a.status_code for a in answers[:5]] == [200] * 5
        refused = answers[5]
        assert refused.status_code == 429
        assert refused.json()["error"]["field"] == "rate"
        assert "rate limit" in refused.json()["error"]["message"] and "5 requests a minute" in refused.json()["error"]["message"]
        assert 1 <= int(refused.headers["retry-after"]) <= 12
        assert neighbour.get("/api/v1/jobs?limit=1").status_code == 200  # each key its own budget


def test_over_the_daily_quota_is_429_with_the_reason(gw, admin):
    key = make_key(admin, "thrifty", daily_quota=2)
    with gw.client(key=key) as client:
        headers = {"Idempotency-Key": f"q-{time.monotonic_ns()}"}
        first = client.post("/api/v1/jobs", json={"task": "t2v", "prompt": "one"}, headers=headers)
        assert first.status_code == 201
        # A replay makes no job, and a refused request makes none: neither is counted.
        assert client.post("/api/v1/jobs", json={"task": "t2v", "prompt": "one"}, headers=headers).status_code == 200
        assert client.post("/api/v1/jobs", json={"task": "t2v", "seed": -1}).status_code == 422
        assert client.get("/api/v1/me").json()["jobs_today"] == 1
        assert client.post("/api/v1/jobs", json={"task": "t2v", "prompt": "two"}).status_code == 201
        over = client.post("/api/v1/jobs", json={"task": "t2v", "prompt": "three"})
        assert over.status_code == 429
        error = over.json()["error"]
        assert error["field"] == "quota"
        assert "daily quota" in error["message"] and "2 jobs a day" in error["message"] and "00:00 UTC" in error["message"]
        assert 0 < int(over.headers["retry-after"]) <= 86400
        # Running a job again costs a job too.
        failed = client.post("/api/v1/jobs", json={"task": "t2v", "prompt": "x"})
        assert failed.status_code == 429
        job_id = first.json()["id"]
        wait_for(client, job_id, {"succeeded"})
        assert client.get("/api/v1/jobs?limit=5").status_code == 200  # reading is not limited


def test_jobs_over_max_concurrent_wait_queued_and_all_finish(tmp_path):
    # The demo node takes 2 jobs at once (1 running + 1 in its own queue): a key capped at 1
    # must never hold both, while another key's job takes the free slot.
    gateway = GatewayProcess(tmp_path / "data", X2V_DEMO_JOB_SECONDS="0.8").start()
    try:
        with gateway.client() as admin:
            capped = make_key(admin, "capped", max_concurrent=1)
            with gateway.client(key=capped) as client:
                ids = [client.post("/api/v1/jobs", json={"task": "t2v", "prompt": f"capped {i}"}).json()["id"]
                       for i in range(3)]
                other = admin.post("/api/v1/jobs", json={"task": "t2v", "prompt": "admin's"}).json()["id"]
                most, other_ran_beside = 0, False
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    # One list request: one snapshot of the store, not three reads in a row.
                    active = {j["id"] for j in admin.get(
                        "/api/v1/jobs", params={"state": "submitted,running", "limit": 500}).json()["jobs"]}
                    on_node = len(active & set(ids))
                    most = max(most, on_node)
                    other_ran_beside = other_ran_beside or bool(on_node and other in active)
                    states = [client.get(f"/api/v1/jobs/{i}").json()["state"] for i in ids]
                    if all(s in ("succeeded", "failed", "cancelled") for s in states):
                        break
                    time.sleep(0.05)
                assert states == ["succeeded"] * 3
                assert most == 1
                assert other_ran_beside
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> GatewayProcess:
    """A gateway that takes 3 MiB per request and 1 MiB per file."""
    gateway = GatewayProcess(tmp_path_factory.mktemp("small") / "data", X2V_MAX_UPLOAD_MB="3", X2V_MAX_FILE_MB="1").start()
    yield gateway
    gateway.stop()


def stored_files(gateway: GatewayProcess) -> list[str]:
    return sorted(str(p.relative_to(gateway.data_dir)) for p in (gateway.data_dir / "blobs").rglob("*") if p.is_file())


def test_oversized_uploads_are_413_and_leave_no_file_behind(small, media, tmp_path):
    big = tmp_path / "big.wav"
    big.write_bytes(b"RIFF" + os.urandom(5 * 1024 * 1024))
    mid = tmp_path / "mid.wav"
    mid.write_bytes(b"RIFF" + os.urandom(2 * 1024 * 1024))
    before = stored_files(small)
    with small.client() as client:
        # Declared too large: refused on its headers.
        assert raw_post_status(small, "/api/v1/jobs", 4 * 1024 * 1024, key=small.admin_key) == 413
        # Too large, and not declared (chunked): refused while it streams in.
        def chunks():
            with big.open("rb") as handle:
                yield b"--xyz\r\nContent-Disposition: form-data; name=\"task\"\r\n\r\ns2v\r\n"
                yield b"--xyz\r\nContent-Disposition: form-data; name=\"audio\"; filename=\"a.wav\"\r\n\r\n"
                while chunk := handle.read(256 * 1024):
                    yield chunk
                yield b"\r\n--xyz--\r\n"
        streamed = client.post("/api/v1/jobs", content=chunks(), headers={"content-type": "multipart/form-data; boundary=xyz"})
        assert streamed.status_code == 413, streamed.text
        # Within the request limit, but one file over the file limit: 413 naming the file.
        one = client.post("/api/v1/jobs", data={"task": "s2v"},
                          files={"image": media["face"].open("rb"), "audio": mid.open("rb")})
        assert one.status_code == 413 and one.json()["error"]["field"] == "audio", one.text
        # The same file as base64 in JSON: 413 as well.
        import base64
        as_json = client.post("/api/v1/jobs", json={"task": "s2v", "image": base64.b64encode(media["face"].read_bytes()).decode(),
                                                    "audio": base64.b64encode(mid.read_bytes()).decode()})
        assert as_json.status_code == 413 and as_json.json()["error"]["field"] == "audio", as_json.text
    assert stored_files(small) == before


def test_a_text_file_named_png_is_422_and_not_kept(small, media):
    before = stored_files(small)
    with small.client() as client:
        answer = client.post("/api/v1/jobs", data={"task": "s2v"},
                             files={"image": media["not_image"].open("rb"), "audio": media["voice"].open("rb")})
    assert answer.status_code == 422 and answer.json()["error"]["field"] == "image"
    assert stored_files(small) == before


def test_low_disk_space_refuses_new_jobs_with_507(tmp_path, media):
    # A threshold above any disk's free space: every new job is refused, reads still work.
    gateway = GatewayProcess(tmp_path / "data", X2V_MIN_FREE_DISK_MB=str(1024**3)).start()
    try:
        assert raw_post_status(gateway, "/api/v1/jobs", 10 * 1024 * 1024, key=gateway.admin_key) == 507
        with gateway.client() as client:
            upload = client.post("/api/v1/jobs", data={"task": "s2v"},
                                 files={"image": media["face"].open("rb"), "audio": media["voice"].open("rb")})
            assert upload.status_code == 507 and "disk space" in upload.json()["error"]["message"]
            assert client.post("/api/v1/jobs", json={"task": "t2v"}).status_code == 507
            assert client.get("/api/v1/jobs").status_code == 200
        assert stored_files(gateway) == []
    finally:
        gateway.stop()


# -- CORS ----------------------------------------------------------------------------------------


def preflight(client: httpx.Client, origin: str) -> httpx.Response:
    return client.options("/api/v1/jobs", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    })


def test_cors_is_off_by_default(gw):
    with gw.client(key=None) as client:
        answer = preflight(client, "https://app.example.com")
        assert "access-control-allow-origin" not in answer.headers
        assert "access-control-allow-origin" not in client.get("/healthz", headers={"Origin": "https://app.example.com"}).headers


def test_cors_allows_only_the_listed_origins(tmp_path):
    gateway = GatewayProcess(tmp_path / "data", X2V_CORS_ORIGINS="https://app.example.com").start()
    try:
        with gateway.client(key=None) as anonymous, gateway.client() as client:
            allowed = preflight(anonymous, "https://app.example.com")
            assert allowed.status_code in (200, 204)
            assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
            assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
            assert "access-control-allow-credentials" not in allowed.headers
            other = preflight(anonymous, "https://evil.example")
            assert other.headers.get("access-control-allow-origin") != "https://evil.example"
            listed = client.get("/api/v1/jobs", headers={"Origin": "https://app.example.com"})
            assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == "https://app.example.com"
            # CORS is no way around the key.
            assert anonymous.get("/api/v1/jobs", headers={"Origin": "https://app.example.com"}).status_code == 401
    finally:
        gateway.stop()


# -- purge and audit -----------------------------------------------------------------------------


def test_purge_deletes_a_jobs_files_and_the_job_says_so(gw, admin, tmp_path):
    user = make_key(admin, "purger")
    portrait = make_png(tmp_path / "unique.png", color=(11, 22, 33))
    shared = make_png(tmp_path / "shared.png", color=(44, 55, 66))
    with gw.client(key=user) as client:
        job = client.post("/api/v1/jobs?wait=30", data={"task": "i2v", "prompt": "purge me"},
                          files={"image": portrait.open("rb")}).json()
        keeper = client.post("/api/v1/jobs?wait=30", data={"task": "i2v", "prompt": "kept"},
                             files={"image": shared.open("rb")}).json()
        sharer = client.post("/api/v1/jobs?wait=30", data={"task": "i2v", "prompt": "shares"},
                             files={"image": shared.open("rb")}).json()
        assert {job["state"], keeper["state"], sharer["state"]} == {"succeeded"}
        blobs = gw.data_dir / "blobs"
        image_sha, video_sha = job["inputs"]["image"]["sha256"], job["result"]["sha256"]
        assert (blobs / image_sha[:2] / image_sha).is_file()
        purged = client.delete(f"/api/v1/jobs/{job['id']}?purge=true")
        assert purged.status_code == 200 and purged.json()["files_expired"] is True
        assert not (blobs / image_sha[:2] / image_sha).exists()
        assert not (blobs / video_sha[:2] / video_sha).exists()
        assert client.get(f"/api/v1/jobs/{job['id']}/video").status_code == 410
        # A portrait another kept job uses stays.
        client.delete(f"/api/v1/jobs/{sharer['id']}?purge=true")
        shared_sha = keeper["inputs"]["image"]["sha256"]
        assert (blobs / shared_sha[:2] / shared_sha).is_file()
        assert client.get(f"/api/v1/jobs/{keeper['id']}/video").status_code == 200

        # A whole batch: unfinished jobs are cancelled, every file goes.
        batch = f"purge-batch-{time.monotonic_ns()}"
        ids = [client.post("/api/v1/jobs", json={"task": "t2v", "prompt": f"b{i}", "batch_id": batch}).json()["id"]
               for i in range(3)]
        wait_for(client, ids[0], {"succeeded"})
        answer = client.delete(f"/api/v1/batches/{batch}?purge=true").json()
        assert answer["jobs"] == 3 and answer["purged"] is True and answer["files_removed"] >= 1
        for job_id in ids:
            after = client.get(f"/api/v1/jobs/{job_id}").json()
            assert after["files_expired"] is True and after["state"] in ("succeeded", "cancelled")
    entries = admin.get("/api/v1/audit?limit=50").json()["entries"]
    purges = [e for e in entries if e["action"] == "purge"]
    assert any(e["target"] == job["id"] for e in purges)
    assert any(e["target"] == f"batch {batch}" for e in purges)
    assert all("purger" in e["actor"] for e in purges[:3])


def test_audit_log_says_who_changed_keys_and_nodes(gw, admin):
    made = admin.post("/api/v1/keys", json={"name": f"audited-{time.monotonic_ns()}", "daily_quota": 5})
    assert made.status_code == 201
    secret = remember_secret(made.json()["key"])
    key_id = made.json()["info"]["id"]
    admin.delete(f"/api/v1/keys/{key_id}")
    node = f"extra{time.monotonic_ns() % 10**6}"
    assert admin.post("/api/v1/nodes", json={"name": node, "url": "http://127.0.0.1:9", "tasks": ["t2v"]}).status_code == 201
    assert admin.post(f"/api/v1/nodes/{node}/drain").status_code == 200
    assert admin.delete(f"/api/v1/nodes/{node}").status_code == 204
    entries = admin.get("/api/v1/audit?limit=20").json()["entries"]
    actions = {(e["action"], e["target"]) for e in entries}
    for expected in [("key.create", key_id), ("key.revoke", key_id), ("node.add", node),
                     ("node.drain", node), ("node.remove", node)]:
        assert expected in actions, (expected, entries)
    assert all(e["actor"].startswith("admin (X2V_ADMIN_KEY)") for e in entries if e["target"] in (key_id, node))
    text = str(entries)
    assert secret not in text and ADMIN_KEY not in text
    log = gw.log()
    assert f"key.create {key_id}" in log and f"node.remove {node}" in log


# -- bootstrap and the CLI -----------------------------------------------------------------------


def test_first_start_without_a_key_makes_one_and_keeps_everything_closed(tmp_path):
    gateway = GatewayProcess(tmp_path / "data", X2V_ADMIN_KEY="").start()
    try:
        key_file = gateway.data_dir / "first-admin-key"
        key = remember_secret(key_file.read_text().strip())
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert str(key_file) in gateway.log() and key not in gateway.log()
        with gateway.client(key=None) as anonymous:
            assert anonymous.get("/api/v1/jobs").status_code == 401
        with gateway.client(key=key) as client:
            assert client.get("/api/v1/me").json()["admin"] is True
        gateway.restart()  # a key exists now: no second one
        with gateway.client(key=key) as client:
            assert len(client.get("/api/v1/keys").json()) == 1
    finally:
        gateway.stop()


def test_changing_x2v_admin_key_retires_the_old_one(tmp_path):
    old, new = remember_secret("old-admin-key-" + "o" * 20), remember_secret("new-admin-key-" + "n" * 20)
    gateway = GatewayProcess(tmp_path / "data", X2V_ADMIN_KEY=old).start()
    try:
        with gateway.client(key=old) as client:
            assert client.get("/api/v1/jobs").status_code == 200
        gateway.stop()
        gateway.env["X2V_ADMIN_KEY"] = new
        gateway.start()
        with gateway.client(key=old) as client:
            assert client.get("/api/v1/jobs").status_code == 401
        with gateway.client(key=new) as client:
            assert client.get("/api/v1/jobs").status_code == 200
    finally:
        gateway.stop()


def test_a_short_admin_key_stops_start_up(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "x2v_gateway.cli", "serve", "--env-file", "/nonexistent"],
        env={"PATH": os.environ["PATH"], "X2V_DATA_DIR": str(tmp_path), "X2V_ADMIN_KEY": "hunter2"},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "X2V_ADMIN_KEY must be at least 24 characters" in result.stderr and "hunter2" not in result.stderr


def cli(gateway: GatewayProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "x2v_gateway.cli", "keys", *args, "--env-file", "/nonexistent"],
        env={"PATH": os.environ["PATH"], "X2V_DATA_DIR": str(gateway.data_dir),
             # The gateway's store, wherever it is (pytest --store=postgresql: a database), and
             # the gateway's code (PYTHONPATH, when a checkout's sources are tested).
             **{k: v for k, v in gateway.env.items() if k in ("X2V_DATABASE_URL", "PYTHONPATH")}},
        capture_output=True, text=True, timeout=60,
    )


def test_cli_creates_lists_and_revokes_keys_of_a_running_gateway(gw):
    made = cli(gw, "create", "--name", "cli-made", "--daily-quota", "7", "--max-concurrent", "2", "--rate", "2/s")
    assert made.returncode == 0, made.stderr
    key = remember_secret(made.stdout.strip())  # the key alone on stdout, for scripts
    assert key.startswith("x2v_") and key not in made.stderr
    with gw.client(key=key) as client:
        me = client.get("/api/v1/me").json()
        assert (me["name"], me["daily_quota"], me["max_concurrent"], me["rate_per_min"]) == ("cli-made", 7, 2, 120.0)
        listed = cli(gw, "list")
        assert "cli-made" in listed.stdout and key not in listed.stdout and key[:12] in listed.stdout
        assert cli(gw, "create", "--name", "cli-made").returncode == 1  # names are unique
        assert cli(gw, "create", "--name", "x", "--rate", "fast").returncode == 2
        revoked = cli(gw, "revoke", "cli-made")
        assert revoked.returncode == 0, revoked.stderr
        # The gateway trusts a key it looked up for CALLER_CACHE_SECONDS; the CLI is another process.
        time.sleep(CALLER_CACHE_SECONDS)
        assert client.get("/api/v1/me").status_code == 401
    with gw.client() as admin:
        entries = admin.get("/api/v1/audit?limit=20").json()["entries"]
    assert {("key.create", me["id"]), ("key.revoke", me["id"])} <= {(e["action"], e["target"]) for e in entries}
    assert any(e["actor"].startswith("cli") for e in entries if e["target"] == me["id"])
