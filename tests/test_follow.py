"""Following a node's jobs: a finished task is seen soon after its end, with few status calls.

The gateway knows when a task began and how long that kind of task takes on that node, so it
asks when the end is due instead of on a fixed tick, within one status call per
X2V_POLL_INTERVAL on average. Both sides are read on the node: its access log says when it was
asked, its task list when each task ended.
"""

from __future__ import annotations

import re
import statistics
import time
from datetime import datetime

import loopback
from gateway_proc import GatewayProcess, wait_for
from servers import NodeProcess

from x2v_gateway.dispatch import FOLLOW_BURST

_ACCESS = re.compile(r'^(\S+ \S+) INFO uvicorn\.access: .*"GET (\S+) HTTP', re.MULTILINE)


class LoggedNode(NodeProcess):
    def command(self) -> list[str]:
        return [*super().command(), "--access-log"]

    def status_calls(self) -> list[float]:
        """When each status request reached the node (not a submission, nor a download)."""
        return [
            datetime.strptime(at, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            for at, path in _ACCESS.findall(self.log())
            if "/result" not in path and "/files/" not in path and path != "/health"
        ]


def test_finished_tasks_are_seen_right_after_their_end_within_one_status_call_per_second(tmp_path):
    node = LoggedNode(tmp_path / "node", job_seconds=1.5, max_queue_size=20).start()
    gateway = GatewayProcess(tmp_path / "gw", f"n={node.url}", X2V_POLL_INTERVAL="1.0")
    try:
        gateway.start()
        started = time.time()
        with gateway.client() as client:
            ids = [client.post("/api/v1/jobs", json={"task": "t2v", "prompt": f"job {i}"}).json()["id"]
                   for i in range(8)]
            jobs = [wait_for(client, job_id, {"succeeded", "failed"}) for job_id in ids]
        elapsed = time.time() - started
        tasks = loopback.get(f"{node.url}/v1/tasks/", timeout=10).json()
    finally:
        gateway.stop()
        node.stop()
    assert all(job["state"] == "succeeded" for job in jobs)
    calls = [at for at in node.status_calls() if at >= started]
    # The budget: one call per second on average, and a few in a row at most.
    assert len(calls) <= elapsed + FOLLOW_BURST, (len(calls), elapsed)
    # The gateway learns a node's run time from its first job; from the third on, the first
    # call after a task's end comes right after it. A fixed 1 s tick would leave half a second
    # on average, and up to a whole one.
    ends = sorted(datetime.fromisoformat(t["end_time"]).timestamp() for t in tasks.values())
    gaps = [min(at for at in calls if at >= end) - end for end in ends[2:]]
    assert statistics.median(gaps) < 0.25, (gaps, len(calls), elapsed)
