"""A batch form's counts are refused over the cap before anything that big is built.

In process, against a real SQLite store and blob store: the answer names the field, and the
memory the planning took stays small (the rows were never made), whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from pathlib import Path

import pytest
from litestar.testing import TestClient

from media import make_png, make_wav
from x2v_gateway.app import Gateway, create_app
from x2v_gateway.batch_plan import MAX_BATCH_JOBS, Upload, plan_batch
from x2v_gateway.settings import load_settings

ADMIN_KEY = "x2v_batch-limits-admin-key-0123456789"
# What planning may allocate for a refused form. The forms below once built 400,000 to 2 million
# rows (hundreds of MiB); a plan of the 2,000 jobs a batch holds takes a few MiB.
SMALL = 16 * 1024 * 1024


def _settings(tmp_path: Path):
    # A node that never answers: planning needs a gateway, not a node.
    return load_settings({"X2V_DATA_DIR": str(tmp_path / "data"), "X2V_NODES": "n=http://127.0.0.1:9",
                          "X2V_ADMIN_KEY": ADMIN_KEY}, env_file=None)


@pytest.fixture
def gateway(tmp_path):
    gw = Gateway(_settings(tmp_path))
    yield gw
    gw.store.close()


def _plan(gw: Gateway, form: dict[str, str], files: list[str]):
    return asyncio.run(gw.jobs.plan_batch(form, files))


def _peak(fn, *args):
    """fn(*args) and the most memory it held at once (every thread's)."""
    tracemalloc.start()
    try:
        result = fn(*args)
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _kept(gw: Gateway, path: Path, role: str) -> str:
    """The form's `file` field for a file kept in the blob store, as the upload route makes it."""
    sha, size = asyncio.run(gw.blobs.adopt(path))
    asyncio.run(gw.store.record_blob(sha, size, "png" if role == "image" else "wav"))
    return Upload(path.name, role, sha, size).as_json()


@pytest.mark.parametrize(("form", "says"), [
    ({"mode": "grid", "task": "t2v", "prompts": "a take\n" * 200, "seeds": "1-1999"},
     "Prompts × seeds: 1 file set × 200 prompts × 1,999 seeds make 399,800 jobs"),
    ({"mode": "grid", "task": "t2v", "prompt": "p", "seeds": "0-4294967295"},
     "Seeds: more than 2000 seeds (counted up to 0-4294967295), a job each"),
    ({"mode": "grid", "task": "t2v", "prompt": "p", "seeds": "1-1500, 1-1500"},
     "Seeds: more than 2000 seeds (counted up to 1-1500), a job each"),
    ({"mode": "grid", "task": "t2v", "prompts": "line\n" * 500_000},
     "Prompts: more than 2000 lines, a job each"),
    ({"mode": "manifest", "task": "t2v", "manifest": "prompt\n" + "a calm take\n" * 200_000},
     "Manifest: more than 2000 rows, a job each"),
    ({"mode": "manifest", "task": "t2v", "manifest": '{"prompt": "x"}\n' * 200_000},
     "Manifest: more than 2000 rows, a job each"),
])
def test_a_form_over_the_cap_is_refused_naming_the_field_before_its_rows_are_built(gateway, form, says):
    plan, peak = _peak(_plan, gateway, form, [])
    assert any(e.startswith(says) for e in plan.errors), plan.errors
    assert "a batch holds at most 2000 jobs: split it" in " ".join(plan.errors)
    assert plan.jobs == [] and not plan.ok
    assert peak < SMALL, f"planning a refused form held {peak / 2**20:.0f} MiB"


def test_files_over_the_cap_are_refused_before_the_store_is_read(gateway, tmp_path):
    # 5,000 listed files: each would be a look-up in the store.
    listed = [Upload(f"f{i}.png", "image", "0" * 64, 1).as_json() for i in range(5000)]
    plan = _plan(gateway, {"mode": "each", "task": "i2v"}, listed)
    assert plan.errors[-1] == ("Files: 5,000 files are listed; a batch holds at most 4000 files:"
                               " split it into several batches")
    # Every image with every audio: 50 × 50 files make 2,500 jobs, counted, not made.
    image = _kept(gateway, make_png(tmp_path / "face.png"), "image")
    audio = _kept(gateway, make_wav(tmp_path / "voice.wav", seconds=0.1), "audio")
    images = [image.replace("face.png", f"face{i}.png") for i in range(50)]
    audios = [audio.replace("voice.wav", f"voice{i}.wav") for i in range(50)]
    plan, peak = _peak(_plan, gateway, {"mode": "each", "task": "s2v"}, images + audios)
    assert plan.errors[-1].startswith("Files: 50 images × 50 audio files make 2,500 jobs"), plan.errors
    assert plan.jobs == [] and plan.summary == "2,500 jobs, more than one batch holds"
    # Up to the cap, the batch is planned row by row as before.
    plan = _plan(gateway, {"mode": "grid", "task": "s2v", "prompts": "a\nb", "seeds": "1-20"},
                      images[:25] + audios[:2])
    assert len(plan.jobs) == 25 * 2 * 2 * 20 == MAX_BATCH_JOBS
    assert not any("split it" in e for e in plan.errors) and not plan.bad_rows, plan.errors


def test_the_issues_grid_preview_answers_422_naming_the_field_and_builds_nothing(tmp_path):
    """1,000 prompts × seeds 1-1999 (a 7 KB form) once built 2 million rows on the event loop."""
    form = {"task": "t2v", "mode": "grid", "prompts": "\n".join(f"take {i}" for i in range(1000)),
            "seeds": "1-1999"}
    with TestClient(create_app(_settings(tmp_path))) as client:
        client.headers["Authorization"] = f"Bearer {ADMIN_KEY}"
        tracemalloc.start()
        try:
            answer = client.post("/ui/batches/preview", data=form)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert answer.status_code == 422, answer.text
        assert "Prompts × seeds: 1 file set × 1,000 prompts × 1,999 seeds make 1,999,000 jobs" in answer.text
        assert "Preview: 1,999,000 jobs, more than one batch holds" in answer.text
        assert peak < SMALL, f"the refused preview held {peak / 2**20:.0f} MiB"
        # Creating it is refused the same way, and nothing was made.
        made = client.post("/ui/batches", data=form)
        assert made.status_code == 422 and "1,999,000 jobs" in made.text
        assert client.get("/api/v1/jobs").json()["jobs"] == []
        assert client.get("/healthz").status_code == 200


def test_pairing_by_file_name_names_the_file_left_without_a_partner():
    # Planning alone is pure: a form and its kept files in, checked rows out; no store, no node.
    uploads = [Upload("face01.png", "image", "a" * 64, 1), Upload("FACE01.wav", "audio", "b" * 64, 1),
               Upload("face02.png", "image", "c" * 64, 1)]
    plan = plan_batch({"mode": "pair", "task": "s2v", "prompt": "hello"}, uploads,
                      runnable={"s2v"}, prompt_missing=lambda task, prompt: None)
    assert [job.files for job in plan.jobs] == [{"image": "face01.png", "audio": "FACE01.wav"}, {"image": "face02.png"}]
    assert plan.jobs[0].errors == [] and plan.jobs[0].inputs == {"image": "a" * 64, "audio": "b" * 64}
    assert plan.jobs[1].errors == ["no audio named face02.* to go with face02.png: add one, or remove the image"]
    assert not plan.ok and plan.bad_rows == 1
    # A task type no upstream runs is said for the whole form.
    plan = plan_batch({"mode": "grid", "task": "t2v", "prompt": "hello"}, [],
                      runnable={"s2v"}, prompt_missing=lambda task, prompt: None)
    assert plan.errors == ["No node of this gateway runs t2v jobs; choose another task type"]
