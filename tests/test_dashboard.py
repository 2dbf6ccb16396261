"""The dashboard in a real browser (Debian's chromium, driven by Playwright) against a real gateway
process and its built-in demo node, signed in with an API key. The main pages are saved to
docs/screenshots/ on the way.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import httpx
import pytest

import loopback
from gateway_proc import GatewayProcess, wait_for
from media import make_png, make_wav
from x2v_gateway.media import probe_video

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
# The README shows these; they are rewritten only on request, so a test run leaves the tree clean:
#   X2V_SCREENSHOTS=1 ./dev test tests/test_dashboard.py
SCREENSHOTS = (
    Path(__file__).resolve().parent.parent / "docs" / "screenshots"
    if os.environ.get("X2V_SCREENSHOTS") == "1"
    else Path(tempfile.gettempdir()) / "x2v-screenshots"
)
LAPTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
ADMIN_KEY = "x2v_dashboard-tests-admin-key-0123456789"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (./dev test installs it)")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> GatewayProcess:
    """Demo jobs take at least 1 s, so a test can watch them queue, run and finish."""
    root = tmp_path_factory.mktemp("dashboard")
    gw = GatewayProcess(root / "data", X2V_DEMO_JOB_SECONDS="1.0", X2V_ADMIN_KEY=ADMIN_KEY).start()
    yield gw
    gw.stop()


def api(gateway: GatewayProcess, key: str = ADMIN_KEY) -> httpx.Client:
    return loopback.client(base_url=gateway.url, timeout=60, headers={"Authorization": f"Bearer {key}"})


def sign_in(browser, gateway: GatewayProcess, key: str = ADMIN_KEY, **options):
    """A browser context signed in to the dashboard with `key`, the way a person does it."""
    context = browser.new_context(viewport=LAPTOP, accept_downloads=True, **options)
    page = context.new_page()
    page.goto(gateway.url + "/ui/jobs")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/ui/jobs")
    page.close()
    return context


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, gateway):
    context = sign_in(browser, gateway)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    # What the browser ended up showing goes to the bodies tests/test_secrets.py scans.
    with gateway.responses_path.open("a", encoding="utf-8") as seen:
        for shown in context.pages:
            seen.write(shown.content())
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("files")
    broken = root / "broken.wav"
    broken.write_text("not a sound, only text with a .wav name\n" * 40)
    return {
        "portrait1": make_png(root / "portrait1.png", (240, 320), color=(52, 101, 164)),
        "portrait2": make_png(root / "portrait2.png", (240, 320), color=(115, 150, 80)),
        "portrait3": make_png(root / "portrait3.png", (240, 320), color=(170, 90, 60)),
        "voice": make_wav(root / "voice.wav", seconds=1.5),
        "broken": broken,
    }


def shot(page, name: str, *, full_page: bool = True) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=full_page)


def api_batch(gateway: GatewayProcess, files, batch_id: str, prompts: list[str]) -> list[str]:
    """Jobs put in a batch through the JSON API (the dashboard shows API batches too)."""
    ids = []
    with api(gateway) as client:
        for prompt in prompts:
            response = client.post(
                "/api/v1/jobs",
                data={"task": "s2v", "prompt": prompt, "batch_id": batch_id},
                files={"image": files["portrait1"].open("rb"), "audio": files["voice"].open("rb")},
            )
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
    return ids


def count(page, state: str) -> str:
    return page.locator(f"#summary [data-count={state}]").inner_text()


def test_a_batch_of_three_s2v_jobs_from_the_form_finishes_live_plays_and_downloads_as_a_zip(
    gateway, page, files, tmp_path
):
    page.goto(gateway.url + "/")
    assert page.url.endswith("/ui/")
    page.get_by_role("link", name="New batch").first.click()
    page.get_by_label("Batch name").fill("Three portraits")
    page.get_by_label("Prompt", exact=True).fill("A presenter talking to the camera")
    page.get_by_label("Drop images and audio files here, or choose them").set_input_files(
        [str(files[k]) for k in ("portrait1", "portrait2", "portrait3", "voice")]
    )
    expect = playwright_api.expect
    expect(page.locator("#uploads li.ok")).to_have_count(4)
    page.get_by_role("button", name="Preview the jobs").click()
    expect(page.locator("#preview-title")).to_have_text("Preview: 3 jobs: 3 images × 1 audio file")
    expect(page.locator("#preview tbody tr.ok")).to_have_count(3)
    shot(page, "new-batch")

    page.get_by_role("button", name="Create the batch: 3 jobs").click()
    page.wait_for_url("**/ui/batches/b*")
    expect(page.locator("#live")).to_have_text("Live")
    # Everything from here on arrives through the event stream: the page is never reloaded.
    page.evaluate("window.stillTheSamePage = true")
    expect(page.locator("#batch-rows tr[data-state=running], #batch-rows tr[data-state=succeeded]").first).to_be_visible()
    shot(page, "batch-running")
    expect(page.locator("#summary .progress-text")).to_contain_text("3 of 3", timeout=30_000)
    assert count(page, "succeeded") == "3"
    assert page.evaluate("window.stillTheSamePage") is True
    expect(page.locator("#summary .eta")).to_have_text("Finished.")
    shot(page, "batch")
    page.set_viewport_size(PHONE)
    shot(page, "batch-phone")
    page.set_viewport_size(LAPTOP)

    with page.expect_download() as download:
        page.get_by_role("link", name="Download all (3 videos + manifest.csv)").click()
    archive = tmp_path / "batch.zip"
    download.value.save_as(archive)
    with zipfile.ZipFile(archive) as zipped:
        names = sorted(zipped.namelist())
        assert names == ["0001_portrait1_voice.mp4", "0002_portrait2_voice.mp4",
                         "0003_portrait3_voice.mp4", "manifest.csv"]
        rows = list(csv.DictReader(io.StringIO(zipped.read("manifest.csv").decode())))
        for name in names[:3]:
            path = tmp_path / name
            path.write_bytes(zipped.read(name))
            video = probe_video(path)
            assert video.duration > 0 and video.has_audio
    assert [r["file"] for r in rows] == names[:3]
    assert {r["image"] for r in rows} == {"portrait1.png", "portrait2.png", "portrait3.png"}
    for row in rows:
        assert row["state"] == "succeeded" and row["audio"] == "voice.wav" and row["node"] == "demo"
        assert row["prompt"] == "A presenter talking to the camera" and row["seed"].isdigit()
        assert float(row["seconds"]) > 0 and row["finished_at"]

    page.locator("#batch-rows a", has_text="portrait2.png").click()
    expect(page.get_by_role("heading", name="Inputs")).to_be_visible()
    duration = page.evaluate("""async () => {
        const video = document.querySelector('#result-video');
        if (video.readyState < 1) await new Promise((ok, fail) => {
            video.addEventListener('loadedmetadata', ok);
            video.addEventListener('error', () => fail(new Error('video error ' + video.error.code)));
        });
        video.muted = true;
        await video.play();
        video.currentTime = video.duration / 2;  // a seek: answered with a Range request
        await new Promise(ok => video.addEventListener('seeked', ok, {once: true}));
        return video.duration;
    }""")
    assert duration > 0
    assert page.evaluate("document.querySelector('audio').src").endswith("/inputs/audio")
    shot(page, "job")


def test_cancel_one_job_then_the_rest_of_the_batch(gateway, page, files):
    ids = api_batch(gateway, files, "cancel-me", [f"take {n}" for n in range(1, 5)])
    page.on("dialog", lambda dialog: dialog.accept())
    page.goto(f"{gateway.url}/ui/batches/cancel-me")
    expect = playwright_api.expect
    last = page.locator(f"#job-{ids[-1]}")
    expect(last).to_have_attribute("data-state", "queued")
    last.get_by_role("button", name="Cancel job").click()
    expect(page.locator(f"#job-{ids[-1]}")).to_have_attribute("data-state", "cancelled")
    expect(page.locator(f"#job-{ids[-1]} .error-cell")).to_have_text("cancelled by user")
    page.get_by_role("button", name="Cancel all").click()
    expect(page.locator("#flash")).to_contain_text("Cancelled")
    expect(page.locator("#summary .progress-text")).to_contain_text("4 of 4")
    with api(gateway) as client:
        states = [client.get(f"/api/v1/jobs/{i}").json()["state"] for i in ids]
    assert states[-1] == "cancelled"
    assert "cancelled" in states[1:] and all(s in ("succeeded", "cancelled") for s in states)
    assert page.locator("#cancel-all").count() == 0


def test_a_failed_job_retried_with_an_edited_prompt_succeeds_in_the_same_batch(gateway, page, files):
    # The demo node fails any job whose prompt says FAIL.
    first, second = api_batch(gateway, files, "retry-me", ["FAIL on purpose", "FAIL again"])
    page.goto(f"{gateway.url}/ui/batches/retry-me")
    expect = playwright_api.expect
    failed = page.locator(f"#job-{first}")
    expect(failed).to_have_attribute("data-state", "failed", timeout=20_000)
    expect(failed.locator(".error-cell")).not_to_be_empty()
    expect(page.locator(f"#job-{second}")).to_have_attribute("data-state", "failed", timeout=20_000)
    shot(page, "batch-failed")

    failed.get_by_text("Retry…").click()
    failed.get_by_label("Prompt").fill("works this time")
    failed.get_by_role("button", name="Retry").click()
    expect(page.locator(f"#job-{first}")).to_contain_text("run again as")
    expect(page.locator("#batch-rows tr")).to_have_count(3)
    new_row = page.locator("#batch-rows tr").last
    expect(new_row).to_contain_text(f"new run of {first}")
    expect(new_row).to_have_attribute("data-state", "succeeded", timeout=20_000)

    # "Retry failed" runs the other failed job again as itself (same prompt: it fails again).
    page.get_by_role("button", name="Retry failed").click()
    expect(page.locator("#flash")).to_contain_text("Queued 1 failed job again.")
    with api(gateway) as client:
        again = wait_for(client, second, {"failed"}, timeout=20)
        jobs = client.get("/api/v1/jobs", params={"batch_id": "retry-me"}).json()["jobs"]
    assert again["run"] == 1
    rerun = next(j for j in jobs if j["id"] not in (first, second))
    assert rerun["params"]["prompt"] == "works this time" and rerun["state"] == "succeeded"


def test_a_csv_manifest_with_a_bad_row_names_that_row_and_keeps_the_form(gateway, page, files):
    page.goto(gateway.url + "/ui/batches/new")
    expect = playwright_api.expect
    # Every control of the form has a label a screen reader can announce.
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('#batch-form input, #batch-form select, #batch-form textarea')]
        .filter(el => el.type !== 'hidden' && !el.labels.length && !el.getAttribute('aria-label'))
        .map(el => el.name || el.id)""")
    assert unlabelled == []

    page.get_by_label("Prompt", exact=True).fill("the default prompt")
    page.get_by_label("Drop images and audio files here, or choose them").set_input_files(
        [str(files[k]) for k in ("portrait1", "portrait2", "voice", "broken")]
    )
    expect(page.locator("#uploads li.ok")).to_have_count(3)
    refused = page.locator("#uploads li.bad")
    expect(refused).to_contain_text("broken.wav is not readable audio")
    expect(refused).to_contain_text("export it again as WAV, MP3 or M4A")

    page.get_by_label("A CSV or JSONL manifest").check()
    manifest = ("image,audio,prompt,seed\n"
                "portrait1.png,voice.wav,first take,1\n"
                "portrait9.png,voice.wav,second take,2\n"
                "portrait2.png,voice.wav,,3\n")
    page.get_by_label("Manifest: CSV with a header line, or JSON Lines").fill(manifest)
    page.get_by_role("button", name="Preview the jobs").click()
    expect(page.locator("#preview")).to_contain_text("1 of 3 jobs cannot run")
    bad = page.locator("#plan-row-2")
    expect(bad).to_contain_text("portrait9.png is not among the uploaded files: add it, or fix the name")
    expect(page.locator("#plan-row-1 .ready")).to_be_visible()
    expect(page.locator("#plan-row-3")).to_contain_text("the default prompt")  # empty cell: the form's value
    assert page.locator("#create-batch").count() == 0
    shot(page, "new-batch-errors")

    # Nothing typed or uploaded was lost: fix the one row and go on.
    assert page.get_by_label("Prompt", exact=True).input_value() == "the default prompt"
    expect(page.locator("#uploads li.ok")).to_have_count(3)
    page.get_by_label("Manifest: CSV with a header line, or JSON Lines").fill(manifest.replace("portrait9", "portrait2"))
    page.get_by_role("button", name="Preview the jobs").click()
    expect(page.locator("#preview tbody tr.ok")).to_have_count(3)
    page.get_by_role("button", name="Create the batch: 3 jobs").click()
    page.wait_for_url("**/ui/batches/b*")
    expect(page.locator("#batch-rows tr")).to_have_count(3)
    expect(page.locator("#batch-rows tr").nth(1)).to_contain_text("second take")
    expect(page.locator("#batch-rows tr").nth(1)).to_contain_text("seed 2")


def test_jobs_list_filters_by_state_nodes_drain_and_the_front_page_lists_batches(gateway, page, files):
    expect = playwright_api.expect
    (failed,) = api_batch(gateway, files, "list-check", ["FAIL for the list"])
    page.goto(gateway.url + "/ui/nodes")
    expect(page.locator("#node-demo")).to_contain_text("up")
    shot(page, "nodes")
    page.get_by_label("Drain demo").check()
    expect(page.locator("#node-demo .state")).to_have_text("draining")
    page.get_by_label("Drain demo").uncheck()
    expect(page.locator("#node-demo .state")).to_have_text("up")
    page.goto(gateway.url + "/ui/jobs")
    expect(page.locator(f"#job-{failed}")).to_have_attribute("data-state", "failed", timeout=20_000)
    shot(page, "jobs")
    page.get_by_label("State").select_option("failed")
    page.get_by_role("button", name="Show").click()
    expect(page.locator(f"#job-{failed}")).to_be_visible()
    states = page.locator("#job-rows tr").evaluate_all("rows => rows.map(r => r.dataset.state)")
    assert set(states) == {"failed"}
    page.get_by_label("State").select_option("succeeded")
    page.get_by_role("button", name="Show").click()
    expect(page.locator(f"#job-{failed}")).to_have_count(0)
    page.goto(gateway.url + "/ui/")
    expect(page.locator("table")).to_contain_text("Batch list-check")
    shot(page, "batches")


def test_an_open_page_reconnects_after_the_gateway_restarts_and_catches_up(browser, files, tmp_path):
    gateway = GatewayProcess(tmp_path / "data", X2V_DEMO_JOB_SECONDS="0.5", X2V_ADMIN_KEY=ADMIN_KEY).start()
    try:
        context = sign_in(browser, gateway)
        page = context.new_page()
        expect = playwright_api.expect
        (first,) = api_batch(gateway, files, "night-shift", ["before the restart"])
        page.goto(f"{gateway.url}/ui/batches/night-shift")
        expect(page.locator("#live")).to_have_text("Live")
        expect(page.locator(f"#job-{first}")).to_have_attribute("data-state", "succeeded", timeout=20_000)

        gateway.kill()
        expect(page.locator("#live")).to_have_text("Reconnecting…")
        gateway.start()
        # A job made while the page had no stream: it shows up once the stream is back.
        (second,) = api_batch(gateway, files, "night-shift", ["after the restart"])
        expect(page.locator("#live")).to_have_text("Live", timeout=15_000)
        expect(page.locator(f"#job-{second}")).to_have_attribute("data-state", "succeeded", timeout=20_000)
        assert count(page, "succeeded") == "2"
        context.close()
    finally:
        gateway.stop()


def test_a_key_sees_only_its_own_batches_and_jobs(gateway, browser, files):
    with api(gateway) as admin:
        made = admin.post("/api/v1/keys", json={"name": "operator-two"})
        assert made.status_code == 201, made.text
    other_key = made.json()["key"]
    (admins_job,) = api_batch(gateway, files, "admins-only", ["not for operator two"])
    context = sign_in(browser, gateway, other_key)
    page = context.new_page()
    expect = playwright_api.expect
    page.goto(gateway.url + "/ui/batches/admins-only")
    expect(page.get_by_role("heading", name="Not found")).to_be_visible()
    page.goto(f"{gateway.url}/ui/jobs/{admins_job}")
    expect(page.get_by_role("heading", name="Not found")).to_be_visible()
    page.goto(gateway.url + "/ui/jobs")
    expect(page.locator("#job-rows")).to_contain_text("No jobs")
    page.goto(gateway.url + "/ui/nodes")
    expect(page.get_by_label("Drain demo")).to_be_disabled()
    expect(page.locator("#drain-help")).to_contain_text("Only an admin key can drain a node.")
    context.close()


def test_preview_pairs_files_by_name_and_crosses_prompts_with_seeds(gateway, tmp_path):
    """The other two ways to form jobs, through the same routes the form uses (no browser)."""
    def upload(client: httpx.Client, path: Path, role: str) -> tuple[int, str]:
        with path.open("rb") as handle:
            answer = client.post(f"/ui/uploads?name={path.name}", data={"name": path.name},
                                 files={role: (path.name, handle)})
        value = answer.text.split('name="file" value="', 1)[1].split('"', 1)[0]
        return answer.status_code, value.replace("&#34;", '"')

    files = {
        "face01.png": make_png(tmp_path / "face01.png"), "face02.png": make_png(tmp_path / "face02.png"),
        "face01.wav": make_wav(tmp_path / "face01.wav"), "face03.wav": make_wav(tmp_path / "face03.wav"),
        "tiny.png": make_png(tmp_path / "tiny.png", (8, 8)),
    }
    with api(gateway) as client:
        uploaded = {}
        for name, path in files.items():
            status, uploaded[name] = upload(client, path, "audio" if name.endswith(".wav") else "image")
            assert status == (422 if name == "tiny.png" else 200), name
        assert "tiny.png is 8x8 pixels; images need at least 16 pixels on each side" in uploaded["tiny.png"]

        paired = client.post("/ui/batches/preview", data={
            "task": "s2v", "mode": "pair", "prompt": "hello",
            "file": [uploaded[n] for n in ("face01.png", "face02.png", "face01.wav", "face03.wav")],
        })
        assert paired.status_code == 422  # two of the three rows cannot run
        rows = paired.text.split('id="plan-row-')[1:]
        assert len(rows) == 3
        assert "face01.png" in rows[0] and "face01.wav" in rows[0] and "ready" in rows[0]
        assert "no audio named face02.* to go with face02.png: add one, or remove the image" in rows[1]
        assert "no image named face03.* to go with face03.wav: add one, or remove the audio" in rows[2]

        grid = client.post("/ui/batches/preview", data={
            "task": "s2v", "mode": "grid", "prompts": "a calm take\na lively take", "seeds": "1-3",
            "file": [uploaded["face01.png"], uploaded["face01.wav"]],
        })
        assert grid.status_code == 200, grid.text
        assert "Preview: 6 jobs" in grid.text and grid.text.count("ready</span>") == 6
        assert grid.text.count("a lively take") == 3 and "Create the batch: 6 jobs" in grid.text

        bad_seed = client.post("/ui/batches/preview", data={
            "task": "s2v", "mode": "each", "seed": "minus one",
            "file": [uploaded["face01.png"], uploaded["face01.wav"]],
        })
        assert bad_seed.status_code == 422
        assert "Seed: must be a whole number" in bad_seed.text

        # A `file` field that is not one the form made is ignored, as the preview ignores it.
        made = client.post("/ui/batches", data={
            "task": "t2v", "mode": "each", "prompt": "a garbled form", "file": ["not json", "[1]"],
        })
        assert made.status_code == 200 and made.headers["hx-redirect"].startswith("/ui/batches/b"), made.text
