"""Every query the store runs on a hot path, with a million jobs of history: its plan and its cost.

The store is filled through SQL (tests/history.py: all but the newest 3,400 jobs finished, one in
three in a batch, 20 keys, 50 nodes), then each method of the store's interface is called as a hot
path calls it (the calls of tests/test_store_plans.py), the SQL it runs is caught, and each
SELECT is timed on its own connection. Plans are checked without statistics (a gateway never runs
ANALYZE): any step that reads a table of history whole is printed.

    PYTHONPATH=$PWD/src .venv/bin/python bench/store_queries.py --jobs 1000000
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

from common import median, percentile
from history import fill_history
from test_store_plans import CALLS, history_scans, statements_by_method

from x2v_gateway.store import JobStore, Reads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=20, help="timings of each statement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="x2v-bench-store-") as tmp:
        started = time.perf_counter()
        history = fill_history(Path(tmp) / "gateway.db", args.jobs)
        print(f"filled {args.jobs:,} jobs in {time.perf_counter() - started:.0f} s")
        store = JobStore(history.path)
        try:
            statements = statements_by_method(store, history)
        finally:
            store.close()
        reads = {name for name in vars(Reads) if not name.startswith("_")}
        conn = sqlite3.connect(history.path)
        partial = {name for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql LIKE '% WHERE %'"
        )}
        rows, scans = [], []
        for name, sqls in statements.items():
            for sql in sqls:
                if found := history_scans(conn, sql, partial):
                    scans.append(f"{name}: {found}: {sql[:200]}")
                if name in reads and sql.startswith("SELECT"):
                    times = []
                    for _ in range(args.repeat):
                        t0 = time.perf_counter()
                        conn.execute(sql).fetchall()
                        times.append((time.perf_counter() - t0) * 1000)
                    rows.append((percentile(times, 95), median(times), name, sql))
        conn.close()
        print(f"\n{sum(map(len, statements.values()))} statements from {len(CALLS)} methods;"
              f" scans of history: {len(scans)}")
        for line in scans:
            print("  " + line)
        rows.sort(reverse=True)
        by_method: dict[str, float] = {}
        for p95, _, name, _ in rows:
            by_method[name] = max(by_method.get(name, 0.0), p95)
        print("\n| read | statements | slowest p95 ms |\n|---|---|---|")
        for name, p95 in sorted(by_method.items(), key=lambda item: -item[1]):
            count = sum(1 for row in rows if row[2] == name)
            print(f"| `{name}` | {count} | {p95:.2f} |")
        print("\nslowest statements (p95 ms, p50 ms):")
        for p95, p50, name, sql in rows[:8]:
            print(f"  {p95:7.2f} {p50:7.2f}  {name}: {sql[:150]}")


if __name__ == "__main__":
    main()
