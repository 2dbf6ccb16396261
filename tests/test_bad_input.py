"""Bad input gets a clear 4xx naming what is wrong, never a 500: integers past what SQLite holds,
headers a client writes, empty prompts, msgspec's terse messages, text that is not UTF-8.

In-process (Litestar's TestClient on a real SQLite file under tmp_path, with the built-in demo
node serving from a thread): these are answers to single requests, no restart involved.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from typing import Any

import pytest
from litestar import Litestar
from litestar.params import QueryParameter
from litestar.testing import TestClient

from gateway_proc import ADMIN_KEY
from media import make_png

HUGE = 2**63  # one past SQLite's largest integer
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> Iterator[Litestar]:
    from x2v_gateway.app import create_app
    from x2v_gateway.settings import load_settings

    data_dir = tmp_path_factory.mktemp("bad-input") / "data"
    settings = load_settings(
        {"X2V_DATA_DIR": str(data_dir), "X2V_ADMIN_KEY": ADMIN_KEY, "X2V_DEMO_JOB_SECONDS": "0.2"},
        env_file=None,
    )
    yield create_app(settings)


@pytest.fixture(scope="module")
def browser(app) -> Iterator[TestClient]:
    """A client with no key: what a browser sends, cookies and all."""
    with TestClient(app, timeout=30) as client:
        yield client


class _KeyClient:
    """`browser`'s requests with the admin key in `Authorization`."""

    def __init__(self, client: TestClient) -> None:
        self._client = client

    def request(self, method: str, url: str, *, headers: dict | None = None, **kwargs: Any) -> Any:
        return self._client.request(method, url, headers={**AUTH, **(headers or {})}, **kwargs)

    def get(self, url: str, **kwargs: Any) -> Any:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> Any:
        return self.request("POST", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> Any:
        return self.request("DELETE", url, **kwargs)


@pytest.fixture(scope="module")
def client(browser) -> _KeyClient:
    return _KeyClient(browser)


@pytest.fixture(scope="module")
def batch_job(client) -> dict[str, Any]:
    """A job in batch `b-ints`, so that batch pages get past their 404 to the paging."""
    response = client.post("/api/v1/jobs", json={"task": "t2v", "prompt": "a cat", "batch_id": "b-ints"})
    assert response.status_code == 201, response.text
    return response.json()


def _signed_in(browser: TestClient) -> str:
    """Sign `browser` in to the dashboard as a person does; returns the page's CSRF token."""
    browser.cookies.clear()
    form = browser.get("/ui/sign-in")
    token = re.search(r'name="_sign_in_token" value="([^"]+)"', form.text).group(1)
    signed_in = browser.post(
        "/ui/sign-in", data={"_sign_in_token": token, "key": ADMIN_KEY, "next": "/ui/"},
        follow_redirects=False,
    )
    assert signed_in.status_code == 303, signed_in.text
    page = browser.get("/ui/jobs")
    return re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)


# -- 1. integers that reach the store ---------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "name"),
    [
        (f"/api/v1/jobs?cursor={_cursor(HUGE)}", "cursor"),
        (f"/api/v1/jobs?cursor={_cursor(10**30)}", "cursor"),
        (f"/api/v1/jobs?cursor={_cursor(-HUGE - 1)}", "cursor"),
        (f"/api/v1/jobs?cursor={_cursor(-1)}", "cursor"),  # a seq is never negative
        (f"/api/v1/jobs?limit={HUGE}", "limit"),
        (f"/api/v1/audit?before={HUGE}", "before"),
        (f"/api/v1/audit?limit={HUGE}", "limit"),
        (f"/ui/jobs?before={HUGE}", "before"),
        (f"/ui/batches/b-ints?after={HUGE}", "after"),
        (f"/ui/batches/b-ints/rows?after={HUGE}", "after"),
    ],
)
def test_integers_past_sqlite_range_get_a_400_naming_the_parameter(client, batch_job, url, name):
    response = client.get(url)
    assert response.status_code == 400, response.text
    if url.startswith("/api/"):
        assert response.json()["error"]["field"] == name
    else:
        assert name in response.text


def _int_query_params(app: Litestar) -> Iterator[tuple[str, str, str]]:
    """(method, path, name) of every integer query parameter of every route, read from the app."""
    for route in app.routes:
        for handler in getattr(route, "route_handlers", ()):
            for field in handler.parsed_fn_signature.parameters.values():
                if not isinstance(field.kwarg_definition, QueryParameter):
                    continue
                if field.annotation is int or int in (t.annotation for t in field.inner_types):
                    for method in handler.http_methods:
                        yield method, route.path, field.kwarg_definition.name or field.name


def test_every_integer_query_parameter_of_every_route_is_range_checked(app, client, batch_job):
    # The class, not the instances: a route added later with an int parameter is covered.
    found = sorted(set(_int_query_params(app)))
    assert ("GET", "/api/v1/jobs", "limit") in found and ("GET", "/ui/jobs", "before") in found, found
    for method, path, name in found:
        url = re.sub(r"\{(\w+):\w+\}", lambda m: {"batch_id": "b-ints"}.get(m.group(1), batch_job["id"]), path)
        for value in (HUGE, -HUGE - 1):
            response = client.request(method, url, params={name: str(value)})
            assert 400 <= response.status_code < 500, (method, url, name, value, response.text[:300])


# -- 2. headers a client writes -----------------------------------------------------------------


@pytest.mark.parametrize("current_url", ["http://[::1", "http://[zz]/ui/jobs", "http://a:99999999/", "::::"])
def test_malformed_hx_current_url_without_credentials_sends_htmx_to_sign_in(browser, current_url):
    browser.cookies.clear()
    response = browser.get("/ui/jobs", headers={"HX-Request": "true", "HX-Current-URL": current_url})
    assert response.status_code == 401, response.text
    assert response.headers["hx-redirect"].startswith("/ui/sign-in?next=")


def test_a_csrf_token_with_non_ascii_characters_is_a_wrong_token_not_a_crash(browser, batch_job):
    _signed_in(browser)
    try:
        for token in ("\u00ff\u00fe", "tok\u00e9n"):
            header = browser.post(f"/ui/jobs/{batch_job['id']}/cancel", headers={"X-CSRFToken": token.encode("latin-1")})
            assert header.status_code == 403, header.text
            form = browser.post("/ui/sign-out", data={"_csrf_token": token}, follow_redirects=False)
            assert form.status_code == 403, form.text
    finally:
        browser.cookies.clear()


def test_a_sign_in_token_with_non_ascii_characters_is_an_expired_form_not_a_crash(browser):
    browser.cookies.clear()
    browser.cookies.set("x2v_sign_in", "abc")
    try:
        response = browser.post("/ui/sign-in", data={"_sign_in_token": "\u00e9t\u00e9", "key": ADMIN_KEY})
        assert response.status_code == 403 and "expired" in response.text
    finally:
        browser.cookies.clear()


@pytest.mark.parametrize("length", ["99999999999999999999999", "9" * 5000])
def test_a_declared_body_larger_than_allowed_is_413_before_anything(client, length):
    # Not 507 "short of disk space": the body is too large whatever the disk holds.
    for content_type in ("application/json", "multipart/form-data; boundary=x", "application/x-www-form-urlencoded"):
        response = client.post(
            "/api/v1/jobs", content=b"{}", headers={"Content-Type": content_type, "Content-Length": length},
        )
        assert response.status_code == 413, (content_type, response.text)
    upload = client.post("/ui/uploads", content=b"x", headers={
        "Content-Type": "multipart/form-data; boundary=x", "Content-Length": length})
    assert upload.status_code == 413, upload.text


def test_a_range_header_of_any_size_is_served_or_ignored(client):
    job = client.post("/api/v1/jobs?wait=30", json={"task": "t2v", "prompt": "a range"}).json()
    assert job["state"] == "succeeded", job
    video = f"/api/v1/jobs/{job['id']}/video"
    whole = client.get(video).content
    assert client.get(video, headers={"Range": "bytes=0-9"}).content == whole[:10]
    for header in ("bytes=" + "9" * 5000 + "-", "bytes=-" + "9" * 40, "bytes=\u00b2-"):
        response = client.get(video, headers={"Range": header.encode("latin-1")})
        assert response.status_code in (200, 416), (header[:20], response.text[:200])
        if response.status_code == 200:
            assert response.content == whole


# -- 3. the prompt a task needs ------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [None, "", "   ", "\n\t"])
def test_t2v_without_a_prompt_is_refused_in_every_encoding(client, prompt):
    fields = {"task": "t2v"} | ({} if prompt is None else {"prompt": prompt})
    answers = {
        "json": client.post("/api/v1/jobs", json=fields),
        "form": client.post("/api/v1/jobs", data=fields),
        "multipart": client.post("/api/v1/jobs", content=_multipart(fields), headers=_MULTIPART),
    }
    for how, response in answers.items():
        assert response.status_code == 422, (how, response.text)
        error = response.json()["error"]
        assert error["field"] == "prompt" and "t2v" in error["message"], (how, error)


_MULTIPART = {"Content-Type": "multipart/form-data; boundary=B"}


def _multipart(fields: dict[str, str | bytes]) -> bytes:
    """A multipart form of text fields, each value as given (bytes: not necessarily UTF-8)."""
    body = b""
    for name, value in fields.items():
        body += f'--B\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        body += (value if isinstance(value, bytes) else value.encode()) + b"\r\n"
    return body + b"--B--\r\n"


def test_a_task_that_needs_no_prompt_still_runs_without_one_on_a_node(client, tmp_path):
    image = make_png(tmp_path / "face.png").read_bytes()
    response = client.post("/api/v1/jobs", data={"task": "i2v"}, files={"image": ("face.png", image, "image/png")})
    assert response.status_code == 201, response.text


def test_retrying_a_t2v_job_with_its_prompt_emptied_is_refused(client, batch_job):
    job = client.delete(f"/api/v1/jobs/{batch_job['id']}").json()  # finished: it may be retried
    assert job["state"] in ("cancelled", "succeeded")
    response = client.post(
        f"/ui/jobs/{batch_job['id']}/retry", data={"prompt": "  ", "seed": "7"}, headers={"HX-Request": "true"},
    )
    assert response.status_code == 422, response.text
    assert "prompt is required" in response.text


def test_a_batch_of_t2v_jobs_without_a_prompt_is_refused_in_its_preview(client):
    response = client.post(
        "/ui/batches/preview", data={"task": "t2v", "mode": "grid", "prompt": " ", "seeds": "1,2"},
        headers={"HX-Request": "true"},
    )
    assert response.status_code == 422, response.text
    assert "Prompt: required" in response.text


# -- 4. messages that say the rule ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"task": "v2v"}, "task", ["task", "s2v", "i2v", "t2v", "flf2v"]),
        ({"prompt": "no task"}, "task", ["task", "required", "t2v"]),
        ({"task": "t2v", "prompt": "p", "infer_steps": 500}, "infer_steps", ["infer_steps", "1 to 200"]),
        ({"task": "t2v", "prompt": "p", "seed": -1}, "seed", ["seed", "0 to 4294967295"]),
        ({"task": "t2v", "prompt": "p", "priority": "high"}, "priority", ["priority", "-100 to 100"]),
        ({"task": "t2v", "prompt": "p", "resize_mode": "zz"}, "resize_mode", ["resize_mode", "adaptive", "fixed_shape"]),
        ({"task": "t2v", "prompt": "p", "target_shape": [8, 8]}, "target_shape", ["target_shape", "16 to 8192"]),
        ({"task": "t2v", "prompt": "p", "use_prompt_enhancer": 3}, "use_prompt_enhancer", ["true or false"]),
        ({"task": "t2v", "prompt": "p", "colour": "red"}, "colour", ["colour", "prompt", "seed"]),
    ],
)
def test_validation_messages_name_the_field_and_say_the_rule(client, body, field, says):
    response = client.post("/api/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field
    assert all(word in error["message"] for word in says), error["message"]
    assert "$." not in error["message"] and "Expected" not in error["message"]


def test_query_parameter_messages_read_like_the_others(client):
    error = client.get("/api/v1/jobs?limit=501").json()["error"]
    assert error == {"status": 400, "message": "limit must be a whole number ≤ 500", "field": "limit"}


def test_an_unknown_file_field_and_an_unknown_text_field_get_the_same_status(client):
    text = client.post("/api/v1/jobs", data={"task": "t2v", "prompt": "p", "colour": "red"})
    file = client.post("/api/v1/jobs", data={"task": "t2v", "prompt": "p"}, files={"sketch": ("s.png", b"xx")})
    form = client.post("/api/v1/jobs", content=b"task=t2v&prompt=p&colour=red",
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert text.status_code == file.status_code == form.status_code == 422, (text.text, file.text)
    assert text.json()["error"]["field"] == form.json()["error"]["field"] == "colour"
    assert file.json()["error"]["field"] == "sketch" and "image" in file.json()["error"]["message"]


# -- 5. text that is not UTF-8 -------------------------------------------------------------------


def test_text_that_is_not_utf8_is_refused_naming_the_field_in_every_encoding(client):
    answers = {
        "urlencoded": client.post(
            "/api/v1/jobs", content=b"task=t2v&prompt=%ff%fe",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ),
        "urlencoded raw bytes": client.post(
            "/api/v1/jobs", content=b"task=t2v&prompt=\xff\xfe",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ),
        "multipart": client.post(
            "/api/v1/jobs", content=_multipart({"task": "t2v", "prompt": b"\xff\xfe"}), headers=_MULTIPART,
        ),
        "json": client.post(
            "/api/v1/jobs", content=b'{"task": "t2v", "prompt": "\xff\xfe"}',
            headers={"Content-Type": "application/json"},
        ),
    }
    for how, response in answers.items():
        assert response.status_code == 400, (how, response.text)
        assert response.json()["error"] == {
            "status": 400, "message": "prompt is not valid UTF-8 text", "field": "prompt",
        }, how


def test_dashboard_forms_refuse_text_that_is_not_utf8_naming_the_field(client):
    for content, content_type in (
        (b"task=t2v&mode=grid&prompt=%ff%fe", "application/x-www-form-urlencoded"),
        (_multipart({"task": "t2v", "mode": "grid", "prompt": b"\xff\xfe"}), _MULTIPART["Content-Type"]),
    ):
        response = client.post("/ui/batches/preview", content=content, headers={"Content-Type": content_type})
        assert response.status_code == 400, response.text
        assert "prompt is not valid UTF-8 text" in response.text


def test_valid_utf8_in_a_urlencoded_form_is_kept_as_sent(client):
    response = client.post(
        "/api/v1/jobs", content="task=t2v&prompt=caf%C3%A9+%E2%9C%93+ü".encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 201, response.text
    assert response.json()["params"]["prompt"] == "café ✓ ü"
