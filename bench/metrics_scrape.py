"""A gateway with 1,000 nodes: how soon it answers once started, and a Prometheus scrape (how
long it takes, and what it does to the requests answered meanwhile).

    .venv/bin/python bench/metrics_scrape.py [--nodes 1000] [--scrapes 5] [--base /other/checkout/src]

`--nodes` lightweight nodes (bench/fake_nodes.py, idle) behind one gateway process. Once it has
looked at every node, `/metrics` is fetched `--scrapes` times, 2 s apart, while another thread
asks `/healthz` every 5 ms: a scrape written on the event loop holds every request that long.
The scrapes are made by curl, so that reading them does not slow this process's own timing.
Reported: how long the gateway took to answer `/healthz` after it was started (it builds a
client per node first), the scrape's time and size, and `/healthz` latencies during the scrapes
(median, p99, max). With `--base`, the same run on that checkout's sources first, both printed
side by side.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import threading
import time
from pathlib import Path

import httpx

from many_nodes import behind_a_gateway, each_code


def measure(src: Path, nodes: int, scrapes: int, root: Path) -> dict:
    with behind_a_gateway(src, nodes, root) as (gateway, _, ready):
        with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {gateway.admin_key}"},
                          timeout=60) as client:
            deadline = time.monotonic() + 120
            while any(node["state"] == "unknown" for node in client.get("/api/v1/nodes").json()):
                assert time.monotonic() < deadline, "the gateway did not look at every node"
                time.sleep(1)
        time.sleep(5)
        latencies: list[float] = []
        done = threading.Event()

        def ask_health() -> None:
            with httpx.Client(base_url=gateway.url, timeout=60) as health:
                while not done.is_set():
                    started = time.perf_counter()
                    health.get("/healthz").raise_for_status()
                    latencies.append(time.perf_counter() - started)
                    time.sleep(0.005)

        asker = threading.Thread(target=ask_health)
        asker.start()
        took, size = [], 0
        try:
            for _ in range(scrapes):
                time.sleep(2)
                # By curl, in a process of its own: reading 8 MB here would hold this process's
                # interpreter, and the thread timing /healthz with it.
                out = subprocess.run(
                    ["curl", "-sf", "-o", "/dev/null", "-w", "%{time_total} %{size_download}",
                     "-H", f"Authorization: Bearer {gateway.admin_key}", f"{gateway.url}/metrics"],
                    capture_output=True, text=True, check=True,
                ).stdout.split()
                took.append(float(out[0]))
                size = int(out[1])
        finally:
            done.set()
            asker.join()
    latencies.sort()
    return {"ready": ready, "scrape": statistics.median(took), "bytes": size, "health_p50": latencies[len(latencies) // 2],
            "health_p99": latencies[int(0.99 * (len(latencies) - 1))], "health_max": latencies[-1],
            "health_n": len(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--scrapes", type=int, default=5)
    parser.add_argument("--base", type=Path, help="src/ of a checkout to compare with")
    args = parser.parse_args()
    results = each_code(args.base, "metrics-scrape-", lambda src, root: measure(src, args.nodes, args.scrapes, root))
    print(f"{args.nodes} idle nodes, /metrics fetched {args.scrapes} times 2 s apart, /healthz asked every 5 ms meanwhile")
    print("| code | started, answering /healthz after | scrape, median | its size | /healthz p50 | p99 | max"
          " | /healthz answered |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, r in results.items():
        print(f"| {label} | {r['ready']:.1f} s | {r['scrape'] * 1000:.0f} ms | {r['bytes'] / 1e6:.1f} MB | {r['health_p50'] * 1000:.1f} ms"
              f" | {r['health_p99'] * 1000:.1f} ms | {r['health_max'] * 1000:.0f} ms | {r['health_n']} |")


if __name__ == "__main__":
    main()
