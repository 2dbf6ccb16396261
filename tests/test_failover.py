"""Failover: jobs of nodes killed, restarted, stuck or silent finish elsewhere, and never run twice.

Real demo nodes on 127.0.0.1 (killed and restarted for real), the gateway as a real process; the
nodes' own task lists and submission journals are the evidence.
"""

from __future__ import annotations

import loopback
from gateway_proc import until
from pool_support import (
    api,
    client_events,
    gateway_for,
    start,
    submit,
    submitted_ids,
    tasks_on,
    wait_all,
)
from servers import MisbehavingNode, NodeProcess


def test_jobs_of_a_node_killed_mid_job_finish_elsewhere(tmp_path, cleanup):
    nodes = {name: NodeProcess(tmp_path / name, job_seconds=1.0) for name in ("a", "b", "c")}
    for node in start(*nodes.values()):
        cleanup(node)
    gateway = gateway_for(tmp_path, nodes)
    cleanup(gateway)
    victim = nodes["c"]
    with api(gateway) as client:
        ids = [submit(client) for _ in range(9)]
        # c runs one of them and holds the next in its own queue.
        until(lambda: sum(1 for i, t in tasks_on(victim).items() if i in ids and t["status"] in ("processing", "pending")) == 2)
        victim.kill()
        jobs = wait_all(client, ids, timeout=60)
        assert all(j["state"] == "succeeded" for j in jobs.values()), jobs
        lost = [i for i in submitted_ids(victim) if jobs[i]["upstream"] != "c"]
        assert len(lost) >= 2
        for job_id in lost:
            detail = " ".join(e["detail"] for e in client.get(f"/api/v1/jobs/{job_id}").json()["events"])
            assert "c stopped accepting connections" in detail
        assert client.get("/api/v1/nodes/c").json()["state"] == "down"
        assert 'x2v_upstream_up{upstream="c"} 0.0' in client.get("/metrics").text
    for name in ("a", "b"):
        # Each job reached a surviving node once.
        sent = submitted_ids(nodes[name])
        assert len(sent) == len(set(sent))


def test_restarted_node_has_its_lost_jobs_resubmitted_without_duplicates(tmp_path, cleanup):
    flaky = MisbehavingNode(tmp_path / "flaky", job_seconds=1.0)
    steady = NodeProcess(tmp_path / "steady", job_seconds=1.0)
    for node in start(flaky, steady):
        cleanup(node)
    gateway = gateway_for(tmp_path, {"flaky": flaky, "steady": steady})
    cleanup(gateway)
    with api(gateway) as client:
        ids = [submit(client) for _ in range(8)]
        until(lambda: sum(1 for i, t in tasks_on(flaky).items() if i in ids and t["status"] == "completed") >= 1
              and sum(1 for t in tasks_on(flaky).values() if t["status"] == "pending") == 1)
        before = set(submitted_ids(flaky))
        flaky.forget_tasks()  # a restart: every task forgotten, the finished videos kept
        jobs = wait_all(client, ids)
    assert all(j["state"] == "succeeded" for j in jobs.values())
    sent = submitted_ids(flaky) + submitted_ids(steady)
    resent = {i for i in ids if sent.count(i) > 1}
    # Only the running job and the one waiting behind it were lost; each went out once more.
    # The jobs the node had finished were collected from its files, not run again.
    assert 1 <= len(resent) <= 2 and resent <= before
    assert all(sent.count(i) <= 2 for i in ids)
    for job_id in resent:
        events = client_events(gateway, job_id)
        assert "no longer knows the task" in events



def test_job_not_started_by_its_deadline_moves_and_never_runs_twice(tmp_path, cleanup):
    stuck = NodeProcess(tmp_path / "stuck", job_seconds=4.0)  # one very long job
    spare = NodeProcess(tmp_path / "spare", job_seconds=0.3)
    for node in start(stuck, spare):
        cleanup(node)
    gateway = gateway_for(tmp_path, {"stuck": stuck, "spare": spare}, X2V_START_DEADLINE="1")
    cleanup(gateway)
    with api(gateway) as client:
        client.post("/api/v1/nodes/spare/drain").raise_for_status()
        long_job, waiting = submit(client), submit(client)
        until(lambda: tasks_on(stuck).get(waiting, {}).get("status") == "pending")
        client.post("/api/v1/nodes/spare/undrain").raise_for_status()
        job = wait_all(client, [waiting])[waiting]
        assert job["upstream"] == "spare" and job["state"] == "succeeded"
        assert "not started on stuck" in client_events(gateway, waiting)
        wait_all(client, [long_job])
    # Cancelled while it waited, it never ran there: still `cancelled`, never `completed`.
    assert tasks_on(stuck)[waiting]["status"] == "cancelled"


def test_job_moved_off_its_only_node_runs_there_later_instead_of_ending_cancelled(tmp_path, cleanup):
    only = NodeProcess(tmp_path / "only", job_seconds=3.0)
    for node in start(only):
        cleanup(node)
    gateway = gateway_for(tmp_path, {"only": only}, X2V_START_DEADLINE="1")
    cleanup(gateway)
    with api(gateway) as client:
        long_job, waiting = submit(client), submit(client)
        jobs = wait_all(client, [long_job, waiting], timeout=40)
        # Cancelled there after its deadline, it came back to the same node: the node still
        # holds the cancelled task under the job's id, so the new attempt needs another one.
        assert jobs[waiting]["state"] == "succeeded", jobs[waiting]["error"]
        assert "not started on only" in client_events(gateway, waiting)
        assert jobs[waiting]["upstream_task_id"] != waiting
    assert tasks_on(only)[waiting]["status"] == "cancelled"


def test_job_on_a_node_that_stops_answering_moves_and_is_cancelled_there(tmp_path, cleanup):
    sick = MisbehavingNode(tmp_path / "sick", job_seconds=7.0)
    spare = NodeProcess(tmp_path / "spare", job_seconds=0.3)
    for node in start(sick, spare):
        cleanup(node)
    gateway = gateway_for(tmp_path, {"sick": sick, "spare": spare}, X2V_START_DEADLINE="2")
    cleanup(gateway)
    with api(gateway) as client:
        client.post("/api/v1/nodes/spare/drain").raise_for_status()
        # Someone else's long task runs on the node; ours waits behind it.
        loopback.post(f"{sick.url}/v1/tasks/video/", json={"task_id": "theirs", "prompt": "x"}).raise_for_status()
        ours = submit(client)
        until(lambda: tasks_on(sick).get(ours, {}).get("status") == "pending")
        # Its status routes break while its worker goes on: the gateway cannot see it any more.
        sick.fault("error", route=r"^GET /v1/(tasks/|service/)", times=None, status=500)
        client.post("/api/v1/nodes/spare/undrain").raise_for_status()
        until(lambda: client.get("/api/v1/nodes/sick").json()["state"] == "down", timeout=10)
        # Silent for the start-by deadline: the job goes where it can run.
        job = wait_all(client, [ours], timeout=30)[ours]
        assert job["upstream"] == "spare" and job["state"] == "succeeded"
        assert "sick has not answered for 2 s" in client_events(gateway, ours)
        sick.clear_faults()
        # Back: the task it still holds for the moved job is cancelled before it could start.
        until(lambda: tasks_on(sick)[ours]["status"] == "cancelled", timeout=15)
        until(lambda: tasks_on(sick)["theirs"]["status"] == "completed", timeout=15)
    assert tasks_on(sick)[ours]["status"] == "cancelled"  # it never ran there


# -- the registry -----------------------------------------------------------------------------
