"""A pipeline's webhook through a real receiver, verified by `standardwebhooks`: how each
pipeline ended, signed with its key's secret, its key's default, a failure, and a delivery
pending through a gateway SIGKILL."""

from __future__ import annotations

import time

import pytest

from gateway_proc import GatewayProcess, running, until
from test_webhooks import HOOK_SETTINGS, Receiver, make_key, verify


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.stop()


def wait_state(api, pipeline_id: str, state: str) -> dict:
    return until(lambda: (p := api.get(f"/api/v1/pipelines/{pipeline_id}").json())["state"] == state and p,
                 timeout=60, what=f"pipeline {state}")


def test_pipeline_ends_arrive_signed_and_survive_a_gateway_sigkill(tmp_path, receiver):
    gw = GatewayProcess(tmp_path / "data", **{**HOOK_SETTINGS, "X2V_WEBHOOK_FIRST_RETRY": "0.5"}).start()
    try:
        key, secret = make_key(gw, "pipes-hooks")
        two = {"scenes": [{"task": "t2v", "prompt": f"scene {i}", "duration": 1} for i in range(2)]}
        with gw.client(key=key) as api:
            made = api.post("/api/v1/pipelines", json={**two, "webhook_url": receiver.url("/pipe")})
            assert made.status_code == 201, made.text
            pipeline = wait_state(api, made.json()["id"], "succeeded")
            (got,) = receiver.wait("/pipe", 1)
            message = verify(secret, got)
            assert message["type"] == "pipeline.succeeded"
            assert message["data"]["id"] == pipeline["id"] and message["data"]["state"] == "succeeded"
            assert message["data"]["result"]["url"] == f"/api/v1/pipelines/{pipeline['id']}/video"
            assert [s["state"] for s in message["data"]["steps"]] == ["succeeded", "succeeded"]
            shown = until(lambda: (d := api.get(f"/api/v1/pipelines/{pipeline['id']}/webhooks").json())
                          ["deliveries"][0]["delivered_at"] and d, what="delivery shown")
            assert shown["webhook"] == {"url": receiver.url("/pipe"), "events": [
                "pipeline.succeeded", "pipeline.failed", "pipeline.cancelled"]}
            assert [(d["id"], d["type"], d["attempts"]) for d in shown["deliveries"]] == [
                (got["headers"]["webhook-id"], "pipeline.succeeded", 1)]

            # A failed step fails the pipeline: the filter names failed only.
            made = api.post("/api/v1/pipelines", json={
                **two, "webhook_url": receiver.url("/pipe-failed"), "webhook_events": ["pipeline.failed"],
            }).json()
            step = until(lambda: api.get(f"/api/v1/pipelines/{made['id']}").json()["steps"][1]["job_id"])
            api.delete(f"/api/v1/jobs/{step}")
            (got,) = receiver.wait("/pipe-failed", 1)
            failed = verify(secret, got)
            assert failed["type"] == "pipeline.failed" and failed["data"]["error"].startswith("steps[1]")
            api.delete(f"/api/v1/pipelines/{made['id']}")  # cancelled: not in its filter

            refused = api.post("/api/v1/pipelines", json={**two, "webhook_url": "x", "webhook_events": ["succeeded"]})
            assert refused.status_code == 422 and refused.json()["error"]["field"] == "webhook_events[0]"

        # The key's default webhook, for a pipeline that names none: its end, while the receiver
        # is down, is still owed after a SIGKILL, and made once it is back, with the same id.
        receiver.plans["/default"] = [500] * 1000
        key, secret = make_key(gw, "pipes-default", webhook_url=receiver.url("/default"))
        with gw.client(key=key) as api:
            made = api.post("/api/v1/pipelines", json=two).json()
            api.delete(f"/api/v1/pipelines/{made['id']}")
            before = receiver.wait("/default", 2)
        helpers = gw.helpers()
        assert len(helpers) >= 2  # a media checker, and the media worker that joined the clips
        gw.kill()
        # Killed, the gateway leaves no helper behind: each ends with it.
        until(lambda: not any(running(pid) for pid in helpers), timeout=10, what="the helpers ended")
        receiver.plans["/default"] = []
        gw.start()
        got = receiver.wait("/default", len(before) + 1)
        assert {r["headers"]["webhook-id"] for r in got} == {before[0]["headers"]["webhook-id"]}
        cancelled = verify(secret, got[-1])
        assert cancelled["type"] == "pipeline.cancelled" and cancelled["data"]["id"] == made["id"]
        time.sleep(1.0)  # nothing more: the steps' own jobs send no messages of their own
        assert len(receiver.at("/pipe")) == 1 and len(receiver.at("/pipe-failed")) == 1
        assert len(receiver.at("/default")) == len(before) + 1
    finally:
        gw.stop()
