"""Several gateway replicas sharing one SQLite file: any of them takes any request, no node gets
more than its slots, a replica SIGKILLed has its jobs taken over, and none reaches a node twice.
tests/test_replicas_postgres.py runs these same tests on one PostgreSQL database.

The long chaos round (500 jobs, 10 kills) is `bench/replicas.py --chaos`.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import loopback
from gateway_proc import until
from replica_cluster import Cluster, run_chaos
from s3_server import SeaweedS3
from servers import MisbehavingNode, NodeProcess


@pytest.fixture
def database_url() -> str:
    """The replicas' store: here their shared SQLite file (test_replicas_postgres.py: PostgreSQL)."""
    return ""


@pytest.fixture
def bucket() -> tuple[SeaweedS3, str] | None:
    """Where the chaos round's replicas keep their files: here their shared data directory
    (test_replicas_postgres.py: a prefix of a real S3 bucket, as a multi-machine deployment)."""
    return None


def test_replicas_share_the_queue_without_overfilling_a_node_and_see_each_others_changes(tmp_path, database_url):
    cluster = Cluster(tmp_path, job_seconds=0.5, database_url=database_url).start()
    try:
        ids = cluster.submit(40)
        # A client waiting on one replica hears of a change made through another within a second.
        waiter, other = cluster.replicas[0], cluster.replicas[1]
        answer: dict = {}

        def wait_on_waiter() -> None:
            with waiter.client() as client:
                response = client.post("/api/v1/jobs?wait=30", json={"task": "t2v", "prompt": "waited on"})
            answer.update(response.json(), returned_at=time.monotonic())

        thread = threading.Thread(target=wait_on_waiter)
        thread.start()
        with other.client() as client:
            job = None
            deadline = time.monotonic() + 20
            while job is None:
                assert time.monotonic() < deadline, "the job posted to the waiter never showed"
                time.sleep(0.05)
                listed = client.get("/api/v1/jobs", params={"limit": 1}).json()["jobs"]
                job = next((j for j in listed if j["params"].get("prompt") == "waited on"), None)
            cancelled_at = time.monotonic()
            assert client.delete(f"/api/v1/jobs/{job['id']}").status_code == 200
        thread.join(timeout=40)
        assert answer["state"] == "cancelled"
        heard_after = answer["returned_at"] - cancelled_at
        assert heard_after < 1.0, f"the waiting replica heard of the cancel {heard_after:.1f} s later"

        cluster.wait_finished(ids, timeout=90)
        cluster.check_exactly_once(ids)
        with cluster.db() as conn:
            senders = {row[0] for row in conn.execute("SELECT DISTINCT replica FROM jobs WHERE id IN"
                                                        f" ({','.join('?' * len(ids))})", ids)}
        assert len(senders) >= 2, f"one replica sent everything: {senders}"
        cluster.check_videos(ids, sample=5)
    finally:
        cluster.stop()


def test_sigkilled_replicas_jobs_are_taken_over_within_10_s_and_sent_once(tmp_path, database_url):
    cluster = Cluster(tmp_path, job_seconds=4.0, database_url=database_url).start()
    try:
        ids = cluster.submit(10)
        # Wait until the busiest replica follows jobs that run, and some that only just went out.
        victim = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            victim = cluster.busiest()
            if len(cluster.held_by(victim.name)) >= 2:
                break
            time.sleep(0.1)
        held = cluster.held_by(victim.name)
        assert len(held) >= 2
        victim.kill()
        killed_at = time.monotonic()
        while cluster.held_by(victim.name) & held:
            assert time.monotonic() - killed_at < 10, "its jobs were not taken over within 10 s"
            time.sleep(0.1)
        moved_in = time.monotonic() - killed_at
        with cluster.db() as conn:
            takers = {row[0] for row in conn.execute(
                f"SELECT replica FROM jobs WHERE id IN ({','.join('?' * len(held))})", list(held)
            )}
        assert victim.name not in takers
        cluster.wait_finished(ids, timeout=120)
        cluster.check_exactly_once(ids)
        print(f"{len(held)} jobs taken over {moved_in:.1f} s after the kill")
        # The survivors answer for every job, the dead replica's included.
        with cluster.live()[0].client() as client:
            for job_id in held:
                assert client.get(f"/api/v1/jobs/{job_id}").json()["state"] == "succeeded"
    finally:
        cluster.stop()


def test_a_cancel_made_through_another_replica_reaches_the_node_and_the_owners_event_stream_at_once(tmp_path):
    # Slow polls (8 s): the owner's follow loop would deliver the stop request only at its next
    # round, 4 s later on average; the owner hears of the cancel from the store's changes instead.
    cluster = Cluster(tmp_path, replicas=2, nodes=1, job_seconds=10.0, X2V_POLL_INTERVAL="8").start()
    (node,) = cluster.nodes
    try:
        ids = cluster.submit(2, prefix="cancelled elsewhere")
        until(lambda: len(cluster.sent()) == 2, timeout=30, what="both jobs on the node")

        def node_status(task_id: str) -> str:
            return loopback.get(f"{node.url}/v1/tasks/{task_id}/status", timeout=10).json()["status"]

        waiting = until(lambda: next((i for i in ids if node_status(i) == "pending"), None),
                        what="one job waiting in the node's queue")
        with cluster.db() as conn:
            (owner,) = conn.execute("SELECT replica FROM jobs WHERE id = ?", (waiting,)).fetchone()
        other = next(r for r in cluster.replicas if r.name != owner)
        # The job's event stream on its owner carries the cancel made through the other replica.
        heard: list[float] = []

        def follow_stream() -> None:
            with next(r for r in cluster.replicas if r.name == owner).client() as client:
                with client.stream("GET", f"/api/v1/jobs/{waiting}/events") as stream:
                    for line in stream.iter_lines():
                        if line.startswith("data:") and '"cancelled"' in line:
                            heard.append(time.monotonic())
                            return

        listener = threading.Thread(target=follow_stream, daemon=True)
        listener.start()
        time.sleep(0.5)  # the stream has replayed what came before
        with other.client() as client:
            cancelled_at = time.monotonic()
            assert client.delete(f"/api/v1/jobs/{waiting}").json()["state"] == "cancelled"
        until(lambda: node_status(waiting) == "cancelled", timeout=10, what="the node's task cancelled")
        took = time.monotonic() - cancelled_at
        assert took < 3.0, f"the node's task was cancelled {took:.1f} s after the user's cancel"
        listener.join(timeout=10)
        assert heard and heard[0] - cancelled_at < 1.0, "the owner's event stream did not carry the cancel within 1 s"
    finally:
        cluster.stop()


def test_a_node_drained_added_or_removed_through_one_replica_is_taken_up_by_the_others(tmp_path):
    cluster = Cluster(tmp_path, replicas=2, nodes=2, job_seconds=0.3).start()
    extra = NodeProcess(tmp_path / "extra", job_seconds=0.3, tasks="t2v").start()
    first, second = cluster.replicas
    try:
        with first.client() as client:
            assert client.post("/api/v1/nodes/n0/drain").status_code == 200
            added = client.post("/api/v1/nodes", json={"name": "n9", "url": extra.url, "tasks": ["t2v"]})
            assert added.status_code in (200, 201), added.text
        with second.client() as client:
            def nodes() -> dict[str, str]:
                return {n["name"]: n["state"] for n in client.get("/api/v1/nodes").json()}

            until(lambda: nodes().get("n0") == "draining" and "n9" in nodes(), timeout=10,
                  what="the other replica seeing the drain and the new node")
            pinned = [client.post("/api/v1/jobs", json={"task": "t2v", "prompt": f"on n9 {i}", "upstream": "n9"})
                      for i in range(3)]
            assert all(r.status_code == 201 for r in pinned), [r.text for r in pinned]
        ids = cluster.submit(10, prefix="while n0 drains") + [r.json()["id"] for r in pinned]
        cluster.wait_finished(ids, timeout=60)
        assert cluster.states(ids) == Counter({"succeeded": len(ids)})
        on_n0 = {e["task_id"] for e in cluster.nodes[0].submissions()}
        assert not on_n0 & set(ids), "a drained node got new jobs"
        assert {r.json()["id"] for r in pinned} <= {e["task_id"] for e in extra.submissions()}
        with first.client() as client:
            assert client.delete("/api/v1/nodes/n9").status_code in (200, 204)
        with second.client() as client:
            until(lambda: "n9" not in nodes(), timeout=10, what="the other replica dropping n9")
    finally:
        cluster.stop()
        extra.stop()


@pytest.mark.parametrize("node_has_it", [False, True], ids=["never-read", "task-made"])
def test_replica_killed_with_its_submission_on_the_wire_has_it_resolved_against_the_node(tmp_path, node_has_it):
    cluster = Cluster(tmp_path, replicas=2, nodes=1, job_seconds=1.0, node_class=MisbehavingNode).start()
    (node,) = cluster.nodes
    try:
        # The node holds the next submission's connection without answering: before reading it
        # (its sender's death drops it), or after making its task (only the answer is lost).
        node.fault("hang", route="submit", seconds=25, phase="after" if node_has_it else "before")
        (job_id,) = cluster.submit(1, prefix="on the wire")
        until(lambda: node.faults()[0]["fired"], what="the submission reached the node")
        with cluster.db() as conn:
            (sender,) = conn.execute("SELECT replica FROM jobs WHERE id = ?", (job_id,)).fetchone()
        next(r for r in cluster.replicas if r.name == sender).kill()
        node.clear_faults()
        until(lambda: cluster.held_by(sender) == set() and cluster.states([job_id])["succeeded"],
              timeout=30, what="the job taken over and finished")
        assert cluster.sent() == {job_id: 1}  # the node made its task once, either way
        with cluster.live()[0].client() as client:
            job = client.get(f"/api/v1/jobs/{job_id}").json()
        # Sent again only when the node had no such task.
        assert job["state"] == "succeeded" and job["attempts"] == (1 if node_has_it else 2), job["events"]
    finally:
        cluster.stop()


def test_chaos_replicas_sigkilled_at_random_lose_nothing_and_send_nothing_twice(tmp_path, database_url, bucket):
    blobs = bucket[0].settings(bucket[1]) if bucket else {}
    cluster = Cluster(tmp_path, job_seconds=1.0, database_url=database_url, **blobs).start()
    try:
        outcome = run_chaos(cluster, jobs=60, kills=3, seed=15, spread=12.0, gap=(1.0, 3.0), timeout=180)
        ids = outcome["ids"]
        assert len(outcome["kills"]) == 3
        assert len(set(ids)) == 60  # every job the clients sent exists, once
        cluster.check_exactly_once(ids)
        cluster.check_videos(ids)
        if bucket:  # every result is an object of the bucket, not a file on some replica's disk
            server, prefix = bucket
            kept = {key.rsplit("/", 1)[-1] for key in server.keys(prefix)}
            with cluster.live()[0].client() as client:
                results = {i: client.get(f"/api/v1/jobs/{i}").json()["result"]["sha256"] for i in ids}
            assert not {i: sha for i, sha in results.items() if sha not in kept}
        for replica in cluster.replicas:
            assert loopback.get(f"{replica.url}/healthz", timeout=10).status_code == 200
    finally:
        cluster.stop()
