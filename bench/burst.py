"""A burst of API traffic against one gateway process: does the event loop keep answering?

2,000 `GET /api/v1/jobs` (limits 10, 50, 100 and 500 in turn) and 300 submits, spread evenly over
30 s and sent open-loop (each at its time, whether or not the earlier ones were answered), against
a gateway with 4 demo nodes, while `/healthz` is asked every 50 ms on a connection of its own.
`/healthz` does no work: its latency is how long the event loop was busy with something else.
Reported: `/healthz` p50/p99, the API's own p50/p99 (lists and submits), and errors (a status
>= 400 or no answer).

Before the burst, `--seed-jobs` jobs are submitted (so that a `limit=500` page holds 500 jobs) and
left to finish. With `--baseline-src`, the same burst also runs against the gateway code at that
path (a `src` directory, e.g. of `git worktree add /work/wt/base 5e998d3`), alternating with this
checkout's code round by round on the same nodes, in one run:

    python bench/burst.py                                          # this checkout only
    python bench/burst.py --baseline-src /work/wt/base/src --rounds 3
    python bench/burst.py --seconds 5 --lists 200 --submits 30    # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from common import ROOT, GatewayProcess, NodeProcess, median, percentile

LIST_LIMITS = (10, 50, 100, 500)


class NicedNode(NodeProcess):
    """A demo node at the lowest CPU priority. In a deployment the nodes are other machines
    (GPU servers): their work never takes the gateway's CPU. Here four demo nodes render every
    video on the CPU of the same 2 cores; niced, they get what the gateway leaves."""

    def command(self) -> list[str]:
        return ["nice", "-n", "19", *super().command()]
HEALTH_EVERY = 0.05


@dataclass
class Samples:
    """Latencies in ms of the answered requests of one kind, and how many failed."""

    ms: list[float] = field(default_factory=list)
    errors: int = 0

    def cell(self) -> str:
        if not self.ms:
            return "—"
        return f"{percentile(self.ms, 50):.1f} / {percentile(self.ms, 99):.1f}"


async def _timed(client: httpx.AsyncClient, samples: Samples, method: str, url: str, **kw) -> None:
    started = time.perf_counter()
    try:
        response = await client.request(method, url, **kw)
        failed = response.status_code >= 400
    except httpx.HTTPError:
        failed = True
    if failed:
        samples.errors += 1
    else:
        samples.ms.append((time.perf_counter() - started) * 1000)


async def _at_times(count: int, seconds: float, make) -> None:
    """Start `make(i)` for i in range(count), evenly over `seconds`, without waiting for each."""
    start, tasks = time.perf_counter(), []
    for i in range(count):
        delay = start + i * seconds / count - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(make(i)))
    await asyncio.gather(*tasks)


async def burst(url: str, key: str, *, seconds: float, lists: int, submits: int) -> dict[str, Samples]:
    results = {"healthz": Samples(), "list": Samples(), "submit": Samples()}
    headers = {"authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with (
        httpx.AsyncClient(base_url=url, headers=headers, timeout=30, limits=limits) as api,
        httpx.AsyncClient(base_url=url, timeout=30) as health,
    ):
        cycle = itertools.cycle(LIST_LIMITS)
        list_limits = [next(cycle) for _ in range(lists)]

        def list_one(i: int):
            return _timed(api, results["list"], "GET", f"/api/v1/jobs?limit={list_limits[i]}")

        def submit_one(i: int):
            body = {"task": "t2v", "prompt": f"burst job {i}"}
            return _timed(api, results["submit"], "POST", "/api/v1/jobs", json=body)

        def health_one(_: int):
            return _timed(health, results["healthz"], "GET", "/healthz")

        await asyncio.gather(
            _at_times(lists, seconds, list_one),
            _at_times(submits, seconds, submit_one),
            _at_times(int(seconds / HEALTH_EVERY), seconds, health_one),
        )
    return results


async def seed(url: str, key: str, count: int) -> None:
    """`count` jobs submitted, 8 at a time, and waited for: a full `limit=500` page of history."""
    headers = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
        gate = asyncio.Semaphore(8)

        async def one(i: int) -> None:
            async with gate:
                r = await client.post("/api/v1/jobs", json={"task": "t2v", "prompt": f"seed {i}"})
                r.raise_for_status()

        await asyncio.gather(*(one(i) for i in range(count)))
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            page = (await client.get("/api/v1/jobs?state=queued,submitted,running&limit=1")).json()
            if not page["jobs"]:
                return
            await asyncio.sleep(0.5)
        raise RuntimeError("seed jobs did not finish in 10 minutes")


def run_one(root: Path, name: str, src: Path, nodes: str, args: argparse.Namespace) -> dict[str, Samples]:
    gateway = GatewayProcess(
        root / name, nodes=nodes, PYTHONPATH=str(src), X2V_LOG_LEVEL="WARNING",
        X2V_POLL_INTERVAL="1.0",
    ).start(timeout=60)
    try:
        asyncio.run(seed(gateway.url, gateway.admin_key, args.seed_jobs))
        return asyncio.run(burst(
            gateway.url, gateway.admin_key, seconds=args.seconds, lists=args.lists, submits=args.submits,
        ))
    finally:
        gateway.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--lists", type=int, default=2000, help="GET /api/v1/jobs requests")
    parser.add_argument("--submits", type=int, default=300, help="POST /api/v1/jobs requests")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--job-seconds", type=float, default=0.5, help="each demo job's run time")
    parser.add_argument("--seed-jobs", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--baseline-src", type=Path, help="a src/ directory of other gateway code")
    parser.add_argument("--nodes-share-cpu", action="store_true",
                        help="run the demo nodes at normal priority, competing with the gateway for CPU")
    args = parser.parse_args()

    variants = {"this checkout": ROOT / "src"}
    if args.baseline_src is not None:
        if not (args.baseline_src / "x2v_gateway").is_dir():
            raise SystemExit(f"{args.baseline_src} holds no x2v_gateway package")
        variants = {"baseline": args.baseline_src.resolve(), **variants}
    root = Path(tempfile.mkdtemp(prefix="x2v-bench-burst-"))
    node_class = NodeProcess if args.nodes_share_cpu else NicedNode
    nodes = [
        node_class(root / f"node{i}", job_seconds=args.job_seconds, max_queue_size=100).start()
        for i in range(args.nodes)
    ]
    node_list = ",".join(f"n{i}={node.url}" for i, node in enumerate(nodes))
    results: dict[str, list[dict[str, Samples]]] = {name: [] for name in variants}
    try:
        for round_no in range(args.rounds):
            for name, src in variants.items():
                print(f"round {round_no + 1}: {name} ({src})", flush=True)
                dir_name = f"gw-{round_no}-{name.replace(' ', '-')}"
                results[name].append(run_one(root, dir_name, src, node_list, args))
    finally:
        for node in nodes:
            node.stop()

    print(f"\n{args.lists:,} GET /api/v1/jobs (limit {', '.join(map(str, LIST_LIMITS))}) and {args.submits}"
          f" submits over {args.seconds:g} s, {args.nodes} demo nodes, {args.seed_jobs} jobs of history;"
          f" /healthz every {HEALTH_EVERY * 1000:.0f} ms. Latency p50 / p99 in ms, each round:\n")
    print("| code | round | /healthz | GET /api/v1/jobs | POST /api/v1/jobs | errors |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rounds in results.items():
        for round_no, r in enumerate(rounds, start=1):
            errors = sum(s.errors for s in r.values())
            print(f"| {name} | {round_no} | {r['healthz'].cell()} | {r['list'].cell()} |"
                  f" {r['submit'].cell()} | {errors} |")
    if args.rounds > 1:
        print("\nmedian over rounds of each round's /healthz p99:", ", ".join(
            f"{name} {median([percentile(r['healthz'].ms, 99) for r in rounds if r['healthz'].ms]):.1f} ms"
            for name, rounds in results.items()
        ))


if __name__ == "__main__":
    main()
