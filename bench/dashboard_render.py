"""The dashboard's pages and the list pages over HTTP, from a real gateway with a million jobs of
history, its dispatcher's loops live: this code and another checkout's, side by side.

    git worktree add --detach /work/wt/dash1m-base 75f8b9d   # the code to compare with
    PYTHONPATH=$PWD/src .venv/bin/python bench/dashboard_render.py --base /work/wt/dash1m-base/src
    PYTHONPATH=$PWD/src .venv/bin/python bench/dashboard_render.py --jobs 100000 --repeat 10

The store is filled through SQL (bench/common.py's `fill_store`, `History.realistic`): `--jobs`
jobs, all but the newest `--queued` finished (94 % succeeded, 4 % failed, 2 % cancelled), five
keys, batches of 500 and 5,000 made in the dashboard and through the API, half the jobs in none.
Filling a million jobs takes minutes: the filled file is kept in /tmp/x2v-bench-stores, keyed by
the fill's parameters and the schema it was filled on, and copied on the next run (`--refill`
fills again; delete the directory to reclaim the space).

Each code runs as `x2v-gateway serve` (default log level and poll interval) with one demo node
that runs the first queued job for an hour, so the dispatcher and the node's follow loop keep
working while the rest wait. Each page is fetched `--repeat` times in a row with the admin key
(who sees every job: the largest pages), or ("a key's") with one of the five keys (its own jobs),
after two warm-up fetches; the codes take turns page by
page, `--rounds` times. Reported: median and p95 of each page's time from request to last byte
(median of the rounds' values), its size, and the ratio of p95s.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import ROOT, GatewayProcess, History, NodeProcess, fill_store, key_secret, median, percentile

LIST_TARGET_MS = 20.0  # the list pages (the jobs list in the API and the dashboard)
PAGE_TARGET_MS = 100.0  # the heaviest dashboard page


def pages(db_path: Path, history: History) -> tuple[dict[str, str], dict[str, str], str]:
    """Each page measured, by name: its address, as the admin and as the key that made the batch
    of 500 jobs; and that key's id."""
    batches = history.batch_ids()
    conn = sqlite3.connect(db_path)
    try:
        (middle,) = conn.execute("SELECT max(seq) / 2 FROM jobs").fetchone()
        (job,) = conn.execute("SELECT id FROM jobs WHERE seq = ?", (middle,)).fetchone()
        (owner,) = conn.execute("SELECT owner FROM jobs WHERE batch_id = ? LIMIT 1", (batches["500"],)).fetchone()
    finally:
        conn.close()
    cursor = base64.urlsafe_b64encode(f"seq:{middle}".encode()).decode().rstrip("=")
    # A key sees its own jobs: the same reads with an owner (its own indexes), smaller pages.
    as_key = {
        "a key's API: newest 50": "/api/v1/jobs?limit=50",
        "a key's API: state=failed": "/api/v1/jobs?limit=50&state=failed",
        "a key's /ui/jobs": "/ui/jobs",
        "a key's /ui/jobs?state=failed": "/ui/jobs?state=failed",
        "a key's front page": "/ui/",
        "a key's batch page, 500 jobs": f"/ui/batches/{batches['500']}",
    }
    return {
        "API: newest 50": "/api/v1/jobs?limit=50",
        "API: state=failed": "/api/v1/jobs?limit=50&state=failed",
        "API: state=queued": "/api/v1/jobs?limit=50&state=queued",
        "API: task=t2v (1 job in 97)": "/api/v1/jobs?limit=50&task=t2v",
        "API: a page in the middle": f"/api/v1/jobs?limit=50&cursor={cursor}",
        "API: a batch of 5,000": f"/api/v1/jobs?limit=50&batch_id={batches['5000']}",
        "/ui/jobs": "/ui/jobs",
        "/ui/jobs?state=failed": "/ui/jobs?state=failed",
        "/ui/jobs?state=queued (queue places)": "/ui/jobs?state=queued",
        "/ui/jobs?task=t2v": "/ui/jobs?task=t2v",
        "/ui/jobs, a page in the middle": f"/ui/jobs?before={middle}",
        "/ui/jobs?batch= (an API batch)": f"/ui/jobs?batch={batches['api']}",
        "front page (/ui/)": "/ui/",
        "batch page, 500 jobs": f"/ui/batches/{batches['500']}",
        "batch page, 5,000 jobs (first 500 rows)": f"/ui/batches/{batches['5000']}",
        "batch page, API batch of 5,000": f"/ui/batches/{batches['api']}",
        "batch page, 5,000 jobs as a gallery": f"/ui/batches/{batches['5000']}?view=gallery",
        "batch page, 500 queued jobs (queue places)": f"/ui/batches/{batches['queued']}",
        "job page": f"/ui/jobs/{job}",
        "nodes page": "/ui/nodes",
        "pipelines page": "/ui/pipelines",
    }, as_key, owner


def is_list(name: str) -> bool:
    return name.removeprefix("a key's ").startswith(("API:", "/ui/jobs"))


def fetch(client: httpx.Client, url: str, repeat: int) -> tuple[list[float], int]:
    """`repeat` sequential GETs after two warm-ups: their times in ms, and the page's size."""
    times = []
    for n in range(repeat + 2):
        started = time.perf_counter()
        response = client.get(url)
        elapsed = (time.perf_counter() - started) * 1000
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code} {response.text[:300]}")
        if n >= 2:
            times.append(elapsed)
    return times, len(response.content)


def start(name: str, src: Path, root: Path, history: History, refill: bool) -> tuple[NodeProcess, GatewayProcess]:
    data = root / name / "gw"
    took = fill_store(data / "gateway.db", src, history, cache=not refill)
    print(f"{name}: store filled (or copied from the cache) in {took:.0f} s", file=sys.stderr)
    node = NodeProcess(root / name / "node", job_seconds=3600, max_queue_size=2000).start()
    gateway = GatewayProcess(data, nodes=f"n1={node.url}", PYTHONPATH=str(src), X2V_POLL_INTERVAL="1")
    try:
        gateway.start(timeout=180)
        with gateway.client() as client:  # the dispatcher at work: one job on the node
            deadline = time.monotonic() + 60
            while not client.get("/api/v1/jobs?state=running,submitted&limit=1").json()["jobs"]:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: no job went to the node")
                time.sleep(0.2)
    except BaseException:
        gateway.stop()
        node.stop()
        raise
    return node, gateway


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--queued", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=30, help="fetches of each page per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base", type=Path, help="src/ of another checkout, measured beside this one")
    parser.add_argument("--refill", action="store_true", help="fill the store again, not from the cache")
    args = parser.parse_args()
    history = History.realistic(args.jobs, args.queued)
    codes = {"this": ROOT / "src"}
    if args.base:
        codes["base"] = args.base.resolve()
    root = Path(tempfile.mkdtemp(prefix="x2v-bench-dashboard-"))
    running: list = []
    gateways: dict[str, GatewayProcess] = {}
    try:
        for name, src in codes.items():
            node, gateways[name] = start(name, src, root, history, args.refill)
            running += [node, gateways[name]]
        admin_urls, key_urls, owner = pages(root / "this" / "gw" / "gateway.db", history)
        urls = {**admin_urls, **key_urls}
        times = {(code, page): [] for page in urls for code in codes}
        sizes: dict[tuple[str, str], int] = {}
        # Plain clients: a GatewayProcess's own client keeps every body it reads (for the tests).
        clients = {(code, who): httpx.Client(base_url=gateway.url, timeout=60, headers={
            "Authorization": f"Bearer {gateway.admin_key if who == 'admin' else key_secret(owner)}"})
            for code, gateway in gateways.items() for who in ("admin", "key")}
        for round_ in range(args.rounds):
            for page, url in urls.items():
                who = "key" if page in key_urls else "admin"
                for code in (list(codes) if round_ % 2 == 0 else list(reversed(codes))):
                    values, sizes[code, page] = fetch(clients[code, who], url, args.repeat)
                    times[code, page].append((median(values), percentile(values, 95)))
            print(f"round {round_ + 1} done", file=sys.stderr)
        for client in clients.values():
            client.close()
    finally:
        for proc in reversed(running):
            proc.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"{args.jobs:,} jobs in the store ({args.queued:,} queued, one running on the node); the admin"
          f" key, or the key {owner} of 5; {args.repeat} GETs per page per round, median of {args.rounds} alternating rounds;"
          f" load average {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores\n")
    print("| page | " + " | ".join(f"{code} p50 ms | {code} p95 ms" for code in codes)
          + " | KB | target p95 ms |" + (" p95 this/base |" if "base" in codes else ""))
    print("|---|" + "---:|---:|" * len(codes) + "---:|---:|" + ("---:|" if "base" in codes else ""))
    missed = []
    for page in urls:
        p95 = {code: median([p for _, p in times[code, page]]) for code in codes}
        cells = " | ".join(f"{median([m for m, _ in times[code, page]]):.1f} | {p95[code]:.1f}" for code in codes)
        target = LIST_TARGET_MS if is_list(page) else PAGE_TARGET_MS
        ratio = f" {p95['this'] / p95['base']:.2f} |" if "base" in codes else ""
        print(f"| {page} | {cells} | {sizes['this', page] / 1024:.0f} | {target:.0f} |{ratio}")
        if p95["this"] > target:
            missed.append(page)
    if missed:
        print(f"\nover target (this code): {', '.join(missed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
