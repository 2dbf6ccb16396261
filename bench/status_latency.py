"""`GET /api/v1/jobs/{id}` of a finished and of a queued job, on a store with a long history,
at the default log level: requests/s, p50/p99, and the latency the gateway adds over asking the
node directly (`GET /v1/tasks/{id}/status` on a demo node); and the p95 of the list pages
(`GET /api/v1/jobs?limit=50`, `/ui/jobs`).

    PYTHONPATH=$PWD/src .venv/bin/python bench/status_latency.py [--seconds 8] [--rounds 3] \\
        [--finished 1000000] [--queued 10000] [--code base=/path/to/other/checkout/src]

Each `--code NAME=SRC` runs a second gateway from another checkout (e.g. the main branch before
a change, from `git worktree add`) on a store filled the same way, measured in alternating rounds
with this checkout's so that a busy machine slows both alike. The store is filled through SQL
before the gateway starts: `--finished` succeeded jobs (with their events) and `--queued` jobs
waiting behind one that runs for an hour on the only node (bench/common.py's `fill_store`; a
filled store is kept in /tmp/x2v-bench-stores, by the fill's parameters and schema, and copied on
the next run). Load comes from wrk (Debian package `wrk`) on loopback; medians over rounds are
reported.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import ROOT, GatewayProcess, History, NodeProcess, fill_store, median, percentile

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(url: str, *, connections: int, seconds: int, headers: tuple[str, ...] = ()) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
         *(arg for h in headers for arg in ("-H", h)), url],
        capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {}
    for pct in ("50", "99"):
        value, unit = re.search(rf"\s{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)", out).groups()
        lat[pct] = float(value) * _UNITS[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{url}: {errors.group(1)} error responses")
    return {"rps": rps, "p50": lat["50"], "p99": lat["99"]}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def job_ids(db_path: Path, queued: int) -> tuple[str, str]:
    """A finished job from the middle of the history and a job half-way down the queue."""
    conn = sqlite3.connect(db_path)
    try:
        (finished_seq,) = conn.execute("SELECT max(seq) / 2 FROM jobs WHERE state = 'succeeded'").fetchone()
        (done,) = conn.execute("SELECT id FROM jobs WHERE seq >= ? LIMIT 1", (finished_seq,)).fetchone()
        (waiting,) = conn.execute(
            "SELECT id FROM jobs WHERE state = 'queued' ORDER BY priority DESC, seq LIMIT 1 OFFSET ?",
            (queued // 2,),
        ).fetchone()
        return done, waiting
    finally:
        conn.close()


def read_plans(db_path: Path, done: str, waiting: str) -> list[str]:
    """What SQLite does for each statement a GET of these jobs runs (the code on PYTHONPATH),
    with the key lookup: every step should be a SEARCH, or a SCAN of a partial index."""
    from x2v_gateway.routes.api import _full_view_reads
    from x2v_gateway.store.sqlite import SqliteReads as Reads

    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.row_factory = sqlite3.Row
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    reads = Reads(conn)
    for job_id in (done, waiting):
        _full_view_reads(reads, reads.get(job_id))
        reads.pending_deliveries(job_id)  # the GET's `webhooks_pending`
    reads.key_by_hash("0" * 64)
    conn.set_trace_callback(None)
    lines = []
    for sql in dict.fromkeys(statements):
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql)]
        lines.append(f"{' '.join(sql.split())[:110]}\n    -> {'; '.join(plan)}")
    conn.close()
    return lines


def page_p95(url: str, key: str, n: int) -> float:
    """p95 of `n` sequential GETs, in ms."""
    times = []
    with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        for _ in range(n + 3):
            start = time.perf_counter()
            response = client.get(url)
            times.append((time.perf_counter() - start) * 1000)
            response.raise_for_status()
    return percentile(times[3:], 95)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--finished", type=int, default=1_000_000)
    parser.add_argument("--queued", type=int, default=10_000)
    parser.add_argument("--pages", type=int, default=100, help="GETs of each list page per round")
    parser.add_argument("--code", action="append", default=[], metavar="NAME=SRC",
                        help="also measure the gateway from another checkout's src directory")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("needs wrk: apt-get install wrk")
    codes = {"this": ROOT / "src"}
    for item in args.code:
        name, _, src = item.partition("=")
        codes[name] = Path(src).resolve()
    root = Path(tempfile.mkdtemp(prefix="x2v-bench-status-"))
    running: list = []
    targets: dict[str, tuple[str, tuple[str, ...], int]] = {}
    pages: dict[str, tuple[str, str]] = {}
    try:
        # One node per gateway: it runs the first queued job for an hour, so the rest stay queued.
        for name, src in codes.items():  # every store filled before any gateway opens one
            took = fill_store(root / name / "gw" / "gateway.db", src, History(args.finished, args.queued))
            print(f"{name}: filled (or copied) {args.finished:,} finished + {args.queued:,} queued jobs"
                  f" in {took:.0f} s", file=sys.stderr)
        for name, src in codes.items():
            node = NodeProcess(root / name / "node", job_seconds=3600, max_queue_size=2000).start()
            running.append(node)
            data = root / name / "gw"
            done, waiting = job_ids(data / "gateway.db", args.queued)
            if name == "this":
                print("Query plans of a job's GET at this size:", *read_plans(data / "gateway.db", done, waiting),
                      sep="\n  ", file=sys.stderr)
            # The default log level (INFO: uvicorn's access log on), and the default poll interval.
            gateway = GatewayProcess(
                data, nodes=f"n1={node.url}", PYTHONPATH=str(src), X2V_POLL_INTERVAL="1",
            ).start(timeout=120)
            running.append(gateway)
            auth = (f"Authorization: Bearer {gateway.admin_key}",)
            with gateway.client() as client:
                deadline = time.monotonic() + 60
                while not (inflight := client.get("/api/v1/jobs?state=running&limit=1").json()["jobs"]):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{name}: no job started on the node")
                    time.sleep(0.2)
                queued_view = client.get(f"/api/v1/jobs/{waiting}").json()
                assert queued_view["state"] == "queued", queued_view
            print(f"{name}: queued job at position {queued_view.get('queue')}", file=sys.stderr)
            targets[f"{name}: finished job"] = (f"{gateway.url}/api/v1/jobs/{done}", auth, gateway.proc.pid)
            targets[f"{name}: queued job"] = (f"{gateway.url}/api/v1/jobs/{waiting}", auth, gateway.proc.pid)
            pages[f"{name}: `GET /api/v1/jobs?limit=50`"] = (f"{gateway.url}/api/v1/jobs?limit=50", gateway.admin_key)
            pages[f"{name}: `GET /ui/jobs`"] = (f"{gateway.url}/ui/jobs", gateway.admin_key)
            task = inflight[0]["upstream_task_id"]
            if "node" not in targets:
                targets["node"] = (f"{node.url}/v1/tasks/{task}/status", (), node.proc.pid)
        results = {k: {"rps": [], "p50": [], "p99": [], "cpu": []} for k in targets}
        page_results: dict[str, list[float]] = {k: [] for k in pages}
        for _ in range(args.rounds):
            for name, (url, headers, pid) in targets.items():
                cpu = cpu_seconds(pid)
                loaded = wrk(url, connections=32, seconds=args.seconds, headers=headers)
                # CPU per request holds still on a busy machine, where req/s does not.
                results[name]["cpu"].append(
                    (cpu_seconds(pid) - cpu) * 1000 / (loaded["rps"] * args.seconds))
                single = wrk(url, connections=1, seconds=max(3, args.seconds // 2), headers=headers)
                results[name]["rps"].append(loaded["rps"])
                results[name]["p50"].append(single["p50"])
                results[name]["p99"].append(single["p99"])
            for name, (url, key) in pages.items():
                page_results[name].append(page_p95(url, key, args.pages))
    finally:
        for proc in reversed(running):
            proc.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"{args.finished:,} finished + {args.queued:,} queued jobs in the store; log level INFO."
          f" wrk, 1 thread; throughput at 32 connections, latency at 1 connection;"
          f" median of {args.rounds} alternating rounds\n")
    print("| target | req/s (32 conns) | CPU ms/request | p50 ms (1 conn) | p99 ms (1 conn) | p50 added over the node, ms |")
    print("|---|---|---|---|---|---|")
    node_p50 = median(results["node"]["p50"])
    for name, r in results.items():
        added = "" if name == "node" else f"{median(r['p50']) - node_p50:+.3f}"
        label = "node `GET /v1/tasks/{id}/status`" if name == "node" else f"{name} `GET /api/v1/jobs/{{id}}`"
        print(f"| {label} | {median(r['rps']):.0f} | {median(r['cpu']):.3f} | {median(r['p50']):.3f} | {median(r['p99']):.3f} | {added} |")
    print(f"\n| list page | p95 ms ({args.pages} sequential GETs, median of rounds) |")
    print("|---|---|")
    for name, values in page_results.items():
        print(f"| {name} | {median(values):.1f} |")


if __name__ == "__main__":
    main()
