"""Run every benchmark under bench/ one after another and print their tables.

    .venv/bin/python bench/run_all.py [name ...]     e.g. run_all.py status_latency poll_rate
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Slowest last; each prints a markdown table for docs/benchmarks.md.
ORDER = ["status_latency", "queued_estimate", "queue_positions_pg", "burst", "metrics_scrape", "plan", "many_nodes", "node_read",
         "poll_rate", "idle_cpu", "dashboard_render", "webhooks", "pool", "upload", "replicas"]


def main() -> None:
    wanted = sys.argv[1:] or [name for name in ORDER if (HERE / f"{name}.py").exists()]
    failed = []
    for name in wanted:
        print(f"\n## {name}\n", flush=True)
        if subprocess.run([sys.executable, str(HERE / f"{name}.py")], cwd=HERE).returncode != 0:
            failed.append(name)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
