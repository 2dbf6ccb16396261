"""What every upstream adapter offers the gateway, in the gateway's own vocabulary.

`Upstream` is the one door: every call the dispatcher, the API and the upload forwarding make to
a place jobs run, with `Capabilities` saying which of the optional ones it answers. Each adapter
(self-hosted node, hosted cloud) turns its server's quirks into these few types; nothing outside
`upstream/` ever sees an upstream status string or error body, nor asks which adapter it holds.
"""

from __future__ import annotations

import base64
import enum
import functools
import json
import math
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

import httpx
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential
from tenacity.retry import retry_base

T = TypeVar("T")

# Seconds an idle pooled connection to an upstream is kept. Both LightX2V servers run on uvicorn
# (the cloud answers `server: uvicorn`), which closes a connection idle for 5 s: a request sent
# on one as it closes fails with a ReadError, and a submit that fails so cannot be sent again
# blindly (it costs a reconcile: a minute before it is sent again). Ours are let go well before.
UPSTREAM_KEEPALIVE = 2.0
# Each adapter's connection pool.
UPSTREAM_LIMITS = httpx.Limits(max_connections=20, max_keepalive_connections=10, keepalive_expiry=UPSTREAM_KEEPALIVE)


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The TLS settings of every connection to a node, made once: httpx's defaults (certifi's
    CAs, or SSL_CERT_FILE / SSL_CERT_DIR when set). Each costs ~20 ms of CPU to make (the CA
    bundle is read): one per node made a gateway with 1,000 nodes take 22 s to start."""
    return httpx.create_ssl_context()


class RemoteState(enum.StrEnum):
    """Where an upstream says a task is."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(slots=True)
class RemoteStatus:
    state: RemoteState
    error: str | None = None
    # 1-based place in the upstream's own queue, when it says.
    queue_position: int | None = None
    # Seconds the upstream expects the task to wait before it starts / to run once started; None
    # when it says nothing, or only a placeholder (the adapter drops those).
    pending_seconds: float | None = None
    running_seconds: float | None = None
    # Seconds a finished task ran, by the upstream's own clock, when it says: a duration needs no
    # agreement between its clock and ours.
    ran_seconds: float | None = None
    # How far a running task has got, 0 to 1, when the upstream says. Neither upstream reports
    # a percentage: a cloud task says which of its stages (multi_stage) have finished, and how long
    # its running stage has run against the queue's measured average; a self-hosted node, nothing.
    progress: float | None = None


class InputFile(Protocol):
    """An input's bytes where the gateway keeps them (a blob store's `StoredBlob`: a local file
    or an object in a bucket), read as they are sent. A plain `Path` serves as one too."""

    @property
    def size(self) -> int: ...

    def chunks(self, chunk_size: int) -> AsyncIterator[bytes]:
        """The bytes, in pieces of exactly `chunk_size` but the last."""


def input_size(source: Path | InputFile) -> int:
    return source.stat().st_size if isinstance(source, Path) else source.size


@dataclass(slots=True)
class SubmitRequest:
    """One attempt to run a job upstream: everything an adapter needs, nothing it must look up."""

    job_id: str
    # The task id to ask for, where the upstream lets the client choose one (self-hosted does).
    task_id: str
    task: str  # a task type of tasks.py: s2v, i2v, t2v, flf2v, t2i, i2i, animate
    params: dict = field(default_factory=dict)  # prompt, negative_prompt, seed, infer_steps, ...
    inputs: dict[str, Path | InputFile] = field(default_factory=dict)  # image | audio | last_frame | video -> its bytes
    # A file name for each input (blobs have none), with the extension its content was detected as.
    filenames: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class NodeHealth:
    reachable: bool
    # Tasks the upstream itself counts as active (queued + running), when it says.
    active: int | None = None
    detail: str | None = None
    # Nothing listens where it runs: the process is gone, and every task it held in memory with
    # it (a timeout says much less: it may still be running them).
    gone: bool = False


class UpstreamModel(NamedTuple):
    """A model an upstream offers: what a job may name with `model` (hosted cloud)."""

    task: str
    model_cls: str
    stage: str


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an upstream does beyond the calls every one answers. Callers ask these flags, never
    the adapter's type; a call tied to a flag is made only when the flag is set."""

    # The gateway names each task (`SubmitRequest.task_id`), so a repeated submission can never
    # make a second task. Otherwise the upstream picks the id, and `find_task` recognises the
    # attempt by a marker it carries.
    chooses_task_id: bool = False
    # `resume(task_id)`: a failed or cancelled task runs again under its id, so a retry is no
    # new submission.
    resumes: bool = False
    # `open_form(length, task)`: a job's files go out while its upload still arrives at the gateway.
    forwards_uploads: bool = False
    # One server's own queue, whose runs the gateway times: it is asked about its jobs when a
    # run is due to end, and a job that waits there past the start-by deadline is taken back
    # (`current_task` tells whether it started meanwhile). Otherwise the upstream schedules its
    # own pool, tells no start time, and is followed at the steady pace.
    timed_queue: bool = False
    # Its tasks live in one process: when that process is gone (`NodeHealth.gone`), or silent
    # past the start-by deadline, its jobs run elsewhere. Otherwise its tasks outlive any outage
    # and stay there: moving them would lose their place, and could make two tasks of one job.
    tasks_die_with_it: bool = False
    # `models()`, `model_for()`, `check_model()`: a job may choose among the models it offers.
    # Such an upstream also refuses a job without a prompt, whatever its task.
    chooses_models: bool = False


class UpstreamError(Exception):
    """Base class: the message is already sanitised and safe to store and show."""


class Backpressure(UpstreamError):
    """The upstream cannot take the job right now (queue full, rate limit): try again later.

    Never a failure of the job; the job goes back to the gateway's queue.
    """

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(UpstreamError):
    """Transport error, timeout or 5xx on a request that is safe to repeat."""


class AmbiguousSubmit(UpstreamError):
    """A submission whose body may have reached the upstream: never blindly resend it.

    The dispatcher asks the upstream whether it knows the task before trying again.
    """


class Rejected(UpstreamError):
    """The upstream refused this job for good (bad input it would refuse again)."""


class UnknownTask(UpstreamError):
    """The upstream does not know the task (it restarted and forgot, or evicted it)."""


class Upstream(Protocol):
    """A place jobs run: one self-hosted LightX2V node, or one hosted-cloud account.

    The whole contract between the gateway and an upstream. Adapters subclass it; the calls
    below the capability line raise NotImplementedError unless their flag is set.
    """

    name: str
    kind: str  # "selfhosted" | "cloud": a label for people (the nodes list), never a branch
    capabilities: Capabilities
    base_url: str
    # How many jobs the gateway keeps in flight there at once (running + look-ahead).
    slots: int
    # Task types it can run.
    tasks: frozenset[str]

    async def submit(self, request: SubmitRequest) -> str:
        """Start a task; return the upstream's task id. Raises Backpressure, AmbiguousSubmit,
        Rejected or Unavailable (the latter only when nothing can have been sent)."""

    async def poll(self, task_ids: list[str]) -> dict[str, RemoteStatus | None]:
        """Statuses of the given tasks, in as few requests as the upstream allows.

        None for a task the upstream does not know. Raises Unavailable when it cannot tell.
        """

    async def cancel(self, task_id: str) -> None:
        """Ask the upstream to stop a task (best effort; raises Unavailable to be retried)."""

    async def fetch_result(self, task_id: str, dest: Path, *, kind: str = "video") -> None:
        """Stream the finished result, a `video` or an `image` (tasks.makes), into `dest`.
        Raises Unavailable or UnknownTask."""

    async def find_task(self, request: SubmitRequest) -> str | None:
        """After a crash or an ambiguous submit: the upstream task id of this attempt, if the
        upstream has it, else None (so submitting again cannot create a second task)."""

    async def health(self) -> NodeHealth:
        """A cheap status call: never runs a generation."""

    async def learn_model(self) -> str | None:
        """Ask the upstream what it serves and set `tasks` to what that runs; return the model's
        name, or None where there is no single one. Raises UpstreamError when it cannot tell."""
        return None

    async def aclose(self) -> None: ...

    # -- capabilities ---------------------------------------------------------------------------

    async def resume(self, task_id: str) -> bool:
        """`resumes`: re-queue a failed or cancelled task under its id; False if it cannot."""
        raise NotImplementedError

    def open_form(self, length: int, task: str) -> UploadSink:
        """`forwards_uploads`: start a submission of a `task` job, at most `length` bytes, whose
        files are sent while they still arrive."""
        raise NotImplementedError

    async def current_task(self) -> str | None:
        """`timed_queue`: the task the server runs right now, if any."""
        raise NotImplementedError

    async def models(self) -> list[UpstreamModel]:
        """`chooses_models`: the models jobs may choose."""
        raise NotImplementedError

    def model_for(self, task: str, params: dict[str, Any] | None = None) -> UpstreamModel:
        """`chooses_models`: the model a job of `task` runs on (its own choice, else the default).
        Raises Rejected when there is none."""
        raise NotImplementedError

    async def check_model(self, model: UpstreamModel) -> None:
        """`chooses_models`: raise Rejected if `model` is not offered, before anything is uploaded."""
        raise NotImplementedError


class UploadSink(Protocol):
    """A submission whose files are written while the client's upload still arrives
    (`Upstream.open_form`). Nothing becomes a task until `finish()`; `abort()` leaves none."""

    files: dict[str, str]  # gateway role -> the file name sent

    @property
    def broken(self) -> bool:
        """The upstream stopped taking the body: forwarding is over."""

    def begin_file(self, role: str, filename: str) -> None: ...

    def write(self, data: bytes) -> None: ...

    def end_file(self) -> None: ...

    async def drain(self, *, everything: bool = False) -> None:
        """Send what has piled up; waits while the upstream is slower than the client."""

    async def finish(self, request: SubmitRequest) -> str:
        """Complete the submission: the outcomes of `Upstream.submit`."""

    async def abort(self) -> None:
        """Drop the unfinished submission."""


def backoff(retry: retry_base, *, attempts: int) -> AsyncRetrying:
    """For requests that are safe to repeat: up to `attempts` tries, exponential backoff with
    jitter in between (0.2 s, 0.4 s ... at most 2 s). `retry` says which failures are worth it."""
    return AsyncRetrying(
        retry=retry, wait=wait_random_exponential(multiplier=0.2, max=2.0),
        stop=stop_after_attempt(attempts), reraise=True,
    )


async def retried(call: Callable[[], Awaitable[T]], failure: type[Exception], *, attempts: int) -> T:
    """`call()`, tried again after a `failure`: `attempts` tries in all, with `backoff`'s waits.

    The first try runs outside tenacity, whose bookkeeping costs ~0.1 ms of CPU a call: most
    calls succeed, and a gateway following 500 nodes makes 500 a second."""
    try:
        return await call()
    except failure as exc:
        first: Exception | None = exc
    async for attempt in backoff(retry_if_exception_type(failure), attempts=attempts):
        with attempt:
            if first is not None:
                # The try already made, counted by tenacity and waited after like any other.
                failed, first = first, None
                raise failed
            return await call()
    raise AssertionError("unreachable: the last failure is raised again")


_PATH = re.compile(r"(?:/[\w.\-]+){2,}/([\w.\-]+)")
_LONG_TOKEN = re.compile(r"[A-Za-z0-9+/=_\-.]{80,}")


def clean_message(text: str, *, secrets: tuple[str, ...] = (), limit: int = 300) -> str:
    """Make upstream error text safe to store and show.

    Upstreams echo absolute server paths, whole base64 inputs and pages of ffmpeg output in their
    errors; none of it helps a user and some of it must not leak. Secrets are masked first.
    """
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _LONG_TOKEN.sub("…", text)
    text = _PATH.sub(r"\1", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


_B64_CHUNK = 3 * 64 * 1024  # a multiple of 3, so chunks encode without padding in between


def base64_json_body(
    fields: dict[str, Any], files: dict[str, Path | InputFile], *, wrap: str = '"{}"'
) -> tuple[AsyncIterator[bytes], int]:
    """A JSON object of `fields` plus each file base64-encoded from disk as it is sent.

    `wrap` is the JSON value around the base64 text, `{}` standing for it (a bare string for a
    node, `{"type": "base64", "data": "{}"}` for the cloud). The body is streamed, so a large
    input costs one 192 KiB chunk of memory, not the file plus its base64 copy plus the JSON
    string that would hold it. Its length is known up front, so it goes with a Content-Length.
    A streamed body can be read once: build a new one for each send.
    """
    before, after = (part.encode() for part in wrap.split("{}"))
    head = json.dumps(fields).encode()[:-1]  # ASCII (ensure_ascii), without the closing brace
    parts: list[bytes | Path | InputFile] = [head]
    for name, path in files.items():
        parts += [f', "{name}": '.encode() + before, path, after]
    parts.append(b"}")
    length = sum(len(p) if isinstance(p, bytes) else 4 * math.ceil(input_size(p) / 3) for p in parts)
    return stream_parts(parts, _B64_CHUNK, base64.b64encode), length


async def stream_parts(
    parts: list[bytes | Path | InputFile], chunk_size: int, encode: Callable[[bytes], bytes] | None = None
) -> AsyncIterator[bytes]:
    """A request body made of literal bytes and files (on disk, or where the blob store keeps
    them), one chunk at a time."""
    for part in parts:
        if isinstance(part, bytes):
            yield part
        elif isinstance(part, Path):
            with part.open("rb") as handle:
                while chunk := handle.read(chunk_size):
                    yield encode(chunk) if encode else chunk
        else:
            async for chunk in part.chunks(chunk_size):
                yield encode(chunk) if encode else chunk
