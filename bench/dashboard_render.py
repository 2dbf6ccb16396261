"""Server time to render the dashboard's pages with 100,000 jobs in the store.

A real SQLite store is filled fast (executemany, one transaction): 100,000 jobs, mostly finished,
3,000 still queued, in dashboard batches of 500, one batch of 5,000 and API jobs without a batch.
The gateway app is built in this process with no upstream (nothing is dispatched), and each page
is requested through Litestar's in-process test client; the time is the whole request, handler
and template render included (median and 95th percentile of N). Then the query plans of the
dashboard's reads, to show each one uses an index.

    python bench/dashboard_render.py            # 100,000 jobs, 30 requests per page
    python bench/dashboard_render.py --jobs 20000 --repeat 10
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from litestar.testing import TestClient

from x2v_gateway.app import create_app
from x2v_gateway.settings import Settings
from x2v_gateway.store import JobStore

ADMIN_KEY = "x2v_bench-dashboard-admin-key-0123456789"
BATCH_SIZE = 500
BIG_BATCH = 5000
TARGET_MS = 200.0


def fill(db_path: Path, total: int) -> dict[str, str]:
    """Insert `total` jobs; returns ids worth requesting (a batch, the big batch, a job)."""
    JobStore(db_path).close()  # the schema, through the store's own migrations
    rng = random.Random(5)
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("BEGIN")
    now = time.time() - total * 2.0
    sha = "ab" * 32
    jobs, members, batches, events = [], [], [], []
    queued_from = total - 3000  # the newest 3,000 are still waiting: the queue is realistic
    plain_every = 5  # one job in five came through the API without a batch
    batch_id, in_batch, batch_no = None, 0, 0
    big = f"big-{BIG_BATCH}"
    for n in range(1, total + 1):
        created = now + n * 2.0
        if n % plain_every == 0:
            job_batch = None
        elif BIG_BATCH <= n < BIG_BATCH + BIG_BATCH * plain_every // (plain_every - 1):
            job_batch = big  # an API batch: no batch_jobs rows, like jobs posted with a batch_id
        else:
            if batch_id is None or in_batch >= BATCH_SIZE:
                batch_no += 1
                batch_id, in_batch = f"b{batch_no:06d}bench", 0
                batches.append((batch_id, f"Campaign {batch_no}", "s2v", "each", created, "{}"))
            job_batch = batch_id
            in_batch += 1
        if n > queued_from:
            state = "queued"
        else:
            state = rng.choices(["succeeded", "failed", "cancelled"], [94, 4, 2])[0]
        task = "t2v" if n % 97 == 0 else "s2v"
        params = {"prompt": f"a presenter talking, take {n}", "seed": rng.randrange(2**32)}
        finished = created + 30.0 if state != "queued" else None
        jobs.append((
            n, f"j{n:016d}", task, state, json.dumps(params),
            json.dumps({"image": sha, "audio": sha} if task == "s2v" else {}),
            "demo" if finished else None, 1 if finished else 0, rng.randint(-1, 1), job_batch,
            created, finished or created, created + 1 if finished else None,
            created + 2 if finished else None, finished,
            "demo: RuntimeError: out of memory" if state == "failed" else None,
            sha if state == "succeeded" else None,
        ))
        if job_batch and job_batch != big:
            members.append((f"j{n:016d}", job_batch, in_batch,
                            json.dumps({"image": f"face{in_batch:03d}.png", "audio": "voice.wav"})))
        if n == total - 10:
            for k, s in enumerate(("queued", "submitted", "running", "succeeded")):
                events.append((f"j{n:016d}", created + k, s, ""))
    conn.executemany(
        "INSERT INTO jobs (seq, id, task, state, params, inputs, upstream, attempts, priority,"
        " batch_id, created_at, updated_at, submitted_at, started_at, finished_at, error, result_sha)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", jobs,
    )
    conn.executemany("INSERT INTO batches (id, name, task, mode, created_at, form) VALUES (?, ?, ?, ?, ?, ?)", batches)
    conn.executemany("INSERT INTO batch_jobs (job_id, batch_id, position, files) VALUES (?, ?, ?, ?)", members)
    conn.executemany("INSERT INTO job_events (job_id, at, state, detail) VALUES (?, ?, ?, ?)", events)
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.close()
    middle = batches[len(batches) // 2][0]
    return {"batch": middle, "big": big, "job": f"j{total - 10:016d}", "mid_seq": str(total // 2)}


def time_page(client: TestClient, url: str, repeat: int) -> tuple[float, float, int]:
    client.get(url)  # warm: template compiled, pages in the OS cache
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        response = client.get(url)
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, (url, response.status_code, response.text[:300])
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, round(0.95 * (len(times) - 1)))], len(response.content)


PLANS = {
    "jobs list, newest": "SELECT * FROM jobs ORDER BY seq DESC LIMIT 51",
    "jobs list, one state": "SELECT * FROM jobs WHERE state IN (?) ORDER BY seq DESC LIMIT 51",
    "jobs list, one task": "SELECT * FROM jobs WHERE task = ? ORDER BY seq DESC LIMIT 51",
    "batch counts": "SELECT state, count(*) FROM jobs WHERE batch_id = ? GROUP BY state",
    "batch rows": "SELECT * FROM jobs WHERE jobs.batch_id = ? AND jobs.seq > ? ORDER BY jobs.seq LIMIT ?",
    "queue positions": "SELECT seq, row_number() OVER (ORDER BY priority DESC, seq) FROM jobs WHERE state = 'queued'",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        started = time.perf_counter()
        ids = fill(data / "gateway.db", args.jobs)
        print(f"filled {args.jobs:,} jobs in {time.perf_counter() - started:.1f} s\n")
        pages = {
            "jobs list (newest 50)": "/ui/jobs",
            "jobs list, state=failed": "/ui/jobs?state=failed",
            "jobs list, state=queued (queue positions)": "/ui/jobs?state=queued",
            "jobs list, task=t2v": "/ui/jobs?task=t2v",
            "jobs list, a page in the middle": f"/ui/jobs?before={ids['mid_seq']}",
            f"batch page ({BATCH_SIZE} jobs)": f"/ui/batches/{ids['batch']}",
            f"batch page ({BIG_BATCH:,} jobs, first 500 rows)": f"/ui/batches/{ids['big']}",
            "batches (front page)": "/ui/",
            "job page": f"/ui/jobs/{ids['job']}",
        }
        app = create_app(
            Settings(data_dir=data, retention_hours=0, log_level="WARNING", admin_key=ADMIN_KEY),
            upstreams=[],
        )
        rows = []
        # An admin key sees every job: the largest pages there are.
        with TestClient(app) as client:
            client.headers["Authorization"] = f"Bearer {ADMIN_KEY}"
            for name, url in pages.items():
                med, p95, size = time_page(client, url, args.repeat)
                rows.append((name, med, p95, size))
        conn = sqlite3.connect(data / "gateway.db")
        plans = {
            name: " / ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, ("x",) * sql.count("?")))
            for name, sql in PLANS.items()
        }
        conn.close()
    print(f"Dashboard render time, {args.jobs:,} jobs in the store, {args.repeat} requests each "
          f"(target < {TARGET_MS:.0f} ms)\n")
    print("| page | median ms | p95 ms | HTML KB |")
    print("|---|---:|---:|---:|")
    for name, med, p95, size in rows:
        print(f"| {name} | {med:.1f} | {p95:.1f} | {size / 1024:.0f} |")
    print("\n| query | SQLite plan |")
    print("|---|---|")
    for name, plan in plans.items():
        if plan == "SCAN jobs":  # ORDER BY seq DESC LIMIT: walks the rowid backwards, 51 rows
            plan += " (backwards on the rowid, stops after 51 rows)"
        print(f"| {name} | {plan} |")
    slow = [name for name, med, _, _ in rows if med > TARGET_MS]
    if slow:
        print(f"\nover {TARGET_MS:.0f} ms: {', '.join(slow)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
