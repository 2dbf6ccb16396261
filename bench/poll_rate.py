"""Completion-detection lag and status calls per node-second, two codes side by side in one run.

    git worktree add --detach /work/wt/base-i 37e5e3f   # the fixed 1 s poll tick
    .venv/bin/python bench/poll_rate.py --baseline-src /work/wt/base-i/src [--nodes 4] \\
        [--jobs-per-node 10] [--job-seconds 2] [--rounds 2]

Each round starts fresh demo nodes and a gateway of each code in turn (same settings, default
X2V_POLL_INTERVAL of 1 s) and sends `nodes x jobs-per-node` jobs at once, so that every node runs
jobs back to back while the rest wait in the gateway's queue. Measured:

* status calls per node-second, counted on the nodes' side (their access logs): every request
  that is neither a submission, a cancel nor a result download, from the first submission to the
  last job's end, divided by the nodes and that time;
* detection lag per job: from the task's `end_time` in the node's own task list to the job's
  `finished_at` at the gateway (seen finished, video copied and checked). Nodes and gateway share
  this machine's clock.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
from common import GatewayProcess, NodeProcess, median, percentile

_REQUEST = re.compile(r'"(GET|POST|DELETE) (\S+) HTTP')


class LoggedNode(NodeProcess):
    def command(self) -> list[str]:
        return [*super().command(), "--access-log"]

    def status_calls(self) -> int:
        return sum(
            1 for method, path in _REQUEST.findall(self.log())
            if method == "GET" and "/result" not in path and "/files/" not in path
        )


def _seconds(iso: str) -> float:
    # The gateway's times end in Z; the node's are naive local times, as LightX2V writes them.
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def run(code: str, src: Path, args: argparse.Namespace, root: Path) -> dict[str, object]:
    nodes = [
        LoggedNode(root / f"{code}-node{i}", job_seconds=args.job_seconds, max_queue_size=100).start()
        for i in range(args.nodes)
    ]
    gateway = GatewayProcess(
        root / f"{code}-gw", nodes=",".join(f"n{i}={n.url}" for i, n in enumerate(nodes)),
        X2V_POLL_INTERVAL=str(args.poll_interval), X2V_LOG_LEVEL="WARNING",
        PYTHONPATH=str(src),
    ).start()
    try:
        before = sum(n.status_calls() for n in nodes)
        with gateway.client() as client:
            started = time.time()
            ids = [
                client.post("/api/v1/jobs", json={"task": "t2v", "prompt": f"job {i}"}).json()["id"]
                for i in range(args.nodes * args.jobs_per_node)
            ]
            while client.get("/api/v1/jobs", params={"state": "queued,submitted,running", "limit": 1}).json()["jobs"]:
                time.sleep(0.5)
            ended = time.time()
            jobs = {i: client.get(f"/api/v1/jobs/{i}").json() for i in ids}
        calls = sum(n.status_calls() for n in nodes) - before
        tasks: dict[str, dict] = {}
        for node in nodes:
            tasks.update(httpx.get(f"{node.url}/v1/tasks/", timeout=10).json())
    finally:
        gateway.stop()
        for n in nodes:
            n.stop()
    assert all(j["state"] == "succeeded" for j in jobs.values()), {j["state"] for j in jobs.values()}
    # The gateway sends its job id as the task id, and as save_result_path on the form route.
    by_name = {t["save_result_path"].removesuffix(".mp4"): t for t in tasks.values()}
    lags = [
        _seconds(job["finished_at"]) - _seconds(by_name[job_id]["end_time"])
        for job_id, job in jobs.items()
    ]
    window = ended - started
    return {"calls": calls / (args.nodes * window), "lags": lags, "window": window}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline-src", type=Path,
                        help="src/ of a checkout of the code to compare with (else: this code only)")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--jobs-per-node", type=int, default=10)
    parser.add_argument("--job-seconds", type=float, default=2.0)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    codes = {"now": Path(__file__).resolve().parent.parent / "src"}
    if args.baseline_src:
        codes = {"before": args.baseline_src.resolve(), **codes}
    root = Path(tempfile.mkdtemp(prefix="x2v-bench-poll-"))
    results: dict[str, list[dict]] = {code: [] for code in codes}
    try:
        for round_ in range(args.rounds):
            # Alternate which code goes first, so a machine growing busier favours neither.
            order = list(codes) if round_ % 2 == 0 else list(reversed(codes))
            for code in order:
                results[code].append(run(f"{code}{round_}", codes[code], args, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    load = os.getloadavg()[0]
    print(f"{args.nodes} demo nodes, {args.jobs_per_node} jobs of {args.job_seconds} s each, sent at once; "
          f"X2V_POLL_INTERVAL={args.poll_interval}; {args.rounds} rounds per code, alternating; "
          f"load average {load:.1f} on {os.cpu_count()} cores at the end\n")
    print("| code | status calls per node-second | detection lag p50 ms | p95 ms | max ms |")
    print("|---|---:|---:|---:|---:|")
    summary = {}
    for code, runs in results.items():
        lags = [lag for r in runs for lag in r["lags"]]
        calls = median([r["calls"] for r in runs])
        summary[code] = (calls, median(lags))
        print(f"| {code} ({codes[code]}) | {calls:.2f} | {median(lags) * 1000:.0f} | "
              f"{percentile(lags, 95) * 1000:.0f} | {max(lags) * 1000:.0f} |")
    if "before" not in summary:
        return
    before, now = summary["before"], summary["now"]
    print(f"\nDetection lag, median: {now[1] / before[1]:.2f} of before "
          f"({before[1] * 1000:.0f} ms -> {now[1] * 1000:.0f} ms); "
          f"status calls per node-second: {now[0]:.2f} (before {before[0]:.2f})")


if __name__ == "__main__":
    main()
