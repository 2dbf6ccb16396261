"""The gateway as a real process: started, killed with SIGKILL and restarted by tests."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

import loopback
from servers import free_port  # noqa: F401 (tests import it from here too)

# The admin key every test gateway starts with (X2V_ADMIN_KEY), random for each test process.
ADMIN_KEY = "x2v_test_" + secrets.token_urlsafe(24)
_DEFAULT = object()


# tests/test_secrets.py checks, after all other tests, that no secret a test gateway was given or
# handed out (keys, upstream tokens, session cookies) is in any gateway log or response body the
# tests read. The tests run in several processes (pytest-xdist workers) and test_secrets.py in
# another one after them (./dev test), so each process appends the secrets and the files it made
# to its own lists in the run's directory, X2V_TEST_RUN_DIR (made by ./dev, or by conftest.py for
# a plain `pytest`). Without it (the benchmarks), nothing is kept.


def _watch(kind: str, line: str) -> None:
    if run_dir := os.environ.get("X2V_TEST_RUN_DIR"):
        with (Path(run_dir) / f"{kind}-{os.getpid()}.txt").open("a") as out:
            out.write(line + "\n")


def watched(kind: str) -> set[str]:
    """Every line any process of this test run kept: kind "secrets" or "files"."""
    run_dir = Path(os.environ["X2V_TEST_RUN_DIR"])
    return {line for path in run_dir.glob(f"{kind}-*.txt") for line in path.read_text().splitlines() if line}


def remember_secret(secret: str) -> str:
    _watch("secrets", secret)
    return secret


# `pytest --store=postgresql` (conftest.py): every gateway keeps its store in PostgreSQL, one
# database per data dir (replicas sharing a data dir share it). Set by conftest.py then.
database_for: Callable[[Path], str] | None = None


class GatewayProcess:
    """`x2v-gateway serve` in a subprocess, with its own data dir and settings.

    It starts with `ADMIN_KEY` as X2V_ADMIN_KEY (pass `X2V_ADMIN_KEY=""` for none), and its
    `client()` sends that key.
    """

    def __init__(self, data_dir: Path, nodes: str = "", **settings: str) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / f"{data_dir.name}-gateway.log"
        self.responses_path = data_dir.parent / f"{data_dir.name}-responses.log"
        self.env = {
            **os.environ,
            "X2V_DATA_DIR": str(data_dir),
            "X2V_PORT": str(self.port),
            "X2V_NODES": nodes,
            # Half the production default: fast enough for the tests that wait on jobs, while
            # the follow loops' calls (each answered by a node process too) stay a small share
            # of the suite's CPU; 0.2 cost 30-50 CPU-s more a run. Tests that must catch a job
            # in a passing state ask for 0.2.
            "X2V_POLL_INTERVAL": "0.5",
            "X2V_LOG_LEVEL": "INFO",
            "X2V_ADMIN_KEY": ADMIN_KEY,
            **({"X2V_DATABASE_URL": database_for(data_dir)} if database_for else {}),
            **settings,
        }
        self.admin_key = self.env["X2V_ADMIN_KEY"]
        for name in ("X2V_ADMIN_KEY", "LIGHTX2V_ACCESS_TOKEN", "X2V_S3_SECRET_ACCESS_KEY"):
            for token in self.env.get(name, "").split(","):
                if token.strip():
                    remember_secret(token.strip())
        _watch("files", str(self.log_path))
        _watch("files", str(self.responses_path))
        self.proc: subprocess.Popen | None = None

    # 60 s: a parallel run on a busy 2-core machine took over 20 s to import the gateway.
    def start(self, timeout: float = 60.0) -> GatewayProcess:
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
                # 5 s: a gateway just started on a busy machine may take seconds to answer.
                if loopback.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.kill()  # not left running, unwatched, after the test that wanted it has failed
        raise RuntimeError(f"gateway did not start:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, exactly like a crash or an OOM kill."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def helpers(self) -> list[int]:
        """The gateway's child processes (its media checkers, a pipeline's media worker...)."""
        assert self.proc is not None
        pid = self.proc.pid
        return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]

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

    def client(self, timeout: float = 60.0, *, key: str | None | object = _DEFAULT) -> httpx.Client:
        """An HTTP client for this gateway, sending the admin key (or `key`; None: no key).
        What it reads is kept in `responses_path` for tests/test_secrets.py."""
        key = self.admin_key if key is _DEFAULT else key
        headers = {"Authorization": f"Bearer {key}"} if key else None
        return loopback.client(
            base_url=self.url, timeout=timeout, headers=headers,
            transport=CapturingTransport(self.responses_path),
        )

    def sign_in(self, key: str | None = None) -> str:
        """Sign in to the dashboard as a browser does; returns the session cookie's value (for
        a browser context: `{"name": "x2v_session", "value": ..., "url": gateway.url}`)."""
        with loopback.client(base_url=self.url, timeout=30, transport=CapturingTransport(self.responses_path)) as browser:
            form = browser.get("/ui/sign-in")
            token = form.text.split('name="_sign_in_token" value="', 1)[1].split('"', 1)[0]
            signed_in = browser.post("/ui/sign-in", data={
                "_sign_in_token": token, "key": key or self.admin_key, "next": "/ui/",
            })
            assert signed_in.status_code == 303, signed_in.text
            return remember_secret(browser.cookies["x2v_session"])


class _TeeStream(httpx.SyncByteStream):
    """A response body as the client reads it, copied into a file (text bodies, 1 MiB at most)."""

    def __init__(self, inner: httpx.SyncByteStream, sink: Path, title: str) -> None:
        self._inner, self._sink, self._title = inner, sink, title

    def __iter__(self):
        kept = 0
        with self._sink.open("ab") as out:
            out.write(f"\n=== {self._title}\n".encode())
            for chunk in self._inner:
                if kept < 1024 * 1024:
                    out.write(chunk[: 1024 * 1024 - kept])
                    kept += len(chunk)
                yield chunk

    def close(self) -> None:
        self._inner.close()


class CapturingTransport(httpx.HTTPTransport):
    """Keeps every JSON, HTML and text body a test reads, except `POST /api/v1/keys` and
    `POST .../webhook-secret`: the answers that hold a key or a webhook secret by design (each is
    shown once, when made)."""

    def __init__(self, sink: Path) -> None:
        super().__init__(verify=False)  # plain HTTP on loopback (loopback.py says why)
        self._sink = sink

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.method == "POST" and request.url.path.rstrip("/") == "/api/v1/keys":
            return response
        if request.method == "POST" and request.url.path.endswith("/webhook-secret"):
            return response  # a new webhook signing secret, shown once by design too
        if response.headers.get("content-type", "").startswith(("application/json", "text/")):
            title = f"{request.method} {request.url.path} -> {response.status_code}"
            response.stream = _TeeStream(response.stream, self._sink, title)
        return response


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


def running(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie nobody has reaped yet has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def until(check, timeout: float = 30.0, what: str = "condition"):
    """Call `check` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what} not met in {timeout} s"
        time.sleep(0.05)
    return value


def headerless_gateway(data_dir: Path, key_name: str, **settings: str) -> GatewayProcess:
    """A started gateway whose compatible routes take header-less requests as the key
    `key_name` (X2V_HEADERLESS_KEY), made here; `.headerless_key` holds it."""
    gateway = GatewayProcess(data_dir, X2V_HEADERLESS_KEY=key_name, **settings).start()
    with gateway.client() as admin:
        made = admin.post("/api/v1/keys", json={"name": key_name})
        assert made.status_code == 201, made.text
        gateway.headerless_key = remember_secret(made.json()["key"])
    return gateway
