"""Upstream status requests per job-minute, with 200 jobs in flight on 4 demo nodes.

    .venv/bin/python bench/poll_rate.py [--jobs 200] [--nodes 4] [--job-seconds 0.5]

Counted on the nodes' side (their access logs): every request that is not a submission or a
result download. A job-minute is one job spending one minute in the gateway between its
submission and its end. For reference, LightX2V's own client polls each task every 0.5 s:
120 requests per job-minute while the task is on a node.
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
import time
from pathlib import Path

from common import GatewayProcess, NodeProcess

_REQUEST = re.compile(r'"(GET|POST|DELETE) (\S+) HTTP')


class LoggedNode(NodeProcess):
    def command(self) -> list[str]:
        return [*super().command(), "--access-log"]

    def requests(self) -> list[tuple[str, str]]:
        return _REQUEST.findall(self.log())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--job-seconds", type=float, default=0.5)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="x2v-bench-poll-"))
    nodes = [LoggedNode(root / f"node{i}", job_seconds=args.job_seconds, max_queue_size=100).start()
             for i in range(args.nodes)]
    gateway = GatewayProcess(
        root / "gw", nodes=",".join(f"n{i}={n.url}" for i, n in enumerate(nodes)),
        X2V_POLL_INTERVAL=str(args.poll_interval), X2V_LOG_LEVEL="WARNING",
    ).start()
    try:
        before = [len(n.requests()) for n in nodes]
        started = time.time()
        with gateway.client() as client:
            ids = [client.post("/api/v1/jobs", json={"task": "t2v", "prompt": f"job {i}"}).json()["id"]
                   for i in range(args.jobs)]
            while True:
                page = client.get("/api/v1/jobs", params={"state": "queued,submitted,running", "limit": 1}).json()
                if not page["jobs"]:
                    break
                time.sleep(0.5)
            jobs = [client.get(f"/api/v1/jobs/{i}").json() for i in ids]
        elapsed = time.time() - started
        assert all(j["state"] == "succeeded" for j in jobs), {j["state"] for j in jobs}
        requests = [r for n, b in zip(nodes, before) for r in n.requests()[b:]]
    finally:
        gateway.stop()
        for n in nodes:
            n.stop()
        shutil.rmtree(root, ignore_errors=True)

    def seconds(iso: str) -> float:
        from datetime import datetime
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()

    job_minutes = sum(seconds(j["finished_at"]) - seconds(j["created_at"]) for j in jobs) / 60
    status = [r for r in requests if r[0] == "GET" and "/result" not in r[1] and "/files/" not in r[1]]
    kinds: dict[str, int] = {}
    for _, path in status:
        key = re.sub(r"/v1/tasks/[^/]+/status", "/v1/tasks/{id}/status", path)
        kinds[key] = kinds.get(key, 0) + 1
    print(f"{args.jobs} jobs of {args.job_seconds} s on {args.nodes} demo nodes, poll interval {args.poll_interval} s, "
          f"makespan {elapsed:.1f} s, {job_minutes:.1f} job-minutes in flight\n")
    print("| status request | count |")
    print("|---|---|")
    for key, count in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"| `GET {key}` | {count} |")
    print(f"\nStatus requests per job-minute: **{len(status) / job_minutes:.2f}** "
          f"(LightX2V's client, one request per task every 0.5 s: 120)")


if __name__ == "__main__":
    main()
