"""500 busy nodes followed by one gateway process: its CPU, and the status calls per node-second.

    .venv/bin/python bench/many_nodes.py [--nodes 500] [--seconds 30] [--base /other/checkout/src]

500 lightweight nodes (bench/fake_nodes.py: one process, one port each) each get 2 long jobs
(one running, one waiting in the node's queue: look-ahead 1), posted through the API. Once every
job is out, the gateway process's CPU time (utime + stime from /proc/PID/stat) and the nodes'
requests (counted by the fake nodes, per route) are read over `--seconds`. With `--base`, the
same run on that checkout's sources first, both printed side by side.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx

from common import GatewayProcess
from idle_cpu import cpu_seconds

HERE = Path(__file__).resolve().parent


def stats(control: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{control}/stats", timeout=30).json()


@contextmanager
def behind_a_gateway(src: Path, nodes: int, root: Path) -> Iterator[tuple[GatewayProcess, int, float]]:
    """`nodes` fake nodes (one process) with a gateway on `src`'s code in front of them: the
    gateway, the fake nodes' control port, and the seconds it took to answer once started."""
    fake = subprocess.Popen([sys.executable, str(HERE / "fake_nodes.py"), "--count", str(nodes)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout is not None
        info = json.loads(fake.stdout.readline())
        spec = ",".join(f"n{i}=http://127.0.0.1:{port}" for i, port in enumerate(info["ports"]))
        data = root / src.parent.name
        data.mkdir(parents=True)
        began = time.perf_counter()
        gateway = GatewayProcess(data, nodes=spec, PYTHONPATH=str(src),
                                 X2V_POLL_INTERVAL="1.0").start(timeout=120)
        try:
            yield gateway, info["control"], time.perf_counter() - began
        finally:
            gateway.stop()
    finally:
        fake.kill()
        fake.wait()


def each_code(base: Path | None, prefix: str, measure: Callable[[Path, Path], dict]) -> dict[str, dict]:
    """`measure(src, root)` on `base`'s sources (if given), then on this checkout's, by "base" and "this"."""
    codes = ([("base", base)] if base else []) + [("this", HERE.parent / "src")]
    root = Path(tempfile.mkdtemp(prefix=prefix))
    return {label: measure(src.resolve(), root / label) for label, src in codes}


def measure(src: Path, nodes: int, seconds: float, root: Path) -> dict:
    with behind_a_gateway(src, nodes, root) as (gateway, control, _):
        headers = {"Authorization": f"Bearer {gateway.admin_key}"}
        with httpx.Client(base_url=gateway.url, headers=headers, timeout=60) as client:
            def post(i: int) -> None:
                client.post("/api/v1/jobs", json={"task": "t2v", "prompt": f"p{i}", "seed": i}).raise_for_status()

            with ThreadPoolExecutor(8) as pool:
                list(pool.map(post, range(2 * nodes)))
        deadline = time.monotonic() + 300
        while stats(control).get("submit", 0) < 2 * nodes:
            assert time.monotonic() < deadline, "the jobs did not all reach the nodes"
            time.sleep(1)
        time.sleep(5)  # the submissions' follow-up settles
        assert gateway.proc is not None
        before, calls, started = cpu_seconds(gateway.proc.pid), stats(control), time.monotonic()
        time.sleep(seconds)
        used = cpu_seconds(gateway.proc.pid) - before
        after, elapsed = stats(control), time.monotonic() - started
    per_node_second = {kind: (after.get(kind, 0) - calls.get(kind, 0)) / nodes / elapsed
                       for kind in ("status", "list", "task_status", "metadata")}
    return {"cpu": used / elapsed, "calls": per_node_second}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--base", type=Path, help="src/ of a checkout to compare with")
    args = parser.parse_args()
    results = each_code(args.base, "many-nodes-", lambda src, root: measure(src, args.nodes, args.seconds, root))
    print(f"{args.nodes} busy nodes (2 jobs each), X2V_POLL_INTERVAL=1.0, {args.seconds:.0f} s measured")
    print("| code | gateway CPU, % of one core | status calls per node-second (list + task + service) |")
    print("|---|---:|---:|")
    for label, r in results.items():
        c = r["calls"]
        print(f"| {label} | {r['cpu'] * 100:.1f} | {c['list'] + c['task_status'] + c['status']:.2f}"
              f" ({c['list']:.2f} + {c['task_status']:.2f} + {c['status']:.2f}) |")


if __name__ == "__main__":
    main()
