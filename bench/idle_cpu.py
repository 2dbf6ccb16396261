"""CPU an idle gateway uses with a long history and one dead node, two codes side by side.

    git worktree add --detach /work/wt/base-i 37e5e3f
    .venv/bin/python bench/idle_cpu.py --baseline-src /work/wt/base-i/src [--jobs 100000] [--seconds 30]

A real SQLite store is filled directly (executemany, one transaction) with `--jobs` finished
jobs, then copied for each code. Each gateway process starts on its copy with one node whose
port refuses connections (nothing listens there), at the default log level and poll interval;
after a 10 s settle its CPU time (utime + stime, from /proc/<pid>/stat) is read over
`--seconds`. The codes take turns, `--rounds` each.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

from common import GatewayProcess, free_port, median

from x2v_gateway.store import JobStore

_TICK = os.sysconf("SC_CLK_TCK")


def fill(db_path: Path, total: int) -> None:
    """`total` finished jobs (94 % succeeded), on a node that is no longer there."""
    JobStore(db_path).close()  # the schema, through the store's own migrations
    rng = random.Random(13)
    start = time.time() - total * 2.0
    sha = "ab" * 32
    rows = []
    for n in range(1, total + 1):
        created = start + n * 2.0
        state = rng.choices(["succeeded", "failed", "cancelled"], [94, 4, 2])[0]
        rows.append((
            n, f"j{n:016d}", "t2v", state, json.dumps({"prompt": f"take {n}", "seed": n}), "{}",
            "dead", 1, 0, created, created + 30, created + 1, created + 2, created + 30,
            "dead: RuntimeError: out of memory" if state == "failed" else None,
            sha if state == "succeeded" else None,
        ))
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO jobs (seq, id, task, state, params, inputs, upstream, attempts, priority,"
        " created_at, updated_at, submitted_at, started_at, finished_at, error, result_sha)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows,
    )
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def measure(src: Path, template: Path, root: Path, seconds: float) -> float:
    data = root / "gw"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    shutil.copy(template, data / "gateway.db")
    gateway = GatewayProcess(
        data, nodes=f"dead=http://127.0.0.1:{free_port()}", PYTHONPATH=str(src),
        X2V_POLL_INTERVAL="1.0",
    ).start()
    try:
        time.sleep(10)  # startup and the node's first failures are not idle time
        assert gateway.proc is not None
        before, started = cpu_seconds(gateway.proc.pid), time.monotonic()
        time.sleep(seconds)
        used = cpu_seconds(gateway.proc.pid) - before
        return used / (time.monotonic() - started)
    finally:
        gateway.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-src", type=Path,
                        help="src/ of a checkout of the code to compare with (else: this code only)")
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    codes = {"now": Path(__file__).resolve().parent.parent / "src"}
    if args.baseline_src:
        codes = {"before": args.baseline_src.resolve(), **codes}
    root = Path(tempfile.mkdtemp(prefix="x2v-bench-idle-"))
    try:
        template = root / "template.db"
        fill(template, args.jobs)
        results: dict[str, list[float]] = {code: [] for code in codes}
        for round_ in range(args.rounds):
            for code in (list(codes) if round_ % 2 == 0 else list(reversed(codes))):
                results[code].append(measure(codes[code], template, root / code, args.seconds))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{args.jobs:,} finished jobs in the store, one node refusing connections, "
          f"{args.seconds:.0f} s measured after a 10 s settle, {args.rounds} round(s); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print("| code | CPU, % of one core |")
    print("|---|---:|")
    for code, values in results.items():
        print(f"| {code} ({codes[code]}) | {median(values) * 100:.2f} |")


if __name__ == "__main__":
    main()
