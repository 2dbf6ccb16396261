"""A pipeline built in the dashboard's form, in a real browser, followed live to its video."""

from __future__ import annotations

from pathlib import Path

import pytest

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
    page.get_by_label("Size").fill("320x180")
    page.get_by_role("button", name="Make the video").click()
    page.wait_for_url("**/ui/pipelines/p*")
    assert page.locator("#pipeline-steps tbody tr").count() == 3
    # The page follows the steps by itself, to the joined video.
    page.locator("#pipeline-state", has_text="succeeded").wait_for(timeout=60_000)
    assert "3 of 3 steps done" in page.locator("#pipeline-live").inner_text()
    assert "3.5 s · 56 frames · 320×180" in page.locator("#pipeline-live").inner_text()
    with page.expect_download() as download:
        page.get_by_role("link", name="Download the video").click()
    assert download.value.suggested_filename.endswith(".mp4")
    assert page.locator("#step-2").inner_text().count("last frame") == 1
    page.goto(gateway.url + "/ui/pipelines")
    assert page.locator("text=3 of 3").count() == 1
    context.close()
