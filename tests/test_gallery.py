"""Results people can see, in a real browser (chromium through Playwright, as tests/test_dashboard.py
drives it) against a real gateway process and its demo node: posters in the jobs list and the
batch table, the video playing over its poster on hover or click, prompts instead of ids, dates
on times, and a batch as a gallery that fills in live. Screenshots for the README on the way."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from PIL import Image

from gateway_proc import GatewayProcess, wait_for
from media import make_wav
from test_dashboard import ADMIN_KEY, CHROMIUM, LAPTOP, api, browser, shot, sign_in  # noqa: F401 (fixture)

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (./dev test installs it)")

LONG_PROMPT = (
    "A lighthouse keeper in a yellow raincoat explains, slowly and with a smile, how the lamp was"
    " lit by hand every evening before the island had electricity"
)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> GatewayProcess:
    root = tmp_path_factory.mktemp("gallery")
    gw = GatewayProcess(root / "data", X2V_DEMO_JOB_SECONDS="0.5", X2V_ADMIN_KEY=ADMIN_KEY).start()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def portraits(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("portraits")
    found = {"voice": make_wav(root / "voice.wav", seconds=1.2)}
    for name, color in (("sea", (40, 110, 170)), ("sand", (200, 170, 90)), ("moss", (90, 140, 70)),
                        ("rust", (170, 80, 50))):
        image = Image.new("RGB", (360, 480), color)
        image.paste((235, 210, 180), (120, 110, 240, 250))  # a face, of sorts
        image.save(root / f"{name}.png")
        found[name] = root / f"{name}.png"
    return found


@pytest.fixture
def page(browser, gateway):  # noqa: F811 (the browser fixture)
    context = sign_in(browser, gateway)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    with gateway.responses_path.open("a", encoding="utf-8") as seen:
        for shown in context.pages:
            seen.write(shown.content())
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def submit(gateway: GatewayProcess, portraits, batch_id: str, prompt: str, image: str) -> str:
    with api(gateway) as client:
        response = client.post(
            "/api/v1/jobs", data={"task": "s2v", "prompt": prompt, "batch_id": batch_id},
            files={"image": portraits[image].open("rb"), "audio": portraits["voice"].open("rb")},
        )
        assert response.status_code == 201, response.text
        return response.json()["id"]


def finished(gateway: GatewayProcess, ids: list[str]) -> None:
    with api(gateway) as client:
        for job_id in ids:
            assert wait_for(client, job_id, {"succeeded"})["state"] == "succeeded"


def poster_loaded(page, selector: str) -> None:
    page.wait_for_function(
        "sel => { const img = document.querySelector(sel); return img && img.complete && img.naturalWidth > 0; }",
        arg=selector, timeout=15_000,
    )


def test_jobs_list_shows_posters_prompts_and_dated_times(gateway, page, portraits):
    batch = f"lighthouse-{time.monotonic_ns()}"
    ids = [submit(gateway, portraits, batch, LONG_PROMPT, "sea"), submit(gateway, portraits, batch, "The harbour at noon", "sand")]
    finished(gateway, ids)
    page.goto(gateway.url + "/ui/jobs")
    row = page.locator(f"#job-{ids[0]}")
    # The prompt names the job, cut short, whole on hover; the id is not what the row shows.
    link = row.locator("a.prompt")
    expect(link).to_have_attribute("title", LONG_PROMPT)
    assert link.inner_text().endswith("...") and len(link.inner_text()) < len(LONG_PROMPT)
    assert ids[0] not in row.inner_text()
    expect(page.locator(f"#job-{ids[1]} a.prompt")).to_have_text("The harbour at noon")
    # The poster is the video's first frame: the blue portrait, not a blank.
    poster_loaded(page, f"#job-{ids[0]} .poster img")
    colour = page.evaluate("""sel => {
        const img = document.querySelector(sel), canvas = document.createElement('canvas');
        canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
        const ctx = canvas.getContext('2d'); ctx.drawImage(img, 0, 0);
        return Array.from(ctx.getImageData(4, 4, 1, 1).data.slice(0, 3));
    }""", f"#job-{ids[0]} .poster img")
    assert colour[2] > 130 and colour[0] < 90, colour
    # Times carry their date (today's too): the year is there.
    assert time.strftime("%Y") in row.locator("time").first.inner_text()


def test_hovering_a_poster_plays_its_video_muted_and_a_click_keeps_it_playing(gateway, page, portraits):
    batch = f"hover-{time.monotonic_ns()}"
    job_id = submit(gateway, portraits, batch, "A wave rolls in", "moss")
    finished(gateway, [job_id])
    page.goto(gateway.url + f"/ui/batches/{batch}")
    poster = page.locator(f"#job-{job_id} .poster")
    poster_loaded(page, f"#job-{job_id} .poster img")
    poster.hover()
    video = poster.locator("video")
    expect(video).to_have_count(1)
    page.wait_for_function(
        "sel => { const v = document.querySelector(sel); return v && v.muted && !v.paused && v.currentTime > 0; }",
        arg=f"#job-{job_id} .poster video", timeout=15_000,
    )
    page.mouse.move(5, 5)  # away: the poster again
    expect(video).to_have_count(0)
    poster.click()
    page.mouse.move(5, 5)
    expect(video).to_have_count(1)  # clicked: it keeps playing without the pointer on it
    poster.click()
    expect(video).to_have_count(0)


def test_a_batch_as_a_gallery_fills_in_live(gateway, page, portraits):
    batch = "coastal-portraits"  # its name heads the page (and the README screenshot)
    prompts = {
        "sea": "The keeper climbs the spiral stairs", "sand": "Gulls over the dunes at dawn",
        "moss": "Moss on the old stone wall", "rust": "A rusty boat hauled onto the shingle",
    }
    first = [submit(gateway, portraits, batch, prompts[name], name) for name in ("sea", "sand", "moss")]
    finished(gateway, first)
    page.set_viewport_size(LAPTOP)
    page.goto(gateway.url + f"/ui/batches/{batch}")
    page.get_by_role("link", name="Gallery").click()
    page.wait_for_url(f"**/ui/batches/{batch}?view=gallery")
    expect(page.get_by_role("link", name="Gallery")).to_have_attribute("aria-current", "page")
    tiles = page.locator("#gallery .tile")
    expect(tiles).to_have_count(3)
    for n, job_id in enumerate(first):
        poster_loaded(page, f"#job-{job_id} .poster img")
        expect(page.locator(f"#job-{job_id} figcaption")).to_contain_text(list(prompts.values())[n])
    # A job added to the batch appears, and its poster once its video is done, without a reload.
    expect(page.locator("#live")).to_have_text("Live")
    added = submit(gateway, portraits, batch, prompts["rust"], "rust")
    expect(tiles).to_have_count(4, timeout=15_000)
    expect(page.locator(f"#job-{added}")).to_have_attribute("data-state", "succeeded", timeout=20_000)
    poster_loaded(page, f"#job-{added} .poster img")
    for job_id in first + [added]:
        poster_loaded(page, f"#job-{job_id} .poster img")
    shot(page, "gallery")
    page.get_by_role("link", name="Table").click()
    expect(page.locator("#batch-rows tr")).to_have_count(4)
    for job_id in first + [added]:
        poster_loaded(page, f"#job-{job_id} .poster img")
    page.goto(gateway.url + "/ui/jobs")
    for job_id in first + [added]:
        poster_loaded(page, f"#job-{job_id} .poster img")
    shot(page, "jobs-posters", full_page=False)
