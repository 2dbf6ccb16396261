"""The dashboard's other task types in a real browser (chromium through Playwright, as in
test_dashboard.py): flf2v batches formed from first and last frames, image jobs shown as images."""

from __future__ import annotations

from pathlib import Path

import pytest

import loopback
from cloud_double import CloudDouble, render_mp4
from gateway_proc import GatewayProcess, wait_for
from media import make_png
# The browser and a signed-in page (on this module's gateway), as test_dashboard.py makes them.
from test_dashboard import ADMIN_KEY, CHROMIUM, browser, page, playwright_api, sign_in  # noqa: F401 (fixtures)
from x2v_gateway.batch_plan import Upload, plan_batch

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (./dev test installs it)")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> GatewayProcess:
    root = tmp_path_factory.mktemp("dashboard-tasks")
    gw = GatewayProcess(root / "data", X2V_DEMO_JOB_SECONDS="0.3", X2V_ADMIN_KEY=ADMIN_KEY).start()
    yield gw
    gw.stop()


@pytest.fixture
def tab(request):
    """test_dashboard's signed-in `page`, on this module's gateway."""
    return request.getfixturevalue("page")


def test_an_flf2v_batch_pairs_first_and_last_frames_by_name_and_runs(gateway, tab, tmp_path):
    frames = [
        make_png(tmp_path / "shot1_first.png", (160, 120), color=(200, 40, 40)),
        make_png(tmp_path / "shot1_last.png", (160, 120), color=(40, 40, 200)),
        make_png(tmp_path / "shot2.png", (160, 120), color=(40, 160, 40)),
        make_png(tmp_path / "shot2-last.png", (160, 120), color=(160, 160, 40)),
    ]
    expect = playwright_api.expect
    tab.goto(gateway.url + "/ui/batches/new")
    tab.get_by_label("Task type").select_option("flf2v")
    tab.get_by_label("Prompt", exact=True).fill("the light changes")
    tab.get_by_label("Drop images and audio files here, or choose them").set_input_files([str(f) for f in frames])
    expect(tab.locator("#uploads li.ok")).to_have_count(4)
    tab.locator("#mode-pair").check()
    tab.get_by_role("button", name="Preview the jobs").click()
    expect(tab.locator("#preview tbody tr.ok")).to_have_count(2)
    expect(tab.locator("#preview-title")).to_have_text("Preview: 2 jobs: one per first and last frame")
    rows = tab.locator("#preview tbody tr")
    expect(rows.nth(0).locator("td[data-label='First frame']")).to_have_text("shot1_first.png")
    expect(rows.nth(0).locator("td[data-label='Last frame']")).to_have_text("shot1_last.png")
    expect(rows.nth(1).locator("td[data-label='Last frame']")).to_have_text("shot2-last.png")
    jobs = _create_and_finish(tab, gateway, 2)
    assert {j["task"] for j in jobs} == {"flf2v"} and {j["state"] for j in jobs} == {"succeeded"}
    assert all(set(j["inputs"]) == {"image", "last_frame"} for j in jobs)
    job_id = jobs[0]["id"]
    # The job page shows both frames.
    tab.goto(f"{gateway.url}/ui/jobs/{job_id}")
    expect(tab.locator("#input-last-frame")).to_be_visible()
    assert tab.evaluate("document.querySelector('#input-last-frame').naturalWidth") > 0


def _create_and_finish(tab, gateway: GatewayProcess, count: int) -> list[dict]:
    """Create the previewed batch, watch its page until every job finished; its jobs' JSON."""
    tab.get_by_role("button", name=f"Create the batch: {count} jobs").click()
    tab.wait_for_url("**/ui/batches/b*")
    batch_id = tab.url.rsplit("/", 1)[-1]
    playwright_api.expect(tab.locator("#summary .progress-text")).to_contain_text(f"{count} of {count}", timeout=30_000)
    with loopback.client(base_url=gateway.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
        return client.get("/api/v1/jobs", params={"batch_id": batch_id}).json()["jobs"]


def test_an_image_job_page_shows_the_image(gateway, tab):
    with loopback.client(base_url=gateway.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as client:
        batch = client.post("/api/v1/batches", json={"jobs": [{"task": "t2i", "prompt": "a quiet harbour"}]}).json()
        (job,) = batch["jobs"]
        assert wait_for(client, job["id"], {"succeeded"})["result"]["kind"] == "image"
    # The batch's page offers its images.
    tab.goto(f"{gateway.url}/ui/batches/{batch['id']}")
    playwright_api.expect(tab.locator("#download-zip")).to_have_text("Download all (1 image + manifest.csv)")
    tab.goto(f"{gateway.url}/ui/jobs/{job['id']}")
    image = tab.locator("#result-image")
    playwright_api.expect(image).to_be_visible()
    assert tab.locator("#result-video").count() == 0
    size = tab.evaluate("""async () => {
        const img = document.querySelector('#result-image');
        if (!img.complete) await new Promise((ok, fail) => { img.onload = ok; img.onerror = fail; });
        return [img.naturalWidth, img.naturalHeight];
    }""")
    assert size[0] > size[1] > 0
    link = tab.get_by_role("link", name="Download the image")
    assert link.get_attribute("download") == f"{job['id']}.png"


def test_animate_is_offered_only_where_an_upstream_runs_it(gateway, tab):
    # This gateway has the demo node alone: a self-hosted server has no animate route.
    tab.goto(gateway.url + "/ui/batches/new")
    option = tab.locator("#task option[value='animate']")
    playwright_api.expect(option).to_be_disabled()
    playwright_api.expect(option).to_contain_text("(no node runs it)")


def test_an_animate_batch_on_the_cloud_pairs_images_with_driving_videos(request, tmp_path):
    chromium = request.getfixturevalue("browser")  # test_dashboard's, on a gateway of this test's own
    double = CloudDouble(tmp_path / "double", workers=2, job_seconds=0.2, ping_seconds=0.1).start()
    gateway = GatewayProcess(
        tmp_path / "data", nodes="", LIGHTX2V_ACCESS_TOKEN=double.token, LIGHTX2V_BASE_URL=double.url,
        X2V_POLL_INTERVAL="0.2", X2V_ADMIN_KEY=ADMIN_KEY,
    )
    try:
        gateway.start()
        faces = [make_png(tmp_path / f"dancer{n}.png", (160, 120), color=(40 * n, 90, 160)) for n in (1, 2)]
        moves = []
        for n in (1, 2):
            (path := tmp_path / f"dancer{n}.mp4").write_bytes(render_mp4(n))
            moves.append(path)
        context = sign_in(chromium, gateway)
        tab = context.new_page()
        expect = playwright_api.expect
        tab.goto(gateway.url + "/ui/batches/new")
        expect(tab.locator("#task option[value='animate']")).to_be_enabled()
        tab.get_by_label("Task type").select_option("animate")
        tab.get_by_label("Prompt", exact=True).fill("dance like this")
        tab.get_by_label("Drop images and audio files here, or choose them").set_input_files(
            [str(f) for f in faces + moves])
        expect(tab.locator("#uploads li.ok")).to_have_count(4)
        expect(tab.locator("#uploads li[data-role='video']")).to_have_count(2)
        tab.get_by_role("button", name="Preview the jobs").click()
        expect(tab.locator("#preview-title")).to_have_text("Preview: 2 jobs: one per image and driving video")
        rows = tab.locator("#preview tbody tr.ok")
        expect(rows).to_have_count(2)
        expect(rows.nth(0).locator("td[data-label='Image']")).to_have_text("dancer1.png")
        expect(rows.nth(0).locator("td[data-label='Driving video']")).to_have_text("dancer1.mp4")
        jobs = _create_and_finish(tab, gateway, 2)
        context.close()
        assert {(j["task"], j["state"]) for j in jobs} == {("animate", "succeeded")}
        assert all(set(j["inputs"]) == {"image", "video"} for j in jobs)
        sent = sorted(e["inputs"]["input_video"]["bytes"] for e in double.journal() if e["task"] == "animate")
        assert sent == sorted(path.stat().st_size for path in moves)
    finally:
        gateway.stop()
        double.stop()


def test_plans_of_the_new_task_types_without_a_browser():
    def up(name: str, role: str = "image") -> Upload:
        return Upload(name, role, sha256=name.ljust(64, "0")[:64], size=10)

    def plan(task: str, mode: str, uploads: list[Upload], **form: str):
        return plan_batch({"task": task, "mode": mode, "prompt": "p", **form}, uploads,
                          runnable={"s2v", "i2v", "t2v", "flf2v", "t2i", "i2i", "animate"}, prompt_missing=lambda *_: None)

    # Every first frame with its last, also in a grid; an unmatched frame says what to add.
    paired = plan("flf2v", "grid", [up("a_first.png"), up("a_last.png"), up("b.png"), up("b.last.png")], seeds="1,2")
    assert paired.ok and len(paired.jobs) == 4
    lonely = plan("flf2v", "pair", [up("a_first.png"), up("c_last.png")])
    assert [j.errors for j in lonely.jobs] == [
        ["no last frame for a_first.png: add a_last.png, or remove it"],
        ["no first frame for c_last.png: add c_first.png (or c.png), or remove it"],
    ]
    assert plan("flf2v", "pair", [up("a.png"), up("a_last.png"), up("v.wav", "audio")]).errors
    # A manifest names the last frame in its own column.
    manifest = plan("flf2v", "manifest", [up("x.png"), up("y.png")], manifest="image,last_frame\nx.png,y.png\n")
    assert manifest.ok and manifest.jobs[0].files == {"image": "x.png", "last_frame": "y.png"}
    # t2i takes no file, i2i one image each.
    stills = plan("t2i", "grid", [], prompts="one\ntwo", aspect_ratio="1:1")
    assert stills.ok and [j.params["aspect_ratio"] for j in stills.jobs] == ["1:1", "1:1"]
    assert plan("t2i", "each", [], aspect_ratio="square").jobs[0].errors  # the form's own field, checked
    assert plan("t2i", "each", [up("x.png")]).errors
    i2i = plan("i2i", "each", [up("x.png"), up("y.png")])
    assert i2i.ok and [j.files for j in i2i.jobs] == [{"image": "x.png"}, {"image": "y.png"}]
    # animate: each image with its driving video, by name or by the manifest's video column.
    dance = plan("animate", "each", [up("a.png"), up("a.mp4", "video"), up("b.png"), up("b.webm", "video")])
    assert dance.ok and [j.files for j in dance.jobs] == [{"image": "a.png", "video": "a.mp4"},
                                                         {"image": "b.png", "video": "b.webm"}]
    assert dance.summary == "2 jobs: one per image and driving video"
    alone = plan("animate", "pair", [up("a.png"), up("c.mp4", "video")])
    assert [j.errors for j in alone.jobs] == [
        ["no driving video named a.* to go with a.png: add one, or remove the image"],
        ["no image named c.* to go with c.mp4: add one, or remove the driving video"],
    ]
    assert plan("animate", "pair", [up("a.png"), up("a.mp4", "video"), up("a.wav", "audio")]).errors
    rows = plan("animate", "manifest", [up("x.png"), up("m.mp4", "video")], manifest="image,video\nx.png,m.mp4\nm.mp4,x.png\n")
    assert rows.jobs[0].files == {"image": "x.png", "video": "m.mp4"} and not rows.jobs[0].errors
    assert rows.jobs[1].errors == ["m.mp4 is a video, not an image: check the image column",
                                   "x.png is an image, not a video: check the video column"]
    # A video is no input of the other task types.
    assert plan("i2v", "each", [up("a.png"), up("a.mp4", "video")]).errors == [
        "i2v jobs take no video: remove a.mp4, or choose animate"]
