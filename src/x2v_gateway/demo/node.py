"""The demo node's app: upstream's routes and handlers, its processing thread, and its server.

Run one: python -m x2v_gateway.demo --host 127.0.0.1 --port 8000 --data-dir /tmp/node1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import uvicorn

from .asgi import (
    App,
    HTTPError,
    Request,
    Response,
    Router,
    json_response,
    read_form,
    redirect,
    route,
    stream_file,
    text_response,
)
from .board import Refused, Task, TaskBoard, TaskStatus, new_task_id
from .image import render_image
from .inputs import download, looks_like_base64, save_base64, url_accessible
from .sync_images import SyncImages
from .validate import REQUEST_DEFAULTS, parse_video_request, validate_form
from .video import render_video

log = logging.getLogger(__name__)

_IMAGE_TASKS = frozenset({"i2v", "s2v", "flf2v"})

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


class _Abandoned(Exception):
    """The node is shutting down: leave the task as it is."""


class _RunnerError(Exception):
    """A failure inside inference: upstream reports its class name as error_type."""

    def __init__(self, message: str, error_type: str) -> None:
        super().__init__(message)
        self.error_type = error_type


class DemoNodeApp(App):
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
        self.memory = self.data_dir / "memory"
        self.journal = self.data_dir / "submissions.jsonl"
        self.job_seconds = job_seconds
        self.model_cls = model_cls
        self.model_path = model_path
        self.task = task
        self.tasks = frozenset(tasks) if tasks else frozenset({task})
        self.max_side = max_side
        self.board = TaskBoard(max_queue_size)
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        self._journal_lock = threading.Lock()
        # Upstream's routes in FastAPI's registration order, which decides what matches first.
        # Why POST /v1/tasks/video (no slash) is a 405: it matches DELETE /v1/tasks/{task_id}.
        sync = SyncImages(self.board, self.create_task, self.image_inputs, self.outputs)
        self.router = Router(
            [
                route("GET,HEAD", "/docs", self._docs),
                route("GET", "/", self._redirect_to_docs),
                route("GET", "/health", self._health),
                route("GET", "/v1/tasks/", self._list_tasks),
                route("GET", "/v1/tasks/queue/status", self._queue_status),
                route("GET", "/v1/tasks/{task_id}/status", self._task_status),
                route("GET", "/v1/tasks/{task_id}/result", self._task_result),
                route("DELETE", "/v1/tasks/{task_id}", self._stop_task),
                route("DELETE", "/v1/tasks/all/running", self._stop_all_tasks),
                route("POST", "/v1/tasks/video/", self._submit_json),
                route("POST", "/v1/tasks/video/form", self._submit_form),
                route("POST", "/v1/tasks/image/", self._submit_image_json),
                route("POST", "/v1/tasks/image/form", self._submit_image_form),
                route("POST", "/v1/tasks/image/sync", sync.image_sync),
                route("POST", "/v1/tasks/sensenova-vision/", sync.sensenova),
                route("POST", "/v1/tasks/sensenova-vision/sync", sync.sensenova),
                # Declared without a handler (404): no task here is a SenseNova-Vision one.
                route("GET", "/v1/tasks/sensenova-vision/{task_id}/result"),
                route("POST", "/v1/tasks/", self._submit_json),  # deprecated alias, same handler
                route("POST", "/v1/images/generations", sync.generations),
                route("POST", "/v1/images/edits", sync.edits),
                route("GET", "/v1/files/download/{file_path:path}", self._download_file),
                route("GET", "/v1/service/status", self._service_status),
                route("GET", "/v1/service/metadata", self._service_metadata),
            ]
        )

    # -- lifecycle

    def start(self) -> None:
        for directory in (self.outputs, self.image_inputs, self.audio_inputs, self.memory):
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

    # -- the app's lifespan runs the worker

    async def startup(self) -> None:
        self.start()

    async def shutdown(self) -> None:
        await asyncio.to_thread(self.stop)

    # -- handlers: misc

    async def _redirect_to_docs(self, request: Request) -> Response:
        return redirect("/docs")

    async def _docs(self, request: Request) -> Response:
        return text_response(200, _DOCS_HTML, "text/html; charset=utf-8")

    async def _health(self, request: Request) -> Response:
        return json_response(200, {"status": "ok"})

    async def _service_status(self, request: Request) -> Response:
        return json_response(200, self.board.service_status())

    async def _service_metadata(self, request: Request) -> Response:
        return json_response(
            200, {"nproc_per_node": 1, "model_cls": self.model_cls, "model_path": self.model_path}
        )

    # -- handlers: tasks

    async def _list_tasks(self, request: Request) -> Response:
        return json_response(200, self.board.all_statuses())

    async def _queue_status(self, request: Request) -> Response:
        return json_response(200, self.board.queue_status())

    async def _task_status(self, request: Request) -> Response:
        status = self.board.status(request.params["task_id"])
        if status is None:
            return json_response(404, {"detail": "Task not found"})
        return json_response(200, status)

    async def _task_result(self, request: Request) -> Response:
        status = self.board.status(request.params["task_id"])
        if status is None:
            return json_response(404, {"detail": "Task not found"})
        if status["status"] != TaskStatus.COMPLETED:
            return json_response(404, {"detail": "Task not completed"})
        if not status["save_result_path"]:
            return json_response(404, {"detail": "Task result file does not exist"})
        # The status holds only the basename, so a result saved in a sub-directory is a 404 here.
        path = Path(status["save_result_path"])
        return await self._file_response(path if path.is_absolute() else self.outputs / path)

    async def _download_file(self, request: Request) -> Response:
        return await self._file_response(self.outputs / request.params["file_path"])

    async def _file_response(self, path: Path) -> Response:
        resolved = path.resolve()
        if not resolved.is_relative_to(self.outputs):
            return json_response(403, {"detail": "Access to this file is not allowed"})
        if not resolved.is_file():
            # Leaks the absolute server path, as upstream does.
            return json_response(404, {"detail": f"File not found: {path}"})
        size = resolved.stat().st_size
        mime = _MIME_TYPES.get(resolved.suffix.lower(), "application/octet-stream")
        headers = [
            ("content-type", mime),
            ("content-disposition", f'attachment; filename="{resolved.name}"'),
            ("content-length", str(size)),
            # Advertised, but Range requests get the whole file with a 200, as upstream.
            ("accept-ranges", "bytes"),
        ]
        return Response(200, headers=headers, stream=stream_file(resolved))

    async def _stop_task(self, request: Request) -> Response:
        if self.board.cancel(request.params["task_id"]):
            log.info("task %s cancelled", request.params["task_id"])
            return json_response(200, {"stop_status": "success", "reason": "Task stopped successfully."})
        return json_response(
            200, {"stop_status": "do_nothing", "reason": "Task not found or already completed."}
        )

    async def _stop_all_tasks(self, request: Request) -> Response:
        self.board.cancel_all()
        return json_response(200, {"stop_status": "success", "reason": "All tasks stopped successfully."})

    async def _submit_json(self, request: Request, *, output: str = "video") -> Response:
        values = parse_video_request(
            await request.body(), request.header("content-type"), image=output == "image",
        )
        image_path = values.get("image_path", "")
        if image_path.startswith("http") and not await url_accessible(image_path):
            # Upstream raises HTTPException(400) inside a generic `except Exception`: a 500.
            return json_response(500, {"detail": f"400: Image URL is not accessible: {image_path}"})
        task_id = values["task_id"] if "task_id" in values else new_task_id()
        if "seed" not in values:
            values["seed"] = random.randint(0, 2**32 - 1)
        return self._accept(task_id, values, request.path, output)

    async def _submit_image_json(self, request: Request) -> Response:
        return await self._submit_json(request, output="image")

    async def _submit_form(self, request: Request, *, output: str = "video") -> Response:
        # Anything but a multipart or urlencoded body has no fields: image_file is missing.
        files = {"image_file": self.image_inputs}
        if output == "video":
            files.update(last_frame_file=self.image_inputs, audio_file=self.audio_inputs)
        form = await read_form(request, files)
        try:
            values = validate_form(form, image=output == "image")
        except HTTPError:
            form.discard()
            raise
        response = self._accept(new_task_id(), values, request.path, output)
        if response.status != 200:
            form.discard()
        return response

    async def _submit_image_form(self, request: Request) -> Response:
        return await self._submit_form(request, output="image")

    def _accept(self, task_id: str, values: dict[str, Any], route: str, output: str = "video") -> Response:
        try:
            task = self.create_task(task_id, values, route, output)
        except Refused as exc:
            return json_response(503, {"detail": str(exc)})
        return json_response(
            200, {"task_id": task_id, "task_status": "pending", "save_result_path": task.save_result_path}
        )

    def create_task(
        self, task_id: str, values: dict[str, Any], route: str, output: str = "video", *, in_memory: bool = False
    ) -> Task:
        """Queue a task and journal it; `Refused` (upstream's 503) when the queue is full or the
        id is taken. `in_memory`: its PNG is kept on the board, not written to outputs/."""
        # Upstream's BaseTaskRequest: an empty save_result_path becomes the task id.
        save_result_path = values.get("save_result_path") or task_id
        task = self.board.create(task_id, values, save_result_path, output, in_memory=in_memory)
        self._journal_submission(task_id, route, values, task.held)
        queue = self.board.queue_status()
        log.info(
            "accepted task %s via POST %s (%d of %d active)",
            task_id,
            route,
            queue["active_count"],
            queue["queue_size"],
        )
        return task

    def _journal_submission(self, task_id: str, route: str, request: dict[str, Any], held: int) -> None:
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
            "held": held,
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

    def _process(self, task: Task, started: float) -> str:
        """Run one task's inference; returns the basename the status reports once completed."""
        request = {**REQUEST_DEFAULTS, **task.request}
        image_path = request["image_path"]
        if task.output == "image" and "," in image_path and not image_path.startswith("data:"):
            image_path = image_path.split(",", 1)[0]  # OpenAI's edits: several uploads, comma-joined
        image = self._resolve_input(image_path, "image")
        audio = self._resolve_input(request["audio_path"], "audio")
        output = self._output_path(task.save_result_path, ".png" if task.output == "image" else ".mp4")
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
        # An in-memory result (the sync image routes) renders in memory/ and is read back.
        partial = (self.memory if task.in_memory else output.parent) / f".{output.name}.part"
        try:
            try:
                if task.output == "image":
                    render_image(partial, image=image, prompt=request["prompt"], seed=request.get("seed", 0),
                                 aspect_ratio=_image_aspect(request), max_side=self.max_side)
                else:
                    self._render(partial, request, image, audio)
            except Exception as exc:
                raise _RunnerError(str(exc), type(exc).__name__) from exc
            self._wait_until(started + self.job_seconds)
            if task.in_memory:
                task.result_png = partial.read_bytes()
            else:
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
            return download(value, kind, directory, self._stopping)
        if looks_like_base64(value, kind):
            return save_base64(value, kind, directory)
        return Path(value)  # a server-local path, passed through as upstream does

    def _output_path(self, save_result_path: str, suffix: str) -> Path:
        path = Path(save_result_path)
        if not path.is_absolute():
            path = self.outputs / save_result_path
        return path if path.suffix else path.with_suffix(suffix)

    def _wait_until(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining > 0 and self._stopping.wait(remaining):
            raise _Abandoned()
        if self._stopping.is_set():
            raise _Abandoned()


def _image_aspect(request: dict[str, Any]) -> str:
    """A requested [height, width] (OpenAI's `size`) decides the picture's shape over the
    aspect ratio; the demo node scales it to its max side either way."""
    shape = request.get("target_shape") or []
    if len(shape) == 2 and all(isinstance(side, int) and side > 0 for side in shape):
        return f"{shape[1]}:{shape[0]}"
    return request["aspect_ratio"]


_DOCS_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>LightX2V demo node</title></head>
<body style="font-family: sans-serif; max-width: 48em; margin: 2em auto">
<h1>LightX2V demo node</h1>
<p>A stand-in for a LightX2V self-hosted server (x2v-gateway). Routes:</p>
<ul>
<li>POST /v1/tasks/video/ (JSON), POST /v1/tasks/video/form (multipart)</li>
<li>POST /v1/tasks/image/ (JSON), POST /v1/tasks/image/form (multipart), POST /v1/tasks/image/sync (JSON, answers the PNG)</li>
<li>POST /v1/images/generations (JSON), POST /v1/images/edits (multipart): OpenAI-style, synchronous</li>
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

    python -m x2v_gateway.demo --host 127.0.0.1 --port 8000 --data-dir /tmp/node1 --job-seconds 2
    """
    parser = argparse.ArgumentParser(
        prog="python -m x2v_gateway.demo", description="A LightX2V-compatible demo node."
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
