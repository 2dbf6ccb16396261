"""Eight nodes, 200 jobs: how busy the gateway keeps a pool, next to LightX2V's multi-server script.

    .venv/bin/python bench/pool.py [--nodes 8] [--jobs 200] [--job-seconds 2]

In one run, on 127.0.0.1, with demo nodes whose every job takes `--job-seconds`:

1. the gateway (default settings: look-ahead 1, 1 s polls) runs the jobs;
2. the same jobs through `multiserver_baseline.py`, a faithful copy of LightX2V's
   `scripts/server/post_multi_servers.py` loop (status every 3 s, task polls every 0.5 s);
3. the gateway again, with one node SIGKILLed in the middle of the run.

Dispatch planning at scale (1,000 nodes, 50,000 queued, a history, the loops live) is
`bench/plan.py`.

Utilisation is the nodes' own busy time (each task's `start_time`..`end_time` from the node's
`GET /v1/tasks/`) over nodes x makespan; makespan runs from the first submission to the last
task's end. The idle gap is the time between one task's end and the next one's start on a node.
`--skip-baseline`, `--skip-kill` leave parts out.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx

from common import GatewayProcess, NodeProcess, median, percentile
from multiserver_baseline import get_available_urls, messages_like_upstream, process_tasks_async

ADMIN_KEY = "pool-bench-admin-key-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


def start_nodes(root: Path, count: int, job_seconds: float) -> list[NodeProcess]:
    nodes = [NodeProcess(root / f"node{i}", job_seconds=job_seconds, tasks="t2v") for i in range(count)]
    with ThreadPoolExecutor(count) as pool:
        list(pool.map(lambda n: n.start(), nodes))
    return nodes


def _ts(value: str | None) -> float | None:
    # The node's naive local ISO timestamps, as seconds since the epoch.
    return datetime.fromisoformat(value).timestamp() if value else None


def node_tasks(node: NodeProcess, task_ids: set[str]) -> list[tuple[float, float]]:
    """(start, end) of each finished task of ours on the node, by start."""
    listed = httpx.get(f"{node.url}/v1/tasks/", timeout=30).json()
    spans = [
        (_ts(t["start_time"]), _ts(t["end_time"]))
        for tid, t in listed.items()
        if tid in task_ids and t["status"] == "completed" and t["end_time"]
    ]
    return sorted(spans)


def pool_figures(spans: dict[str, list[tuple[float, float]]], t0: float, nodes: int) -> dict:
    ends = [end for s in spans.values() for _, end in s]
    makespan = max(ends) - t0
    busy = sum(end - start for s in spans.values() for start, end in s)
    gaps = [
        b_start - a_end
        for s in spans.values()
        for (_, a_end), (b_start, _) in zip(s, s[1:])
    ]
    return {
        "makespan": makespan,
        "busy": busy,
        "utilisation": busy / (nodes * makespan),
        "gap_median": median(gaps) if gaps else 0.0,
        "gap_p95": percentile(gaps, 95) if gaps else 0.0,
        "gap_max": max(gaps) if gaps else 0.0,
        "first_start": min(start for s in spans.values() for start, _ in s) - t0,
        "per_node": sorted(len(s) for s in spans.values()),
    }


# -- the gateway ---------------------------------------------------------------------------------


def submit_all(url: str, count: int, batch: str) -> list[str]:
    """The jobs, posted from 8 threads (like a client with a loop); returns their ids in order."""
    messages = messages_like_upstream(count)
    with httpx.Client(base_url=url, timeout=60, headers=AUTH) as client:
        def post(i: int) -> str:
            m = messages[i]
            body = {"task": "t2v", "prompt": m["prompt"], "negative_prompt": m["negative_prompt"],
                    "seed": m["seed"], "batch_id": batch}
            response = client.post("/api/v1/jobs", json=body)
            response.raise_for_status()
            return response.json()["id"]

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(post, range(count)))


def wait_all(url: str, batch: str, count: int, timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=60, headers=AUTH) as client:
        while time.monotonic() < deadline:
            jobs = client.get("/api/v1/jobs", params={"batch_id": batch, "limit": 500}).json()["jobs"]
            states: dict[str, int] = {}
            for job in jobs:
                states[job["state"]] = states.get(job["state"], 0) + 1
            if states.get("succeeded", 0) + states.get("failed", 0) + states.get("cancelled", 0) >= count:
                return states
            time.sleep(0.5)
    raise RuntimeError(f"not finished after {timeout} s: {states}")


def run_gateway(nodes: list[NodeProcess], root: Path, jobs: int, job_seconds: float,
                kill: int | None = None) -> dict:
    """The jobs through a fresh gateway; with `kill`, that node is SIGKILLed halfway."""
    data = root / f"gw-{'kill' if kill is not None else 'plain'}"
    data.mkdir()
    spec = ",".join(f"n{i}={n.url}" for i, n in enumerate(nodes))
    gateway = GatewayProcess(data, spec, X2V_POLL_INTERVAL="1.0", X2V_LOG_LEVEL="WARNING",
                             X2V_ADMIN_KEY=ADMIN_KEY).start()
    batch = f"bench-{int(time.time())}"
    killed: dict = {}
    try:
        t0 = time.time()
        if kill is not None:
            ideal = math.ceil(jobs / len(nodes)) * job_seconds

            def killer() -> None:
                time.sleep(ideal / 2)
                victim = nodes[kill]
                # What it did before it died (its memory dies with it).
                listed = httpx.get(f"{victim.url}/v1/tasks/", timeout=30).json()
                victim.kill()
                killed["at"] = time.time()
                killed["listed"] = listed

            threading.Thread(target=killer, daemon=True).start()
        ids = submit_all(gateway.url, jobs, batch)
        submitted = time.time() - t0
        states = wait_all(gateway.url, batch, jobs, timeout=jobs * job_seconds + 120)
        done = time.time() - t0
        task_ids = set(ids)
        spans = {n.url: node_tasks(n, task_ids) for i, n in enumerate(nodes) if i != kill}
        result = {"states": states, "submitted_in": submitted, "gateway_done": done}
        if kill is None:
            result.update(pool_figures(spans, t0, len(nodes)))
            return result
        # The killed node's finished tasks until it died, and the part of the task it was
        # running (wasted: that job runs again elsewhere).
        dead = []
        for tid, t in killed["listed"].items():
            if tid in task_ids and t["status"] == "completed":
                dead.append((_ts(t["start_time"]), _ts(t["end_time"])))
        t_kill = killed["at"]
        ends = [end for s in spans.values() for _, end in s]
        makespan = max(ends) - t0
        # After the kill the 7 survivors did this much work; a pool with no idle time would
        # have done it in work / 7: that is the least the makespan can be.
        after = sum(max(0.0, end - max(start, t_kill)) for s in spans.values() for start, end in s)
        fluid = (t_kill - t0) + after / (len(nodes) - 1)
        with httpx.Client(base_url=gateway.url, timeout=30, headers=AUTH) as client:
            moved_at = []
            for job_id in ids:
                job = client.get(f"/api/v1/jobs/{job_id}").json()
                for event in job["events"] or []:
                    if "elsewhere" in event["detail"] or "no longer knows" in event["detail"]:
                        moved_at.append(datetime.fromisoformat(event["at"].replace("Z", "+00:00")).timestamp())
        succeeded_once = sum(1 for s in spans.values() for _ in s) + len(dead)
        result.update({
            "makespan": makespan,
            "kill_at": t_kill - t0,
            "detection": (min(moved_at) - t_kill) if moved_at else None,
            "moved": len(moved_at),
            "fluid_ideal": fluid,
            "completed_tasks": succeeded_once,
        })
        return result
    finally:
        gateway.stop()
        shutil.rmtree(data, ignore_errors=True)


# -- LightX2V's script ---------------------------------------------------------------------------


def run_baseline(nodes: list[NodeProcess], jobs: int) -> dict:
    urls = get_available_urls([n.url for n in nodes])
    assert urls is not None
    t0 = time.time()
    records = process_tasks_async(messages_like_upstream(jobs), urls)
    done = time.time() - t0
    task_ids = {r.task_id for r in records if r.task_id}
    spans = {n.url: node_tasks(n, task_ids) for n in nodes}
    result = pool_figures(spans, t0, len(nodes))
    result.update({"states": {"succeeded": sum(r.success for r in records)}, "gateway_done": done})
    return result


def report(name: str, r: dict, ideal: float) -> None:
    print(f"{name}: {r['states']}; makespan {r['makespan']:.1f} s (ideal {ideal:.0f} s),"
          f" utilisation {r['utilisation'] * 100:.1f} %, idle gap median {r['gap_median'] * 1000:.0f} ms"
          f" p95 {r['gap_p95'] * 1000:.0f} ms max {r['gap_max'] * 1000:.0f} ms, first task after"
          f" {r['first_start']:.2f} s, jobs per node {r['per_node']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--job-seconds", type=float, default=2.0)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--skip-kill", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="x2v-bench-pool-"))
    ideal = math.ceil(args.jobs / args.nodes) * args.job_seconds
    nodes = start_nodes(root, args.nodes, args.job_seconds)
    try:
        gw = run_gateway(nodes, root, args.jobs, args.job_seconds)
        report("gateway ", gw, ideal)
        if not args.skip_baseline:
            base = run_baseline(nodes, args.jobs)
            report("baseline", base, ideal)
        if not args.skip_kill:
            k = run_gateway(nodes, root, args.jobs, args.job_seconds, kill=args.nodes // 2)
            allowed = args.job_seconds + (k["detection"] or 0)
            print(f"kill    : {k['states']}; node killed at {k['kill_at']:.1f} s, detected after"
                  f" {k['detection']:.2f} s, {k['moved']} job(s) moved; makespan {k['makespan']:.1f} s"
                  f" vs {gw['makespan']:.1f} s without the kill; least possible with {args.nodes - 1}"
                  f" nodes after the kill {k['fluid_ideal']:.1f} s: over it by {k['makespan'] - k['fluid_ideal']:.1f} s"
                  f" (allowed: job time + detection = {allowed:.1f} s)", flush=True)
    finally:
        for node in nodes:
            node.stop()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
