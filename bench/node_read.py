"""CPU per read of a node's task list, by the adapter and by the layers beneath it.

    .venv/bin/python bench/node_read.py [--reads 3000] [--runs 5] [--base /other/checkout/src]

One fake node (bench/fake_nodes.py) with nothing on it; in one uvloop process, `--reads`
sequential reads each way, `thread_time` per read, median of `--runs` (alternating). Ways:
`SelfHostedNode._list` (what the follow loop calls once a second per busy node), and for
reference httpx's `AsyncClient.get` and a bare asyncio protocol that writes a fixed request and
parses nothing (the floor of a kept-alive connection). With `--base`, the adapter of that
checkout is measured in a process of its own first, and both are printed side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from plan import side_by_side

HERE = Path(__file__).resolve().parent


async def _measure(reads: int, runs: int) -> dict[str, float]:
    import httpx
    from x2v_gateway.upstream.selfhosted import SelfHostedNode

    fake = subprocess.Popen([sys.executable, str(HERE / "fake_nodes.py"), "--count", "1"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout is not None
        url = f"http://127.0.0.1:{json.loads(fake.stdout.readline())['ports'][0]}"
        node, client = SelfHostedNode("n0", url), httpx.AsyncClient(base_url=url)
        loop = asyncio.get_running_loop()

        class Floor(asyncio.Protocol):
            answer: asyncio.Future

            def data_received(self, data: bytes) -> None:
                self.answer.set_result(data)

        transport, floor = await loop.create_connection(Floor, "127.0.0.1", int(url.rsplit(":", 1)[1]))

        async def bare() -> None:
            floor.answer = loop.create_future()
            transport.write(b"GET /v1/tasks/ HTTP/1.1\r\nhost: node\r\n\r\n")
            await floor.answer

        ways = {"adapter": node._list, "httpx get": lambda: client.get("/v1/tasks/"), "floor": bare}
        seen: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(runs):
            for name, read in ways.items():
                for _ in range(100):  # warm: connections open, caches filled
                    await read()
                began = time.thread_time()
                for _ in range(reads):
                    await read()
                seen[name].append((time.thread_time() - began) / reads)
        transport.close()
        await client.aclose()
        await node.aclose()
        return {name: statistics.median(values) for name, values in seen.items()}
    finally:
        fake.kill()
        fake.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--base", help="src/ of a checkout to compare with")
    # Given by `plan.side_by_side`, which runs this script once per checkout: measure here (no
    # store is used).
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.store:
        import uvloop

        print(json.dumps(uvloop.run(_measure(args.reads, args.runs))))
        return
    results = side_by_side(__file__, args.base, ["--reads", str(args.reads), "--runs", str(args.runs)])
    print(f"CPU per read of a node's task list, µs (median of {args.runs} × {args.reads} reads)")
    print("| code | SelfHostedNode._list | httpx AsyncClient.get | bare protocol (floor) |")
    print("|---|---:|---:|---:|")
    for label, r in results.items():
        print(f"| {label} | {r['adapter'] * 1e6:.0f} | {r['httpx get'] * 1e6:.0f} | {r['floor'] * 1e6:.0f} |")


if __name__ == "__main__":
    main()
