"""One small ASGI toolkit: requests, responses, routing with Starlette's rules, multipart forms.

The demo node answers byte for byte what a FastAPI server answers, quirks included, and the
tests' doubles (the cloud double, the misbehaving node) likewise reproduce servers they stand
in for. A framework would "fix" those answers; this toolkit sends exactly what it is given.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qsl, quote

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[str, str]]

CHUNK = 1024 * 1024
# Starlette's limit for a non-file multipart field; a larger one is a 400.
MAX_FIELD_BYTES = 1024 * 1024


class HTTPError(Exception):
    """Answered as `App.error_response` shapes it: FastAPI's `{"detail": ...}` by default."""

    def __init__(self, status: int, detail: Any, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, list(headers)


# ---------------------------------------------------------------------------------------------
# Responses


@dataclass(slots=True)
class Response:
    """A status, headers and either a body or a stream of chunks (which sets its own length)."""

    status: int
    body: bytes = b""
    headers: Headers = field(default_factory=list)
    stream: AsyncIterator[bytes] | None = None

    async def send(self, send: Send) -> None:
        # uvicorn itself leaves the body out of the answer to a HEAD request.
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers]
        if self.stream is None:
            headers.insert(0, (b"content-length", str(len(self.body)).encode()))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        if self.stream is None:
            await send({"type": "http.response.body", "body": self.body})
            return
        try:
            async for chunk in self.stream:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        except OSError:  # the client went away mid-download (uvicorn's ClientDisconnected)
            pass


def json_response(status: int, payload: Any, headers: Iterable[tuple[str, str]] = ()) -> Response:
    # Starlette's JSONResponse: compact separators, non-ASCII kept.
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return Response(status, body, [("content-type", "application/json"), *headers])


def text_response(
    status: int, text: str, content_type: str = "text/plain; charset=utf-8"
) -> Response:
    return Response(status, text.encode(), [("content-type", content_type)])


def redirect(location: str) -> Response:
    # Starlette's RedirectResponse: 307, quoted location, empty body.
    return Response(307, b"", [("location", quote(location, safe=":/%#?=@[]!$&'()*+,;"))])


async def stream_file(path: Path) -> AsyncIterator[bytes]:
    """A file's bytes, read off the event loop: a download must not stall other requests."""
    with path.open("rb") as file:
        while chunk := await asyncio.to_thread(file.read, CHUNK):
            yield chunk


# ---------------------------------------------------------------------------------------------
# Requests


class Request:
    def __init__(self, scope: Scope, receive: Receive, params: dict[str, str] | None = None) -> None:
        self.scope = scope
        self.receive = receive
        self.params = params or {}  # what the route's {name} parts matched
        self._body: bytes | None = None

    @property
    def method(self) -> str:
        return self.scope["method"]

    @property
    def path(self) -> str:
        return self.scope["path"]

    @property
    def query(self) -> dict[str, str]:
        text = self.scope.get("query_string", b"").decode("latin-1")
        return dict(parse_qsl(text, keep_blank_values=True))

    def header(self, name: str) -> str | None:
        """The first value of a header, or None."""
        wanted = name.lower().encode("latin-1")
        for key, value in self.scope["headers"]:
            if key.lower() == wanted:
                return value.decode("latin-1")
        return None

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise HTTPError(400, "Client disconnected")
            if message.get("body"):
                yield message["body"]
            if not message.get("more_body"):
                return

    async def body(self) -> bytes:
        if self._body is None:
            self._body = b"".join([chunk async for chunk in self.chunks()])
        return self._body

    async def wait_for_disconnect(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass


# ---------------------------------------------------------------------------------------------
# Routing, with Starlette's matching rules.

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class Route:
    methods: frozenset[str]
    regex: re.Pattern[str]
    handler: Handler | None  # None: a declared route that is not served (404 Not Found)


def route(methods: str, template: str, handler: Handler | None = None) -> Route:
    """`route("GET,HEAD", "/v1/files/{path:path}", handler)`: Starlette's convertors, where
    {name} is one path segment and {name:path} the rest of the path."""
    pattern = re.sub(
        r"\{(\w+)(:path)?\}",
        lambda m: f"(?P<{m.group(1)}>.*)" if m.group(2) else f"(?P<{m.group(1)}>[^/]+)",
        template,
    )
    return Route(frozenset(methods.split(",")), re.compile(f"^{pattern}$"), handler)


NOT_FOUND = {"detail": "Not Found"}


class Router:
    """Routes tried in order, as Starlette does: the first whose path and method match serves;
    a path that matches with another method is a 405; with `redirect_slashes`, a path that
    matches nothing but does with its trailing slash added or removed is a 307 there."""

    def __init__(self, routes: Iterable[Route], *, redirect_slashes: bool = True) -> None:
        self.routes = list(routes)
        self.redirect_slashes = redirect_slashes

    def resolve(self, request: Request) -> Handler | Response:
        """The handler for `request` (its `params` set), or the answer when none serves it."""
        method, path = request.method, request.path
        partial: Route | None = None
        for candidate in self.routes:
            match = candidate.regex.match(path)
            if match is None:
                continue
            if method not in candidate.methods:
                partial = partial or candidate
                continue
            if candidate.handler is None:
                return json_response(404, NOT_FOUND)
            request.params = match.groupdict()
            return candidate.handler
        if partial is not None:
            allow = ", ".join(sorted(partial.methods))
            return json_response(405, {"detail": "Method Not Allowed"}, [("allow", allow)])
        if self.redirect_slashes and path != "/":
            other = path[:-1] if path.endswith("/") else path + "/"
            if any(candidate.regex.match(other) for candidate in self.routes):
                return redirect(absolute_url(request.scope, other))
        return json_response(404, NOT_FOUND)


def absolute_url(scope: Scope, path: str) -> str:
    # How Starlette builds the URL of a slash redirect: from the Host header when there is one.
    scheme = scope.get("scheme", "http")
    host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
    if host is None and scope.get("server"):
        server_host, port = scope["server"]
        default_port = {"http": 80, "https": 443}.get(scheme)
        host = server_host if port == default_port else f"{server_host}:{port}"
    url = f"{scheme}://{host}{path}" if host else path
    if scope.get("query_string"):
        url += "?" + scope["query_string"].decode("latin-1")
    return url


# ---------------------------------------------------------------------------------------------
# The app


class App:
    """An ASGI app: the lifespan runs `startup` and `shutdown`; each HTTP request goes to the
    handler `router` picks. A handler's `HTTPError` is answered by `error_response`, anything
    else it raises by uvicorn's plain 500."""

    router: Router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            response = await self.respond(Request(scope, receive))
            await response.send(send)

    async def startup(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    async def respond(self, request: Request) -> Response:
        handler = self.router.resolve(request)
        if isinstance(handler, Response):
            return handler
        try:
            return await handler(request)
        except HTTPError as exc:
            return self.error_response(exc)
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            return text_response(500, "Internal Server Error")

    def error_response(self, exc: HTTPError) -> Response:
        return json_response(exc.status, {"detail": exc.detail}, exc.headers)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


# ---------------------------------------------------------------------------------------------
# Forms: multipart bodies parsed as they stream in, file parts written straight to disk.


@dataclass(slots=True)
class Upload:
    filename: str
    path: Path | None  # None when the part had an empty filename (nothing saved)


@dataclass(slots=True)
class Form:
    """A submitted form: text fields in memory, uploads already on disk."""

    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, Upload] = field(default_factory=dict)
    saved: list[Path] = field(default_factory=list)
    # Every upload of a field `read_form` was told may repeat (`image` of OpenAI's edits), in order.
    repeated: dict[str, list[Upload]] = field(default_factory=dict)

    def discard(self) -> None:
        """Delete the uploads (the submission was refused)."""
        for path in self.saved:
            path.unlink(missing_ok=True)


async def read_form(
    request: Request, file_dirs: dict[str, Path], repeated: frozenset[str] = frozenset()
) -> Form:
    """The form in the body, as Starlette reads it: multipart or urlencoded; any other body
    gives no fields. File parts named in `file_dirs` are saved there; other files are dropped.
    A file field named in `repeated` keeps every upload (`Form.repeated`), not just the last."""
    form = Form()
    mime, options = parse_options_header(request.header("content-type") or "")
    if mime == b"multipart/form-data":
        boundary = options.get(b"boundary")
        if not boundary:
            raise HTTPError(400, "Missing boundary in multipart.")
        reader = _MultipartReader(form, boundary, file_dirs, repeated)
        try:
            async for chunk in request.chunks():
                # Parse and write off the event loop: an upload must not stall other requests.
                await asyncio.to_thread(reader.write, chunk)
            await asyncio.to_thread(reader.finish)
        except FormParserError:
            reader.close()
            form.discard()
            raise HTTPError(400, "There was an error parsing the body") from None
        except BaseException:
            reader.close()
            form.discard()
            raise
    elif mime == b"application/x-www-form-urlencoded":
        text = (await request.body()).decode("latin-1")
        form.fields.update(parse_qsl(text, keep_blank_values=True))
    else:
        await request.body()
    return form


class _MultipartReader:
    """Parses a multipart body as it streams in: known file parts go straight to disk."""

    def __init__(
        self, form: Form, boundary: bytes, file_dirs: dict[str, Path], repeated: frozenset[str]
    ) -> None:
        self._form = form
        self._file_dirs = file_dirs
        self._repeated = repeated
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._filename: str | None = None
        self._out: BinaryIO | None = None
        self._out_path: Path | None = None
        self._value = bytearray()
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_header_field": lambda data, start, end: self._header_name.extend(data[start:end]),
                "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
            },
        )

    def write(self, chunk: bytes) -> None:
        self._parser.write(chunk)

    def finish(self) -> None:
        self._parser.finalize()
        self.close()

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
        self._out = None
        self._out_path = None

    def _on_part_begin(self) -> None:
        self._headers = {}
        self._value = bytearray()

    def _on_header_end(self) -> None:
        self._headers[bytes(self._header_name).lower()] = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        # Like Starlette, a part with a filename parameter is a file, even an empty one.
        raw_filename = options.get(b"filename")
        self._filename = None if raw_filename is None else raw_filename.decode("utf-8", "replace")
        directory = self._file_dirs.get(self._name)
        if self._filename and directory is not None:
            # Saved as <uuid><client's extension>, as LightX2V names its uploads.
            self._out_path = directory / f"{uuid.uuid4()}{Path(self._filename).suffix}"
            self._out = self._out_path.open("wb")
            self._form.saved.append(self._out_path)

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._filename is not None:
            if self._out is not None:
                self._out.write(data[start:end])
            return
        self._value.extend(data[start:end])
        if len(self._value) > MAX_FIELD_BYTES:
            raise HTTPError(400, "Part exceeded maximum size of 1024KB.")

    def _on_part_end(self) -> None:
        if self._filename is None:
            self._form.fields[self._name] = self._value.decode("utf-8", "replace")
            return
        path = self._out_path
        self.close()
        if self._name in self._repeated:
            self._form.repeated.setdefault(self._name, []).append(Upload(self._filename, path))
            return
        previous = self._form.files.get(self._name)
        if previous is not None and previous.path is not None:
            previous.path.unlink(missing_ok=True)  # a repeated field: the last one wins
        self._form.files[self._name] = Upload(self._filename, path)
