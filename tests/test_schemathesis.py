"""The gateway's OpenAPI document says what the API does: every status a route answers with, and
the body each one has (`{"error": {...}}` for every refusal). Checked three ways: the document
itself; requests generated from it, sent with a valid key (and, by schemathesis's negative cases,
without one); and chosen requests that reach what generated ones cannot (a real job, its video,
a replay, a second key). Every answer must be one the document lists, with the content type and
body it gives: schemathesis's conformance checks, not only "no 5xx"."""

from __future__ import annotations

import re
import tempfile
from urllib.parse import unquote

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway_proc import ADMIN_KEY, GatewayProcess, wait_for
from x2v_gateway.auth import access
from x2v_gateway.compat import OPENAI, surface

CHECKS = [
    not_a_server_error, status_code_conformance, content_type_conformance,
    response_schema_conformance, response_headers_conformance,
]


def _openapi_document() -> dict:
    """The schema the gateway serves at /schema/openapi.json, from the app itself, so that each
    operation is a test of its own (the requests still go to a real gateway process)."""
    from x2v_gateway.app import create_app
    from x2v_gateway.settings import load_settings

    with tempfile.TemporaryDirectory() as data_dir:
        app = create_app(load_settings({"X2V_DATA_DIR": data_dir, "X2V_ADMIN_KEY": ADMIN_KEY}, env_file=None))
        try:
            return app.openapi_schema.to_schema()
        finally:
            app.state.gateway.store.close()


DOCUMENT = _openapi_document()
schema = schemathesis.openapi.from_dict(DOCUMENT)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory) -> GatewayProcess:
    # `?wait=` is capped at 1 s, so a generated wait=600 does not hold the run for ten minutes;
    # small body limits keep generated uploads cheap.
    gateway = GatewayProcess(
        tmp_path_factory.mktemp("fuzz") / "data", X2V_MAX_WAIT="1", X2V_MAX_UPLOAD_MB="8",
        X2V_MAX_JSON_MB="8", X2V_MAX_FILE_MB="4",
    ).start()
    yield gateway
    gateway.stop()


def test_the_document_is_valid_openapi():
    schema.validate()
    assert DOCUMENT["openapi"].startswith("3.")


def _operations():
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            if method in ("get", "post", "put", "patch", "delete"):
                yield path, method.upper(), operation


def test_every_refusal_is_documented_with_the_error_body_the_api_sends():
    for path, method, operation in _operations():
        responses = operation["responses"]
        # The APIs existing clients speak refuse in their own shapes (compat.py).
        which = surface(path)
        body = {None: "ErrorResponse", OPENAI: "OpenAIError"}.get(which, "FastApiError")
        error_body = {"$ref": f"#/components/schemas/{body}"}
        for status, response in responses.items():
            if 400 <= int(status) < 500 and "content" in response:
                assert response["content"] == {"application/json": {"schema": error_body}}, (method, path, status)
        # What auth.AuthMiddleware answers before any handler runs.
        need = access(path, method, metrics_open=False)
        if need != "open":
            assert {"401", "429"} <= set(responses), (method, path)
        if need == "admin" or (need == "key" and method != "GET"):  # admins only; CSRF of sessions
            assert "403" in responses, (method, path)
        if any(p["in"] in ("path", "query", "header") for p in operation.get("parameters", [])):
            # Litestar's own validation of parameters (FastAPI's services answered it with 422).
            assert ("422" if which not in (None, OPENAI) else "400") in responses, (method, path)


def _operation_for(path: str) -> tuple[str, dict[str, str]]:
    """The document's path template that `path` is an instance of, and its parameters."""
    for template in DOCUMENT["paths"]:
        pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
        if match := re.fullmatch(pattern, path):
            return template, {name: unquote(value) for name, value in match.groupdict().items()}
    raise AssertionError(f"{path} is not in the OpenAPI document")


def _conforms(response: httpx.Response, status: int) -> httpx.Response:
    """`response` has `status`, and is what the document says its route answers with it."""
    request = response.request
    assert response.status_code == status, (request.method, str(request.url), response.text)
    template, parameters = _operation_for(request.url.path)
    case = schema[template][request.method].Case(path_parameters=parameters)
    case.validate_response(response, checks=CHECKS)
    return response


def test_chosen_requests_get_documented_answers(fuzzed):
    # Before the generated requests: they may drain the demo node or fill the audit log.
    jobs, nodes, keys = "/api/v1/jobs", "/api/v1/nodes", "/api/v1/keys"
    with fuzzed.client() as admin:
        once = {"Idempotency-Key": "schema-1"}
        body = {"task": "t2v", "prompt": "a lighthouse at dusk", "batch_id": "schema-batch"}
        created = _conforms(admin.post(jobs, json=body, headers=once), 201)
        made = created.json()
        assert created.headers["location"] == f"{jobs}/{made['id']}"  # the documented header
        replay = _conforms(admin.post(jobs, json=body, headers=once), 200)
        assert replay.headers["idempotent-replayed"] == "true"
        _conforms(admin.post(jobs, json={**body, "prompt": "another"}, headers=once), 409)
        _conforms(admin.post(jobs, content=b"task=t2v", headers={"Content-Type": "text/plain"}), 415)
        _conforms(admin.post(jobs, json={"task": "t2v", "prompt": "x", "image": "aGk="}), 422)
        too_big = b'{"task": "t2v", "prompt": "' + b"a" * (8 * 1024 * 1024) + b'"}'
        _conforms(admin.post(jobs, content=too_big, headers={"Content-Type": "application/json"}), 413)
        _conforms(admin.get(jobs, params={"cursor": "not-a-cursor"}), 400)
        _conforms(admin.get(jobs, params={"limit": 0}), 400)
        _conforms(admin.get(jobs, params={"limit": 1}), 200)

        done = wait_for(admin, made["id"], {"succeeded"})
        _conforms(admin.get(f"{jobs}/{done['id']}"), 200)
        _conforms(admin.get(f"{jobs}/{done['id']}", headers={"Prefer": "wait=1"}), 200)
        # A finished job's stream ends after its final state; asked again after it: 204.
        stream = _conforms(admin.get(f"{jobs}/{done['id']}/events"), 200)
        last = re.findall(r"^id: (\d+)", stream.text, re.MULTILINE)[-1]
        _conforms(admin.get(f"{jobs}/{done['id']}/events", headers={"Last-Event-ID": last}), 204)
        _conforms(admin.get(f"{jobs}/{done['id']}/events", headers={"Last-Event-ID": "x"}), 400)
        _conforms(admin.get(f"{jobs}/nope/events"), 404)
        _conforms(admin.get("/api/v1/batches/schema-batch/events"), 204)
        _conforms(admin.get("/api/v1/batches/nope/events"), 404)
        _conforms(admin.get(f"{jobs}/{done['id']}/poster"), 200)
        _conforms(admin.get(f"{jobs}/nope/poster"), 404)
        url = f"{jobs}/{done['id']}/video"
        _conforms(admin.get(url), 200)
        _conforms(admin.get(url, headers={"Range": "bytes=0-9"}), 206)
        _conforms(admin.get(url, headers={"Range": "bytes=999999999-"}), 416)
        _conforms(admin.post(f"{jobs}/{done['id']}/retry"), 409)
        _conforms(admin.get(f"{jobs}/nope"), 404)
        _conforms(admin.delete(f"{jobs}/{done['id']}", params={"purge": "true"}), 200)
        _conforms(admin.get(url), 410)
        _conforms(admin.get(f"{jobs}/{done['id']}/poster"), 410)
        _conforms(admin.delete("/api/v1/batches/schema-batch"), 200)
        _conforms(admin.delete("/api/v1/batches/nope"), 404)

        (demo,) = _conforms(admin.get(nodes), 200).json()
        _conforms(admin.get(f"{nodes}/{demo['name']}"), 200)
        _conforms(admin.get(f"{nodes}/nope"), 404)
        _conforms(admin.post(f"{nodes}/{demo['name']}/drain"), 200)
        _conforms(admin.post(f"{nodes}/{demo['name']}/undrain"), 200)
        _conforms(admin.post(nodes, json={"name": demo["name"], "url": demo["url"]}), 409)
        _conforms(admin.post(nodes, json={"name": "x", "url": "ftp://example.org"}), 422)
        _conforms(admin.post(nodes, json={"name": "x"}), 400)
        _conforms(admin.delete(f"{nodes}/nope"), 404)
        # Nothing listens on port 9: the node is added, found down, and removed.
        spare = {"name": "schema-spare", "url": "http://127.0.0.1:9", "tasks": ["t2v"]}
        _conforms(admin.post(nodes, json=spare), 201)
        _conforms(admin.delete(f"{nodes}/schema-spare"), 204)
        _conforms(admin.get("/api/v1/models"), 200)

        slow = _conforms(admin.post(keys, json={"name": "schema-slow", "rate_per_min": 1}), 201).json()
        _conforms(admin.post(keys, json={"name": "schema-slow"}), 409)
        _conforms(admin.post(keys, json={"name": ""}), 400)
        _conforms(admin.get(keys), 200)
        _conforms(admin.get("/api/v1/audit", params={"limit": 2}), 200)
        _conforms(admin.get("/metrics"), 200)
        _conforms(admin.get("/readyz"), 200)
        _conforms(admin.get("/healthz"), 200)

    with fuzzed.client(key=slow["key"]) as limited:
        _conforms(limited.get("/api/v1/me"), 200)
        refused = _conforms(limited.get("/api/v1/me"), 429)  # one request a minute
        assert int(refused.headers["retry-after"]) > 0
    with fuzzed.client() as admin:
        _conforms(admin.delete(f"{keys}/{slow['info']['id']}"), 200)
        _conforms(admin.delete(f"{keys}/{slow['info']['id']}"), 404)
        user = admin.post(keys, json={"name": "schema-user"}).json()
    with fuzzed.client(key=slow["key"]) as revoked:
        _conforms(revoked.get(jobs), 401)
    with fuzzed.client(key=user["key"]) as plain:
        _conforms(plain.get(keys), 403)
        _conforms(plain.get("/metrics"), 403)
        _conforms(plain.post(f"{nodes}/{demo['name']}/drain"), 403)
    with fuzzed.client(key=None) as nobody:
        _conforms(nobody.get("/metrics"), 401)


# Node creation is left out: generated URLs would make the gateway resolve and call random
# host names for the rest of the run. Its answers are checked with chosen values above. So are
# the event streams': a stream of a key's jobs never ends by itself.
generated = schema.exclude(method="POST", path="/api/v1/nodes").exclude(path_regex=r"/events$")


@generated.parametrize()
@settings(
    max_examples=25, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_every_generated_request_gets_a_documented_answer(case, fuzzed):
    response = case.call(
        base_url=fuzzed.url, headers={"Authorization": f"Bearer {fuzzed.admin_key}"}, timeout=30,
    )
    # Kept for tests/test_secrets.py, like every body the other tests read (a new key's own
    # answer excepted: it holds that key by design).
    if not (case.method == "POST" and case.path == "/api/v1/keys"):
        with fuzzed.responses_path.open("ab") as out:
            out.write(f"\n=== {case.method} {case.formatted_path} -> {response.status_code}\n".encode())
            out.write(response.content[: 1024 * 1024])
    case.validate_response(response, checks=CHECKS)
