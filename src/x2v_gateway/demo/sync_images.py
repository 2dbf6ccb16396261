"""The demo node's synchronous image routes, as upstream's server has them: `/v1/tasks/image/sync`
(a PNG back in the response), the OpenAI-style `/v1/images/generations` and `/v1/images/edits`,
and SenseNova-Vision's routes refusing on a server not started for it.

Each queues an ordinary task whose PNG stays in memory (upstream's `prefer_memory_result`) and
waits for it: failed is a 500 (413 for a `ValueError` on the sync route), cancelled a 409, past
the deadline the task is cancelled and the answer is 504, a client that goes away cancels it (499).
"""

from __future__ import annotations

import asyncio
import base64
import io
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from .asgi import HTTPError, Request, Response, absolute_url, json_response, read_form
from .board import Refused, Task, TaskBoard, TaskStatus, new_task_id
from .inputs import url_accessible
from .validate import (
    parse_generation_request,
    parse_video_request,
    validate_edit_form,
    validate_sync_query,
)

CreateTask = Callable[..., Task]  # DemoNodeApp.create_task

_SIZE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$", re.IGNORECASE)
# The OpenAI routes' fixed wait and poll; the sync route takes both from its query.
_OPENAI_TIMEOUT_SECONDS = 600
_OPENAI_POLL_SECONDS = 0.2
# A client's poll interval, however small, polls no faster than this.
_MIN_POLL_SECONDS = 0.01


class SyncImages:
    """The handlers; they queue on the node's board through `create_task`."""

    def __init__(self, board: TaskBoard, create_task: CreateTask, image_inputs: Path, outputs: Path) -> None:
        self.board = board
        self.create_task = create_task
        self.image_inputs = image_inputs
        self.outputs = outputs

    # -- POST /v1/tasks/image/sync

    async def image_sync(self, request: Request) -> Response:
        values = parse_video_request(await request.body(), request.header("content-type"), image=True)
        timeout, poll = validate_sync_query(request.query)
        for key, label in (("image_path", "Image"), ("image_mask_path", "Image mask")):
            url = values.get(key, "")
            # Unlike the async route's (wrapped into a 500), this 400 reaches the client.
            if url.startswith("http") and not await url_accessible(url):
                raise HTTPError(400, f"{label} URL is not accessible: {url}")
        presigned_url = values.get("presigned_url", "").strip()
        if presigned_url and not presigned_url.startswith(("http://", "https://")):
            raise HTTPError(400, f"Invalid presigned_url: {values['presigned_url']}")
        task_id = values["task_id"] if "task_id" in values else new_task_id()
        values.setdefault("seed", random.randint(0, 2**32 - 1))
        png = await self._run(request, task_id, values, timeout, poll, value_error_413=True)
        if presigned_url:
            await _upload(presigned_url, png)
            return json_response(200, {
                "task_id": task_id, "task_status": "completed",
                "uploaded_to_presigned_url": True, "presigned_url": presigned_url,
            })
        return Response(200, png, [
            ("content-type", "image/png"), ("content-disposition", 'inline; filename="result.png"'),
        ])

    # -- POST /v1/images/generations (t2i)

    async def generations(self, request: Request) -> Response:
        body = parse_generation_request(await request.body(), request.header("content-type"))
        values = _openai_task("t2i", body["prompt"], body["n"], body["size"], body["seed"])
        task_id = new_task_id()
        png = await self._run(request, task_id, values, _OPENAI_TIMEOUT_SECONDS, _OPENAI_POLL_SECONDS)
        return json_response(200, await _images_response(png, "b64_json", "", body["size"]))

    # -- POST /v1/images/edits (i2i, multipart)

    async def edits(self, request: Request) -> Response:
        inputs = self.image_inputs
        form = await read_form(
            request, {"image": inputs, "image[]": inputs, "mask": inputs}, repeated=frozenset({"image", "image[]"})
        )
        try:
            fields = validate_edit_form(form)
            values = _openai_task("i2i", fields["prompt"], fields["n"], fields["size"], fields["seed"])
            # `image`, or the `image[]` some clients send when `image` is missing.
            uploads = form.repeated.get("image") or form.repeated.get("image[]") or []
            if not uploads:
                raise HTTPError(400, "At least one image is required")
            mask = form.files.get("mask")
            if mask is not None and len(uploads) != 1:
                raise HTTPError(400, "mask is only supported when exactly one image is uploaded")
            values["image_path"] = ",".join([_saved(upload) for upload in uploads])
            if mask is not None:
                values["image_mask_path"] = _saved(mask)
        except HTTPError:
            form.discard()
            raise
        if "negative_prompt" in form.fields:
            values["negative_prompt"] = fields["negative_prompt"]
        if fields["i2i_denoise_strength"] is not None:
            values["i2i_denoise_strength"] = fields["i2i_denoise_strength"]
        task_id = new_task_id()
        png = await self._run(request, task_id, values, _OPENAI_TIMEOUT_SECONDS, _OPENAI_POLL_SECONDS)
        url = ""
        if fields["response_format"] == "url":
            await asyncio.to_thread((self.outputs / f"{task_id}.png").write_bytes, png)
            # Built from the request's Host header, as upstream's `request.base_url`.
            url = absolute_url({**request.scope, "query_string": b""}, f"/v1/files/download/{task_id}.png")
        return json_response(200, await _images_response(png, fields["response_format"], url, fields["size"]))

    # -- SenseNova-Vision: this node's runner is not one

    async def sensenova(self, request: Request) -> Response:
        return json_response(409, {
            "detail": "The SenseNova-Vision API requires a server started with --model_cls sensenova_vision."
        })

    # -- waiting for the in-memory result

    async def _run(
        self, request: Request, task_id: str, values: dict[str, Any], timeout: int, poll: float,
        *, value_error_413: bool = False,
    ) -> bytes:
        try:
            self.create_task(task_id, values, request.path, "image", in_memory=True)
        except Refused as exc:
            raise HTTPError(503, str(exc)) from None
        waiter = asyncio.create_task(self._result(task_id, timeout, poll, value_error_413))
        watcher = asyncio.create_task(request.wait_for_disconnect())
        done, pending = await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if waiter not in done:
            self.board.cancel(task_id)
            raise HTTPError(499, f"Client disconnected, task {task_id} cancelled")
        return waiter.result()

    async def _result(self, task_id: str, timeout: int, poll: float, value_error_413: bool) -> bytes:
        started = time.monotonic()
        while True:
            status = self.board.status(task_id)
            if status is None:
                raise HTTPError(500, f"Task status not found: {task_id}")
            if status["status"] == TaskStatus.COMPLETED:
                png = self.board.result_png(task_id)
                if not png:
                    raise HTTPError(500, f"Task completed but no in-memory image found: {task_id}")
                return png
            if status["status"] == TaskStatus.FAILED:
                code = 413 if value_error_413 and status["error_type"] == "ValueError" else 500
                raise HTTPError(code, status["error"] or "Task failed")
            if status["status"] == TaskStatus.CANCELLED:
                raise HTTPError(409, status["error"] or "Task cancelled")
            if time.monotonic() - started > timeout:
                self.board.cancel(task_id)  # its inference still runs to the end, as upstream's
                raise HTTPError(504, f"Task {task_id} timed out after {timeout} seconds")
            await asyncio.sleep(max(poll, _MIN_POLL_SECONDS))


def _openai_task(task: str, prompt: str, n: int, size: str | None, seed: int | None) -> dict[str, Any]:
    """The task an OpenAI route queues, its 400s in upstream's order (n, prompt, size)."""
    if n != 1:
        raise HTTPError(400, "Only n=1 is currently supported")
    if not prompt.strip():
        raise HTTPError(400, "prompt is required")
    values: dict[str, Any] = {"task": task, "prompt": prompt}
    if size:
        match = _SIZE.match(size)
        if not match:
            raise HTTPError(400, "size must be in WxH format, e.g. 1024x1024")
        width, height = int(match.group(1)), int(match.group(2))
        if width <= 0 or height <= 0:
            raise HTTPError(400, "size width and height must be positive")
        values["target_shape"] = [height, width]
    values["seed"] = seed if seed is not None else random.randint(0, 2**32 - 1)
    return values


def _saved(upload: Any) -> str:
    """Where an upload was saved; a name without an extension gets `.png`, as upstream."""
    if upload.path is None:
        raise HTTPError(400, "Uploaded file has no filename")
    if upload.path.stat().st_size == 0:
        raise HTTPError(400, f"Uploaded file is empty: {upload.filename}")
    if not Path(upload.filename).suffix:
        upload.path = upload.path.rename(upload.path.with_suffix(".png"))
    return str(upload.path)


async def _images_response(png: bytes, response_format: str, url: str, size: str | None) -> dict[str, Any]:
    def build() -> dict[str, Any]:
        with Image.open(io.BytesIO(png)) as picture:
            width, height = picture.size
        # What the captured server reported: one output image token per 16x16 patch
        # (64x48 -> 12), none for the input.
        tokens = width * height // 256
        item = {"b64_json": base64.b64encode(png).decode()} if response_format == "b64_json" else {"url": url}
        return {
            "created": int(time.time()),
            "data": [item],
            "output_format": "png",
            "size": size,
            "usage": {
                "input_tokens": 0,
                "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                "output_tokens": tokens,
                "total_tokens": tokens,
                "output_tokens_details": {"image_tokens": tokens, "text_tokens": 0},
            },
        }

    return await asyncio.to_thread(build)


async def _upload(presigned_url: str, png: bytes) -> None:
    """PUT the PNG to the client's presigned URL; a refusal is upstream's 502."""
    try:
        async with httpx.AsyncClient(timeout=30.0) as client:
            response = await client.put(presigned_url, content=png, headers={"content-type": "image/png"})
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise HTTPError(502, f"Failed to upload sync result to presigned URL: {exc}") from None
