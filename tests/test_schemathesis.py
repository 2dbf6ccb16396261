"""Requests generated from the gateway's own OpenAPI schema, sent with a valid key: whatever they
hold, the gateway answers with a 2xx or a 4xx, never a 5xx."""

from __future__ import annotations

import tempfile

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error

from gateway_proc import ADMIN_KEY, GatewayProcess


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


# Node creation is left out: generated URLs would make the gateway resolve and call random
# host names for the rest of the run. Its validation is tested with chosen bad values.
schema = schemathesis.openapi.from_dict(_openapi_document()).exclude(method="POST", path="/api/v1/nodes")


@schema.parametrize()
@settings(
    max_examples=25, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_no_generated_request_gets_a_server_error(case, fuzzed):
    response = case.call(
        base_url=fuzzed.url, headers={"Authorization": f"Bearer {fuzzed.admin_key}"}, timeout=30,
    )
    # Kept for tests/test_secrets.py, like every body the other tests read (a new key's own
    # answer excepted: it holds that key by design).
    if not (case.method == "POST" and case.path == "/api/v1/keys"):
        with fuzzed.responses_path.open("ab") as out:
            out.write(f"\n=== {case.method} {case.formatted_path} -> {response.status_code}\n".encode())
            out.write(response.content[: 1024 * 1024])
    case.validate_response(response, checks=[not_a_server_error])
