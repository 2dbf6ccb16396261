"""The client commands (`submit`, `watch`, `download`, `cancel`, `retry`) run as a script runs
them: a real subprocess against a real gateway process and its built-in demo node."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway_proc import GatewayProcess, free_port, until
from media import make_big_wav, make_png, make_wav


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> GatewayProcess:
    root = tmp_path_factory.mktemp("client-gw")
    # Short demo jobs keep the tests fast, and long enough to stop a client in the middle.
    gateway = GatewayProcess(root / "data", X2V_DEMO_JOB_SECONDS="0.3").start()
    yield gateway
    gateway.stop()


@pytest.fixture
def api(gateway):
    with gateway.client() as client:
        yield client


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> dict:
        return json.loads(self.stdout)


def _env(gateway: GatewayProcess, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("X2V_")}
    return {**env, "X2V_URL": gateway.url, "X2V_KEY": gateway.admin_key, "COLUMNS": "120", **extra}


def client(gateway: GatewayProcess, *args: str, cwd: Path, timeout: float = 120, **env: str) -> Run:
    """`x2v-gateway ARGS` in `cwd`, its stderr not a terminal (so rich draws its bars once, at the end)."""
    done = subprocess.run(
        [sys.executable, "-m", "x2v_gateway.cli", *args], cwd=cwd, env=_env(gateway, **env),
        capture_output=True, text=True, timeout=timeout,
    )
    return _checked(Run(done.returncode, done.stdout, done.stderr), gateway)


def _checked(run: Run, gateway: GatewayProcess) -> Run:
    assert gateway.admin_key not in run.stdout + run.stderr, "the client printed its key"
    assert "Traceback" not in run.stderr, run.stderr
    return run


def in_terminal(gateway: GatewayProcess, *args: str, cwd: Path) -> Run:
    """The command with its stderr on a terminal (a pty), as a person sees it: stderr's bytes."""
    terminal, their_end = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "x2v_gateway.cli", *args], cwd=cwd, env=_env(gateway),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=their_end,
    )
    os.close(their_end)
    seen = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([terminal], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(terminal, 65536)
            except OSError:  # the process ended and closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    os.close(terminal)
    stdout = proc.stdout.read().decode()
    proc.wait(timeout=10)
    return _checked(Run(proc.returncode, stdout, seen.decode(errors="replace")), gateway)


def portraits(folder: Path, count: int, *, audio: bool = True, shade: int = 0) -> Path:
    """`count` distinct portraits and (with `audio`) one voice-over in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        make_png(folder / f"face{i:02d}.png", color=(20 + 30 * i, 100 + shade, 80))
    if audio:
        make_wav(folder / "voice.wav", seconds=0.5)
    return folder


def video_gets(gateway: GatewayProcess) -> list[str]:
    """The job ids whose video was fetched, once per request, from the gateway's access log."""
    return re.findall(r'"GET /api/v1/jobs/(\w+)/video HTTP', gateway.log())


def batch_jobs(api, batch_id: str) -> list[dict]:
    return api.get("/api/v1/jobs", params={"batch_id": batch_id, "limit": 500}).json()["jobs"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_submit_a_folder_downloads_each_video_with_a_manifest_and_shows_progress(gateway, api, tmp_path):
    portraits(tmp_path / "portraits", 2)
    run = in_terminal(gateway, "submit", "portraits", "--prompt", "a presenter talking", "--out", "videos",
                      cwd=tmp_path)
    assert run.code == 0, run.stderr

    # The bars as the terminal showed them: uploads, jobs and downloads, each at its end.
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", run.stderr)
    assert re.search(r"uploads\s+━+\s+[\d.]+ kB/[\d.]+ kB · 2/2 jobs", screen), screen
    assert re.search(r"jobs\s+━+\s+2/2 finished: 2 succeeded", screen), screen
    assert re.search(r"downloads\s+━+\s+2/2 videos in videos", screen), screen
    batch_id = re.fullmatch(r"batch (b\w+): 2 succeeded; videos and videos/manifest.csv\n", run.stdout)[1]

    jobs = {job["id"]: job for job in batch_jobs(api, batch_id)}
    assert len(jobs) == 2 and {j["params"]["prompt"] for j in jobs.values()} == {"a presenter talking"}
    with (tmp_path / "videos" / "manifest.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["file"], r["image"], r["audio"], r["state"]) for r in rows] == [
        ("0001_face00_voice.mp4", "face00.png", "voice.wav", "succeeded"),
        ("0002_face01_voice.mp4", "face01.png", "voice.wav", "succeeded"),
    ]
    for row in rows:
        assert sha256(tmp_path / "videos" / row["file"]) == jobs[row["job_id"]]["result"]["sha256"]
    assert sorted(p.name for p in (tmp_path / "videos").glob("*.mp4")) == [r["file"] for r in rows]


def test_a_killed_client_run_again_submits_nothing_twice_and_downloads_nothing_twice(gateway, api, tmp_path):
    portraits(tmp_path / "in", 6, shade=40)
    args = ["submit", "in", "--prompt", "resume me", "--out", "out", "--parallel", "1", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "x2v_gateway.cli", *args], cwd=tmp_path, env=_env(gateway),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        until(lambda: list((tmp_path / "out").glob("*.mp4")), timeout=60, what="a first video")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    had = {p.name for p in (tmp_path / "out").glob("*.mp4")}
    assert 0 < len(had) < 6, "the client was not stopped in the middle"

    again = client(gateway, *args, "--json", cwd=tmp_path)
    assert again.code == 0, again.stderr
    answer = again.json()
    assert answer["counts"]["succeeded"] == 6
    jobs = batch_jobs(api, answer["batch_id"])
    assert len(jobs) == 6, "a job was made twice"
    assert sorted(j["id"] for j in jobs) == sorted(j["id"] for j in answer["jobs"])
    fetched = Counter(job_id for job_id in video_gets(gateway) if job_id in {j["id"] for j in jobs})
    assert set(fetched) == {j["id"] for j in jobs}, "a video was not fetched"
    # A video already here is never fetched again. The one the kill may have cut short (one
    # download at a time) is fetched again whole: there is no half of it to keep.
    here = {line["id"] for line in answer["jobs"] if Path(line["file"]).name in had}
    twice = {job_id for job_id, n in fetched.items() if n > 1}
    assert len(twice) <= 1 and all(fetched[job_id] == 2 for job_id in twice), fetched
    assert not twice & here, f"a video already downloaded was fetched again: {fetched}"
    for line in answer["jobs"]:
        assert Path(tmp_path / line["file"]).is_file()

    # Even with the folder's journal lost, the same command finds every job it made (by their
    # Idempotency-Keys) and every video already here (by size and sha256).
    (tmp_path / "out" / ".x2v-client.jsonl").unlink()
    third = client(gateway, *args, "--json", cwd=tmp_path)
    assert third.code == 0, third.stderr
    assert third.json()["batch_id"] == answer["batch_id"]
    assert len(batch_jobs(api, answer["batch_id"])) == 6
    assert sorted(j for j in video_gets(gateway) if j in {x["id"] for x in jobs}) == sorted(fetched)
    assert len(list((tmp_path / "out").glob("*.mp4"))) == 6


def test_a_gateway_killed_and_restarted_mid_run_is_waited_for(gateway, api, tmp_path):
    portraits(tmp_path / "in", 6, shade=160)
    proc = subprocess.Popen(
        [sys.executable, "-m", "x2v_gateway.cli", "submit", "in", "--prompt", "outage", "--json", "-q"],
        cwd=tmp_path, env=_env(gateway), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        until(lambda: list((tmp_path / "in-videos").glob("*.mp4")), timeout=60, what="a first video")
        assert proc.poll() is None, "the client ended before the gateway went away"
        gateway.kill()
        time.sleep(1)
        gateway.start()
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    answer = json.loads(stdout)
    assert answer["counts"]["succeeded"] == 6
    assert len(batch_jobs(api, answer["batch_id"])) == 6
    assert len(list((tmp_path / "in-videos").glob("*.mp4"))) == 6


def test_manifest_rows_with_a_failed_job_answer_json_and_exit_1(gateway, tmp_path):
    assets = portraits(tmp_path / "assets", 2, shade=80)
    (tmp_path / "jobs.csv").write_text(
        "image,audio,prompt,seed\n"
        "face00.png,voice.wav,a calm presenter,7\n"
        "face01.png,voice.wav,this one should FAIL,8\n"
    )
    run = client(gateway, "submit", "jobs.csv", str(assets), "--out", "campaign", "--json", cwd=tmp_path)
    assert run.code == 1, run.stderr
    answer = run.json()
    assert answer["counts"] == {"queued": 0, "submitted": 0, "running": 0, "succeeded": 1, "failed": 1, "cancelled": 0}
    by_number = {line["number"]: line for line in answer["jobs"]}
    assert by_number[1]["state"] == "succeeded" and by_number[1]["file"].endswith("0001_face00_voice.mp4")
    assert by_number[2]["state"] == "failed" and "FAIL" in by_number[2]["error"] and by_number[2]["file"] is None
    assert by_number[2]["source"] == "jobs.csv line 3"
    with (tmp_path / "campaign" / "manifest.csv").open() as f:
        rows = {r["number"]: r for r in csv.DictReader(f)}
    assert (rows["1"]["seed"], rows["2"]["seed"], rows["2"]["state"]) == ("7", "8", "failed")
    assert "failed" in run.stderr  # and people are told which, on stderr

    retried = client(gateway, "retry", answer["batch_id"], "--json", cwd=tmp_path)
    assert retried.code == 0 and retried.json()["retried"] == [by_number[2]["id"]], retried.stdout
    assert client(gateway, "watch", answer["batch_id"], cwd=tmp_path).code == 1  # it fails again


def test_pairs_by_file_name_and_a_jsonl_manifest_form_the_jobs_the_dashboard_would(gateway, api, tmp_path):
    faces, voices = tmp_path / "faces", tmp_path / "voices"
    portraits(faces, 2, audio=False, shade=100)
    voices.mkdir()
    for i, seconds in enumerate((0.4, 0.6)):
        make_wav(voices / f"FACE{i:02d}.wav", seconds=seconds)
    paired = client(gateway, "submit", "faces", "voices", "--mode", "pair", "--set", "infer_steps=4",
                    "--no-wait", "--json", cwd=tmp_path)
    assert paired.code == 0, paired.stderr
    jobs = batch_jobs(api, paired.json()["batch_id"])
    pairs = {(j["inputs"]["image"]["sha256"], j["inputs"]["audio"]["sha256"]) for j in jobs}
    assert pairs == {(sha256(faces / f"face{i:02d}.png"), sha256(voices / f"FACE{i:02d}.wav")) for i in range(2)}
    assert {j["params"]["infer_steps"] for j in jobs} == {4}

    (tmp_path / "rows.jsonl").write_text(
        '{"image": "face00.png", "prompt": "left", "target_shape": [64, 96], "seed": 3}\n'
        '{"image": "face01.png", "prompt": "right", "priority": 5}\n'
    )
    rows = client(gateway, "submit", "rows.jsonl", "faces", "--task", "i2v", "--no-wait", "--json", cwd=tmp_path)
    assert rows.code == 0, rows.stderr
    by_prompt = {j["params"]["prompt"]: j for j in batch_jobs(api, rows.json()["batch_id"])}
    assert by_prompt["left"]["params"]["target_shape"] == [64, 96] and by_prompt["left"]["params"]["seed"] == 3
    assert by_prompt["right"]["priority"] == 5 and by_prompt["left"]["task"] == "i2v"
    for batch_id in (paired.json()["batch_id"], rows.json()["batch_id"]):
        assert client(gateway, "watch", batch_id, "-q", cwd=tmp_path).code == 0

    unknown = tmp_path / "bad.jsonl"
    unknown.write_text('{"image": "face00.png", "steps": 4}\n{"image": "nothere.png"}\n')
    bad = client(gateway, "submit", "bad.jsonl", "faces", "--task", "i2v", cwd=tmp_path)
    assert bad.code == 2, bad.stderr
    assert "line 1: unknown key(s) 'steps'" in bad.stderr and "line 2: nothere.png is neither" in bad.stderr


def test_bad_usage_unreachable_gateway_and_refused_key_have_their_own_exit_codes(gateway, tmp_path):
    portraits(tmp_path / "in", 1, shade=120)

    bad = client(gateway, "submit", "in", "--seeds", "1-x", cwd=tmp_path)
    assert bad.code == 2 and "--seeds" in bad.stderr, bad.stderr
    bad = client(gateway, "submit", "in", "--set", "steps=8", cwd=tmp_path)
    assert bad.code == 2 and "--set" in bad.stderr, bad.stderr
    bad = client(gateway, "submit", "nowhere", cwd=tmp_path)
    assert bad.code == 2 and "nowhere" in bad.stderr, bad.stderr
    bad = client(gateway, "submit", "in", "--task", "i2v", cwd=tmp_path)
    assert bad.code == 2 and "i2v jobs take no audio" in bad.stderr, bad.stderr
    bad = client(gateway, "submit", "in", "--url", "not a url", cwd=tmp_path)
    assert bad.code == 2 and "--url" in bad.stderr, bad.stderr

    nowhere = f"http://127.0.0.1:{free_port()}"
    for args in (["submit", "in"], ["watch", "b1234567890"], ["cancel", "j1234567890"]):
        started = time.monotonic()
        gone = client(gateway, *args, cwd=tmp_path, X2V_URL=nowhere)
        assert gone.code == 3 and "does not answer" in gone.stderr, gone.stderr
        assert time.monotonic() - started < 20, "a gateway that never answered was waited for"
    refused = client(gateway, "submit", "in", cwd=tmp_path, X2V_KEY="x2v_" + "0" * 43)
    assert refused.code == 4 and "X2V_KEY" in refused.stderr, refused.stderr
    nokey = client(gateway, "watch", "b1234567890", cwd=tmp_path, X2V_KEY="")
    assert nokey.code == 4 and "X2V_KEY" in nokey.stderr, nokey.stderr
    unknown = client(gateway, "watch", "b1234567890", cwd=tmp_path)
    assert unknown.code == 5 and "no batch b1234567890" in unknown.stderr, unknown.stderr
    assert not list(tmp_path.glob("*-videos/*.mp4")), "nothing was submitted"


def test_watch_download_cancel_and_retry(gateway, api, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red kite\na blue kite\n")
    made = client(gateway, "submit", "--task", "t2v", "--prompts", "prompts.txt", "--seeds", "1-2",
                  "--no-wait", "--json", cwd=tmp_path)
    assert made.code == 0, made.stderr
    batch_id = made.json()["batch_id"]
    assert sorted((j["params"]["prompt"], j["params"]["seed"]) for j in batch_jobs(api, batch_id)) == [
        ("a blue kite", 1), ("a blue kite", 2), ("a red kite", 1), ("a red kite", 2)]

    watched = client(gateway, "watch", batch_id, "--json", cwd=tmp_path)
    assert watched.code == 0, watched.stderr
    assert watched.json()["counts"]["succeeded"] == 4

    got = client(gateway, "download", batch_id, "videos", cwd=tmp_path)
    assert got.code == 0, got.stderr
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == 4
    fetched = len(video_gets(gateway))
    assert client(gateway, "download", batch_id, "videos", cwd=tmp_path).code == 0
    assert len(video_gets(gateway)) == fetched, "a video already in the folder was fetched again"

    # A retry of a job that succeeded is refused; a batch cancelled has its unfinished jobs cancelled.
    job_id = batch_jobs(api, batch_id)[0]["id"]
    refused = client(gateway, "retry", job_id, cwd=tmp_path)
    assert refused.code == 5 and "succeeded" in refused.stderr, refused.stderr

    queued = client(gateway, "submit", "--task", "t2v", "--prompt", "cancel me", "--seeds", "1-6",
                    "--no-wait", "--json", cwd=tmp_path)
    cancel_batch = queued.json()["batch_id"]
    cancelled = client(gateway, "cancel", cancel_batch, "--json", cwd=tmp_path)
    assert cancelled.code == 0, cancelled.stderr
    assert cancelled.json()["jobs"] == 6 and cancelled.json()["cancelled"] >= 1
    after = client(gateway, "watch", cancel_batch, "--json", cwd=tmp_path)
    assert after.code == 1 and after.json()["counts"]["cancelled"] >= 1

    one = next(j for j in batch_jobs(api, cancel_batch) if j["state"] == "cancelled")
    again = client(gateway, "retry", one["id"], "--json", cwd=tmp_path)
    assert again.code == 0, again.stderr
    assert again.json()["id"] == one["id"] and again.json()["state"] in ("queued", "submitted", "running", "succeeded")
    until(lambda: api.get(f"/api/v1/jobs/{one['id']}").json()["state"] == "succeeded", what="the retried job")

    # The last of 20 jobs waits in the gateway's queue while the demo node runs the first ones.
    running = client(gateway, "submit", "--task", "t2v", "--prompt", "cancel the last one", "--seeds", "1-20",
                     "--no-wait", "--json", cwd=tmp_path)
    job = running.json()["jobs"][-1]["id"]
    early = client(gateway, "download", running.json()["batch_id"], "early", "--no-wait", "--json", cwd=tmp_path)
    assert early.code == 6, early.stderr  # some jobs have not finished
    assert early.json()["counts"]["queued"] >= 1
    stopped = client(gateway, "cancel", job, cwd=tmp_path)
    assert stopped.code == 0 and stopped.stdout == f"job {job}: cancelled\n", stopped.stdout
    assert client(gateway, "cancel", "jnothing", cwd=tmp_path).code == 5
    assert client(gateway, "cancel", running.json()["batch_id"], cwd=tmp_path).code == 0  # frees the node


def test_a_large_input_streams_from_disk_and_the_video_to_disk(gateway, tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    make_png(folder / "face.png", color=(10, 200, 10))
    make_big_wav(folder / "voice.wav", 64)
    # The client is the only child of this small process: its peak memory is the children's.
    measured = subprocess.run(
        [sys.executable, "-c", (
            "import resource, subprocess, sys\n"
            "code = subprocess.run([sys.executable, '-m', 'x2v_gateway.cli', 'submit', 'big', '-q'], stdout=subprocess.DEVNULL).returncode\n"
            "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)\n"
        )], cwd=tmp_path, env=_env(gateway), capture_output=True, text=True, timeout=120,
    )
    code, peak_mb = map(int, measured.stdout.split())
    assert code == 0, measured.stderr
    assert len(list((tmp_path / "big-videos").glob("*.mp4"))) == 1
    # Whole in memory, the 64 MiB file alone would take the client past 100 MB.
    assert peak_mb < 75, f"the client peaked at {peak_mb} MB uploading a 64 MiB file"


def test_ctrl_c_stops_at_once_and_says_how_to_go_on(gateway, api, tmp_path):
    # The nodes drained: the batch cannot finish before the interrupt, however busy the machine.
    nodes = [node["name"] for node in api.get("/api/v1/nodes").json()]
    for name in nodes:
        api.post(f"/api/v1/nodes/{name}/drain").raise_for_status()
    try:
        made = client(gateway, "submit", "--task", "t2v", "--prompt", "interrupt me", "--seeds", "1-12",
                      "--no-wait", "--json", cwd=tmp_path)
        batch_id = made.json()["batch_id"]
        polls = gateway.log().count(f"batch_id={batch_id}")
        # Ctrl-C as a terminal delivers it, to a process that does not ignore it: in a whole-suite
        # run the watch went on polling after the signal, as if the worker it inherited from had
        # come to ignore SIGINT (a child keeps an ignored signal ignored).
        proc = subprocess.Popen([sys.executable, "-m", "x2v_gateway.cli", "watch", batch_id, "--quiet"],
                                cwd=tmp_path, env=_env(gateway), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        until(lambda: gateway.log().count(f"batch_id={batch_id}") > polls, what="the watch's first look at the batch")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)
    finally:
        for name in nodes:
            api.post(f"/api/v1/nodes/{name}/undrain").raise_for_status()
    assert proc.returncode == 130, stderr
    assert "interrupted; run the same command again to go on" in stderr and "Traceback" not in stderr
    assert client(gateway, "cancel", batch_id, cwd=tmp_path).code == 0


def test_client_knows_the_gateways_job_fields_manifest_columns_and_task_inputs():
    from x2v_gateway.batch_plan import MANIFEST_COLUMNS
    from x2v_gateway.client import plan
    from x2v_gateway.schemas import TASK_INPUTS, GenerationParams

    assert plan.PARAMS == GenerationParams.__struct_fields__
    assert plan.MANIFEST_COLUMNS == MANIFEST_COLUMNS
    assert plan.TASK_INPUTS == {task: TASK_INPUTS[task] for task in plan.TASKS}
    assert set(plan.TASKS) == set(TASK_INPUTS)  # every task type the gateway takes, the client forms


def test_client_submits_flf2v_frames_paired_by_name(gateway, api, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for name, shade in (("shot1_first", 40), ("shot1_last", 80), ("shot2", 120), ("shot2-last", 160)):
        make_png(frames / f"{name}.png", color=(shade, 90, 200))
    made = client(gateway, "submit", "frames", "--task", "flf2v", "--prompt", "the light changes", "--json", cwd=tmp_path)
    assert made.code == 0, made.stderr
    jobs = batch_jobs(api, made.json()["batch_id"])
    pairs = {(j["inputs"]["image"]["sha256"], j["inputs"]["last_frame"]["sha256"]) for j in jobs}
    assert pairs == {(sha256(frames / "shot1_first.png"), sha256(frames / "shot1_last.png")),
                     (sha256(frames / "shot2.png"), sha256(frames / "shot2-last.png"))}
    assert {(j["task"], j["state"]) for j in jobs} == {("flf2v", "succeeded")}
    make_png(frames / "shot3_last.png")
    lonely = client(gateway, "submit", "frames", "--task", "flf2v", "--prompt", "x", cwd=tmp_path)
    assert lonely.code == 2 and "no first frame named shot3.* to go with shot3_last.png" in lonely.stderr


def test_client_submits_animate_jobs_an_image_and_its_driving_video_each(tmp_path):
    from cloud_double import CloudDouble, render_mp4

    dance = tmp_path / "dance"
    dance.mkdir()
    for n in (1, 2):
        make_png(dance / f"dancer{n}.png", color=(40 * n, 90, 160))
        (dance / f"dancer{n}.mp4").write_bytes(render_mp4(n))
    double = CloudDouble(tmp_path / "double", workers=2, job_seconds=0.2, ping_seconds=0.1).start()
    gateway = GatewayProcess(tmp_path / "data", nodes="", LIGHTX2V_ACCESS_TOKEN=double.token,
                             LIGHTX2V_BASE_URL=double.url, X2V_POLL_INTERVAL="0.2")
    try:
        gateway.start()
        wrong = client(gateway, "submit", "dance", "--task", "i2v", cwd=tmp_path)
        assert wrong.code == 2 and "i2v jobs take no video" in wrong.stderr, wrong.stderr
        made = client(gateway, "submit", "dance", "--task", "animate", "--prompt", "dance like this",
                      "--out", "out", "--json", cwd=tmp_path)
        assert made.code == 0, made.stderr
        with gateway.client() as api:
            jobs = batch_jobs(api, made.json()["batch_id"])
        pairs = {(j["inputs"]["image"]["sha256"], j["inputs"]["video"]["sha256"]) for j in jobs}
        assert pairs == {(sha256(dance / f"dancer{n}.png"), sha256(dance / f"dancer{n}.mp4")) for n in (1, 2)}
        assert {(j["task"], j["state"]) for j in jobs} == {("animate", "succeeded")}
        assert len(list((tmp_path / "out").glob("*.mp4"))) == 2
    finally:
        gateway.stop()
        double.stop()


def test_every_client_command_has_examples_and_exit_codes_in_its_help(gateway, tmp_path):
    for command in ("submit", "watch", "download", "cancel", "retry"):
        shown = client(gateway, command, "--help", cwd=tmp_path)
        assert shown.code == 0
        examples = shown.stdout.split("Examples:\n", 1)[1].split("\n\n", 1)[0]
        assert re.search(rf"^\s+x2v-gateway {command} ", examples, re.M), shown.stdout
        assert "Exit codes:" in shown.stdout and "gateway does not answer" in shown.stdout
