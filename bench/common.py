"""Shared by the benchmarks: real processes on 127.0.0.1, and small statistics helpers."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from gateway_proc import GatewayProcess, wait_for  # noqa: E402
from media import make_big_wav, make_png, make_wav  # noqa: E402
from servers import NodeProcess, free_port  # noqa: E402

__all__ = ["GatewayProcess", "NodeProcess", "free_port", "make_big_wav", "make_png", "make_wav",
           "percentile", "median", "rss_peak_mb", "wait_for"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def median(values: list[float]) -> float:
    return statistics.median(values)


def rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")
