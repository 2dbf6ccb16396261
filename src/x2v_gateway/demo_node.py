"""A stand-in for a LightX2V self-hosted node: the same HTTP API, quirks included, tiny renders.

It reproduces what the self-hosted contract (selfhosted.md) captured from the real server
(ModelTC/LightX2V `lightx2v/server/`, commit f8aee98b): the routes and their trailing-slash
rules (FastAPI's 307 redirects and 405s), `task_status` on submit but `status` on the status
route, pydantic-shaped 422 bodies, a single FIFO processing thread, `max_queue_size` counting
pending + processing tasks, cancel that does not stop a running inference (the task flips from
`cancelled` to `completed`), at most 1000 tasks kept in memory and nothing else remembered
across a restart, while the files in `<data_dir>/outputs/` stay downloadable.

"Inference" is `render.render_video`: the input image slowly zooming, with the input audio for
s2v, or a prompt card when there is no image. A prompt containing `FAIL` makes inference fail
with a RuntimeError, like the stub the contract was captured with. `job_seconds` makes every
task take at least that long, for benchmarks.

Not reproduced: the image routes (`/v1/tasks/image/...`, `/v1/images/...`) and SenseNova-Vision
are declared but answer 404 `{"detail":"Not Found"}`; `/docs` is a short HTML page rather than
Swagger UI, and there is no `/openapi.json`; there is no Prometheus metrics port.

Two additions that are not part of the upstream API, both for tests: every accepted submission
is appended to `<data_dir>/submissions.jsonl` (task_id, time, route, and the request fields the
runner would get), so a test can count and inspect what reached the node across restarts; and
a write to a `save_result_path` outside `outputs/` is refused (the task still completes, as the
real stub did).

Run one:

    python -m x2v_gateway.demo_node --host 127.0.0.1 --port 8000 --data-dir /tmp/node1
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import enum
import json
import logging
import math
import os
import random
import re
import secrets
import string
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qsl, quote, urlsplit

import httpx
import uvicorn
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from x2v_gateway.render import render_video

# A fixed name: under `python -m` this module is __main__.
log = logging.getLogger("x2v_gateway.demo_node")

# Upstream's TaskManager keeps this many tasks and evicts the oldest finished ones beyond it.
MAX_TASKS_KEPT = 1000
# Starlette's limit for a non-file multipart field; a larger one is a 400, as upstream.
_MAX_FIELD_BYTES = 1024 * 1024
_CHUNK = 1024 * 1024
_IMAGE_TASKS = frozenset({"i2v", "s2v", "flf2v"})

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class TaskStatus(enum.StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


_ACTIVE = (TaskStatus.PENDING, TaskStatus.PROCESSING)


@dataclass(slots=True, eq=False)
class _Task:
    task_id: str
    # The validated request fields the client set (JSON) or every form field (form).
    request: dict[str, Any]
    save_result_path: str
    status: TaskStatus = TaskStatus.PENDING
    start_time: datetime = field(default_factory=datetime.now)
    end_time: datetime | None = None
    error: str | None = None
    error_type: str | None = None

    def as_status(self) -> dict[str, Any]:
        # Naive local ISO timestamps, exactly as FastAPI encodes upstream's datetime.now().
        return {
            "task_id": self.task_id,
            "status": self.status.value,
            "start_time": self.start_time.isoformat(),
            "end_time": self.end_time.isoformat() if self.end_time else None,
            "error": self.error,
            "error_type": self.error_type or "",
            "save_result_path": self.save_result_path,
        }


class _Refused(Exception):
    """A submission upstream answers with 503 (queue full, duplicate task id)."""


class _TaskBoard:
    """Every task the node knows, in memory only; mirrors upstream's TaskManager."""

    def __init__(self, max_queue_size: int) -> None:
        self.max_queue_size = max_queue_size
        self._tasks: OrderedDict[str, _Task] = OrderedDict()
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        # The task whose inference holds the worker, cancelled or not ("busy" until it ends).
        self._current: str | None = None
        self._total = self._completed = self._failed = 0

    def create(self, task_id: str, request: dict[str, Any], save_result_path: str) -> _Task:
        with self._wakeup:
            if task_id in self._tasks:
                raise _Refused(f"Task ID {task_id} already exists")
            if self._active_count() >= self.max_queue_size:
                raise _Refused(f"Task queue is full (max {self.max_queue_size} tasks)")
            task = _Task(task_id=task_id, request=request, save_result_path=save_result_path)
            self._tasks[task_id] = task
            self._total += 1
            self._evict_old_tasks()
            self._wakeup.notify()
            return task

    def next_task(self, timeout: float) -> _Task | None:
        """Start the oldest pending task, waiting up to `timeout` for one to arrive."""
        with self._wakeup:
            task = self._first_pending()
            if task is None:
                self._wakeup.wait(timeout)
                task = self._first_pending()
            if task is None:
                return None
            # Upstream overwrites start_time and moves the task to the end of the listing.
            task.status = TaskStatus.PROCESSING
            task.start_time = datetime.now()
            self._tasks.move_to_end(task.task_id)
            self._current = task.task_id
            return task

    def complete(self, task: _Task, save_result_path: str) -> None:
        with self._lock:
            if task.task_id not in self._tasks:
                log.warning("task %s was evicted before it completed", task.task_id)
                return
            # Also for a task cancelled while running: upstream flips it to completed and
            # keeps error = "Task cancelled by user".
            task.status = TaskStatus.COMPLETED
            task.end_time = datetime.now()
            task.save_result_path = save_result_path
            self._completed += 1

    def fail(self, task: _Task, error: str, error_type: str | None) -> None:
        with self._lock:
            if task.task_id not in self._tasks:
                log.warning("task %s was evicted before it failed", task.task_id)
                return
            task.status = TaskStatus.FAILED
            task.end_time = datetime.now()
            task.error = error
            task.error_type = error_type
            self._failed += 1

    def release(self, task: _Task) -> None:
        with self._lock:
            if self._current == task.task_id:
                self._current = None

    def cancel(self, task_id: str) -> bool:
        with self._lock:
            return self._cancel(task_id)

    def cancel_all(self) -> None:
        with self._lock:
            for task_id, task in list(self._tasks.items()):
                if task.status in _ACTIVE:
                    self._cancel(task_id)

    def _cancel(self, task_id: str) -> bool:
        task = self._tasks.get(task_id)
        if task is None or task.status in (TaskStatus.COMPLETED, TaskStatus.FAILED):
            return False
        # Nothing stops a running render (upstream never sets the runner's stop signal): it goes
        # on and later overwrites this status. Cancelling an already cancelled task succeeds
        # again and moves end_time, as upstream.
        task.status = TaskStatus.CANCELLED
        task.end_time = datetime.now()
        task.error = "Task cancelled by user"
        return True

    def status(self, task_id: str) -> dict[str, Any] | None:
        with self._lock:
            task = self._tasks.get(task_id)
            return task.as_status() if task else None

    def all_statuses(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {task_id: task.as_status() for task_id, task in self._tasks.items()}

    def queue_status(self) -> dict[str, Any]:
        with self._lock:
            active = self._active_count()
            return {
                "is_processing": self._current is not None,
                "current_task": self._current,
                "pending_count": self._pending_count(),
                "active_count": active,
                "queue_size": self.max_queue_size,
                "queue_available": self.max_queue_size - active,
            }

    def service_status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "service_status": "busy" if self._current else "idle",
                "current_task": self._current,
                "active_tasks": [
                    task_id
                    for task_id, task in self._tasks.items()
                    if task.status == TaskStatus.PROCESSING
                ],
                "pending_tasks": self._pending_count(),
                "queue_size": self.max_queue_size,
                "total_tasks": self._total,
                "completed_tasks": self._completed,
                "failed_tasks": self._failed,
            }

    def wake(self) -> None:
        with self._wakeup:
            self._wakeup.notify_all()

    def _first_pending(self) -> _Task | None:
        return next((t for t in self._tasks.values() if t.status == TaskStatus.PENDING), None)

    def _active_count(self) -> int:
        return sum(1 for t in self._tasks.values() if t.status in _ACTIVE)

    def _pending_count(self) -> int:
        return sum(1 for t in self._tasks.values() if t.status == TaskStatus.PENDING)

    def _evict_old_tasks(self) -> None:
        excess = len(self._tasks) - MAX_TASKS_KEPT
        if excess <= 0:
            return
        finished = [t for t in self._tasks.values() if t.status not in _ACTIVE]
        finished.sort(key=lambda t: t.end_time or t.start_time)
        for task in finished[:excess]:
            del self._tasks[task.task_id]


# ---------------------------------------------------------------------------------------------
# Request validation, shaped like the pydantic errors FastAPI returns (422).


class _Invalid(Exception):
    def __init__(self, type_: str, msg: str, ctx: dict[str, Any] | None = None) -> None:
        super().__init__(msg)
        self.type, self.msg, self.ctx = type_, msg, ctx


Validator = Callable[[Any, tuple, list], Any]


def _error(type_: str, loc: tuple, msg: str, value: Any, ctx: dict | None = None) -> dict:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    detail = {"type": type_, "loc": list(loc), "msg": msg, "input": value}
    if ctx is not None:
        detail["ctx"] = ctx
    return detail


def _leaf(check: Callable[[Any], Any]) -> Validator:
    def validate(value: Any, loc: tuple, errors: list) -> Any:
        try:
            return check(value)
        except _Invalid as exc:
            errors.append(_error(exc.type, loc, exc.msg, value, exc.ctx))
            return None

    return validate


def _check_str(value: Any) -> str:
    # Pydantic never turns a number into a string: 123 for a str field is an error.
    if isinstance(value, str):
        return value
    raise _Invalid("string_type", "Input should be a valid string")


_INT_TEXT = re.compile(r"([+-]?\d+)(?:\.0*)?")


def _check_int(value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Invalid("finite_number", "Input should be a finite number")
        if value.is_integer():
            return int(value)
        raise _Invalid(
            "int_from_float", "Input should be a valid integer, got a number with a fractional part"
        )
    if isinstance(value, str):
        match = _INT_TEXT.fullmatch(value.strip())
        if match:
            return int(match.group(1))
        raise _Invalid(
            "int_parsing", "Input should be a valid integer, unable to parse string as an integer"
        )
    raise _Invalid("int_type", "Input should be a valid integer")


def _check_float(value: Any) -> float:
    if isinstance(value, (bool, int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise _Invalid(
                "float_parsing", "Input should be a valid number, unable to parse string as a number"
            ) from None
    raise _Invalid("float_type", "Input should be a valid number")


def _check_positive_float(value: Any) -> float:
    number = _check_float(value)
    if not number > 0:
        raise _Invalid("greater_than", "Input should be greater than 0", {"gt": 0.0})
    return number


_TRUE_TEXT = {"1", "on", "t", "true", "y", "yes"}
_FALSE_TEXT = {"0", "off", "f", "false", "n", "no"}


def _check_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE_TEXT | _FALSE_TEXT:
        return value.lower() in _TRUE_TEXT
    if isinstance(value, (int, float, str)):
        raise _Invalid("bool_parsing", "Input should be a valid boolean, unable to interpret input")
    raise _Invalid("bool_type", "Input should be a valid boolean")


def _optional(validate: Validator) -> Validator:
    def validate_optional(value: Any, loc: tuple, errors: list) -> Any:
        return None if value is None else validate(value, loc, errors)

    return validate_optional


def _list_of(validate: Validator) -> Validator:
    def validate_list(value: Any, loc: tuple, errors: list) -> Any:
        if not isinstance(value, list):
            errors.append(_error("list_type", loc, "Input should be a valid list", value))
            return None
        return [validate(item, (*loc, index), errors) for index, item in enumerate(value)]

    return validate_list


def _talk_object(value: Any, loc: tuple, errors: list) -> Any:
    if not isinstance(value, dict):
        errors.append(
            _error(
                "model_type",
                loc,
                "Input should be a valid dictionary or instance of TalkObject",
                value,
                {"class_name": "TalkObject"},
            )
        )
        return None
    result = {}
    for key in ("audio", "mask"):
        if key not in value:
            errors.append(_error("missing", (*loc, key), "Field required", value))
        else:
            result[key] = _STR(value[key], (*loc, key), errors)
    return result


_STR, _INT, _BOOL = _leaf(_check_str), _leaf(_check_int), _leaf(_check_bool)
_FLOAT = _leaf(_check_float)

# VideoTaskRequest's fields in pydantic's order (base classes first): errors come in this order.
_VIDEO_REQUEST_FIELDS: dict[str, Validator] = {
    "data_bootstrap_room": _optional(_INT),
    "disagg_phase1_receiver_engine_rank": _optional(_INT),
    "disagg_bootstrap_room": _optional(_INT),
    "disagg_decoder_bootstrap_room": _optional(_INT),
    "task_id": _STR,
    "prompt": _STR,
    "use_prompt_enhancer": _BOOL,
    "negative_prompt": _STR,
    "image_path": _STR,
    "last_frame_path": _STR,
    "image_mask_path": _STR,
    "save_result_path": _STR,
    "presigned_url": _STR,
    "infer_steps": _INT,
    "seed": _INT,
    "reuse": _BOOL,
    "target_shape": _list_of(_INT),
    "lora_name": _optional(_STR),
    "lora_strength": _FLOAT,
    "prefer_memory_result": _BOOL,
    "num_fragments": _INT,
    "target_video_length": _INT,
    "video_path": _STR,
    "sr_ratio": _leaf(_check_positive_float),
    "audio_path": _STR,
    "video_duration": _INT,
    "talk_objects": _optional(_list_of(_talk_object)),
    "target_fps": _optional(_INT),
    "resize_mode": _optional(_STR),
}

# Defaults of the fields the demo inference reads, for JSON requests that leave them out.
_REQUEST_DEFAULTS: dict[str, Any] = {
    "prompt": "",
    "image_path": "",
    "audio_path": "",
    "last_frame_path": "",
    "target_video_length": 81,
    "target_fps": 16,
}

# The form route's parameters in FastAPI's order, with their Form defaults (None = a file).
_FORM_FIELDS: dict[str, tuple[Validator | None, Any]] = {
    "image_file": (None, ...),
    "last_frame_file": (None, None),
    "prompt": (_STR, ""),
    "save_result_path": (_STR, ""),
    "use_prompt_enhancer": (_BOOL, False),
    "negative_prompt": (_STR, ""),
    "num_fragments": (_INT, 1),
    "infer_steps": (_INT, 5),
    "target_video_length": (_INT, 81),
    "seed": (_INT, 42),
    "audio_file": (None, None),
    "video_duration": (_INT, 5),
    "target_fps": (_INT, 16),
}


def _validate_video_request(body: Any) -> tuple[dict[str, Any], list[dict]]:
    """The fields a JSON body sets, validated; unknown fields are dropped, as pydantic does."""
    if body is None:
        return {}, [_error("missing", ("body",), "Field required", None)]
    if not isinstance(body, dict):
        msg = "Input should be a valid dictionary or object to extract fields from"
        return {}, [_error("model_attributes_type", ("body",), msg, body)]
    values, errors = {}, []
    for name, validate in _VIDEO_REQUEST_FIELDS.items():
        if name in body:
            values[name] = validate(body[name], ("body", name), errors)
    return values, errors


def _is_json_content_type(content_type: str | None) -> bool:
    # FastAPI parses the body as JSON without a content-type, or with application/*json.
    if content_type is None:
        return True
    mime = content_type.split(";", 1)[0].strip().lower()
    maintype, _, subtype = mime.partition("/")
    return maintype == "application" and (subtype == "json" or subtype.endswith("+json"))


# ---------------------------------------------------------------------------------------------
# HTTP plumbing: a tiny request/response pair and a router with Starlette's matching rules.


class _HTTPError(Exception):
    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


@dataclass(slots=True)
class _Response:
    status: int
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    stream: AsyncIterator[bytes] | None = None

    async def send(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        if self.stream is None:
            await send({"type": "http.response.body", "body": self.body})
            return
        try:
            async for chunk in self.stream:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        except OSError:  # the client went away mid-download (uvicorn's ClientDisconnected)
            pass


def _json(status: int, payload: Any, headers: Iterable[tuple[bytes, bytes]] = ()) -> _Response:
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return _Response(
        status,
        body,
        [
            (b"content-length", str(len(body)).encode()),
            (b"content-type", b"application/json"),
            *headers,
        ],
    )


def _redirect(location: str) -> _Response:
    # Starlette's RedirectResponse: 307, quoted location, empty body.
    quoted = quote(location, safe=":/%#?=@[]!$&'()*+,;")
    return _Response(307, b"", [(b"content-length", b"0"), (b"location", quoted.encode("latin-1"))])


@dataclass(slots=True)
class _Request:
    scope: Scope
    receive: Receive
    params: dict[str, str]

    @property
    def path(self) -> str:
        return self.scope["path"]

    def header(self, name: bytes) -> str | None:
        for key, value in self.scope["headers"]:
            if key == name:
                return value.decode("latin-1")
        return None

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise _HTTPError(400, "Client disconnected")
            if message.get("body"):
                yield message["body"]
            if not message.get("more_body"):
                return

    async def body(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])


@dataclass(frozen=True, slots=True)
class _Route:
    methods: frozenset[str]
    regex: re.Pattern[str]
    handler: str  # a DemoNodeApp method name, or "" for a declared route this node does not serve


def _route(methods: str, template: str, handler: str = "") -> _Route:
    # Starlette's convertors: {name} is one path segment, {name:path} is the rest of the path.
    pattern = re.sub(
        r"\{(\w+)(:path)?\}",
        lambda m: f"(?P<{m.group(1)}>.*)" if m.group(2) else f"(?P<{m.group(1)}>[^/]+)",
        template,
    )
    return _Route(frozenset(methods.split(",")), re.compile(f"^{pattern}$"), handler)


# Upstream's routes in FastAPI's registration order, which decides what matches first.
_ROUTES = [
    _route("GET,HEAD", "/docs", "_docs"),
    _route("GET", "/", "_redirect_to_docs"),
    _route("GET", "/health", "_health"),
    _route("GET", "/v1/tasks/", "_list_tasks"),
    _route("GET", "/v1/tasks/queue/status", "_queue_status"),
    _route("GET", "/v1/tasks/{task_id}/status", "_task_status"),
    _route("GET", "/v1/tasks/{task_id}/result", "_task_result"),
    _route("DELETE", "/v1/tasks/{task_id}", "_stop_task"),
    _route("DELETE", "/v1/tasks/all/running", "_stop_all_tasks"),
    _route("POST", "/v1/tasks/video/", "_submit_json"),
    _route("POST", "/v1/tasks/video/form", "_submit_form"),
    _route("POST", "/v1/tasks/image/"),
    _route("POST", "/v1/tasks/image/form"),
    _route("POST", "/v1/tasks/image/sync"),
    _route("POST", "/v1/tasks/sensenova-vision/"),
    _route("POST", "/v1/tasks/sensenova-vision/sync"),
    _route("GET", "/v1/tasks/sensenova-vision/{task_id}/result"),
    _route("POST", "/v1/tasks/", "_submit_json"),  # deprecated alias, same handler
    _route("POST", "/v1/images/generations"),
    _route("POST", "/v1/images/edits"),
    _route("GET", "/v1/files/download/{file_path:path}", "_download_file"),
    _route("GET", "/v1/service/status", "_service_status"),
    _route("GET", "/v1/service/metadata", "_service_metadata"),
]

_NOT_FOUND = {"detail": "Not Found"}
_MIME_TYPES = {
    ".mp4": "video/mp4",
    ".avi": "video/x-msvideo",
    ".mov": "video/quicktime",
    ".mkv": "video/x-matroska",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".gif": "image/gif",
    ".txt": "text/plain; charset=utf-8",
    ".json": "application/json",
    ".npy": "application/octet-stream",
    ".glb": "model/gltf-binary",
}


def _absolute_url(scope: Scope, path: str) -> str:
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
# Inputs: uploads, base64 strings and URLs turned into files under <data_dir>/inputs/.

_IMAGE_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "png",
    b"\xff\xd8\xff": "jpg",
    b"GIF87a": "gif",
    b"GIF89a": "gif",
}
_AUDIO_SIGNATURES = {
    b"ID3": "mp3",
    b"\xff\xfb": "mp3",
    b"\xff\xf3": "mp3",
    b"\xff\xf2": "mp3",
    b"OggS": "ogg",
    b"fLaC": "flac",
}


def _looks_like_base64(value: str, kind: str) -> bool:
    """Upstream's test: a data URL, or valid base64 whose first bytes are a known file type."""
    if value.startswith(f"data:{kind}/"):
        return True
    if len(value) % 4:
        return False
    try:
        base64.b64decode(value, validate=True)
        head = base64.b64decode(value[:100])
    except ValueError:
        return False
    if kind == "image":
        return head.startswith(tuple(_IMAGE_SIGNATURES)) or head[8:12] == b"WEBP"
    return (
        head.startswith(tuple(_AUDIO_SIGNATURES))
        or (head.startswith(b"RIFF") and b"WAVE" in head[:12])
        or head[:4] in (b"ftyp", b"\x00\x00\x00\x20", b"\x00\x00\x00\x18")
    )


def _save_base64(value: str, kind: str, directory: Path) -> Path:
    extension = None
    match = re.match(rf"data:{kind}/(\w+);base64,(.+)", value)
    if match:
        extension, value = match.group(1), match.group(2)
    try:
        data = base64.b64decode(value)
    except ValueError as exc:
        raise ValueError(f"Invalid base64 data: {exc}") from exc
    if extension is None:
        signatures = _IMAGE_SIGNATURES if kind == "image" else _AUDIO_SIGNATURES
        extension = next((ext for sig, ext in signatures.items() if data.startswith(sig)), None)
        if extension is None:
            if kind == "image" and data[8:12] == b"WEBP":
                extension = "webp"
            elif kind == "audio" and data.startswith(b"RIFF") and b"WAVE" in data[:12]:
                extension = "wav"
            else:
                extension = "png" if kind == "image" else "mp3"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{uuid.uuid4()}.{extension}"
    path.write_bytes(data)
    return path


def _download(url: str, kind: str, directory: Path, stop: threading.Event) -> Path:
    """Fetch an input URL like upstream: 3 attempts, retrying connection errors and 5xx."""
    parsed = urlsplit(url)
    if not parsed.scheme or not parsed.netloc:
        raise ValueError(f"Invalid URL format: {url}")
    name = Path(parsed.path).name or f"{uuid.uuid4()}.{'jpg' if kind == 'image' else 'mp3'}"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    last_error: Exception | None = None
    delay = 1.0
    timeout = httpx.Timeout(connect=10.0, read=30.0, write=10.0, pool=5.0)
    with httpx.Client(verify=False, timeout=timeout, follow_redirects=True) as client:
        for attempt in range(3):
            try:
                with client.stream("GET", url) as response:
                    if response.status_code == 200:
                        with path.open("wb") as out:
                            for chunk in response.iter_bytes(_CHUNK):
                                out.write(chunk)
                        return path
                    if response.status_code < 500:
                        raise ValueError(f"HTTP error for {url}: Client error {response.status_code}")
                    last_error = RuntimeError(f"Server returned {response.status_code}")
            except httpx.HTTPError as exc:
                last_error = exc
            if attempt < 2 and stop.wait(delay):
                break
            delay *= 2
    raise ValueError(
        f"Failed to connect to {url}: All 3 connection attempts failed for {url}: {last_error}"
    )


async def _url_accessible(url: str) -> bool:
    """Upstream's submit-time check of an image URL: a HEAD answered below 400 within 5 s."""
    parsed = urlsplit(url)
    if not parsed.scheme or not parsed.netloc:
        return False
    try:
        async with httpx.AsyncClient(verify=False, timeout=5.0) as client:
            response = await client.head(url, follow_redirects=True)
    except (httpx.HTTPError, ValueError):
        return False
    return response.status_code < 400


@dataclass(slots=True)
class _Upload:
    filename: str
    path: Path | None  # None when the part had an empty filename (nothing saved)


@dataclass(slots=True)
class _Form:
    """A submitted form: text fields in memory, uploads already on disk."""

    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, _Upload] = field(default_factory=dict)
    saved: list[Path] = field(default_factory=list)

    def discard(self) -> None:
        """Delete the uploads (the submission was refused)."""
        for path in self.saved:
            path.unlink(missing_ok=True)


class _MultipartReader:
    """Parses a multipart body as it streams in: known file parts go straight to disk."""

    def __init__(self, form: _Form, boundary: bytes, file_dirs: dict[str, Path]) -> None:
        self._form = form
        self._file_dirs = file_dirs
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
            # Upstream names uploads <uuid><client's extension>.
            self._out_path = directory / f"{uuid.uuid4()}{Path(self._filename).suffix}"
            self._out = self._out_path.open("wb")
            self._form.saved.append(self._out_path)

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._filename is not None:
            if self._out is not None:
                self._out.write(data[start:end])
            return
        self._value.extend(data[start:end])
        if len(self._value) > _MAX_FIELD_BYTES:
            raise _HTTPError(400, "Part exceeded maximum size of 1024KB.")

    def _on_part_end(self) -> None:
        if self._filename is None:
            self._form.fields[self._name] = self._value.decode("utf-8", "replace")
            return
        path = self._out_path
        self.close()
        previous = self._form.files.get(self._name)
        if previous is not None and previous.path is not None:
            previous.path.unlink(missing_ok=True)  # a repeated field: the last one wins
        self._form.files[self._name] = _Upload(self._filename, path)


# ---------------------------------------------------------------------------------------------
# The node: an ASGI app plus its processing thread.


class _Abandoned(Exception):
    """The node is shutting down: leave the task as it is."""


class _RunnerError(Exception):
    """A failure inside inference: upstream reports its class name as error_type."""

    def __init__(self, message: str, error_type: str) -> None:
        super().__init__(message)
        self.error_type = error_type


class DemoNodeApp:
    """The ASGI app of one demo node. `start()`/`stop()` run its worker (lifespan calls them)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        job_seconds: float = 0.0,
        max_queue_size: int = 10,
        model_cls: str = "demo",
        model_path: str = "/models/demo",
        task: str = "s2v",
        tasks: Iterable[str] | None = None,
        max_side: int = 320,
    ) -> None:
        if max_queue_size <= 0:
            raise ValueError("max_queue_size must be positive")
        self.data_dir = Path(data_dir).resolve()
        self.outputs = self.data_dir / "outputs"
        self.image_inputs = self.data_dir / "inputs" / "imgs"
        self.audio_inputs = self.data_dir / "inputs" / "audios"
        self.journal = self.data_dir / "submissions.jsonl"
        self.job_seconds = job_seconds
        self.model_cls = model_cls
        self.model_path = model_path
        self.task = task
        self.tasks = frozenset(tasks) if tasks else frozenset({task})
        self.max_side = max_side
        self.board = _TaskBoard(max_queue_size)
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        self._journal_lock = threading.Lock()

    # -- lifecycle

    def start(self) -> None:
        for directory in (self.outputs, self.image_inputs, self.audio_inputs):
            directory.mkdir(parents=True, exist_ok=True)
        if self._worker is None or not self._worker.is_alive():
            self._stopping.clear()
            self._worker = threading.Thread(target=self._work, name="demo-node-worker", daemon=True)
            self._worker.start()

    def stop(self) -> None:
        self._stopping.set()
        self.board.wake()
        if self._worker is not None:
            self._worker.join(timeout=5)

    # -- ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            response = await self._respond(scope, receive)
            await response.send(send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self.start()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await asyncio.to_thread(self.stop)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _respond(self, scope: Scope, receive: Receive) -> _Response:
        method, path = scope["method"], scope["path"]
        partial: _Route | None = None
        for route in _ROUTES:
            match = route.regex.match(path)
            if match is None:
                continue
            if method not in route.methods:
                partial = partial or route
                continue
            if not route.handler:
                return _json(404, _NOT_FOUND)
            request = _Request(scope, receive, match.groupdict())
            try:
                return await getattr(self, route.handler)(request)
            except _HTTPError as exc:
                return _json(exc.status, {"detail": exc.detail})
            except Exception:
                log.exception("unhandled error in %s %s", method, path)
                return _Response(
                    500,
                    b"Internal Server Error",
                    [(b"content-length", b"21"), (b"content-type", b"text/plain; charset=utf-8")],
                )
        if partial is not None:
            # Why POST /v1/tasks/video (no slash) is a 405: it matches DELETE /v1/tasks/{task_id}.
            allow = ", ".join(sorted(partial.methods)).encode()
            return _json(405, {"detail": "Method Not Allowed"}, [(b"allow", allow)])
        if path != "/":
            # Starlette's redirect_slashes: the other spelling matches something, so 307 there.
            other = path[:-1] if path.endswith("/") else path + "/"
            if any(route.regex.match(other) for route in _ROUTES):
                return _redirect(_absolute_url(scope, other))
        return _json(404, _NOT_FOUND)

    # -- handlers: misc

    async def _redirect_to_docs(self, request: _Request) -> _Response:
        return _redirect("/docs")

    async def _docs(self, request: _Request) -> _Response:
        body = _DOCS_HTML.encode()
        return _Response(
            200,
            body,
            [
                (b"content-length", str(len(body)).encode()),
                (b"content-type", b"text/html; charset=utf-8"),
            ],
        )

    async def _health(self, request: _Request) -> _Response:
        return _json(200, {"status": "ok"})

    async def _service_status(self, request: _Request) -> _Response:
        return _json(200, self.board.service_status())

    async def _service_metadata(self, request: _Request) -> _Response:
        return _json(
            200, {"nproc_per_node": 1, "model_cls": self.model_cls, "model_path": self.model_path}
        )

    # -- handlers: tasks

    async def _list_tasks(self, request: _Request) -> _Response:
        return _json(200, self.board.all_statuses())

    async def _queue_status(self, request: _Request) -> _Response:
        return _json(200, self.board.queue_status())

    async def _task_status(self, request: _Request) -> _Response:
        status = self.board.status(request.params["task_id"])
        if status is None:
            return _json(404, {"detail": "Task not found"})
        return _json(200, status)

    async def _task_result(self, request: _Request) -> _Response:
        status = self.board.status(request.params["task_id"])
        if status is None:
            return _json(404, {"detail": "Task not found"})
        if status["status"] != TaskStatus.COMPLETED:
            return _json(404, {"detail": "Task not completed"})
        if not status["save_result_path"]:
            return _json(404, {"detail": "Task result file does not exist"})
        # The status holds only the basename, so a result saved in a sub-directory is a 404 here.
        path = Path(status["save_result_path"])
        return await self._file_response(path if path.is_absolute() else self.outputs / path)

    async def _download_file(self, request: _Request) -> _Response:
        return await self._file_response(self.outputs / request.params["file_path"])

    async def _file_response(self, path: Path) -> _Response:
        resolved = path.resolve()
        if not resolved.is_relative_to(self.outputs):
            return _json(403, {"detail": "Access to this file is not allowed"})
        if not resolved.is_file():
            # Leaks the absolute server path, as upstream does.
            return _json(404, {"detail": f"File not found: {path}"})
        size = resolved.stat().st_size
        mime = _MIME_TYPES.get(resolved.suffix.lower(), "application/octet-stream")
        headers = [
            (b"content-type", mime.encode()),
            (b"content-disposition", f'attachment; filename="{resolved.name}"'.encode()),
            (b"content-length", str(size).encode()),
            # Advertised, but Range requests get the whole file with a 200, as upstream.
            (b"accept-ranges", b"bytes"),
        ]
        return _Response(200, headers=headers, stream=_read_file(resolved))

    async def _stop_task(self, request: _Request) -> _Response:
        if self.board.cancel(request.params["task_id"]):
            log.info("task %s cancelled", request.params["task_id"])
            return _json(200, {"stop_status": "success", "reason": "Task stopped successfully."})
        return _json(
            200, {"stop_status": "do_nothing", "reason": "Task not found or already completed."}
        )

    async def _stop_all_tasks(self, request: _Request) -> _Response:
        self.board.cancel_all()
        return _json(200, {"stop_status": "success", "reason": "All tasks stopped successfully."})

    async def _submit_json(self, request: _Request) -> _Response:
        raw = await request.body()
        body: Any = None
        if raw:
            if _is_json_content_type(request.header(b"content-type")):
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError as exc:
                    detail = {
                        "type": "json_invalid",
                        "loc": ["body", exc.pos],
                        "msg": "JSON decode error",
                        "input": {},
                        "ctx": {"error": exc.msg},
                    }
                    return _json(422, {"detail": [detail]})
                except UnicodeDecodeError:
                    return _json(400, {"detail": "There was an error parsing the body"})
            else:
                body = raw  # pydantic then refuses it as "not a dictionary", input = the text
        values, errors = _validate_video_request(body)
        if errors:
            return _json(422, {"detail": errors})
        image_path = values.get("image_path", "")
        if image_path.startswith("http") and not await _url_accessible(image_path):
            # Upstream raises HTTPException(400) inside a generic `except Exception`: a 500.
            return _json(500, {"detail": f"400: Image URL is not accessible: {image_path}"})
        task_id = values["task_id"] if "task_id" in values else _new_task_id()
        if "seed" not in values:
            values["seed"] = random.randint(0, 2**32 - 1)
        return self._accept(task_id, values, request.path)

    async def _submit_form(self, request: _Request) -> _Response:
        form = await self._read_form(request)
        values, errors = _validate_form(form)
        if errors:
            form.discard()
            return _json(422, {"detail": errors})
        response = self._accept(_new_task_id(), values, request.path)
        if response.status != 200:
            form.discard()
        return response

    async def _read_form(self, request: _Request) -> _Form:
        form = _Form()
        mime, options = parse_options_header(request.header(b"content-type") or "")
        if mime == b"multipart/form-data":
            boundary = options.get(b"boundary")
            if not boundary:
                raise _HTTPError(400, "Missing boundary in multipart.")
            dirs = {
                "image_file": self.image_inputs,
                "last_frame_file": self.image_inputs,
                "audio_file": self.audio_inputs,
            }
            reader = _MultipartReader(form, boundary, dirs)
            try:
                async for chunk in request.chunks():
                    # Parse and write off the event loop: an upload must not stall status polls.
                    await asyncio.to_thread(reader.write, chunk)
                await asyncio.to_thread(reader.finish)
            except FormParserError:
                reader.close()
                form.discard()
                raise _HTTPError(400, "There was an error parsing the body") from None
            except BaseException:
                reader.close()
                form.discard()
                raise
        elif mime == b"application/x-www-form-urlencoded":
            text = (await request.body()).decode("latin-1")
            form.fields.update(parse_qsl(text, keep_blank_values=True))
        else:
            await request.body()  # anything else: no fields at all, so image_file is missing
        return form

    def _accept(self, task_id: str, values: dict[str, Any], route: str) -> _Response:
        # Upstream's BaseTaskRequest: an empty save_result_path becomes the task id.
        save_result_path = values.get("save_result_path") or task_id
        try:
            self.board.create(task_id, values, save_result_path)
        except _Refused as exc:
            return _json(503, {"detail": str(exc)})
        self._journal_submission(task_id, route, values)
        queue = self.board.queue_status()
        log.info(
            "accepted task %s via POST %s (%d of %d active)",
            task_id,
            route,
            queue["active_count"],
            queue["queue_size"],
        )
        return _json(
            200, {"task_id": task_id, "task_status": "pending", "save_result_path": save_result_path}
        )

    def _journal_submission(self, task_id: str, route: str, request: dict[str, Any]) -> None:
        # The request as the runner would get it, long strings (base64 inputs) shortened.
        shown = {
            key: f"{value[:64]}...({len(value)} chars)"
            if isinstance(value, str) and len(value) > 256
            else value
            for key, value in request.items()
        }
        entry = {
            "task_id": task_id,
            "time": datetime.now().isoformat(),
            "route": route,
            "request": shown,
        }
        line = json.dumps(entry, ensure_ascii=False)
        with self._journal_lock, self.journal.open("a", encoding="utf-8") as journal:
            journal.write(line + "\n")

    # -- the processing thread

    def _work(self) -> None:
        while not self._stopping.is_set():
            task = self.board.next_task(timeout=0.2)
            if task is None:
                continue
            started = time.monotonic()
            try:
                result_name = self._process(task, started)
            except _Abandoned:
                continue
            except _RunnerError as exc:
                self.board.fail(task, str(exc), exc.error_type)
                log.info("task %s failed in %.2f s: %s", task.task_id, time.monotonic() - started, exc)
            except Exception as exc:
                # Outside the runner (an input download, say): upstream leaves error_type empty.
                self.board.fail(task, str(exc), None)
                log.info("task %s failed in %.2f s: %s", task.task_id, time.monotonic() - started, exc)
            else:
                self.board.complete(task, result_name)
                log.info("task %s completed in %.2f s", task.task_id, time.monotonic() - started)
            finally:
                self.board.release(task)

    def _process(self, task: _Task, started: float) -> str:
        """Run one task's inference; returns the basename the status reports once completed."""
        request = {**_REQUEST_DEFAULTS, **task.request}
        image = self._resolve_input(request["image_path"], "image")
        audio = self._resolve_input(request["audio_path"], "audio")
        output = self._output_path(task.save_result_path)
        if "FAIL" in request["prompt"]:
            self._wait_until(started + self.job_seconds)
            raise _RunnerError(
                f"stub inference failure for task {task.task_id}: prompt contains 'FAIL'",
                "RuntimeError",
            )
        if not output.resolve().is_relative_to(self.outputs):
            # Upstream would write anywhere; the demo node refuses, and still completes.
            log.warning("task %s: not writing %s, outside %s", task.task_id, output, self.outputs)
            self._wait_until(started + self.job_seconds)
            return output.name
        # A real runner saves the video when inference ends: render beside it, and give it its
        # name only then, so a node killed mid-task leaves no finished-looking file behind.
        partial = output.with_name(f".{output.name}.part")
        try:
            try:
                self._render(partial, request, image, audio)
            except Exception as exc:
                raise _RunnerError(str(exc), type(exc).__name__) from exc
            self._wait_until(started + self.job_seconds)
            os.replace(partial, output)
        finally:
            partial.unlink(missing_ok=True)
        return output.name

    def _render(
        self, output: Path, request: dict[str, Any], image: Path | None, audio: Path | None
    ) -> None:
        if image is not None and not self.tasks & _IMAGE_TASKS:
            image = None  # a t2v runner ignores image_path
        if image is None and "t2v" not in self.tasks:
            raise RuntimeError(f"the demo {self.task} runner needs an image_path")
        if "s2v" not in self.tasks:
            audio = None
        fps = min(max(int(request["target_fps"] or 16), 1), 60)
        render_video(
            output,
            image=image,
            audio=audio,
            prompt=request["prompt"],
            seed=request.get("seed", 0),
            seconds=request["target_video_length"] / fps,
            fps=fps,
            max_side=self.max_side,
        )

    def _resolve_input(self, value: str, kind: str) -> Path | None:
        if not value:
            return None
        directory = self.image_inputs if kind == "image" else self.audio_inputs
        if value.startswith("http"):
            return _download(value, kind, directory, self._stopping)
        if _looks_like_base64(value, kind):
            return _save_base64(value, kind, directory)
        return Path(value)  # a server-local path, passed through as upstream does

    def _output_path(self, save_result_path: str) -> Path:
        path = Path(save_result_path)
        if not path.is_absolute():
            path = self.outputs / save_result_path
        return path if path.suffix else path.with_suffix(".mp4")

    def _wait_until(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining > 0 and self._stopping.wait(remaining):
            raise _Abandoned()
        if self._stopping.is_set():
            raise _Abandoned()


async def _read_file(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as file:
        while chunk := await asyncio.to_thread(file.read, _CHUNK):
            yield chunk


def _validate_form(form: _Form) -> tuple[dict[str, Any], list[dict]]:
    """The form route's parameters: every one is passed to the runner, defaults included."""
    values: dict[str, Any] = {}
    errors: list[dict] = []
    for name, (validate, default) in _FORM_FIELDS.items():
        loc = ("body", name)
        if validate is None:  # a file parameter
            upload = form.files.get(name)
            text = form.fields.get(name, "")
            if upload is not None:
                values[name] = upload
            elif text:
                msg = f"Value error, Expected UploadFile, received: {type(text)}"
                errors.append(_error("value_error", loc, msg, text, {"error": {}}))
            elif default is ...:
                errors.append(_error("missing", loc, "Field required", None))
            continue
        # FastAPI treats an empty form value as absent.
        text = form.fields.get(name, "")
        values[name] = validate(text, loc, errors) if text != "" else default
    if errors:
        return {}, errors
    request = {name: value for name, value in values.items() if not name.endswith("_file")}
    for name, key in (
        ("image_file", "image_path"),
        ("last_frame_file", "last_frame_path"),
        ("audio_file", "audio_path"),
    ):
        upload = values.get(name)
        request[key] = str(upload.path) if upload is not None and upload.path else ""
    return request, []


def _new_task_id() -> str:
    alphabet = string.ascii_uppercase + string.digits
    return "-".join("".join(secrets.choice(alphabet) for _ in range(4)) for _ in range(5))


_DOCS_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>LightX2V demo node</title></head>
<body style="font-family: sans-serif; max-width: 48em; margin: 2em auto">
<h1>LightX2V demo node</h1>
<p>A stand-in for a LightX2V self-hosted server (x2v-gateway). Routes:</p>
<ul>
<li>POST /v1/tasks/video/ (JSON), POST /v1/tasks/video/form (multipart)</li>
<li>GET /v1/tasks/, GET /v1/tasks/{id}/status, GET /v1/tasks/{id}/result</li>
<li>DELETE /v1/tasks/{id}, DELETE /v1/tasks/all/running</li>
<li>GET /v1/tasks/queue/status, GET /v1/service/status, GET /v1/service/metadata</li>
<li>GET /v1/files/download/{path}, GET /health</li>
</ul>
</body></html>
"""


def create_demo_app(data_dir: Path, **options: Any) -> DemoNodeApp:
    """The ASGI app of a demo node keeping its files under `data_dir` (options: `DemoNodeApp`'s).

    `task` is what the node's runner is configured for (LightX2V's `--task`); `tasks` the task
    types it accepts, default just `task`. Without "t2v" in them, a request without an image
    fails like a real image-to-video runner would; with it, such a request renders a prompt card.
    """
    return DemoNodeApp(data_dir, **options)


# The thread an in-process demo node (`app.DemoNode`) serves from.
IN_PROCESS_THREAD = "x2v-demo-node"


def _not_in_process_chatter(record: logging.LogRecord) -> bool:
    return record.threadName != IN_PROCESS_THREAD or record.levelno >= logging.WARNING


def quiet_in_process_server() -> None:
    """Drop the access lines and start/stop notices of the demo node serving from
    `IN_PROCESS_THREAD`, and keep its warnings and errors.

    uvicorn's loggers (`uvicorn.access`, `uvicorn.error`) belong to the process, not to a
    server, and the gateway's own server configures them with its access log on, so the demo
    node's `access_log=False` cannot hold: every status poll of the dispatcher printed a line,
    and its "Uvicorn running on" read like a second gateway. Only the thread tells them apart.
    """
    for name in ("uvicorn.access", "uvicorn.error"):
        logging.getLogger(name).addFilter(_not_in_process_chatter)  # once: the same function


def build_demo_server(
    host: str,
    port: int,
    data_dir: Path,
    *,
    log_level: str = "info",
    access_log: bool = False,
    **options: Any,
) -> uvicorn.Server:
    """A uvicorn server for a demo node; run it with `await server.serve()` or `server.run()`.

    `options` are those of `create_demo_app`. Logging is left to the caller's configuration.
    """
    app = create_demo_app(data_dir, **options)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        log_config=None,
        log_level=log_level,
        access_log=access_log,
        # A client stuck on a download must not keep a stopping node alive.
        timeout_graceful_shutdown=3,
    )
    return uvicorn.Server(config)


def main(argv: list[str] | None = None) -> None:
    """Run a demo node in the foreground.

    python -m x2v_gateway.demo_node --host 127.0.0.1 --port 8000 --data-dir /tmp/node1 --job-seconds 2
    """
    parser = argparse.ArgumentParser(
        prog="python -m x2v_gateway.demo_node", description="A LightX2V-compatible demo node."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--job-seconds", type=float, default=0.0)
    parser.add_argument("--max-queue-size", type=int, default=10)
    parser.add_argument("--model-cls", default="demo")
    parser.add_argument("--task", default="s2v")
    parser.add_argument("--tasks", default="", help="comma-separated task types, default: --task")
    parser.add_argument("--max-side", type=int, default=320)
    parser.add_argument("--access-log", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every input URL check at INFO: one line per task is enough.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    server = build_demo_server(
        args.host,
        args.port,
        args.data_dir,
        access_log=args.access_log,
        job_seconds=args.job_seconds,
        max_queue_size=args.max_queue_size,
        model_cls=args.model_cls,
        task=args.task,
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()] or None,
        max_side=args.max_side,
    )
    server.run()


if __name__ == "__main__":
    main()
