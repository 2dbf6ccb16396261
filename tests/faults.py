"""Faults injected into a test server at run time: the one mechanism of every test double.

`serve(create_app, host, port)` runs an ASGI app (a `x2v_gateway.demo.asgi.App`) behind a
`FaultInjector`, itself behind a TCP proxy. The proxy exists for the transport faults: only it
holds the client's socket, so only it can reset the connection. Faults are set through
`/_faults`, a route only the injector has (`FaultsClient` wraps it for tests):

    POST   /_faults {"action": ..., "route": ..., "times": 1, "phase": "before", ...}
    GET    /_faults     every fault armed since the last DELETE, with how often each fired
    DELETE /_faults     disarm them all

actions: "error" (answer `status`, default 500, with `body`; without one, uvicorn's plain
"Internal Server Error" for a 500, else the HTML page a proxy in front of a down app answers),
"hang" (no answer until the client gives up; with `seconds`, handle it normally after that long,
or as soon as the fault is disarmed), "reset" (abort the TCP connection with SO_LINGER 0: the
client sees a connection reset), "close" (close the connection without an answer), "restart"
(immediate: a new app, which has forgotten everything, drops open connections and refuses
connections for `downtime` seconds), and any preset the server names (the misbehaving node's
"queue_full": an error with its own status, body and route).
`route` is "any", an alias the server names ("submit", "status"...), or a regular expression
searched in "METHOD /path". `times` is how many matching requests the fault takes (null: all of
them until disarmed). `phase` "after" lets the app handle the request first, then misbehaves:
a request that took effect although the client saw an error, a reset or a timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from x2v_gateway.demo.asgi import (
    App,
    Receive,
    Request,
    Response,
    Router,
    Scope,
    Send,
    json_response,
    route,
    text_response,
)

import loopback

log = logging.getLogger("tests.faults")

_ACTIONS = {"error", "hang", "reset", "close"}
_PROXY_PAGE = "<html><head><title>{0}</title></head><body><center><h1>{0}</h1></center></body></html>"


@dataclass(frozen=True)
class Preset:
    """A named error fault: what it answers, and the route it takes by default."""

    status: int
    body: Any
    route: str = "any"


@dataclass
class Fault:
    id: int
    action: str
    route: str
    times: int | None
    phase: str
    status: int | None
    body: Any
    seconds: float | None
    fired: int = 0


def error_response(status: int | None, body: Any) -> Response:
    status = status or 500
    if body is None and status == 500:
        return text_response(500, "Internal Server Error")  # what uvicorn answers on a crash
    if body is None:
        return text_response(status, _PROXY_PAGE.format(status), "text/html")
    if isinstance(body, str):
        return text_response(status, body)
    return json_response(status, body)


class FaultInjector(App):
    """ASGI app: answers /_faults, misbehaves as armed, otherwise hands over to the app."""

    def __init__(
        self,
        create_app: Callable[[], App],
        *,
        aliases: dict[str, str] | None = None,
        presets: dict[str, Preset] | None = None,
    ) -> None:
        self._create_app = create_app
        self.app = create_app()
        self.aliases = {"any": "", **(aliases or {})}
        self.presets = presets or {}
        self.proxy: TcpProxy | None = None
        self._faults: list[Fault] = []
        self._next_id = 1
        self.router = Router(
            [route("GET", "/_faults", self._list), route("POST", "/_faults", self._arm),
             route("DELETE", "/_faults", self._clear)],
            redirect_slashes=False,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/_faults":
            await super().__call__(scope, receive, send)  # the lifespan, or the fault routes
        elif (fault := self._take_fault(f"{scope['method']} {scope['path']}")) is None:
            await self.app(scope, receive, send)
        else:
            log.info("fault %s (%s) on %s %s", fault.action, fault.phase, scope["method"], scope["path"])
            await self._misbehave(fault, Request(scope, receive), send)

    async def startup(self) -> None:
        await self.app.startup()

    async def shutdown(self) -> None:
        await self.app.shutdown()

    async def _misbehave(self, fault: Fault, request: Request, send: Send) -> None:
        answer: list[dict] | None = None
        if fault.phase == "after":
            # The app really handles the request; its answer is held back.
            answer = []
            await self.app(request.scope, request.receive, _recorder(answer))
        if fault.action == "hang":
            if fault.seconds is None:
                await request.wait_for_disconnect()
                return
            # A slow server rather than a dead one: the real answer, late. Disarming the fault
            # (DELETE /_faults) lets a held request go on at once, when the test chooses.
            until = time.monotonic() + fault.seconds
            while time.monotonic() < until and fault in self._faults:
                await asyncio.sleep(0.02)
            if answer is None:
                await self.app(request.scope, request.receive, send)
            else:
                for message in answer:
                    await send(message)
        elif fault.action in ("reset", "close"):
            assert self.proxy is not None
            self.proxy.abort(request.scope["client"][1], reset=fault.action == "reset")
            await request.wait_for_disconnect()
        else:  # "error" or a preset, which `_arm` filled in
            await error_response(fault.status, fault.body).send(send)

    def _take_fault(self, request_line: str) -> Fault | None:
        for fault in self._faults:
            if fault.times is not None and fault.fired >= fault.times:
                continue  # used up; still listed, so a test can see that it fired
            if re.search(self.aliases.get(fault.route, fault.route), request_line):
                fault.fired += 1
                return fault
        return None

    async def _list(self, request: Request) -> Response:
        return json_response(200, [asdict(fault) for fault in self._faults])

    async def _clear(self, request: Request) -> Response:
        self._faults.clear()
        return json_response(200, [])

    async def _arm(self, request: Request) -> Response:
        try:
            spec = json.loads(await request.body() or b"{}")
            if spec.get("action") == "restart":
                await self._restart(request, float(spec.get("downtime", 0)))
                return json_response(200, {"restarted": True})
            fault = self._fault(spec)
        except (ValueError, TypeError, re.error) as exc:
            return json_response(400, {"detail": str(exc)})
        return json_response(200, asdict(fault))

    def _fault(self, spec: dict[str, Any]) -> Fault:
        action = spec.get("action")
        preset = self.presets.get(action)
        if action not in _ACTIONS and preset is None:
            raise ValueError(f"action must be one of {sorted(_ACTIONS | {'restart'} | set(self.presets))}")
        phase = spec.get("phase", "before")
        if phase not in ("before", "after"):
            raise ValueError("phase must be 'before' or 'after'")
        route = spec.get("route") or (preset.route if preset else "any")
        re.compile(self.aliases.get(route, route))
        times = spec.get("times", 1)
        fault = Fault(
            id=self._next_id,
            action=action,
            route=route,
            times=None if times is None else int(times),
            phase=phase,
            status=spec.get("status") or (preset.status if preset else None),
            body=spec.get("body") or (preset.body if preset else None),
            seconds=spec.get("seconds"),
        )
        self._next_id += 1
        self._faults.append(fault)
        return fault

    async def _restart(self, request: Request, downtime: float) -> None:
        old, self.app = self.app, self._create_app()
        await old.shutdown()
        await self.app.startup()
        assert self.proxy is not None
        # A restarted process drops every open connection; this request's still gets its answer.
        self.proxy.abort_all(keep=request.scope["client"][1])
        if downtime > 0:
            self.proxy.refuse_for(downtime)
        log.info("restarted: everything forgotten (down for %.1f s)", downtime)


def _recorder(messages: list[dict]) -> Send:
    async def record(message: dict) -> None:
        messages.append(message)

    return record


class TcpProxy:
    """Pipes client connections to the server and can abort any of them on request."""

    def __init__(self, host: str, port: int, upstream: tuple[str, int]) -> None:
        self.host, self.port, self.upstream = host, port, upstream
        self._server: asyncio.AbstractServer | None = None
        self._reopening: asyncio.Task | None = None
        # Keyed by the local port of the proxy's connection to the server, which is what the
        # server's ASGI scope reports as the client: that is how a request finds its socket.
        self._links: dict[int, tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = {}

    async def listen(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]  # the one picked, for port 0

    def stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def refuse_for(self, seconds: float) -> None:
        """A closed port for a while (connection refused), like a server that is restarting."""
        self.stop_listening()
        loop = asyncio.get_running_loop()

        def reopen() -> None:
            # Keep a reference: the loop holds tasks only weakly.
            self._reopening = loop.create_task(self.listen())

        loop.call_later(seconds, reopen)

    def abort(self, server_side_port: int, *, reset: bool = True) -> bool:
        link = self._links.pop(server_side_port, None)
        if link is None:
            return False
        client, server = link
        if reset:
            sock = client.get_extra_info("socket")
            # Linger 0: close() sends RST instead of FIN, so the client sees ECONNRESET.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.transport.abort()
        else:
            client.transport.close()
        server.transport.abort()
        return True

    def abort_all(self, *, keep: int | None = None) -> None:
        for server_side_port in list(self._links):
            if server_side_port != keep:
                self.abort(server_side_port)

    async def _handle(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        try:
            server_in, server_out = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_out.transport.abort()
            return
        key = server_out.get_extra_info("sockname")[1]
        self._links[key] = (client_out, server_out)
        try:
            await asyncio.gather(_pipe(client_in, server_out), _pipe(server_in, client_out))
        finally:
            self._links.pop(key, None)
            for writer in (client_out, server_out):
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


async def serve(
    app: FaultInjector,
    host: str,
    port: int,
    *,
    wrap: Callable[[Any], Any] = lambda app: app,
    on_listening: Callable[[str], None] = lambda url: None,
    **uvicorn_options: Any,
) -> None:
    """Serve `app` behind its TCP proxy on host:port (0: any free port) until SIGTERM.

    `wrap` puts ASGI middleware around the injector; `on_listening` gets the proxy's URL."""
    import uvicorn

    # The server listens on a private port; clients only ever reach it through the proxy.
    inner = socket.socket()
    inner.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    inner.bind(("127.0.0.1", 0))
    # Listening before uvicorn starts: connections that arrive early wait in the backlog.
    inner.listen(128)
    proxy = TcpProxy(host, port, inner.getsockname())
    app.proxy = proxy
    await proxy.listen()
    on_listening(f"http://{host}:{proxy.port}")
    config = uvicorn.Config(
        wrap(app), lifespan="on", access_log=False, timeout_graceful_shutdown=1, **uvicorn_options
    )
    try:
        await uvicorn.Server(config).serve(sockets=[inner])
    finally:
        proxy.stop_listening()
        proxy.abort_all()


class FaultsClient:
    """A test's handle on a server run by `serve`: `self.url` is its address."""

    url: str

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
        response = loopback.post(f"{self.url}/_faults", json=spec, timeout=5)
        response.raise_for_status()
        return response.json()

    def faults(self) -> list[dict[str, Any]]:
        return loopback.get(f"{self.url}/_faults", timeout=5).json()

    def clear_faults(self) -> None:
        loopback.delete(f"{self.url}/_faults", timeout=5).raise_for_status()

    def forget_tasks(self, downtime: float = 0.0) -> None:
        """Restart the app inside the running process: every task is forgotten, files stay."""
        response = loopback.post(
            f"{self.url}/_faults", json={"action": "restart", "downtime": downtime}, timeout=10
        )
        response.raise_for_status()
