"""CPU an idle gateway uses with a long history and one dead node, two codes side by side.

    git worktree add --detach /work/wt/dash1m-base 75f8b9d
    PYTHONPATH=$PWD/src .venv/bin/python bench/idle_cpu.py --baseline-src /work/wt/dash1m-base/src \
        [--jobs 1000000] [--seconds 30] [--rounds 1]

A real SQLite store is filled through SQL (bench/common.py's `fill_store`, `History.realistic`
with nothing queued: `--jobs` finished jobs, 94 % succeeded, in batches of 500 and 5,000, five
keys), kept in /tmp/x2v-bench-stores between runs (by the fill's parameters and schema; filling a
million jobs takes minutes) and copied for each gateway. Each gateway process starts on its copy
with its one node, n1 (that ran every job), at a port that refuses connections (nothing listens
there), at the default log level and poll interval; after a 10 s settle its CPU time (utime +
stime, from /proc/<pid>/stat) is read over `--seconds`. The codes take turns, `--rounds` each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import GatewayProcess, History, fill_store, free_port, median

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def measure(src: Path, history: History, root: Path, seconds: float) -> float:
    data = root / "gw"
    shutil.rmtree(data, ignore_errors=True)
    fill_store(data / "gateway.db", src, history)  # a fresh copy for each round
    gateway = GatewayProcess(
        data, nodes=f"n1=http://127.0.0.1:{free_port()}", PYTHONPATH=str(src),
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
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    codes = {"now": Path(__file__).resolve().parent.parent / "src"}
    if args.baseline_src:
        codes = {"before": args.baseline_src.resolve(), **codes}
    root = Path(tempfile.mkdtemp(prefix="x2v-bench-idle-"))
    history = History.realistic(args.jobs, 0)
    try:
        results: dict[str, list[float]] = {code: [] for code in codes}
        for round_ in range(args.rounds):
            for code in (list(codes) if round_ % 2 == 0 else list(reversed(codes))):
                results[code].append(measure(codes[code], history, root / code, args.seconds))
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
