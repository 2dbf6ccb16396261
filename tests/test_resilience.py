"""Restarts and misbehaving nodes: every job still ends, and reaches a node exactly once."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pytest

import loopback
from gateway_proc import GatewayProcess, until, wait_for
from media import make_big_wav
from servers import MisbehavingNode, NodeProcess


@contextmanager
def gateway_for(
    tmp_path: Path, node: NodeProcess, *, name: str = "n1", start_node: bool = True, **settings: str
) -> Iterator[GatewayProcess]:
    """A gateway with `node` as its one node (`name`), both started (the node unless
    `start_node` is False); both stopped at the end, whatever happened."""
    if start_node:
        node.start()
    gateway = GatewayProcess(tmp_path / "data", nodes=f"{name}={node.url}", **settings)
    try:
        yield gateway.start()
    finally:
        gateway.stop()
        node.stop()


def submitted_ids(node: NodeProcess) -> Counter:
    return Counter(entry["task_id"] for entry in node.submissions())


def submit_t2v(client, n: int, prefix: str) -> list[str]:
    ids = []
    for i in range(n):
        response = client.post("/api/v1/jobs", json={"task": "t2v", "prompt": f"{prefix} {i}"})
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    return ids


def test_job_survives_gateway_sigkill_with_exactly_one_upstream_submission_each(tmp_path):
    node = NodeProcess(tmp_path / "node", job_seconds=0.6)
    with gateway_for(tmp_path, node) as gateway:
        with gateway.client() as client:
            ids = submit_t2v(client, 6, "crash")
            wait_for(client, ids[0], {"running"})
            states = {client.get(f"/api/v1/jobs/{i}").json()["state"] for i in ids}
            assert "queued" in states  # some are still waiting in the gateway when it dies
        gateway.kill()
        time.sleep(1.0)  # the node keeps working while the gateway is down
        gateway.start()
        with gateway.client() as client:
            for job_id in ids:
                assert wait_for(client, job_id, {"succeeded", "failed"})["state"] == "succeeded"
        assert submitted_ids(node) == Counter({job_id: 1 for job_id in ids})


def test_node_restart_forgets_tasks_and_jobs_are_resubmitted_without_duplicates(tmp_path):
    node = NodeProcess(tmp_path / "node", job_seconds=1.5)
    with gateway_for(tmp_path, node) as gateway:
        with gateway.client() as client:
            ids = submit_t2v(client, 3, "restart")
            first = wait_for(client, ids[0], {"running"})
            seeds = {i: client.get(f"/api/v1/jobs/{i}").json()["params"]["seed"] for i in ids}
            restarted_at = datetime.now().isoformat()
            # A crash mid-job: the new process knows no task, and the running one left no video.
            node.kill()
            node.start()
            for job_id in ids:
                assert wait_for(client, job_id, {"succeeded", "failed"}, timeout=90)["state"] == "succeeded"
            after = {i: client.get(f"/api/v1/jobs/{i}").json() for i in ids}
        # The job that was running when the node restarted went out again, same seed. The gateway
        # sees the restart one of two ways: the new process answers 404 for the task, or a poll
        # lands while the port is closed (connection refused, the node's tasks are gone with it).
        assert after[first["id"]]["attempts"] == 2
        assert any(
            "no longer knows" in e["detail"] or "stopped accepting connections" in e["detail"]
            for e in after[first["id"]]["events"]
        )
        for job_id in ids:
            assert after[job_id]["params"]["seed"] == seeds[job_id]
        # Never two submissions of a job to one incarnation of the node.
        journal = node.submissions()
        before = Counter(e["task_id"] for e in journal if e["time"] < restarted_at)
        later = Counter(e["task_id"] for e in journal if e["time"] >= restarted_at)
        assert max(before.values()) == 1 and max(later.values()) == 1
        assert set(before) | set(later) == set(ids)


def test_misbehaving_node_5xx_timeouts_resets_and_queue_full_never_fail_a_job(tmp_path):
    node = MisbehavingNode(tmp_path / "node", job_seconds=0.3)
    with gateway_for(tmp_path, node, name="bad", X2V_REQUEST_TIMEOUT="2") as gateway:
        node.fault("error", route="list", status=500, times=4)
        node.fault("reset", route="list", times=2)
        node.fault("hang", route="list", times=1)
        node.fault("queue_full", route="submit", times=3)
        # Accepted by the node, but the gateway never hears so: must not be sent twice.
        node.fault("reset", route="submit", phase="after", times=1)
        # Refused before the node saw it: must be sent again.
        node.fault("error", route="submit", status=500, times=1)
        node.fault("error", route="result", status=502, times=2)
        with gateway.client() as client:
            ids = submit_t2v(client, 5, "chaos")
            for job_id in ids:
                job = wait_for(client, job_id, {"succeeded", "failed"}, timeout=120)
                assert job["state"] == "succeeded", job
            metrics = client.get("/metrics").text
        assert all(f["fired"] >= 1 for f in node.faults()), node.faults()
        assert submitted_ids(node) == Counter({job_id: 1 for job_id in ids})
        assert 'x2v_upstream_errors_total{kind="Unavailable"' in metrics or "x2v_upstream_errors_total" in metrics


def test_node_that_is_down_at_submission_gets_the_job_when_it_is_back(tmp_path):
    node = NodeProcess(tmp_path / "node")
    with gateway_for(tmp_path, node, name="late", start_node=False) as gateway:
        with gateway.client() as client:
            (job_id,) = submit_t2v(client, 1, "early")
            time.sleep(1.0)
            assert client.get(f"/api/v1/jobs/{job_id}").json()["state"] == "queued"
            assert client.get("/readyz").status_code == 503
            node.start()
            assert wait_for(client, job_id, {"succeeded", "failed"}, timeout=90)["state"] == "succeeded"
            assert client.get("/readyz").status_code == 200


@pytest.mark.timeout(600)
def test_large_upload_streams_to_disk_without_raising_gateway_memory(tmp_path, media):
    audio = make_big_wav(tmp_path / "long.wav", 300)
    node = NodeProcess(tmp_path / "node")
    with gateway_for(tmp_path, node) as gateway:
        with gateway.client(timeout=300) as client:
            client.get("/api/v1/jobs")  # warm up: imports and first requests settle
            baseline = gateway.peak_rss_mb()
            with media["face"].open("rb") as image, audio.open("rb") as sound:
                response = client.post("/api/v1/jobs", data={"task": "s2v"}, files={"image": image, "audio": sound})
            assert response.status_code == 201, response.text
            job = wait_for(client, response.json()["id"], {"succeeded", "failed"}, timeout=300)
            assert job["state"] == "succeeded", job
        growth = gateway.peak_rss_mb() - baseline
        # 300 MiB went in through the gateway and out to the node; its memory barely moved.
        assert growth < 60, f"peak RSS grew by {growth:.0f} MiB"
        assert job["inputs"]["audio"]["size"] == audio.stat().st_size


def test_form_route_submission_whose_answer_is_lost_is_found_not_resent(tmp_path, media):
    # The node's /form route takes no task id; the gateway names the task through its
    # save_result_path instead, and finds it by that after losing the node's answer.
    node = MisbehavingNode(tmp_path / "node", job_seconds=1.0)
    with gateway_for(tmp_path, node, X2V_FORM_THRESHOLD_MB="0", X2V_REQUEST_TIMEOUT="3") as gateway:
        node.fault("reset", route="submit", phase="after", times=1)
        with gateway.client() as client, media["face"].open("rb") as image, media["voice"].open("rb") as voice:
            response = client.post("/api/v1/jobs", data={"task": "s2v"}, files={"image": image, "audio": voice})
            job = wait_for(client, response.json()["id"], {"succeeded", "failed"}, timeout=60)
        assert job["state"] == "succeeded", job
        assert job["upstream_task_id"] == job["id"]
        (entry,) = node.submissions()
        assert entry["route"].endswith("/form")
        assert entry["task_id"] != job["id"]  # the node chose its own id


def test_readyz_while_the_store_is_locked_does_not_stall_other_requests(tmp_path):
    # The SQLite file's write lock, whatever store `pytest --store` gives other gateways.
    gateway = GatewayProcess(tmp_path / "data", X2V_DATABASE_URL="").start()
    try:
        with gateway.client() as client:
            assert client.get("/readyz").status_code == 200
            # Another process (a backup, sqlite3 in a shell) holds the write lock.
            lock = sqlite3.connect(tmp_path / "data" / "gateway.db", isolation_level=None)
            lock.execute("BEGIN IMMEDIATE")
            try:
                ready: list[int] = []
                probe = threading.Thread(target=lambda: ready.append(client.get("/readyz").status_code))
                probe.start()
                time.sleep(0.3)  # the probe now waits for the lock (up to the 5 s busy timeout)
                assert client.get("/healthz").status_code == 200
                assert probe.is_alive()  # answered while the probe still waits, not behind it
                probe.join(timeout=30)
                assert ready == [503]
            finally:
                lock.execute("ROLLBACK")
                lock.close()
            assert client.get("/readyz").status_code == 200
    finally:
        gateway.stop()


def test_node_that_breaks_every_submission_fails_the_job_instead_of_looping(tmp_path):
    node = MisbehavingNode(tmp_path / "node")
    with gateway_for(tmp_path, node, name="broken") as gateway:
        node.fault("error", route="submit", status=500, times=None)
        with gateway.client() as client:
            (job_id,) = submit_t2v(client, 1, "doomed")
            job = wait_for(client, job_id, {"failed", "succeeded"}, timeout=60)
        assert job["state"] == "failed" and "submission kept failing" in job["error"]
        assert job["attempts"] == 3
        assert submitted_ids(node) == Counter()  # the node never took it


def node_task(node: NodeProcess, task_id: str) -> dict | None:
    """The node's own status of a task, or None while it does not know it."""
    response = loopback.get(f"{node.url}/v1/tasks/{task_id}/status", timeout=10)
    return response.json() if response.status_code == 200 else None


def hold_next_submission(node: MisbehavingNode) -> None:
    """The node takes the next submission's connection but reads it only once released
    (`node.clear_faults()`): a slow link or a busy node, for as long as the test needs."""
    node.fault("hang", route="submit", seconds=25)


def test_cancel_while_the_node_is_still_reading_the_submission_stops_the_task_there(tmp_path):
    node = MisbehavingNode(tmp_path / "node", job_seconds=3.0)
    with gateway_for(tmp_path, node) as gateway:
        hold_next_submission(node)
        with gateway.client() as client:
            (job_id,) = submit_t2v(client, 1, "cancelled in flight")
            until(lambda: node.faults()[0]["fired"], what="the submission reached the node")
            cancelled = client.delete(f"/api/v1/jobs/{job_id}")
            assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
            node.clear_faults()  # the node reads it now, and its task starts at once

            # The stop request reaches the task once it exists. If it had started, its render
            # is not stopped (the node finishes it, then reports the task `completed`): the job
            # stays cancelled all the same.
            until(lambda: (node_task(node, job_id) or {}).get("error") == "Task cancelled by user",
                  what="the node's task cancelled")
            until(lambda: loopback.get(f"{node.url}/v1/service/status").json()["service_status"] == "idle",
                  what="the node done with it")
            (later,) = submit_t2v(client, 1, "after the cancelled one")
            assert wait_for(client, later, {"succeeded", "failed"})["state"] == "succeeded"
            job = client.get(f"/api/v1/jobs/{job_id}").json()
            assert job["state"] == "cancelled" and job["result"] is None
        assert submitted_ids(node) == Counter({job_id: 1, later: 1})


def test_retry_while_the_cancelled_submission_is_in_flight_leaves_no_orphan_task(tmp_path):
    node = MisbehavingNode(tmp_path / "node", job_seconds=2.0)
    with gateway_for(tmp_path, node) as gateway:
        hold_next_submission(node)
        with gateway.client() as client:
            (job_id,) = submit_t2v(client, 1, "cancelled and retried in flight")
            until(lambda: node.faults()[0]["fired"], what="the submission reached the node")
            assert client.delete(f"/api/v1/jobs/{job_id}").json()["state"] == "cancelled"
            assert client.post(f"/api/v1/jobs/{job_id}/retry").json()["state"] == "queued"
            node.clear_faults()
            job = wait_for(client, job_id, {"succeeded", "failed", "cancelled"})
            assert job["state"] == "succeeded" and job["upstream_task_id"] == f"{job_id}-r1"
            # The first run's task, which landed after the retry, was stopped there too.
            until(lambda: (node_task(node, job_id) or {}).get("error") == "Task cancelled by user",
                  what="the first run's task cancelled")
        assert submitted_ids(node) == Counter({job_id: 1, f"{job_id}-r1": 1})
