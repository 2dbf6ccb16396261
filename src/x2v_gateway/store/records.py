"""The store's records: what the rest of the gateway reads and passes back, whatever the backend."""

from __future__ import annotations

import base64
import secrets
from typing import Any, NamedTuple

import msgspec

QUEUED, SUBMITTED, RUNNING = "queued", "submitted", "running"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
STATES = (QUEUED, SUBMITTED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
ACTIVE = (SUBMITTED, RUNNING)  # handed to an upstream, not finished
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)


class Job(msgspec.Struct, kw_only=True):
    """One job, its whole life: what it asks, where it went, how it ended."""

    seq: int
    id: str
    task: str
    state: str
    params: dict[str, Any]
    inputs: dict[str, str]  # role (image | audio | last_frame) -> blob sha256
    upstream: str | None = None
    upstream_task_id: str | None = None
    run: int = 0  # how many times the user asked to retry
    attempts: int = 0  # submissions that may have reached an upstream
    priority: int = 0
    batch_id: str | None = None
    owner: str | None = None
    created_at: float
    updated_at: float
    submitted_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    result_sha: str | None = None
    result_meta: dict[str, Any] | None = None
    queue_info: dict[str, Any] | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    pinned: str | None = None  # the upstream the user asked for, if any
    cancel_pending: bool = False
    files_expired: bool = False
    # The gateway replica that sent it and follows it while it is on an upstream (see
    # dispatch/replicas.py); another takes it over when that one's lease runs out.
    replica: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before for a different request."""


class KeyNameTaken(ValueError):
    """An active key already has this name."""


class AdminKeyNeeded(ValueError):
    """Revoking this key would lock every admin out (see `JobStore.revoke_key`)."""


class BatchJobSpec(msgspec.Struct, kw_only=True):
    """One job to create in a batch, from inputs already in the blob store."""

    task: str
    params: dict[str, Any]
    inputs: dict[str, str]  # role -> blob sha256
    files: dict[str, str]  # role -> the file name the user gave it
    priority: int = 0
    retry_of: str | None = None
    pinned: str | None = None  # the upstream it must run on (`upstream` of the API)


class BatchItem(msgspec.Struct):
    """A job of a batch, with its place in the batch and its files' names (empty for jobs
    that came through the API with a `batch_id`)."""

    job: Job
    position: int | None
    files: dict[str, str]
    retry_of: str | None
    retried_as: str | None = None


class JobWebhook(NamedTuple):
    """Where a job's events are sent (webhooks.py): fixed when the job is accepted."""

    url: str
    events: tuple[str, ...]
    key_id: str | None  # whose secret signs the deliveries


class Lane(NamedTuple):
    """Queued jobs that share a task type, a priority, an owner and a batch."""

    task: str
    priority: int
    owner: str  # '' for none
    batch: str  # '' for none
    head_seq: int


class QueuedJob(NamedTuple):
    """A queued job as a dispatch round weighs it (`Reads.lane_heads`)."""

    id: str
    seq: int
    task: str
    pinned: str | None


class Inflight(NamedTuple):
    """A job handed to an upstream and not finished, in the few columns dispatch planning reads."""

    id: str
    upstream: str
    task: str
    state: str
    owner: str
    batch: str
    submitted_at: float | None
    started_at: float | None


def new_job_id() -> str:
    # Lower-case base32: safe as an upstream task id and as a file name on the node.
    return "j" + base64.b32encode(secrets.token_bytes(10)).decode().lower()

