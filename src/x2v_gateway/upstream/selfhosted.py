"""Adapter for the open-source LightX2V API server (`lightx2v/server/`), one node per instance.

Every quirk of that server is handled here and nowhere else (see shared/lightx2v/selfhosted.md):

* submit routes need their trailing slash (`/v1/tasks/video/`); without it the server answers 405;
* the submit answer says `task_status`, the status answer says `status`;
* the client may choose the task id on the JSON route, and a reused id gets 503 "already exists":
  the gateway sends its own id, so a repeated submission can never create a second task (a job
  that comes back to a node that cancelled its task there goes out under a fresh id). The
  `/form` route takes no task id, but it does take `save_result_path`, which the task list shows:
  the gateway's id goes there on both routes, and tasks are found by it;
* 503 "Task queue is full" is back-pressure, not a failure;
* a node forgets every task when it restarts (404 `Task not found`), but the files it finished stay
  downloadable from `/v1/files/download/<id>.mp4`;
* a cancelled running task keeps running and later reports `completed`;
* image tasks (t2i, i2i) go to `/v1/tasks/image/` (and its `/form`, which has other fields than
  the video form), and their output is `<id>.png`, not `.mp4`;
* an unreachable `image_path` URL comes back as a 500, and error details carry absolute paths.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from ..tasks import IMAGE_TASKS, NODE_TASKS
from .base import (
    UPSTREAM_KEEPALIVE,
    UPSTREAM_LIMITS,
    AmbiguousSubmit,
    Backpressure,
    Capabilities,
    InputFile,
    NodeHealth,
    Rejected,
    RemoteState,
    RemoteStatus,
    SubmitRequest,
    Unavailable,
    UnknownTask,
    Upstream,
    base64_json_body,
    clean_message,
    input_size,
    retried,
    stream_parts,
    tls_context,
)
from .plain_http import KeptGets, StreamedPost

# What `health()` says when nothing listens on the node's port.
CONNECTION_REFUSED = "connection refused"

_STATES = {
    "pending": RemoteState.QUEUED,
    "processing": RemoteState.RUNNING,
    "completed": RemoteState.SUCCEEDED,
    "failed": RemoteState.FAILED,
    "cancelled": RemoteState.CANCELLED,
}

# The gateway's input roles and the JSON fields the server reads them from.
_JSON_INPUTS = {"image": "image_path", "audio": "audio_path", "last_frame": "last_frame_path"}
_FORM_FILES = {"image": "image_file", "audio": "audio_file", "last_frame": "last_frame_file"}
# What `/v1/tasks/video/form` accepts besides files; anything else needs the JSON route.
_FORM_FIELDS = {
    "save_result_path", "prompt", "negative_prompt", "use_prompt_enhancer", "num_fragments",
    "infer_steps", "target_video_length", "seed", "video_duration", "target_fps",
}
# `/v1/tasks/image/form`: an optional image_file and these fields (i2i_denoise_strength: JSON only).
_IMAGE_FORM_FIELDS = {
    "save_result_path", "prompt", "negative_prompt", "use_prompt_enhancer", "infer_steps", "seed",
    "aspect_ratio",
}
# The extension the node gives each kind of output (`save_result_path` has none until it is done).
_OUTPUT_SUFFIXES = {"video": ".mp4", "image": ".png"}


def _route(task: str) -> str:
    """The submit route of a task type: the trailing slash matters (without it, 405)."""
    return "/v1/tasks/image/" if task in IMAGE_TASKS else "/v1/tasks/video/"


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", "")
    except (ValueError, AttributeError):
        detail = response.text
    if not isinstance(detail, str):  # FastAPI's 422 list of errors
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', [])[1:])}: {e.get('msg')}"
            for e in detail if isinstance(e, dict)
        ) or json.dumps(detail)
    return clean_message(detail)


class SelfHostedNode(Upstream):
    kind = "selfhosted"
    capabilities = Capabilities(
        chooses_task_id=True, forwards_uploads=True, timed_queue=True, tasks_die_with_it=True,
    )

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        slots: int = 2,
        tasks: frozenset[str] = NODE_TASKS,
        form_threshold: int = 16 * 1024 * 1024,
        timeout: float = 30.0,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.slots = slots
        self.tasks = tasks
        self.form_threshold = form_threshold
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            limits=UPSTREAM_LIMITS,
            verify=tls_context(),
        )
        # Its reads (status, task list) go on connections of their own, not through httpx:
        # plain_http.py says why.
        self._reads = KeptGets(self.base_url, timeout=self._client.timeout, keepalive=UPSTREAM_KEEPALIVE)

    async def aclose(self) -> None:
        self._reads.close()
        await self._client.aclose()

    async def _get(self, path: str) -> httpx.Response:
        return await retried(lambda: self._get_once(path), Unavailable, attempts=3)

    async def _get_once(self, path: str) -> httpx.Response:
        try:
            response = await self._reads.get(path)
        except httpx.TransportError as exc:
            raise Unavailable(f"{self.name} unreachable: {type(exc).__name__}") from None
        if response.status_code >= 500:
            raise Unavailable(f"{self.name} answered {response.status_code}: {_detail(response)}")
        return response

    # -- submit ---------------------------------------------------------------------------------

    async def submit(self, request: SubmitRequest) -> str:
        response = await self._send(request, request.task_id)
        if _already_exists(response) and await self._is_dead(request.task_id):
            # The job was moved off this node (its task here cancelled) and has come back: a
            # cancelled task never runs again, so this attempt goes out under a fresh id.
            task_id = await self._fresh_id(request.task_id)
            return self._submitted(await self._send(request, task_id), task_id)
        return self._submitted(response, request.task_id)

    async def _send(self, request: SubmitRequest, task_id: str) -> httpx.Response:
        # The output is named after the gateway's id too: it identifies the task in the list
        # (form route) and names the file that outlives a node restart.
        fields: dict[str, Any] = {**request.params, "save_result_path": task_id}
        size = sum(input_size(p) for p in request.inputs.values())
        use_form = size > self.form_threshold and _form_carries(fields, request.inputs, request.task)
        if not use_form:
            fields["task_id"] = task_id
        try:
            if use_form:
                return await self._submit_form(fields, request.inputs, request.filenames, request.task)
            content, length = base64_json_body(
                fields, {_JSON_INPUTS[role]: path for role, path in request.inputs.items()}
            )
            return await self._client.post(
                _route(request.task),
                content=content,
                headers={"content-type": "application/json", "content-length": str(length)},
            )
        except httpx.ConnectError as exc:
            # Refused before a byte was sent: safe to try again, here or elsewhere.
            raise Unavailable(f"{self.name} unreachable: {type(exc).__name__}") from None
        except httpx.TransportError as exc:
            raise AmbiguousSubmit(f"{self.name}: submission interrupted ({type(exc).__name__})") from None

    def _submitted(self, response: httpx.Response, task_id: str) -> str:
        if response.status_code == 200 or _already_exists(response):
            # 200: on the form route the node picked its own id; the gateway keeps using its
            # own, which the node reports as the task's save_result_path. "Already exists": our
            # own id, so an earlier attempt of this very submission reached the node.
            return task_id
        detail = _detail(response)
        if response.status_code == 503:
            raise Backpressure(f"{self.name}: {detail}", retry_after=1.0)
        if response.status_code == 500 and "not accessible" in detail:
            raise Rejected(f"{self.name} could not read an input: {detail}")
        if response.status_code in (400, 404, 405, 413, 422):
            raise Rejected(f"{self.name} refused the request ({response.status_code}): {detail}")
        # Any other 5xx: the node read the request and broke somewhere; whether the task exists
        # is unknown until it is asked.
        raise AmbiguousSubmit(f"{self.name} answered {response.status_code}: {detail}")

    async def _is_dead(self, task_id: str) -> bool:
        """Whether the node's task of this id was cancelled (or failed): it will never run."""
        response = await self._get(f"/v1/tasks/{task_id}/status")
        return response.status_code == 200 and response.json().get("status") in ("cancelled", "failed")

    async def _fresh_id(self, task_id: str) -> str:
        names = _names(await self._list())
        n = 1
        while f"{task_id}-m{n}" in names:
            n += 1
        return f"{task_id}-m{n}"

    async def _submit_form(
        self, fields: dict[str, Any], inputs: dict[str, Path | InputFile], filenames: dict[str, str], task: str,
    ) -> httpx.Response:
        # The form route fills every field it is not sent with its own default (seed 42,
        # infer_steps 5...), so only the fields the user set are sent, and seed always is.
        content, length, content_type = _form_body(
            _form_values(fields),
            # The node names its copy after the file name, keeping the extension.
            {_FORM_FILES[role]: (filenames.get(role, role), path) for role, path in inputs.items()},
        )
        return await self._client.post(
            _route(task) + "form", content=content,
            headers={"content-type": content_type, "content-length": str(length)},
        )

    def open_form(self, length: int, task: str) -> FormUpload:
        """Start a `/form` submission of a `task` job, at most `length` bytes, whose files are
        sent while they still arrive (see FormUpload)."""
        return FormUpload(self, length, task)

    # -- follow ---------------------------------------------------------------------------------

    async def poll(self, task_ids: list[str]) -> dict[str, RemoteStatus | None]:
        # One request per node per tick, whatever the number of jobs: the list has every task.
        listed = await self._list()
        names = _names(listed)
        # 1-based places in the node's FIFO, behind the task it runs.
        running = any(t.get("status") == "processing" for t in listed.values())
        pending = (tid for tid, t in listed.items() if t.get("status") == "pending")
        places = {tid: place + int(running) for place, tid in enumerate(pending, start=1)}
        result: dict[str, RemoteStatus | None] = {}
        for task_id in task_ids:
            real_id = names.get(task_id)
            task = listed.get(real_id) if real_id else None
            if task is None:
                result[task_id] = await self._status_of_unlisted(task_id)
                continue
            status = _to_status(task)
            if status.state is RemoteState.QUEUED and real_id in places:
                status.queue_position = places[real_id]
            result[task_id] = status
        return result

    async def _status_of_unlisted(self, task_id: str) -> RemoteStatus | None:
        response = await self._get(f"/v1/tasks/{task_id}/status")
        if response.status_code == 200:
            return _to_status(response.json())
        # Forgotten (the node restarted, or evicted it past its 1000 tasks). The files of
        # finished tasks outlive the restart: if the video is there, the task did complete.
        if await self._output_exists(task_id):
            return RemoteStatus(RemoteState.SUCCEEDED)
        return None

    async def _output_exists(self, task_id: str) -> bool:
        # HEAD gets 405 on this server, so open a GET and close it once the headers arrive. The
        # task's type is not known here: a video, else an image (a rare path: a forgotten task).
        try:
            for suffix in _OUTPUT_SUFFIXES.values():
                async with self._client.stream("GET", f"/v1/files/download/{task_id}{suffix}") as response:
                    if response.status_code == 200:
                        return True
            return False
        except httpx.TransportError as exc:
            raise Unavailable(f"{self.name} unreachable: {type(exc).__name__}") from None

    async def _list(self) -> dict[str, dict]:
        response = await self._get("/v1/tasks/")  # `/v1/tasks` would be a 307 to this
        return response.json()

    async def _node_id(self, task_id: str) -> str:
        """The node's own id of a task the gateway names `task_id` (they differ on the form route)."""
        return _names(await self._list()).get(task_id, task_id)

    async def find_task(self, request: SubmitRequest) -> str | None:
        return request.task_id if request.task_id in _names(await self._list()) else None

    async def cancel(self, task_id: str) -> None:
        # Always 200: `success` for pending/running/cancelled, `do_nothing` for finished or
        # unknown tasks. Either way there is nothing more to do. A running task is not stopped
        # by this (the node finishes it and reports `completed`); the gateway ignores that.
        response = await self._delete(task_id)
        if response.json().get("stop_status") == "do_nothing":
            # Unknown under the gateway's id: a form-route task, known by its save_result_path.
            node_id = await self._node_id(task_id)
            if node_id != task_id:
                await self._delete(node_id)

    async def _delete(self, node_id: str) -> httpx.Response:
        try:
            response = await self._client.delete(f"/v1/tasks/{node_id}")
        except httpx.TransportError as exc:
            raise Unavailable(f"{self.name} unreachable: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise Unavailable(f"{self.name} answered {response.status_code}")
        return response

    async def fetch_result(self, task_id: str, dest: Path, *, kind: str = "video") -> None:
        # `/result` for a task the node knows under the gateway's id (JSON route); the file
        # route for a form-route task or after a restart: the file is named after that id.
        suffix = _OUTPUT_SUFFIXES.get(kind, ".mp4")
        for path in (f"/v1/tasks/{task_id}/result", f"/v1/files/download/{task_id}{suffix}"):
            try:
                async with self._client.stream("GET", path) as response:
                    if response.status_code == 404:
                        continue
                    if response.status_code != 200:
                        raise Unavailable(f"{self.name} answered {response.status_code} for the result")
                    with dest.open("wb") as out:
                        async for chunk in response.aiter_bytes(256 * 1024):
                            out.write(chunk)
                    return
            except httpx.TransportError as exc:
                raise Unavailable(f"{self.name}: result download failed ({type(exc).__name__})") from None
        raise UnknownTask(f"{self.name} has no result for task {task_id}")

    async def health(self) -> NodeHealth:
        try:
            response = await self._reads.get("/v1/service/status")
        except httpx.TransportError as exc:
            # Refused means no process listens on the port: the server died or is restarting,
            # and either way every task it held in memory is gone. A timeout says much less.
            refused = _refused(exc)
            detail = CONNECTION_REFUSED if refused else type(exc).__name__
            return NodeHealth(reachable=False, detail=detail, gone=refused)
        if response.status_code != 200:
            return NodeHealth(reachable=False, detail=f"HTTP {response.status_code}")
        body = response.json()
        active = int(body.get("pending_tasks", 0)) + (body.get("service_status") == "busy")
        return NodeHealth(reachable=True, active=active)

    async def metadata(self) -> dict[str, Any]:
        response = await self._get("/v1/service/metadata")
        return response.json() if response.status_code == 200 else {}

    async def learn_model(self) -> str | None:
        # A restarted node may serve another model now: the dispatcher asks again after downtime.
        model = (await self.metadata()).get("model_cls")
        tasks = tasks_for_model(model)
        self.tasks = NODE_TASKS if tasks is None else tasks
        return model

    async def current_task(self) -> str | None:
        """The task the node's worker holds right now, if any.

        After cancelling a pending task this tells whether it had started in between: the status
        says `cancelled` either way, but a started task keeps running (cancel does not stop
        inference) and stays the worker's `current_task` until it ends.
        """
        response = await self._get("/v1/service/status")
        if response.status_code != 200:
            raise Unavailable(f"{self.name} answered {response.status_code} on its status")
        return response.json().get("current_task")


# `/v1/service/metadata` says only `model_cls`, not the `--task` the server was started with.
# These model classes are talking-head models: audio + image in, nothing else.
_AUDIO_MODELS = ("talk", "audio", "s2v")
# These make images (qwen_image, z_image, flux...): t2i and i2i on `/v1/tasks/image/`.
_IMAGE_MODELS = ("image", "flux")
# These make 3D or describe pictures: nothing the gateway sends fits them.
_OTHER_MODELS = ("hunyuan3d", "bagel", "sensenova", "worldmirror")


def tasks_for_model(model_cls: str | None) -> frozenset[str] | None:
    """The task types a node's model class can run, or None when its name does not say.

    A video model without audio can run t2v, i2v or flf2v depending on its `--task`, which the
    node does not report: set X2V_NODE_TASKS for such nodes when they are not interchangeable.
    """
    if not model_cls:
        return None
    name = model_cls.lower()
    if any(word in name for word in _AUDIO_MODELS):
        return frozenset({"s2v"})
    if any(word in name for word in _OTHER_MODELS):
        return frozenset()
    if any(word in name for word in _IMAGE_MODELS):
        return IMAGE_TASKS
    if name.startswith(("wan", "hunyuan_video", "ltx", "lingbot_video", "cosmos")):
        return frozenset({"t2v", "i2v", "flf2v"})
    return None


def _refused(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, ConnectionRefusedError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _already_exists(response: httpx.Response) -> bool:
    return response.status_code == 503 and "already exists" in _detail(response)


def _names(listed: dict[str, dict]) -> dict[str, str]:
    """The gateway's name of each listed task -> the node's key for it."""
    names = {}
    for key, task in listed.items():
        # save_result_path is the request value until completion, then the file's basename.
        saved = task.get("save_result_path") or ""
        for suffix in _OUTPUT_SUFFIXES.values():
            saved = saved.removesuffix(suffix)
        names[saved] = key
    names.update({key: key for key in listed})
    return names


def _to_status(task: dict) -> RemoteStatus:
    state = _STATES.get(task.get("status", ""), RemoteState.QUEUED)
    error = None
    if state is RemoteState.FAILED:
        kind = task.get("error_type") or ""
        error = clean_message(f"{kind}: {task.get('error')}" if kind else str(task.get("error")))
    ran = None
    if state is RemoteState.SUCCEEDED:
        # start_time is overwritten when processing starts, so end - start is the run alone.
        # Both are naive local times of the node's clock: only their difference is used.
        with contextlib.suppress(KeyError, TypeError, ValueError):
            ran = (
                datetime.fromisoformat(task["end_time"]) - datetime.fromisoformat(task["start_time"])
            ).total_seconds()
    return RemoteStatus(state, error=error, ran_seconds=ran if ran and ran > 0 else None)


_FORM_CHUNK = 1024 * 1024


def _form_carries(fields: dict[str, Any], roles: Iterable[str], task: str) -> bool:
    """Whether the task's `/form` route can take this request: the video form requires
    image_file, and neither has a field for anything outside its own set (those need JSON)."""
    roles = set(roles)
    if task in IMAGE_TASKS:
        return roles <= {"image"} and set(fields) <= _IMAGE_FORM_FIELDS
    return "image" in roles and set(fields) <= _FORM_FIELDS


def _form_values(fields: dict[str, Any]) -> dict[str, str]:
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()}


def _part_head(boundary: str, name: str, filename: str | None = None) -> bytes:
    if filename is None:
        return f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


def _form_end(boundary: str, fields: dict[str, str]) -> bytes:
    """The text fields and the closing boundary: what follows the files of a form."""
    return b"".join(
        _part_head(boundary, name) + value.encode() + b"\r\n" for name, value in fields.items()
    ) + f"--{boundary}--\r\n".encode()


def _form_body(
    fields: dict[str, str], files: dict[str, tuple[str, Path | InputFile]]
) -> tuple[AsyncIterator[bytes], int, str]:
    """A multipart/form-data body streamed from disk: (chunks, length, content type).

    httpx's own multipart reads files in 64 KiB pieces; 1 MiB pieces move a 1 GB voice-over to
    the node with a sixteenth of the Python work, and memory still holds one piece at a time.
    """
    boundary = secrets.token_hex(16)
    parts: list[bytes | Path | InputFile] = []
    for name, (filename, path) in files.items():
        parts += [_part_head(boundary, name, filename), path, b"\r\n"]
    parts.append(_form_end(boundary, fields))
    length = sum(len(p) if isinstance(p, bytes) else input_size(p) for p in parts)
    return stream_parts(parts, _FORM_CHUNK), length, f"multipart/form-data; boundary={boundary}"


class FormUpload:
    """A `/form` submission sent while the client's upload is still arriving at the gateway.

    A large input then crosses loopback once, at the pace of the slower side, instead of being
    received whole and then sent again. The files go out as they come; the text fields and the
    closing boundary go only with `finish()`, once the gateway has kept and checked every input
    and recorded the attempt. Until then the node holds an unfinished request, and the server
    parses the whole form before it creates a task: so `abort()`, a failed check or a gateway
    crash only drops a connection, and no task exists.

    The request declares a Content-Length, `length`, before the files' sizes are known: an upper
    bound from the client's own Content-Length. `finish()` fills what the form leaves of it with
    an epilogue of line breaks after the closing boundary, which multipart parsers skip (RFC 2046
    section 5.1.1). Chunked encoding would need no bound, but it costs a copy of every byte on
    the gateway (h11 joins each chunk with its framing) and a parse of that framing on the node.
    """

    # Bytes written to the connection at a time (one writev).
    _BATCH = 1024 * 1024

    def __init__(self, node: SelfHostedNode, length: int, task: str) -> None:
        self._node = node
        self._length = length
        self._task = task
        self._written = 0  # bytes of the body so far, sent or pending
        self._boundary = secrets.token_hex(16)
        # The client's pieces as they came (not joined: each copy of a 1 GB upload costs CPU
        # that the node, maybe on the same machine, could have used).
        self._pending: list[bytes] = []
        self._queued = 0  # bytes of the body handed to the connection
        self._ending = False
        self.files: dict[str, str] = {}  # gateway role -> the file name the node was sent
        # Not through httpx: its per-piece cost was half the kernel's (plain_http.py says why).
        self._post = StreamedPost(
            node.base_url + _route(task) + "form",
            {"content-type": f"multipart/form-data; boundary={self._boundary}"},
            length, timeout=node._client.timeout,
        )

    @property
    def broken(self) -> bool:
        """The node stopped taking the body before its end (it closed the connection), or the
        body outgrew the length it declared (which the client's Content-Length should prevent)."""
        return (self._post.answer.done() and not self._ending) or self._written > self._length

    def begin_file(self, role: str, filename: str) -> None:
        self.files[role] = filename
        self.write(_part_head(self._boundary, _FORM_FILES[role], filename))

    def write(self, data: bytes) -> None:
        self._written += len(data)
        self._pending.append(data)

    def end_file(self) -> None:
        self.write(b"\r\n")

    async def drain(self, *, everything: bool = False) -> None:
        """Send what has piled up; waits while the node is slower than the client."""
        if self._written - self._queued >= self._BATCH or (everything and self._pending):
            await self._send_pending()

    async def _send_pending(self) -> bool:
        """False when the request ended before (the node has none of these bytes)."""
        batch, self._pending, self._queued = self._pending, [], self._written
        return await self._post.send(batch)

    async def finish(self, request: SubmitRequest) -> str:
        """Send the end of the body and read the node's answer: the outcomes of `submit`.

        When the node dropped the upload before its end, or the job as kept is not what was
        streamed (or needs fields the form route lacks), the node has no task: the job is sent
        the ordinary way instead.
        """
        fields: dict[str, Any] = {**request.params, "save_result_path": request.task_id}
        end = _form_end(self._boundary, _form_values(fields))
        if (
            self.broken or self.files != request.filenames or request.task != self._task
            or not _form_carries(fields, self.files, self._task)
            or self._written + len(end) > self._length
        ):
            await self.abort()
            return await self._node.submit(request)
        self.write(end + b"\r\n" * ((self._length - self._written - len(end)) // 2))
        if self._written < self._length:  # an odd number of bytes left
            self.write(b"\n")
        if not await self._send_pending():  # dropped before the end of the body: no task there
            await self.abort()
            return await self._node.submit(request)
        self._ending = True
        try:
            response = await self._post.response()
        except (httpx.TransportError, TimeoutError) as exc:
            raise AmbiguousSubmit(
                f"{self._node.name}: submission interrupted ({type(exc).__name__})"
            ) from None
        return self._node._submitted(response, request.task_id)

    async def abort(self) -> None:
        """Drop the unfinished request; nothing once `finish` has sent the end of the body."""
        if not self._ending:
            await self._post.abort()
