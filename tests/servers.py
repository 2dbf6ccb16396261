"""Real node servers for tests: the demo node as a subprocess, and a node that misbehaves.

Plain functions and classes (no fixtures), so any conftest or script can use them:

    node = NodeProcess(tmp_path / "node").start()
    loopback.post(f"{node.url}/v1/tasks/video/", json={"prompt": "hi"})
    node.restart()          # a real process restart: every task is forgotten, files stay
    node.submissions()      # what reached the node, across restarts

A misbehaving node is the demo node behind the tests' fault injector (faults.py), in its own
process: `node.fault("reset", route="submit", phase="after")`, `node.forget_tasks()` (a restart
inside the process). Its routes have aliases: "submit", "status", "result", "cancel", "list",
"queue", "service", "health"; and one preset, "queue_full" (the node's 503, on submit).

Run one by hand:

    python tests/servers.py misbehaving --port 18601 --data-dir /tmp/bad-node --job-seconds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

import loopback
from faults import FaultInjector, FaultsClient, Preset, serve
from x2v_gateway.demo import create_demo_app


def _port_pool() -> range:
    """The ports this process hands out: below the kernel's ephemeral range, one slice per
    pytest-xdist worker.

    A port the OS picked with bind(("127.0.0.1", 0)) and let go is free only until the next
    outgoing connection or bind to port 0 on the machine takes it, and a server started in a
    subprocess binds it a second later: with several workers starting servers at once, two of
    them got the same port. No connect() and no bind to port 0 ever picks a port below the
    ephemeral range, and each worker (gw0, gw1, ...; slice 0 outside xdist) draws from its own,
    counted from X2V_TEST_PORT_SLICE.
    """
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768  # Linux's default
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw3" in a worker, unset outside xdist
    slot = int(worker[2:]) + 1 if worker.startswith("gw") and worker[2:].isdigit() else 0
    # Two test runs at once on one machine (two checkouts) each name a different base slice.
    slot += int(os.environ.get("X2V_TEST_PORT_SLICE") or 0)
    low, size = 10_000, 800
    slices = max(1, (ephemeral_low - low) // size)
    start = low + (slot % slices) * size
    return range(start, start + size)


_POOL = _port_pool()
# A random start: two test runs at once on one machine (two checkouts) rarely meet.
_next_port = random.randrange(len(_POOL))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on now, and that no other caller in this
    test run gets (see _port_pool)."""
    global _next_port
    for _ in range(len(_POOL)):
        port = _POOL[_next_port % len(_POOL)]
        _next_port += 1
        with socket.socket() as probe:
            try:
                # No SO_REUSEADDR: a port with connections still in TIME_WAIT is skipped too.
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_POOL}")


class NodeProcess:
    """`python -m x2v_gateway.demo` as a real subprocess on 127.0.0.1."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        job_seconds: float = 0.0,
        max_queue_size: int = 10,
        tasks: str = "s2v,i2v,t2v,flf2v",
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.options = [
            "--job-seconds", str(job_seconds),
            "--max-queue-size", str(max_queue_size),
            "--tasks", tasks,
        ]
        self.log_path = data_dir / "node.log"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "x2v_gateway.demo",
            "--host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(self.data_dir),
            *self.options,
        ]

    # 60 s: parallel runs on a busy 2-core machine saw a node take over 15 s to start.
    def start(self, timeout: float = 60.0) -> NodeProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Appending keeps the log of every incarnation when a test restarts the node.
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                self.command(), stdout=log_file, stderr=subprocess.STDOUT, cwd=self.data_dir
            )
        try:
            self.wait_ready(timeout)
        except RuntimeError:
            self.kill()  # not left running, unwatched, after the test that wanted it has failed
            raise
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if loopback.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"node not ready after {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, as a service manager stops it; SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, like a crash or an OOM kill."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def restart(self, timeout: float = 60.0) -> None:
        """A new process on the same port and data dir: it knows no task, the files remain."""
        self.stop()
        self.start(timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def submissions(self) -> list[dict[str, Any]]:
        """Every submission the node accepted, in order, across restarts (its journal)."""
        journal = self.data_dir / "submissions.jsonl"
        if not journal.exists():
            return []
        return [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> NodeProcess:
        return self.start() if not self.running else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MisbehavingNode(NodeProcess, FaultsClient):
    """A demo node whose HTTP and TCP behaviour can be broken on purpose, in its own process."""

    def command(self) -> list[str]:
        return [
            sys.executable, str(Path(__file__).resolve()), "misbehaving",
            "--host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(self.data_dir),
            *self.options,
        ]


# ---------------------------------------------------------------------------------------------
# Inside the misbehaving node's process: a demo node app behind faults.serve's injector and proxy.

_ROUTE_ALIASES = {
    "submit": r"^POST /v1/tasks/(video/(form)?)?$",
    "status": r"^GET /v1/tasks/(?!queue/)[^/]+/status$",
    "result": r"^GET (/v1/tasks/[^/]+/result|/v1/files/download/.*)$",
    "cancel": r"^DELETE /v1/tasks/",
    "list": r"^GET /v1/tasks/$",
    "queue": r"^GET /v1/tasks/queue/status$",
    "service": r"^GET /v1/service/",
    "health": r"^GET /health$",
}


def _misbehaving_node(data_dir: Path, node_options: dict[str, Any]) -> FaultInjector:
    queue_full = {"detail": f"Task queue is full (max {node_options['max_queue_size']} tasks)"}
    return FaultInjector(
        lambda: create_demo_app(data_dir, **node_options),
        aliases=_ROUTE_ALIASES,
        # The node's own 503 when its queue is full.
        presets={"queue_full": Preset(503, queue_full, route="submit")},
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run a test server.

    python tests/servers.py misbehaving --port 18601 --data-dir /tmp/bad-node
    """
    parser = argparse.ArgumentParser(prog="python tests/servers.py")
    commands = parser.add_subparsers(dest="command", required=True)
    bad = commands.add_parser("misbehaving", help="a demo node with faults armed through /_faults")
    bad.add_argument("--host", default="127.0.0.1")
    bad.add_argument("--port", type=int, required=True)
    bad.add_argument("--data-dir", type=Path, required=True)
    bad.add_argument("--job-seconds", type=float, default=0.0)
    bad.add_argument("--max-queue-size", type=int, default=10)
    bad.add_argument("--tasks", default="s2v,i2v,t2v,flf2v")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    node_options = {
        "job_seconds": args.job_seconds,
        "max_queue_size": args.max_queue_size,
        "tasks": [t for t in args.tasks.split(",") if t],
    }
    node = _misbehaving_node(args.data_dir, node_options)
    asyncio.run(serve(node, args.host, args.port, log_config=None))


if __name__ == "__main__":
    main()
