"""`GET /api/v1/jobs/{id}` on one gateway process: requests/s, p50/p99, and the latency it adds
compared with asking the node directly (`GET /v1/tasks/{id}/status` on a demo node).

    .venv/bin/python bench/status_latency.py [--seconds 8] [--rounds 3]

Load comes from wrk (Debian package `wrk`) on loopback. Gateway and node are measured in
alternating rounds in the same run; medians over rounds are reported.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from common import GatewayProcess, NodeProcess, median, wait_for

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("needs wrk: apt-get install wrk")
    root = Path(tempfile.mkdtemp(prefix="x2v-bench-status-"))
    node = NodeProcess(root / "node").start()
    gateway = GatewayProcess(root / "gw", nodes=f"n1={node.url}", X2V_LOG_LEVEL="WARNING").start()
    try:
        with gateway.client() as client:
            job = client.post("/api/v1/jobs", json={"task": "t2v", "prompt": "latency"}).json()
            job = wait_for(client, job["id"], {"succeeded"})
        # The gateway's request carries an API key (checked on every request); the node has none.
        targets = {
            "gateway `GET /api/v1/jobs/{id}`": (
                f"{gateway.url}/api/v1/jobs/{job['id']}", (f"Authorization: Bearer {gateway.admin_key}",),
            ),
            "node `GET /v1/tasks/{id}/status`": (f"{node.url}/v1/tasks/{job['upstream_task_id']}/status", ()),
        }
        results: dict[str, dict[str, list[float]]] = {k: {"rps": [], "p50": [], "p99": [], "rps1": []} for k in targets}
        for _ in range(args.rounds):
            for name, (url, headers) in targets.items():
                loaded = wrk(url, connections=32, seconds=args.seconds, headers=headers)
                single = wrk(url, connections=1, seconds=max(3, args.seconds // 2), headers=headers)
                results[name]["rps"].append(loaded["rps"])
                results[name]["p50"].append(single["p50"])
                results[name]["p99"].append(single["p99"])
                results[name]["rps1"].append(single["rps"])
    finally:
        gateway.stop()
        node.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"wrk, 1 thread; throughput at 32 connections, latency at 1 connection; median of {args.rounds} alternating rounds\n")
    print("| endpoint | req/s (32 conns) | p50 ms (1 conn) | p99 ms (1 conn) |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {median(r['rps']):.0f} | {median(r['p50']):.3f} | {median(r['p99']):.3f} |")
    gw, nd = results.values()
    print(f"\np50 added by the gateway over asking the node: {median(gw['p50']) - median(nd['p50']):+.3f} ms")


if __name__ == "__main__":
    main()
