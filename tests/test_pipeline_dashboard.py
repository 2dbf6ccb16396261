"""Pipelines in the dashboard, in a real browser: one built in the form and followed live to its
video; a failed step retried and a pipeline cancelled from its page."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

import loopback
from gateway_proc import GatewayProcess
from test_dashboard import ADMIN_KEY, CHROMIUM, browser, sign_in  # noqa: F401 (browser: a fixture)

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (./dev test installs it)")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> GatewayProcess:
    root = tmp_path_factory.mktemp("pipeline-dashboard")
    gw = GatewayProcess(root / "data", X2V_DEMO_JOB_SECONDS="0.5", X2V_ADMIN_KEY=ADMIN_KEY).start()
    yield gw
    gw.stop()


def test_a_pipeline_made_in_the_form_runs_live_to_its_video(browser, gateway, media):  # noqa: F811
    context = sign_in(browser, gateway)
    page = context.new_page()
    page.goto(gateway.url + "/ui/pipelines")
    # A scene without its seconds: the form says so and keeps what was typed.
    page.get_by_label("Scene 1 prompt").fill("a title card")
    page.get_by_role("button", name="Make the video").click()
    assert "duration is required" in page.locator("#pipeline-error").inner_text()
    assert page.get_by_label("Scene 1 prompt").input_value() == "a title card"

    page.get_by_label("Scene 1 seconds").fill("1")
    page.get_by_label("Scene 2 task").select_option("i2v")
    page.get_by_label("Scene 2 prompt").fill("a face")
    page.get_by_label("Scene 2 seconds").fill("1")
    page.get_by_label("Scene 2 image", exact=True).set_input_files(str(media["face"]))
    page.get_by_label("Scene 3 task").select_option("i2v")
    page.get_by_label("Scene 3 prompt").fill("the face goes on")
    page.get_by_label("Scene 3 seconds").fill("1.5")
    page.get_by_label("Scene 3 starts from the last frame of the scene before").check()
    # That frame made over first (an i2i step between the two clips).
    page.get_by_label("Scene 3: its image made over from this prompt").fill("as a watercolour")
    page.get_by_label("Size").fill("320x180")
    page.get_by_role("button", name="Make the video").click()
    page.wait_for_url("**/ui/pipelines/p*")
    assert page.locator("#pipeline-steps tbody tr").count() == 4
    # The page follows the steps by itself, to the joined video.
    page.locator("#pipeline-state", has_text="succeeded").wait_for(timeout=60_000)
    assert "4 of 4 steps done" in page.locator("#pipeline-live").inner_text()
    assert "3.5 s · 56 frames · 320×180" in page.locator("#pipeline-live").inner_text()
    with page.expect_download() as download:
        page.get_by_role("link", name="Download the video").click()
    assert download.value.suggested_filename.endswith(".mp4")
    assert page.locator("#step-2").inner_text().count("last frame") == 1
    assert "i2i" in page.locator("#step-2").inner_text()
    page.goto(gateway.url + "/ui/pipelines")
    assert page.locator("text=4 of 4").count() == 1
    context.close()


def test_a_failed_step_is_retried_and_a_pipeline_cancelled_from_its_page(browser, gateway, media):  # noqa: F811
    context = sign_in(browser, gateway)
    page = context.new_page()
    with loopback.client(base_url=gateway.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30) as api:
        doc = {"scenes": [{"task": "t2v", "prompt": "one", "duration": 1}, {"task": "t2v", "prompt": "two", "duration": 1}]}
        pipeline = api.post("/api/v1/pipelines", json=doc).json()
        page.goto(f"{gateway.url}/ui/pipelines/{pipeline['id']}")
        job_id = None
        while job_id is None:
            job_id = api.get(f"/api/v1/pipelines/{pipeline['id']}").json()["steps"][1]["job_id"]
        api.delete(f"/api/v1/jobs/{job_id}")
        # The page hears of the failed step by itself, and offers to retry it alone.
        page.locator("#pipeline-state", has_text="failed").wait_for(timeout=30_000)
        page.locator("#step-1").get_by_role("button", name="Retry this step").click()
        page.locator("#pipeline-state", has_text="succeeded").wait_for(timeout=30_000)
        assert api.get(f"/api/v1/jobs/{job_id}").json()["run"] == 1

        slow = {"scenes": [{"task": "i2v", "prompt": "a", "image": _b64(media["face"]), "duration": 1},
                           {"task": "i2v", "prompt": "b", "first_frame": "previous", "duration": 1}]}
        pipeline = api.post("/api/v1/pipelines", json=slow).json()
        page.goto(f"{gateway.url}/ui/pipelines/{pipeline['id']}")
        page.get_by_role("button", name="Cancel this pipeline").click()
        page.locator("#pipeline-state", has_text="cancelled").wait_for(timeout=10_000)
        assert api.get(f"/api/v1/pipelines/{pipeline['id']}").json()["state"] == "cancelled"
    context.close()


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()
