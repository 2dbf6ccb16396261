"""Adapter for the hosted LightX2V cloud (`/api/v1/task/*`), one account (access token) per instance.

Every quirk of that API is handled here and nowhere else (see shared/lightx2v/cloud.md):

* `Authorization: Bearer <token>` on every call; 401 and 403 both mean the token is refused (which
  one depends on the server's FastAPI version);
* inputs travel as base64 inside the JSON body: it is encoded from the blob files as it is sent;
* nearly every mistake is a 500 `{"message": "error: ...!"}` echoing the input, ffmpeg's whole
  stderr or a server path: all sanitised before anyone sees it;
* the per-user limits (0.05 s between submits, 3 active tasks, 100 a day) answer 400 and a full
  queue answers 500 "Queue busy": all of them are back-pressure, never a failed job;
* the cloud chooses the task id, so each request carries a marker (kept by the cloud in `params`)
  that `find_task` looks for in the account's task list;
* statuses are CREATED PENDING RUNNING SUCCEED FAILED CANCEL (not CANCELLED);
* `task_ids=a,b` reads many tasks at once, but one unknown id fails the whole request with 500;
* cancel and resume are GET; resume re-queues a FAILED or CANCEL task under the same id;
* `result_url` is relative (fetched with the token) or an absolute pre-signed URL (fetched
  without it: the token never goes to another host).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
from tenacity import AsyncRetrying, retry_if_exception

from .base import (
    UPSTREAM_LIMITS,
    AmbiguousSubmit,
    Backpressure,
    Capabilities,
    NodeHealth,
    Rejected,
    RemoteStatus,
    SubmitRequest,
    Unavailable,
    UnknownTask,
    Upstream,
    UpstreamModel,
    backoff,
    base64_json_body,
)
from .cloud_answers import error_text, is_app_error, sanitise, to_status, too_frequent

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://x2v.light-ai.top"
DEFAULT_MODELS = {
    "s2v": "SekoTalk",
    "i2v": "wan2.2-14B-480P",
    "t2v": "wan2.2-T2V-A14B",
    "flf2v": "wan2.2-14B-480P",
    # cloud.md §3: image tasks run qwen-image models and make `output_image`; animate drives an
    # image with a video.
    "t2i": "qwen-image",
    "i2i": "qwen-image-2509",
    "animate": "wan2.2_animate",
}
# The name of a task's result among its outputs (`result_url?name=`).
_OUTPUT_NAMES = {"video": "output_video", "image": "output_image"}
# The key under which each request carries the gateway's id for the attempt. The cloud stores
# unknown keys in the task's `params` and returns them in query and list answers.
MARKER = "x2v_job"

# The gateway's input roles and the fields the cloud's pipelines read them from.
_INPUT_FIELDS = {
    "image": "input_image",
    "audio": "input_audio",
    "last_frame": "input_last_frame",
    "video": "input_video",
}
# Parameters that are the gateway's or the self-hosted server's business, never the cloud's.
# `input_*`/`output_*` keys are dropped too: an `output_video` in params makes `result_url`
# refuse the task ("is a stream").
_NOT_PASSED = {"prompt", "model_cls", "stage", "task", MARKER, "task_id", "save_result_path",
               "image_path", "audio_path", "last_frame_path", "video_path"}
_RENAMED = {"target_shape": "custom_shape"}  # both [height, width]

# Known 500 answers that are the cloud's way of saying "no such task", not a fault to retry.
_UNKNOWN_TASK = "cannot unpack non-iterable NoneType object"  # query, also for one id of many
_RESUME_UNKNOWN = "'NoneType' object is not subscriptable"

# The cloud wants 0.05 s between two submits of one user; leave twice that, since requests sent
# that far apart can still arrive closer together.
SUBMIT_GAP = 0.1
# How long to wait before offering the cloud a job again after each kind of refusal.
RETRY_AFTER = {"visit": 0.2, "active": 3.0, "queue": 10.0, "daily": 600.0}
# Sends of one submit refused as "visit too frequently" before it becomes back-pressure; another
# client on the same token (a script, the web UI) can make every send too close.
_VISIT_RETRIES = 2
_QUERY_BATCH = 50  # ids per `task_ids=` query, to keep URLs short
_FIND_PAGES, _FIND_PAGE_SIZE = 4, 50  # find_task looks at the newest 200 tasks of the account
_MODELS_TTL = 300.0


CloudModel = UpstreamModel


class CloudAuthError(Unavailable):
    """The cloud refused the access token (HTTP 401/403): nothing runs there until it is replaced.

    An Unavailable, so jobs wait in the gateway's queue instead of failing.
    """


class _Secret:
    """Holds the token so that no repr, traceback local or log of the adapter can show it."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "'***'"


def _should_retry(exc: BaseException) -> bool:
    # A refused token or an unknown task does not get better by asking again.
    return isinstance(exc, Unavailable) and not isinstance(exc, CloudAuthError)


# -- the adapter ----------------------------------------------------------------------------------


class CloudUpstream(Upstream):
    """One hosted-cloud account as an upstream.

    The cloud picks task ids (`find_task` matches on MARKER instead), resumes failed and
    cancelled tasks, runs its own worker pool's queue, keeps its tasks through any outage, and
    offers a list of models a job may choose from (each refusing a job without a prompt).
    """

    kind = "cloud"
    capabilities = Capabilities(resumes=True, chooses_models=True)

    def __init__(
        self,
        name: str,
        base_url: str,
        token: str,
        *,
        models: dict[str, str] | None = None,
        stage: str = "single_stage",
        slots: int = 3,  # the cloud's own limit of active tasks per user
        client: httpx.AsyncClient | None = None,
        timeout: float = 30.0,
        retries: int = 3,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.models_by_task = dict(DEFAULT_MODELS if models is None else models)
        self.stage = stage
        self.slots = slots
        self.tasks = frozenset(self.models_by_task)
        self._token = _Secret(token)
        self._retries = retries
        # No default headers: the token is added per request, only to requests for base_url.
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            limits=UPSTREAM_LIMITS,
        )
        self._models: list[CloudModel] | None = None
        self._models_at = 0.0
        self._submit_lock = asyncio.Lock()
        self._next_submit = 0.0

    def __repr__(self) -> str:
        return f"CloudUpstream(name={self.name!r}, base_url={self.base_url!r})"

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- plumbing -------------------------------------------------------------------------------

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token.value}"}

    def _clean(self, text: str) -> str:
        return sanitise(text, (self._token.value,))

    def _retrying(self, attempts: int | None = None) -> AsyncRetrying:
        """For requests that are safe to repeat: exponential backoff with jitter."""
        return backoff(retry_if_exception(_should_retry), attempts=attempts or self._retries)

    def _check_auth(self, response: httpx.Response) -> None:
        if response.status_code in (401, 403):
            raise CloudAuthError(
                f"{self.name}: cloud token rejected (HTTP {response.status_code}: "
                f"{self._clean(error_text(response))}); set a fresh LIGHTX2V_ACCESS_TOKEN"
            )

    async def _get(
        self, path: str, params: dict[str, Any] | None = None, *, known: tuple[str, ...] = (),
        attempts: int | None = None,
    ) -> httpx.Response:
        """A GET of the API, retried on transport errors and on 5xx answers other than `known`.

        Returns any answer below 500 (and the `known` 500s) for the caller to read.
        """
        async for attempt in self._retrying(attempts):
            with attempt:
                try:
                    response = await self._client.get(f"{self.base_url}{path}", params=params, headers=self._auth())
                except httpx.TransportError as exc:
                    raise Unavailable(f"{self.name}: cloud unreachable ({type(exc).__name__})") from None
                self._check_auth(response)
                if response.status_code >= 500 and not any(k in error_text(response) for k in known):
                    raise Unavailable(
                        f"{self.name}: cloud answered {response.status_code}: {self._clean(error_text(response))}"
                    )
        return response

    def _unexpected(self, response: httpx.Response, what: str) -> Unavailable:
        return Unavailable(
            f"{self.name}: unexpected answer to {what} (HTTP {response.status_code}: "
            f"{self._clean(error_text(response))})"
        )

    # -- models ---------------------------------------------------------------------------------

    async def models(self) -> list[CloudModel]:
        """The (task, model_cls, stage) triples the cloud accepts; cached for a few minutes."""
        if self._models is None or time.monotonic() - self._models_at > _MODELS_TTL:
            # One try: this runs while a client waits for `POST /jobs` or `GET /models`, and
            # each health check reloads the list anyway.
            try:
                await self._load_models(attempts=1)
            except CloudAuthError:
                raise
            except Unavailable:
                if self._models is None:
                    raise
                # A list a few minutes old beats none: the cloud's models change rarely.
        assert self._models is not None
        return self._models

    async def _load_models(self, attempts: int | None = None) -> None:
        response = await self._get("/api/v1/model/list", attempts=attempts)
        if response.status_code != 200:
            raise self._unexpected(response, "model list")
        self._models = [
            CloudModel(str(m.get("task")), str(m.get("model_cls")), str(m.get("stage")))
            for m in response.json().get("models", []) if isinstance(m, dict)
        ]
        self._models_at = time.monotonic()

    def model_for(self, task: str, params: dict[str, Any] | None = None) -> CloudModel:
        """The model a job of `task` runs on: the job's own choice, else the configured default."""
        params = params or {}
        model_cls = params.get("model_cls") or self.models_by_task.get(task)
        if not model_cls:
            raise Rejected(f"{self.name}: no cloud model is configured for {task} jobs")
        return CloudModel(task, str(model_cls), str(params.get("stage") or self.stage))

    async def check_model(self, model: CloudModel) -> None:
        """Raise Rejected if the cloud does not offer `model`, before anything is uploaded."""
        try:
            offered = await self.models()
        except CloudAuthError:
            raise
        except Unavailable:
            return  # cannot tell now; the cloud itself refuses a model it does not have
        if model not in offered:
            choices = ", ".join(m.model_cls for m in offered if m.task == model.task and m.stage == model.stage)
            raise Rejected(
                f"{self.name}: the cloud does not offer {model.model_cls} ({model.stage}) for {model.task} jobs"
                + (f"; it offers {choices}" if choices else "")
            )

    # -- submit ---------------------------------------------------------------------------------

    @staticmethod
    def marker(request: SubmitRequest) -> str:
        """What this attempt is recognised by in the cloud's task list.

        The gateway's task id is unique per attempt (the job id, plus the run for user retries).
        """
        return request.task_id

    def _fields(self, request: SubmitRequest, model: CloudModel) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "task": model.task, "model_cls": model.model_cls, "stage": model.stage,
            "prompt": request.params.get("prompt"),
        }
        for key, value in request.params.items():
            if value is None or key in _NOT_PASSED or key.startswith(("input_", "output_")):
                continue
            if key in _RENAMED:
                if value:  # the self-hosted default [] means "the model's own shape"
                    fields[_RENAMED[key]] = list(value)
                continue
            fields[key] = value  # seed, negative_prompt, aspect_ratio...: stored and handed to the worker
        fields[MARKER] = self.marker(request)
        return fields

    async def submit(self, request: SubmitRequest) -> str:
        prompt = request.params.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise Rejected(f"{self.name}: the cloud needs a non-empty prompt")
        model = self.model_for(request.task, request.params)
        await self.check_model(model)
        inputs = {}
        for role, path in request.inputs.items():
            if role not in _INPUT_FIELDS:
                raise Rejected(f"{self.name}: the cloud takes no {role} input")
            inputs[_INPUT_FIELDS[role]] = path
        fields = self._fields(request, model)
        for attempt in range(1 + _VISIT_RETRIES):
            try:
                # Built afresh for each send: a streamed body can be read only once.
                content, length = base64_json_body(fields, inputs, wrap='{"type": "base64", "data": "{}"}')
            except OSError as exc:
                raise Rejected(f"{self.name}: an input file is missing ({type(exc).__name__})") from None
            await self._pace()
            try:
                response = await self._client.post(
                    f"{self.base_url}/api/v1/task/submit",
                    content=content,
                    headers={**self._auth(), "content-type": "application/json", "content-length": str(length)},
                )
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                # No connection, so not a byte sent: safe to try again, here or elsewhere.
                raise Unavailable(f"{self.name}: cloud unreachable ({type(exc).__name__})") from None
            except httpx.TransportError as exc:
                # The body may have arrived whole and the task been created before the answer was
                # lost: the dispatcher looks for the marker before sending it again.
                raise AmbiguousSubmit(f"{self.name}: submission interrupted ({type(exc).__name__})") from None
            if attempt < _VISIT_RETRIES and too_frequent(response):
                # Submits that left SUBMIT_GAP apart can still arrive closer together (a busy
                # event loop writes both at once). The cloud checks this before reading the
                # body, so nothing was created: send again after its gap, rather than put the
                # job back in the queue with a limit in its timeline.
                self._next_submit = max(self._next_submit, asyncio.get_running_loop().time() + RETRY_AFTER["visit"])
                continue
            break
        return self._submitted(response)

    async def _pace(self) -> None:
        """Leave SUBMIT_GAP between the starts of this account's submits."""
        async with self._submit_lock:
            loop = asyncio.get_running_loop()
            wait = self._next_submit - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self._next_submit = loop.time() + SUBMIT_GAP

    def _submitted(self, response: httpx.Response) -> str:
        status = response.status_code
        if status == 200:
            try:
                task_id = response.json()["task_id"]
            except (ValueError, KeyError, TypeError):
                raise AmbiguousSubmit(f"{self.name}: the cloud accepted the job but its answer was unreadable") from None
            return str(task_id)
        self._check_auth(response)
        message = error_text(response)
        # The per-user limits are checked before the body is even read: nothing was created.
        if status == 400 and "visit too frequently" in message:
            raise Backpressure(f"{self.name}: cloud rate limit (submits too close together)", RETRY_AFTER["visit"])
        if status == 400 and "too many active tasks" in message:
            raise Backpressure(f"{self.name}: the cloud account has its maximum of active tasks", RETRY_AFTER["active"])
        if status == 400 and "too many daily tasks" in message:
            raise Backpressure(f"{self.name}: the cloud account reached its daily task limit", RETRY_AFTER["daily"])
        if status == 500 and "Queue busy" in message:
            raise Backpressure(f"{self.name}: the cloud's queue is full", RETRY_AFTER["queue"])
        if status in (404, 405):
            # The SPA catch-all or a wrong method: the base URL does not point at the API.
            raise Unavailable(f"{self.name}: no cloud API at {self.base_url} (HTTP {status}); check LIGHTX2V_BASE_URL")
        if (status == 500 and is_app_error(response)) or 400 <= status < 500:
            raise Rejected(f"{self.name}: the cloud refused the job: {self._clean(message)}")
        # A proxy's 502/504 or a crash: the task may or may not exist.
        raise AmbiguousSubmit(f"{self.name}: the cloud answered HTTP {status} to the submission")

    async def find_task(self, request: SubmitRequest) -> str | None:
        # The list is newest first; an attempt being reconciled is among the most recent tasks.
        marker = self.marker(request)
        for page in range(1, _FIND_PAGES + 1):
            response = await self._get("/api/v1/task/list", {"page": page, "page_size": _FIND_PAGE_SIZE})
            if response.status_code != 200:
                raise self._unexpected(response, "task list")
            body = response.json()
            for task in body.get("tasks", []):
                if isinstance(task, dict) and (task.get("params") or {}).get(MARKER) == marker:
                    return str(task["task_id"])
            if page >= (body.get("pagination") or {}).get("total_pages", 0):
                break
        return None

    # -- follow ---------------------------------------------------------------------------------

    async def poll(self, task_ids: list[str]) -> dict[str, RemoteStatus | None]:
        unique = list(dict.fromkeys(task_ids))
        result: dict[str, RemoteStatus | None] = {}
        for start in range(0, len(unique), _QUERY_BATCH):
            result.update(await self._query(unique[start:start + _QUERY_BATCH]))
        return result

    async def _query(self, task_ids: list[str]) -> dict[str, RemoteStatus | None]:
        response = await self._get("/api/v1/task/query", {"task_ids": ",".join(task_ids)}, known=(_UNKNOWN_TASK,))
        if response.status_code == 200:
            secrets = (self._token.value,)
            listed = {t.get("task_id"): t for t in response.json().get("tasks", []) if isinstance(t, dict)}
            # A platform that skips unknown ids instead of failing comes out the same way.
            return {tid: to_status(listed[tid], secrets) if tid in listed else None for tid in task_ids}
        if response.status_code != 500:
            raise self._unexpected(response, "task query")
        # One unknown id fails the whole query, and the answer does not say which: halve the
        # list until each unknown id stands alone (2·log2(n) requests for one unknown id).
        if len(task_ids) == 1:
            return {task_ids[0]: None}
        log.debug("%s: an unknown task among %d; querying halves", self.name, len(task_ids))
        middle = len(task_ids) // 2
        return {**await self._query(task_ids[:middle]), **await self._query(task_ids[middle:])}

    async def cancel(self, task_id: str) -> None:
        # Safe to repeat: a second cancel is a 400 "not in active status", which is fine.
        response = await self._get("/api/v1/task/cancel", {"task_id": task_id})
        if response.status_code == 200:
            return
        if response.status_code == 400:
            # Already finished, or unknown: either way nothing is left to stop. A RUNNING task
            # is CANCEL at once; its worker stops at its next ping and the status stays CANCEL.
            log.debug("%s: cancel of %s: %s", self.name, task_id, self._clean(error_text(response)))
            return
        raise self._unexpected(response, "cancel")

    async def resume(self, task_id: str) -> bool:
        """Re-queue a FAILED or CANCEL task under the same id. False if the cloud cannot."""
        response = await self._get("/api/v1/task/resume", {"task_id": task_id}, known=(_RESUME_UNKNOWN,))
        if response.status_code == 200:
            return True
        message = error_text(response)
        if response.status_code == 400 and "Active task cannot be resumed" in message:
            # Queued or running again already (an earlier try whose answer was lost): the task
            # will run, which is what resuming asked for.
            return True
        if response.status_code in (400, 500):
            # SUCCEED tasks, models no longer offered, unknown tasks ("'NoneType' object...").
            log.info("%s: task %s cannot be resumed: %s", self.name, task_id, self._clean(message))
            return False
        raise self._unexpected(response, "resume")

    # -- results --------------------------------------------------------------------------------

    async def fetch_result(self, task_id: str, dest: Path, *, kind: str = "video") -> None:
        # Each try asks for the URL afresh: a pre-signed one may have expired since the last.
        async for attempt in self._retrying():
            with attempt:
                url = await self._result_url(task_id, _OUTPUT_NAMES.get(kind, "output_video"))
                await self._download(url, dest)

    async def _result_url(self, task_id: str, output: str) -> str:
        response = await self._get(
            "/api/v1/task/result_url", {"task_id": task_id, "name": output},
            known=("not found", "not succeed"), attempts=1,
        )
        if response.status_code == 200:
            return str(response.json()["url"])
        message = error_text(response)
        if response.status_code == 500 and f"Task {task_id} not found" in message:
            raise UnknownTask(f"{self.name}: the cloud does not know task {task_id}")
        if response.status_code == 500 and "not found in task" in message:
            raise UnknownTask(f"{self.name}: cloud task {task_id} has no {output}")
        raise self._unexpected(response, "result_url")

    async def _download(self, url: str, dest: Path) -> None:
        parts = urlsplit(url)
        presigned = bool(parts.scheme or parts.netloc)
        if presigned:
            # A pre-signed URL carries its own authorisation, usually for another host (an
            # object store, which refuses a second auth mechanism anyway): never send the token.
            request = self._client.build_request("GET", url)
            request.headers.pop("Authorization", None)  # even if a shared client has defaults
        else:
            # `./assets/task/result?...`: relative to the API, same token. A base URL with a
            # path keeps it (urljoin needs the trailing slash).
            request = self._client.build_request("GET", urljoin(self.base_url + "/", url), headers=self._auth())
        try:
            # httpx drops the Authorization header on a redirect to another origin.
            response = await self._client.send(request, stream=True, follow_redirects=True)
        except httpx.TransportError as exc:
            raise Unavailable(f"{self.name}: result download failed ({type(exc).__name__})") from None
        part = dest.with_name(dest.name + ".part")
        try:
            if not presigned:
                self._check_auth(response)
            if response.status_code != 200:
                raise Unavailable(f"{self.name}: result download answered HTTP {response.status_code}")
            size = 0
            with part.open("wb") as out:
                async for chunk in response.aiter_bytes(256 * 1024):
                    out.write(chunk)
                    size += len(chunk)
            if size == 0:
                raise Unavailable(f"{self.name}: the cloud sent an empty result")
            os.replace(part, dest)  # a half-written file never takes the result's name
        except httpx.TransportError as exc:
            raise Unavailable(f"{self.name}: result download failed ({type(exc).__name__})") from None
        finally:
            await response.aclose()
            part.unlink(missing_ok=True)

    # -- health ---------------------------------------------------------------------------------

    async def health(self) -> NodeHealth:
        # The model list is the cheapest authenticated call: it proves both reach and token,
        # and keeps the list `check_model` reads fresh.
        try:
            await self._load_models(attempts=1)
        except Unavailable as exc:  # CloudAuthError included
            return NodeHealth(reachable=False, detail=str(exc))
        return NodeHealth(reachable=True)
