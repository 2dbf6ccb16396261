"""Gateway replicas on one SQLite file: pool use with 1 and 3, reads on 1 and 3, a replica's death, chaos.

    .venv/bin/python bench/replicas.py [--skip-pool] [--skip-reads] [--skip-death] [--chaos]
                                       [--store sqlite|postgresql]

`--store postgresql`: the replicas keep their store in PostgreSQL (a throwaway server started
by the run, tests/pg_cluster.py) instead of their shared SQLite file.

In one run, on 127.0.0.1, replicas and demo nodes as real processes (tests/replica_cluster.py):

1. pool: 8 demo nodes x 200 jobs of 2 s, through 1 replica, then through 3 (jobs sent to the
   replicas in turn), default settings (1 s polls, look-ahead 1). Utilisation as bench/pool.py
   counts it: the nodes' own busy time over nodes x makespan.
2. reads: `GET /api/v1/jobs/{id}` of finished jobs from 16 client threads for 10 s, against 1
   replica and against 3 (each thread on one replica); requests per second and latency, the
   median of 3 rounds.
3. death: 3 replicas, 4 nodes, jobs of 6 s; the replica following the most jobs in flight is
   SIGKILLed; the time until the others have taken every one of them over (read from the
   store), 3 rounds.
4. `--chaos`: the long chaos round: 500 jobs across 3 replicas and 4 nodes, a random replica
   SIGKILLed 10 times (restarted each time); then 0 lost, 0 stuck, 0 sent twice, no node above
   its slots, every video downloaded and decoded.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from common import median, percentile  # first: it puts tests/ on the path
import gateway_proc
from pool import node_tasks, pool_figures
from replica_cluster import Cluster, run_chaos

QUIET = {"X2V_POLL_INTERVAL": "1.0", "X2V_LOG_LEVEL": "WARNING"}


def pool_run(root: Path, replicas: int, nodes: int, jobs: int, job_seconds: float) -> dict:
    cluster = Cluster(root, replicas=replicas, nodes=nodes, job_seconds=job_seconds, **QUIET).start()
    try:
        t0 = time.time()
        ids = cluster.submit(jobs)
        submitted = time.time() - t0
        states = cluster.wait_finished(ids, timeout=jobs * job_seconds + 180)
        spans = {n.url: node_tasks(n, set(ids)) for n in cluster.nodes}
        figures = pool_figures(spans, t0, nodes)
        figures.update(states=dict(states), submitted_in=submitted, most_held=cluster.most_held(),
                       sent_twice=sum(1 for n in cluster.sent().values() if n > 1))
        return figures
    finally:
        cluster.stop()


def reads_run(cluster: Cluster, replicas: int, job_ids: list[str], seconds: float, threads: int = 16) -> dict:
    """GETs of finished jobs from `threads` clients, spread over the first `replicas` replicas."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        replica = cluster.replicas[i % replicas]
        with replica.client(timeout=30) as http:
            n = 0
            while time.monotonic() < stop:
                started = time.perf_counter()
                response = http.get(f"/api/v1/jobs/{job_ids[n % len(job_ids)]}")
                latencies[i].append(time.perf_counter() - started)
                errors[i] += response.status_code != 200
                n += 1

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    every = [x for per in latencies for x in per]
    return {"rps": len(every) / seconds, "p50_ms": 1000 * median(every),
            "p99_ms": 1000 * percentile(every, 99), "errors": sum(errors)}


def death_rounds(root: Path, rounds: int) -> list[dict]:
    cluster = Cluster(root, replicas=3, nodes=4, job_seconds=6.0, **QUIET).start()
    results = []
    try:
        for r in range(rounds):
            ids = cluster.submit(16, prefix=f"death {r}")
            deadline = time.monotonic() + 60
            while True:
                victim = cluster.busiest()
                held = cluster.held_by(victim.name)
                if len(held) >= 3 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            victim.kill()
            killed = time.monotonic()
            while cluster.held_by(victim.name) & held:
                time.sleep(0.05)
            moved = time.monotonic() - killed
            victim.start()
            cluster.wait_finished(ids, timeout=300)
            cluster.check_exactly_once(ids)
            results.append({"jobs": len(held), "moved_after": moved})
            print(f"  round {r + 1}: {len(held)} jobs of {victim.name} taken over {moved:.1f} s after its SIGKILL", flush=True)
        return results
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--job-seconds", type=float, default=2.0)
    parser.add_argument("--replicas", default="1,3", help="replica counts of the pool run, e.g. 1,3")
    parser.add_argument("--skip-pool", action="store_true")
    parser.add_argument("--skip-reads", action="store_true")
    parser.add_argument("--skip-death", action="store_true")
    parser.add_argument("--chaos", action="store_true", help="the long chaos round (500 jobs, 10 kills)")
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="x2v-replicas-"))
    store = "SQLite"
    if args.store == "postgresql":
        from pg_cluster import PostgresCluster

        postgres = PostgresCluster().start()
        databases: dict[Path, str] = {}
        # Every cluster's replicas share one database, as they share one data dir.
        gateway_proc.database_for = lambda data_dir: databases.setdefault(data_dir.resolve(), postgres.new_database())
        store = "PostgreSQL"
    try:
        _run(args, root, store)
    finally:
        if args.store == "postgresql":
            postgres.stop()


def _run(args: argparse.Namespace, root: Path, store: str) -> None:

    if not args.skip_pool:
        print(f"pool: {args.nodes} nodes x {args.jobs} jobs of {args.job_seconds:g} s", flush=True)
        for replicas in (int(n) for n in args.replicas.split(",")):
            f = pool_run(root / f"pool-{replicas}", replicas, args.nodes, args.jobs, args.job_seconds)
            print(f"  {replicas} replica(s) on {store}: utilisation {100 * f['utilisation']:.1f} %,"
                  f" makespan {f['makespan']:.1f} s (ideal {args.jobs * args.job_seconds / args.nodes:.0f} s),"
                  f" idle gap median {1000 * f['gap_median']:.0f} ms p95 {1000 * f['gap_p95']:.0f} ms max {1000 * f['gap_max']:.0f} ms,"
                  f" first start {f['first_start']:.2f} s, jobs per node {f['per_node']},"
                  f" most held by a node {f['most_held']}, sent twice {f['sent_twice']}, {f['states']}",
                  flush=True)

    if not args.skip_reads:
        print("reads: GET /api/v1/jobs/{id}, 16 client threads, 10 s, median of 3 rounds", flush=True)
        cluster = Cluster(root / "reads", replicas=3, nodes=2, **QUIET).start()
        try:
            ids = cluster.submit(50, prefix="reads")
            cluster.wait_finished(ids, timeout=120)
            for replicas in (1, 3):
                rounds = [reads_run(cluster, replicas, ids, 10.0) for _ in range(3)]
                rps = median([r["rps"] for r in rounds])
                each = ", ".join(f"{r['rps']:.0f}" for r in rounds)
                print(f"  {replicas} replica(s): {rps:.0f} req/s, p50 {median([r['p50_ms'] for r in rounds]):.1f} ms,"
                      f" p99 {median([r['p99_ms'] for r in rounds]):.1f} ms,"
                      f" errors {sum(r['errors'] for r in rounds)} (rounds: {each} req/s)",
                      flush=True)
        finally:
            cluster.stop()

    if not args.skip_death:
        print("death: 3 replicas, 4 nodes, jobs of 6 s, the busiest replica SIGKILLed", flush=True)
        rounds = death_rounds(root / "death", 3)
        print(f"  taken over after: median {median([r['moved_after'] for r in rounds]):.1f} s,"
              f" max {max(r['moved_after'] for r in rounds):.1f} s (lease 6 s, heartbeat 1 s)", flush=True)

    if args.chaos:
        print("chaos: 500 jobs, 3 replicas, 4 nodes, 10 SIGKILLs", flush=True)
        cluster = Cluster(root / "chaos", replicas=3, nodes=4, job_seconds=0.5, X2V_LOG_LEVEL="WARNING").start()
        try:
            outcome = run_chaos(cluster, jobs=500, kills=10, seed=int(time.time()), spread=60.0,
                                gap=(2.0, 5.0), timeout=900)
            ids = outcome["ids"]
            cluster.check_exactly_once(ids)
            cluster.check_videos(ids)
            print(f"  {len(ids)} jobs, {len(outcome['kills'])} kills in {outcome['seconds']:.0f} s:"
                  f" {dict(outcome['states'])}, 0 sent twice, most held by a node"
                  f" {cluster.most_held()} (slots 2), every video decoded", flush=True)
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
