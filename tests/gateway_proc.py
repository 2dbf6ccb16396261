"""The gateway as a real process: started, killed with SIGKILL and restarted by tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx



def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class GatewayProcess:
    """`x2v-gateway serve` in a subprocess, with its own data dir and settings."""

    def __init__(self, data_dir: Path, nodes: str = "", **settings: str) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / f"{data_dir.name}-gateway.log"
        self.env = {
            **os.environ,
            "X2V_DATA_DIR": str(data_dir),
            "X2V_PORT": str(self.port),
            "X2V_NODES": nodes,
            "X2V_POLL_INTERVAL": "0.2",
            "X2V_LOG_LEVEL": "INFO",
            **settings,
        }
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> GatewayProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "x2v_gateway.cli", "serve", "--env-file", "/nonexistent"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.data_dir.parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gateway did not start:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, exactly like a crash or an OOM kill."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> GatewayProcess:
        self.stop()
        return self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def peak_rss_mb(self) -> float:
        """The process's peak resident memory so far (VmHWM), in MiB."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM")

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)


def wait_for(client: httpx.Client, job_id: str, states: set[str], timeout: float = 60.0) -> dict:
    """Poll a job until it reaches one of `states`."""
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job.get("state") in states:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job.get('state')} after {timeout}s: {job}")
