"""What GET of a queued job costs the gateway with 1,000 nodes busy: its place in the queue and
its wait estimate, the part of `GET /api/v1/jobs/{id}` that grows with the number of jobs in
flight.

    .venv/bin/python bench/queued_estimate.py [--nodes 1000] [--queued 50000] [--history 200000]
        [--gets 2000] [--base /path/to/other/checkout/src]

The store of `bench/plan.py` (`--history` finished jobs, `--queued` queued ones), with the first
2 x `--nodes` queued jobs made `running` on the nodes (2 each, as after a start), and the real
Dispatcher (not started) with its run times loaded from that history. Then `--gets` reads of one
queued job, one after another on an event loop, each as the route does it: one hop to a reader
thread for the job's queue position and the estimate's reads, and the estimate. Measured per GET:
wall time (median, p99) and the event loop thread's CPU time (what every other request waits
for). With `--base`, the same runs first on that checkout's sources (in a subprocess).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import sqlite3
import time
from pathlib import Path

from plan import _dispatcher, fill_store, side_by_side


def _busy(path: Path, nodes: int) -> None:
    """The oldest 2 x `nodes` queued jobs running, two on each node."""
    conn = sqlite3.connect(path)
    now = time.time()
    ids = [row[0] for row in conn.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT ?",
                                          (2 * nodes,))]
    conn.executemany(
        "UPDATE jobs SET state = 'running', upstream = ?, submitted_at = ?, started_at = ? WHERE id = ?",
        [(f"n{i // 2}", now - 1, now - 1, job_id) for i, job_id in enumerate(ids)],
    )
    conn.commit()
    conn.close()


async def _gets(path: Path, nodes: int, queued: int, gets: int) -> dict:
    store, dispatcher = _dispatcher(path, nodes)
    dispatcher.timings.load(reversed(await store.read(lambda r: r.recent_run_times())))
    for state in dispatcher._scheduler.ctx.states.values():
        state.up, state.ready = True, True
    job = await store.read(lambda r: r.get(f"j{queued - 1:07d}"))  # the last in the queue
    # This code: the estimate reads what it needs on the reader thread. Before: the route read
    # every job in flight there and the estimate ran on the loop.
    on_thread = "r" in inspect.signature(dispatcher.estimate).parameters

    async def get() -> dict | None:
        if on_thread:
            return await store.read(lambda r: dispatcher.estimate(r, job, r.queue_position(job)))
        position, inflight = await store.read(lambda r: (r.queue_position(job), r.inflight()))
        return dispatcher.estimate(job, position, inflight)

    await get()  # the reader thread's connection opened
    walls, estimate = [], None
    loop_cpu = time.thread_time()
    for _ in range(gets):
        started = time.perf_counter()
        estimate = await get()
        walls.append(time.perf_counter() - started)
    loop_cpu = time.thread_time() - loop_cpu
    store.close()
    walls.sort()
    return {"p50_ms": walls[len(walls) // 2] * 1000, "p99_ms": walls[int(len(walls) * 0.99)] * 1000,
            "per_s": gets / sum(walls), "loop_cpu_ms": loop_cpu / gets * 1000, "estimate": estimate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--queued", type=int, default=50_000)
    parser.add_argument("--history", type=int, default=200_000)
    parser.add_argument("--gets", type=int, default=2000)
    parser.add_argument("--base", help="src directory of the checkout to compare with")
    parser.add_argument("--store", help=argparse.SUPPRESS)  # where the subprocess fills its store
    args = parser.parse_args()

    if args.store:
        fill_store(Path(args.store), args.queued, args.history)
        _busy(Path(args.store), args.nodes)
        print(json.dumps(asyncio.run(_gets(Path(args.store), args.nodes, args.queued, args.gets))))
        return
    results = side_by_side(__file__, args.base, ["--nodes", str(args.nodes), "--queued", str(args.queued),
                                                 "--history", str(args.history), "--gets", str(args.gets)])
    print(f"GET of a queued job: {args.nodes} nodes, {2 * args.nodes} jobs running, {args.queued} queued,"
          f" {args.history} finished; {args.gets} GETs one after another")
    for label, r in results.items():
        print(f"  {label:<5} p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  {r['per_s']:8.0f} /s"
              f"  event loop CPU {r['loop_cpu_ms']:5.2f} ms per GET  last estimate {r['estimate']}")


if __name__ == "__main__":
    main()
