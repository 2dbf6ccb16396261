"""The cloud adapter against the cloud double, a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import traceback
import tracemalloc
from pathlib import Path

import av
import pytest

from cloud_double import CloudDouble, make_token
from media import make_big_wav, make_png, make_wav
from servers import free_port
from x2v_gateway.upstream.base import (
    AmbiguousSubmit,
    Backpressure,
    Rejected,
    RemoteState,
    SubmitRequest,
    Unavailable,
    UpstreamError,
)
from x2v_gateway.upstream.cloud import CloudAuthError, CloudModel, CloudUpstream
from x2v_gateway.upstream.cloud_answers import sanitise

UNKNOWN = "00000000-0000-0000-0000-000000000000"


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    """Three workers, 0.3 s jobs: jobs finish quickly."""
    with CloudDouble(tmp_path_factory.mktemp("fast"), users=12, workers=3, job_seconds=0.3, ping_seconds=0.1) as double:
        yield double


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """One worker, 3 s jobs: a second task waits in the queue."""
    with CloudDouble(tmp_path_factory.mktemp("slow"), users=3, workers=1, job_seconds=3.0, ping_seconds=0.1) as double:
        yield double


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cloud-inputs")
    not_image = root / "notes.png"
    not_image.write_text("this is a text file with a .png name\n" * 20)
    not_audio = root / "notes.wav"
    not_audio.write_bytes(b"RIFF....not really a wav file" * 40)
    return {
        "face": make_png(root / "face.png"),
        "last": make_png(root / "last.png", color=(60, 90, 200)),
        "voice": make_wav(root / "voice.wav", seconds=0.5),
        "not_image": not_image,
        "not_audio": not_audio,
    }


def adapter_for(double: CloudDouble, user: str = "github_12345", **options) -> CloudUpstream:
    return CloudUpstream("cloud", double.url, double.token_for(user), **options)


def job(name: str, task: str = "t2v", inputs: dict[str, Path] | None = None, **params) -> SubmitRequest:
    params.setdefault("prompt", f"a {task} job called {name}")
    return SubmitRequest(job_id=name, task_id=name, task=task, params=params, inputs=inputs or {})


async def wait_for(adapter: CloudUpstream, task_id: str, *states: RemoteState, timeout: float = 10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        status = (await adapter.poll([task_id]))[task_id]
        if status is not None and status.state in states:
            return status
        assert asyncio.get_running_loop().time() < deadline, f"{task_id} still {status}"
        await asyncio.sleep(0.05)


def assert_playable(path: Path) -> None:
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        assert sum(1 for _ in container.decode(video=0)) > 0


def test_s2v_i2v_and_t2v_jobs_run_and_give_playable_videos(fast, files, tmp_path):
    requests = [
        job("s2v-1", "s2v", {"image": files["face"], "audio": files["voice"]}, seed=7, target_shape=[480, 832]),
        job("i2v-1", "i2v", {"image": files["face"]}, negative_prompt="blurry", target_shape=[]),
        job("t2v-1", "t2v", aspect_ratio="16:9", infer_steps=4),
    ]

    async def scenario():
        adapter = adapter_for(fast)
        try:
            ids = [await adapter.submit(r) for r in requests]
            for task_id in ids:
                await wait_for(adapter, task_id, RemoteState.SUCCEEDED)
                await adapter.fetch_result(task_id, tmp_path / f"{task_id}.mp4")
            return ids
        finally:
            await adapter.aclose()

    ids = asyncio.run(scenario())
    for task_id in ids:
        assert_playable(tmp_path / f"{task_id}.mp4")
    journal = {entry["task_id"]: entry for entry in fast.journal()}
    s2v, i2v, t2v = (journal[i] for i in ids)
    assert (s2v["task"], s2v["model_cls"], s2v["stage"]) == ("s2v", "SekoTalk", "single_stage")
    assert s2v["inputs"]["input_audio"]["sha256"] == hashlib.sha256(files["voice"].read_bytes()).hexdigest()
    assert s2v["inputs"]["input_image"]["sha256"] == hashlib.sha256(files["face"].read_bytes()).hexdigest()
    assert s2v["params"] == {"prompt": "a s2v job called s2v-1", "seed": 7, "custom_shape": [480, 832], "x2v_job": "s2v-1"}
    assert i2v["model_cls"] == "wan2.2-14B-480P" and "custom_shape" not in i2v["params"]
    assert i2v["params"]["negative_prompt"] == "blurry"
    assert t2v["model_cls"] == "wan2.2-T2V-A14B"
    assert t2v["params"]["aspect_ratio"] == "16:9" and t2v["params"]["infer_steps"] == 4
    # The relative result URL was fetched with the token, from the API's own host.
    downloads = [r for r in fast.requests() if r["path"] == "/assets/task/result"]
    assert downloads and all(r["auth"] == "bearer" and r["status"] == 200 for r in downloads)


def test_large_input_is_streamed_not_held_in_memory(fast, tmp_path):
    big = make_big_wav(tmp_path / "long.wav", megabytes=24)
    face = make_png(tmp_path / "face.png")

    async def scenario():
        adapter = adapter_for(fast, "github_12346")
        try:
            await adapter.models()  # outside the measurement
            tracemalloc.start()
            task_id = await adapter.submit(job("big-1", "s2v", {"image": face, "audio": big}))
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            return task_id, peak
        finally:
            await adapter.aclose()

    task_id, peak = asyncio.run(scenario())
    size = big.stat().st_size
    # A 24 MB file is 32 MB of base64: holding either would show. One chunk is 192 KiB.
    assert peak < size / 4, f"peak {peak} bytes for a {size}-byte input"
    entry = next(e for e in fast.journal() if e["task_id"] == task_id)
    assert entry["inputs"]["input_audio"] == {"bytes": size, "sha256": hashlib.sha256(big.read_bytes()).hexdigest()}


def test_one_adapter_spaces_its_submits_so_the_rate_limit_never_trips(fast):
    async def scenario():
        adapter = adapter_for(fast, "github_12347")
        try:
            return await asyncio.gather(*(adapter.submit(job(f"paced-{i}")) for i in range(3)))
        finally:
            await adapter.aclose()

    assert len(set(asyncio.run(scenario()))) == 3


def test_submits_too_close_together_are_backpressure(fast):
    # Two gateways (or a gateway and a script) on one token: only the cloud sees both.
    async def scenario():
        first, second = adapter_for(fast, "github_12348"), adapter_for(fast, "github_12348")
        try:
            await asyncio.gather(first.models(), second.models())
            return await asyncio.gather(first.submit(job("twin-1")), second.submit(job("twin-2")),
                                        return_exceptions=True)
        finally:
            await first.aclose()
            await second.aclose()

    with fast.configured(visit_gap=1.0):
        results = asyncio.run(scenario())
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(refused) == 1 and isinstance(refused[0], Backpressure)
    assert "rate limit" in str(refused[0]) and refused[0].retry_after <= 1.0


def test_fourth_active_task_and_full_queue_are_backpressure(tmp_path):
    with CloudDouble(tmp_path, users=2, workers=0, queue_capacity=4) as double:

        async def scenario():
            first, second = adapter_for(double), adapter_for(double, "github_12346")
            try:
                for i in range(3):
                    await first.submit(job(f"active-{i}"))
                with pytest.raises(Backpressure, match="maximum of active tasks") as active:
                    await first.submit(job("active-3"))
                await second.submit(job("queued-4"))
                with pytest.raises(Backpressure, match="queue is full") as busy:
                    await second.submit(job("queued-5"))
                return active.value, busy.value
            finally:
                await first.aclose()
                await second.aclose()

        active, busy = asyncio.run(scenario())
        assert active.retry_after >= 1.0 and busy.retry_after >= active.retry_after
        assert len(double.journal()) == 4


def test_poll_finds_statuses_when_an_unknown_id_is_mixed_in(fast):
    async def scenario():
        adapter = adapter_for(fast, "github_12349")
        try:
            ids = [await adapter.submit(job(f"mixed-{i}")) for i in range(3)]
            for task_id in ids:
                await wait_for(adapter, task_id, RemoteState.SUCCEEDED)
            before = fast.counts()["GET /api/v1/task/query"]
            statuses = await adapter.poll([ids[0], UNKNOWN, ids[1], ids[2]])
            return ids, statuses, fast.counts()["GET /api/v1/task/query"] - before
        finally:
            await adapter.aclose()

    ids, statuses, queries = asyncio.run(scenario())
    assert statuses[UNKNOWN] is None
    assert all(statuses[i].state is RemoteState.SUCCEEDED for i in ids)
    assert queries <= 5  # the failing query, then halves, not one request per id and retries


def test_poll_reports_queue_position_and_estimates(slow):
    async def scenario():
        adapter = adapter_for(slow)
        multi = adapter_for(slow, "github_12346", stage="multi_stage")
        try:
            running = await adapter.submit(job("eta-running"))
            await wait_for(adapter, running, RemoteState.RUNNING)
            queued = await adapter.submit(job("eta-queued"))
            stuck = await multi.submit(job("eta-multi"))
            statuses = {**await adapter.poll([running, queued]), **await multi.poll([stuck])}
            for task_id in (running, queued):
                await adapter.cancel(task_id)
            await multi.cancel(stuck)
            return statuses[running], statuses[queued], statuses[stuck]
        finally:
            await adapter.aclose()
            await multi.aclose()

    running, queued, stuck = asyncio.run(scenario())
    # Until a worker has finished a task the cloud's running "estimate" is its timeout (3600 s):
    # a placeholder, which the adapter does not pass on as an estimate.
    assert running.state is RemoteState.RUNNING and running.running_seconds is None
    assert queued.state is RemoteState.QUEUED
    assert (queued.queue_position, queued.pending_seconds, queued.running_seconds) == (1, 3600, None)
    # No worker serves multi_stage queues: a position, but no made-up wait.
    assert stuck.state is RemoteState.QUEUED and stuck.queue_position == 1 and stuck.pending_seconds is None


def test_cancel_stops_queued_and_running_tasks(slow):
    async def scenario():
        adapter = adapter_for(slow, "github_12347")
        try:
            running = await adapter.submit(job("cancel-running"))
            await wait_for(adapter, running, RemoteState.RUNNING)
            queued = await adapter.submit(job("cancel-queued"))
            for task_id in (running, queued):
                await adapter.cancel(task_id)
            statuses = await adapter.poll([running, queued])
            await adapter.cancel(running)  # again: already CANCEL, still no error
            await adapter.cancel(UNKNOWN)
            return statuses
        finally:
            await adapter.aclose()

    statuses = asyncio.run(scenario())
    assert {s.state for s in statuses.values()} == {RemoteState.CANCELLED}


def test_resume_requeues_a_failed_task_under_the_same_id(fast):
    async def scenario():
        adapter = adapter_for(fast, "github_12350")
        try:
            failing = await adapter.submit(job("resume-1", prompt="please FAIL this one"))
            failed = await wait_for(adapter, failing, RemoteState.FAILED)
            resumed = await adapter.resume(failing)
            again = await wait_for(adapter, failing, RemoteState.QUEUED, RemoteState.RUNNING, RemoteState.FAILED)
            fine = await adapter.submit(job("resume-2"))
            await wait_for(adapter, fine, RemoteState.SUCCEEDED)
            return failing, failed, resumed, again, await adapter.resume(fine), await adapter.resume(UNKNOWN)
        finally:
            await adapter.aclose()

    failing, failed, resumed, again, resume_succeeded, resume_unknown = asyncio.run(scenario())
    assert failed.error == "worker failed"
    assert resumed is True and again is not None
    assert resume_succeeded is False and resume_unknown is False
    assert sum(1 for e in fast.journal() if e["params"].get("x2v_job") == "resume-1") == 1


def test_find_task_recognises_the_attempt_by_its_marker(fast):
    async def scenario():
        adapter = adapter_for(fast, "github_12351")
        try:
            sent = job("find-me")
            task_id = await adapter.submit(sent)
            return task_id, await adapter.find_task(sent), await adapter.find_task(job("never-sent"))
        finally:
            await adapter.aclose()

    task_id, found, not_found = asyncio.run(scenario())
    assert found == task_id and not_found is None


def test_submission_whose_answer_is_lost_is_ambiguous_and_then_found(fast):
    # The cloud creates the task, then the connection breaks before its answer arrives.
    fast.inject("/api/v1/task/submit", drop=True)
    sent = job("lost-answer")

    async def scenario():
        adapter = adapter_for(fast, "github_12352")
        try:
            with pytest.raises(AmbiguousSubmit):
                await adapter.submit(sent)
            return await adapter.find_task(sent)
        finally:
            await adapter.aclose()

    found = asyncio.run(scenario())
    created = [e["task_id"] for e in fast.journal() if e["params"].get("x2v_job") == "lost-answer"]
    assert created == [found]


def test_proxy_errors_are_retried_on_reads_and_ambiguous_on_submit(fast):
    async def scenario():
        adapter = adapter_for(fast, "github_12353")
        try:
            task_id = await adapter.submit(job("proxied"))
            fast.inject("/api/v1/task/query", status=502, count=2)
            status = (await adapter.poll([task_id]))[task_id]
            fast.inject("/api/v1/task/submit", status=504)
            with pytest.raises(AmbiguousSubmit):
                await adapter.submit(job("proxied-2"))
            return status
        finally:
            await adapter.aclose()

    assert asyncio.run(scenario()) is not None
    failed_queries = [r for r in fast.requests() if r["path"] == "/api/v1/task/query" and r["status"] == 502]
    assert len(failed_queries) == 2


def test_absolute_result_url_is_fetched_without_the_token(tmp_path):
    with CloudDouble(tmp_path / "cloud", workers=1, job_seconds=0.1, absolute_urls=True) as double:

        async def scenario():
            adapter = adapter_for(double)
            try:
                task_id = await adapter.submit(job("signed"))
                await wait_for(adapter, task_id, RemoteState.SUCCEEDED)
                await adapter.fetch_result(task_id, tmp_path / "signed.mp4")
            finally:
                await adapter.aclose()

        asyncio.run(scenario())
        assert_playable(tmp_path / "signed.mp4")
        assert not (tmp_path / "signed.mp4.part").exists()
        fetched = [r for r in double.requests() if r["path"].startswith("/presigned/")]
        assert [(r["auth"], r["status"]) for r in fetched] == [("none", 200)]


def test_models_are_listed_and_a_bad_one_is_refused_before_upload(fast, files):
    async def scenario():
        adapter = adapter_for(fast, "github_12354", models={"i2v": "no-such-model"})
        try:
            models = await adapter.models()
            with pytest.raises(Rejected, match="does not offer no-such-model") as refused:
                await adapter.submit(job("bad-model", "i2v", {"image": files["face"]}))
            return models, refused.value
        finally:
            await adapter.aclose()

    models, refused = asyncio.run(scenario())
    assert CloudModel("s2v", "SekoTalk", "single_stage") in models
    assert "wan2.2-14B-480P" in str(refused)
    assert not any(e["params"].get("x2v_job") == "bad-model" for e in fast.journal())


def test_cloud_refusals_become_short_clear_errors(fast, files):
    async def scenario():
        adapter = adapter_for(fast, "github_12355")
        errors = []
        try:
            for name, request in [
                ("no-image", job("bad-image", "i2v", {"image": files["not_image"]})),
                ("no-audio", job("bad-audio", "s2v", {"image": files["face"], "audio": files["not_audio"]})),
            ]:
                with pytest.raises(Rejected) as refused:
                    await adapter.submit(request)
                errors.append(str(refused.value))
            with pytest.raises(Rejected, match="non-empty prompt"):
                await adapter.submit(job("no-prompt", prompt=""))
            return errors
        finally:
            await adapter.aclose()

    not_image, not_audio = asyncio.run(scenario())
    assert not_image == "cloud: the cloud refused the job: Failed to read input_image: cannot identify image file"
    assert not_audio == ("cloud: the cloud refused the job: Failed to read input_audio: media to wav failed: "
                         "Invalid data found when processing input")


def test_rejected_token_and_unreachable_cloud(fast):
    async def scenario():
        refused = CloudUpstream("cloud", fast.url, "not-a-token")
        gone = CloudUpstream("cloud", f"http://127.0.0.1:{free_port()}", fast.token)
        try:
            health = await refused.health()
            with pytest.raises(CloudAuthError, match="token rejected"):
                await refused.submit(job("refused"))
            with pytest.raises(CloudAuthError):
                await refused.poll([UNKNOWN])
            down = await gone.health()
            with pytest.raises(Unavailable) as unreachable:
                await gone.submit(job("unreachable"))
            with pytest.raises(Unavailable):
                await gone.poll([UNKNOWN])
            return health, down, unreachable.value, await adapter_health(fast)
        finally:
            await refused.aclose()
            await gone.aclose()

    health, down, unreachable, ok = asyncio.run(scenario())
    assert not health.reachable and "token rejected" in health.detail
    assert not down.reachable
    assert not isinstance(unreachable, AmbiguousSubmit)  # nothing was sent: safe to send elsewhere
    assert ok.reachable


async def adapter_health(double: CloudDouble):
    adapter = adapter_for(double)
    try:
        return await adapter.health()
    finally:
        await adapter.aclose()


def test_token_never_appears_in_errors_logs_or_repr(tmp_path, files, caplog):
    caplog.set_level(logging.DEBUG)
    token, expired = make_token("github_12345"), make_token("github_12345")
    with CloudDouble(tmp_path / "cloud", tokens={token: "github_12345"}, expired_token=[expired],
                     workers=1, job_seconds=0.1) as double:
        errors: list[BaseException] = []

        async def attempt(coro):
            try:
                return await coro
            except UpstreamError as exc:
                errors.append(exc)

        async def scenario():
            good = CloudUpstream("cloud", double.url, token)
            stale = CloudUpstream("cloud", double.url, expired)
            gone = CloudUpstream("cloud", f"http://127.0.0.1:{free_port()}", token)
            try:
                await attempt(good.submit(job("leak-1", "i2v", {"image": files["not_image"]})))
                await asyncio.sleep(0.11)
                await attempt(good.submit(job("leak-2", "s2v", {"image": files["face"], "audio": files["not_audio"]})))
                await attempt(good.fetch_result(UNKNOWN, tmp_path / "x.mp4"))
                await attempt(stale.submit(job("leak-3")))
                await attempt(stale.fetch_result(UNKNOWN, tmp_path / "x.mp4"))
                await attempt(gone.submit(job("leak-4")))
                await attempt(gone.cancel(UNKNOWN))
                return [repr(good), repr(stale), str(await stale.health()), str(await gone.health())]
            finally:
                for adapter in (good, stale, gone):
                    await adapter.aclose()

        texts = asyncio.run(scenario())
    assert len(errors) == 7
    for exc in errors:
        texts += [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    texts += [caplog.text, *(r.getMessage() for r in caplog.records)]
    texts += [(tmp_path / "cloud" / name).read_text() for name in ("requests.jsonl", "double.log")]
    for secret in (token, expired):
        assert not any(secret in text for text in texts)
        # Not even a recognisable piece of it (the signature part of the JWT).
        assert not any(secret.rsplit(".", 1)[1] in text for text in texts)


def test_sanitise_turns_captured_errors_into_short_text():
    noisy = (
        "error: Failed to read input_image, type=base64, val=data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAEAAAABACAIAAAAlC+aJAAABCklEQVR4nO2Zyw3CMBBEA6KOnCmbIi: Incorrect padding!!"
    )
    assert sanitise(noisy) == "Failed to read input_image: Incorrect padding"
    assert sanitise("error: ['t2v', 'no-such-model', 'single_stage'] are not in /srv/app/configs/model_pipeline.json!!") \
        == "the cloud does not offer t2v / no-such-model / single_stage"
    assert sanitise("error: Failed to read input_image, type=url, val=http://127.0.0.1:18613/nothing.png: "
                    "All connection attempts failed!!") == "Failed to read input_image: All connection attempts failed"
    assert sanitise("error: see https://bucket.example/o.mp4?X-Signature=abc123!") == "see https://bucket.example/o.mp4"
    assert sanitise("Bearer sekrit-token-value rejected", ("sekrit-token-value",)) == "Bearer *** rejected"
