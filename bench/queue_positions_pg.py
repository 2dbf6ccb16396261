"""Places in the queue for a page of queued jobs on PostgreSQL (the list pages and a batch's
page), with 50,000 queued behind 200,000 finished.

    .venv/bin/python bench/queue_positions_pg.py [--base /path/to/other/checkout/src]

A PostgreSQL cluster from Debian's package (tests/pg_cluster.py) is started for each code, the
store made by that code's migrations and filled through SQL; then `queue_positions` of a page of
50 and of 500 neighbouring queued jobs deep in the queue, 15 times each: medians. With `--base`,
the same runs first on that checkout's sources (in a subprocess).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAGES = (50, 500)


def measure() -> dict[str, float]:
    import psycopg
    from pg_cluster import PostgresCluster

    from x2v_gateway.store import JobStore

    cluster = PostgresCluster().start()
    try:
        url = cluster.new_database()
        store = JobStore(url)
        with psycopg.connect(url) as conn:
            conn.execute("INSERT INTO jobs (id, task, state, params, inputs, priority, created_at, updated_at)"
                         " SELECT 'h' || g, 't2v', 'succeeded', '{}', '{}', 0, 0, 0 FROM generate_series(1, 200000) g")
            conn.execute("INSERT INTO jobs (id, task, state, params, inputs, priority, created_at, updated_at)"
                         " SELECT 'q' || g, 't2v', 'queued', '{}', '{}', CASE WHEN g % 100 = 0 THEN 5 ELSE 0 END,"
                         " 0, 0 FROM generate_series(1, 50000) g")
            conn.execute("ANALYZE jobs")
        result = {}
        for size in PAGES:
            ids = [f"q{i}" for i in range(40000, 40000 + size)]
            jobs = store.read_blocking(lambda r, ids=ids: r.jobs_by_id(ids))
            times = []
            for _ in range(15):
                started = time.perf_counter()
                store.read_blocking(lambda r, jobs=jobs: r.queue_positions(jobs))
                times.append(time.perf_counter() - started)
            result[str(size)] = sorted(times)[len(times) // 2] * 1000
        store.close()
        return result
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", help="src directory of the checkout to compare with")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the subprocess
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure()))
        return
    sources = ([("base", args.base)] if args.base else []) + [("this", str(HERE.parent / "src"))]
    print("queue_positions on PostgreSQL, 50,000 queued, 200,000 finished (median of 15):", flush=True)
    for label, src in sources:
        out = subprocess.run([sys.executable, __file__, "--one"], capture_output=True, text=True, check=False,
                             env={**os.environ, "PYTHONPATH": f"{src}:{HERE.parent / 'tests'}"})
        if out.returncode:
            sys.exit(f"{label} ({src}) failed:\n{out.stderr[-3000:]}")
        found = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {label:<5} " + "  ".join(f"a page of {size}: {found[str(size)]:7.2f} ms" for size in PAGES))


if __name__ == "__main__":
    main()
