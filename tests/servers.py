"""Real node servers for tests: the demo node as a subprocess, and a node that misbehaves.

Plain functions and classes (no fixtures), so any conftest or script can use them:

    node = NodeProcess(tmp_path / "node").start()
    httpx.post(f"{node.url}/v1/tasks/video/", json={"prompt": "hi"})
    node.restart()          # a real process restart: every task is forgotten, files stay
    node.submissions()      # what reached the node, across restarts

A misbehaving node is the demo node behind a fault injector, in its own process. Faults are set
at run time through `/_faults`, a route only it has (MisbehavingNode.fault wraps it):

    POST   /_faults {"action": ..., "route": ..., "times": 1, "phase": "before", ...}
    GET    /_faults     every fault armed since the last DELETE, with how often each fired
    DELETE /_faults     disarm them all

actions: "error" (answer `status`, default 500, with `body`), "queue_full" (the node's 503),
"hang" (no answer until the client gives up; with `seconds`, handle it normally after that
long, or as soon as the fault is disarmed),
"reset" (abort the TCP connection with SO_LINGER 0: the client sees a connection reset),
"close" (close the connection without an answer), and "restart" (immediate: forget every task
as a restarted node would, drop open connections, refuse connections for `downtime` seconds).
`route` is "any", "submit", "status", "result", "cancel", "list", "queue", "service",
"health", or a regular expression searched in "METHOD /path". `times` is how many matching
requests the fault takes (null: all of them until disarmed). `phase` "after" lets the real
node handle the request first, then misbehaves: a submission that was accepted although the
client saw an error, a reset or a timeout.

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
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger("tests.servers")


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
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
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


class MisbehavingNode(NodeProcess):
    """A demo node whose HTTP and TCP behaviour can be broken on purpose, in its own process."""

    def command(self) -> list[str]:
        return [
            sys.executable, str(Path(__file__).resolve()), "misbehaving",
            "--host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(self.data_dir),
            *self.options,
        ]

    def fault(
        self,
        action: str,
        *,
        route: str | None = None,
        times: int | None = 1,
        phase: str = "before",
        status: int | None = None,
        body: Any = None,
        seconds: float | None = None,
    ) -> dict[str, Any]:
        """Arm a fault for the next `times` requests matching `route`; returns it as armed."""
        spec = {"action": action, "times": times, "phase": phase}
        for key, value in (("route", route), ("status", status), ("body", body), ("seconds", seconds)):
            if value is not None:
                spec[key] = value
        response = httpx.post(f"{self.url}/_faults", json=spec, timeout=5)
        response.raise_for_status()
        return response.json()

    def faults(self) -> list[dict[str, Any]]:
        return httpx.get(f"{self.url}/_faults", timeout=5).json()

    def clear_faults(self) -> None:
        httpx.delete(f"{self.url}/_faults", timeout=5).raise_for_status()

    def forget_tasks(self, downtime: float = 0.0) -> None:
        """Restart the node inside the running process: every task is forgotten, files stay."""
        response = httpx.post(
            f"{self.url}/_faults", json={"action": "restart", "downtime": downtime}, timeout=10
        )
        response.raise_for_status()


# ---------------------------------------------------------------------------------------------
# Inside the misbehaving node's process: a TCP proxy in front of an ASGI fault injector in
# front of a demo node app. The proxy exists for the transport faults: only it holds the
# client's socket, so only it can reset the connection.

_ROUTE_ALIASES = {
    "any": r"",
    "submit": r"^POST /v1/tasks/(video/(form)?)?$",
    "status": r"^GET /v1/tasks/(?!queue/)[^/]+/status$",
    "result": r"^GET (/v1/tasks/[^/]+/result|/v1/files/download/.*)$",
    "cancel": r"^DELETE /v1/tasks/",
    "list": r"^GET /v1/tasks/$",
    "queue": r"^GET /v1/tasks/queue/status$",
    "service": r"^GET /v1/service/",
    "health": r"^GET /health$",
}
_ACTIONS = {"error", "queue_full", "hang", "reset", "close"}


@dataclass
class _Fault:
    id: int
    action: str
    route: str
    times: int | None
    phase: str
    status: int | None
    body: Any
    seconds: float | None
    fired: int = 0

    def matches(self, request_line: str) -> bool:
        if self.times is not None and self.fired >= self.times:
            return False  # used up; still listed, so a test can see that it fired
        pattern = _ROUTE_ALIASES.get(self.route, self.route)
        return re.search(pattern, request_line) is not None


class _Proxy:
    """Pipes client connections to the node and can abort any of them on request."""

    def __init__(self, host: str, port: int, upstream: tuple[str, int]) -> None:
        self.host, self.port, self.upstream = host, port, upstream
        self._server: asyncio.AbstractServer | None = None
        self._reopening: asyncio.Task | None = None
        # Keyed by the local port of the proxy's connection to the node, which is what the
        # node's ASGI scope reports as the client: that is how a request finds its socket.
        self._links: dict[int, tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = {}

    async def listen(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, reuse_address=True
        )

    def stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def refuse_for(self, seconds: float) -> None:
        """A closed port for a while (connection refused), like a node that is restarting."""
        self.stop_listening()
        loop = asyncio.get_running_loop()

        def reopen() -> None:
            # Keep a reference: the loop holds tasks only weakly.
            self._reopening = loop.create_task(self.listen())

        loop.call_later(seconds, reopen)

    def abort(self, node_side_port: int, *, reset: bool = True) -> bool:
        link = self._links.pop(node_side_port, None)
        if link is None:
            return False
        client, node = link
        if reset:
            sock = client.get_extra_info("socket")
            # Linger 0: close() sends RST instead of FIN, so the client sees ECONNRESET.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.transport.abort()
        else:
            client.transport.close()
        node.transport.abort()
        return True

    def abort_all(self, *, keep: int | None = None) -> None:
        for node_side_port in list(self._links):
            if node_side_port != keep:
                self.abort(node_side_port)

    async def _handle(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        try:
            node_in, node_out = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_out.transport.abort()
            return
        key = node_out.get_extra_info("sockname")[1]
        self._links[key] = (client_out, node_out)
        try:
            await asyncio.gather(_pipe(client_in, node_out), _pipe(node_in, client_out))
        finally:
            self._links.pop(key, None)
            for writer in (client_out, node_out):
                writer.close()


async def _pipe(source: asyncio.StreamReader, dest: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            dest.write(data)
            await dest.drain()
        if dest.can_write_eof() and not dest.is_closing():
            dest.write_eof()
    except (ConnectionError, OSError, RuntimeError):
        dest.transport.abort()


class _FaultInjector:
    """ASGI app: answers /_faults, misbehaves as armed, otherwise hands over to the demo node."""

    def __init__(self, data_dir: Path, node_options: dict[str, Any]) -> None:
        from x2v_gateway.demo import create_demo_app

        self._create_node = lambda: create_demo_app(data_dir, **node_options)
        self.node = self._create_node()
        self.max_queue_size = node_options.get("max_queue_size", 10)
        self.proxy: _Proxy | None = None
        self._faults: list[_Fault] = []
        self._next_id = 1

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["path"] == "/_faults":
            await self._control(scope, receive, send)
            return
        fault = self._take_fault(f"{scope['method']} {scope['path']}")
        if fault is None:
            await self.node(scope, receive, send)
            return
        log.info("fault %s (%s) on %s %s", fault.action, fault.phase, scope["method"], scope["path"])
        answer: list[dict] | None = None
        if fault.phase == "after":
            # The node really handles the request; its answer is held back.
            answer = []
            await self.node(scope, receive, _recorder(answer))
        await self._misbehave(fault, scope, receive, send, answer)

    async def _misbehave(
        self, fault: _Fault, scope: dict, receive: Any, send: Any, answer: list[dict] | None
    ) -> None:
        if fault.action == "error":
            await _send(send, fault.status or 500, fault.body)
        elif fault.action == "queue_full":
            detail = f"Task queue is full (max {self.max_queue_size} tasks)"
            await _send(send, fault.status or 503, fault.body or {"detail": detail})
        elif fault.action == "hang":
            if fault.seconds is None:
                await _wait_for_disconnect(receive)
                return
            # A slow node rather than a dead one: the real answer, late. Disarming the fault
            # (DELETE /_faults) lets a held request go on at once, when the test chooses.
            until = time.monotonic() + fault.seconds
            while time.monotonic() < until and fault in self._faults:
                await asyncio.sleep(0.02)
            if answer is None:
                await self.node(scope, receive, send)
            else:
                for message in answer:
                    await send(message)
        elif fault.action in ("reset", "close"):
            assert self.proxy is not None
            self.proxy.abort(scope["client"][1], reset=fault.action == "reset")
            await _wait_for_disconnect(receive)

    def _take_fault(self, request_line: str) -> _Fault | None:
        for fault in self._faults:
            if fault.matches(request_line):
                fault.fired += 1
                return fault
        return None

    async def _control(self, scope: dict, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["method"] == "GET":
            await _send(send, 200, [asdict(fault) for fault in self._faults])
        elif scope["method"] == "DELETE":
            self._faults.clear()
            await _send(send, 200, [])
        elif scope["method"] == "POST":
            try:
                spec = json.loads(body or b"{}")
                if spec.get("action") == "restart":
                    await self._restart(scope, float(spec.get("downtime", 0)))
                    await _send(send, 200, {"restarted": True})
                    return
                fault = self._arm(spec)
            except (ValueError, TypeError, re.error) as exc:
                await _send(send, 400, {"detail": str(exc)})
                return
            await _send(send, 200, asdict(fault))
        else:
            await _send(send, 405, {"detail": "Method Not Allowed"})

    def _arm(self, spec: dict[str, Any]) -> _Fault:
        action = spec.get("action")
        if action not in _ACTIONS:
            raise ValueError(f"action must be one of {sorted(_ACTIONS | {'restart'})}")
        phase = spec.get("phase", "before")
        if phase not in ("before", "after"):
            raise ValueError("phase must be 'before' or 'after'")
        route = spec.get("route") or ("submit" if action == "queue_full" else "any")
        re.compile(_ROUTE_ALIASES.get(route, route))
        times = spec.get("times", 1)
        fault = _Fault(
            id=self._next_id,
            action=action,
            route=route,
            times=None if times is None else int(times),
            phase=phase,
            status=spec.get("status"),
            body=spec.get("body"),
            seconds=spec.get("seconds"),
        )
        self._next_id += 1
        self._faults.append(fault)
        return fault

    async def _restart(self, scope: dict, downtime: float) -> None:
        old, self.node = self.node, self._create_node()
        await asyncio.to_thread(old.stop)
        self.node.start()
        assert self.proxy is not None
        # A restarted process drops every open connection; this request's still gets its answer.
        self.proxy.abort_all(keep=scope["client"][1])
        if downtime > 0:
            self.proxy.refuse_for(downtime)
        log.info("node restarted: every task forgotten (down for %.1f s)", downtime)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.node.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await asyncio.to_thread(self.node.stop)
                await send({"type": "lifespan.shutdown.complete"})
                return


def _recorder(messages: list[dict]) -> Any:
    async def record(message: dict) -> None:
        messages.append(message)

    return record


async def _send(send: Any, status: int, body: Any) -> None:
    if body is None and status == 500:
        body = "Internal Server Error"  # what uvicorn/Starlette answer on a crash
    if isinstance(body, str):
        data, content_type = body.encode(), b"text/plain; charset=utf-8"
    else:
        data, content_type = json.dumps(body, separators=(",", ":")).encode(), b"application/json"
    headers = [(b"content-type", content_type), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


async def _wait_for_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _serve_misbehaving(host: str, port: int, data_dir: Path, node_options: dict[str, Any]) -> None:
    import uvicorn

    injector = _FaultInjector(data_dir, node_options)
    # The node listens on a private port; clients only ever reach it through the proxy.
    inner = socket.socket()
    inner.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    inner.bind(("127.0.0.1", 0))
    # Listening before uvicorn starts: connections that arrive early wait in the backlog.
    inner.listen(128)
    proxy = _Proxy(host, port, inner.getsockname())
    injector.proxy = proxy
    config = uvicorn.Config(
        injector, lifespan="on", log_config=None, access_log=False, timeout_graceful_shutdown=1
    )
    await proxy.listen()
    try:
        await uvicorn.Server(config).serve(sockets=[inner])
    finally:
        proxy.stop_listening()
        proxy.abort_all()


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
    asyncio.run(_serve_misbehaving(args.host, args.port, args.data_dir, node_options))


if __name__ == "__main__":
    main()
