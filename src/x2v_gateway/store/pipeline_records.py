"""The store's records of pipelines (pipelines/): a pipeline and its steps, whatever the backend."""

from __future__ import annotations

import base64
import secrets
from typing import Any

import msgspec

RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"
PIPELINE_STATES = (RUNNING, SUCCEEDED, FAILED, CANCELLED)


class PipelineStep(msgspec.Struct, kw_only=True):
    """One step: an ordinary job once its inputs are there (`job_id`)."""

    n: int  # its place in the pipeline, from 0
    scene: int  # the scene it renders (or prepares, for an image step)
    segment: int | None = None  # its part of a long speech, from 0
    kind: str  # "clip" (a span of the finished video) | "image" (feeds a later step)
    task: str
    params: dict[str, Any]
    inputs: dict[str, str]  # role -> blob sha256, given with the pipeline
    # role -> {"step": n, "take": "last_frame" | "output"}: what an earlier step's result gives it.
    needs: dict[str, dict[str, Any]]
    seconds: float | None = None  # its span of the finished video (clips)
    # The original audio under that span: {"sha256", "offset"} (s2v), so that a long speech
    # split into parts is joined with the audio the user gave, intact.
    audio: dict[str, Any] | None = None
    job_id: str | None = None


class Pipeline(msgspec.Struct, kw_only=True):
    """A pipeline, its whole life: its steps, its state, its joined video."""

    seq: int = 0
    id: str
    owner: str | None = None
    name: str | None = None
    state: str = RUNNING
    output: dict[str, Any]  # fps, width, height (None: the first clip's)
    priority: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    finished_at: float | None = None
    error: str | None = None
    result_sha: str | None = None
    result_meta: dict[str, Any] | None = None
    files_expired: bool = False
    idempotency_key: str | None = None  # the owner's key, scoped: "<owner>:<key>"
    request_hash: str | None = None
    # Who joins its clips, until when (PipelineService: a lease, so that replicas join it once).
    join_by: str | None = None
    join_until: float | None = None
    steps: list[PipelineStep] = []

    @property
    def finished(self) -> bool:
        """No step will be made or joined any more (a failed one may be retried)."""
        return self.state in (SUCCEEDED, CANCELLED)


def new_pipeline_id() -> str:
    # The same alphabet as a job's id: safe in a URL, a file name and a batch id.
    return "p" + base64.b32encode(secrets.token_bytes(10)).decode().lower()
