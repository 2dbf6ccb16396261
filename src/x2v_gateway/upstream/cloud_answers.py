"""Reading the hosted LightX2V cloud's answers (see shared/lightx2v/cloud.md): its task
statuses and progress, and its error text, which is sanitised before anyone sees it.

The adapter that sends the requests is `cloud.py`; everything here is a pure function of an
answer it received.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx

from .base import RemoteState, RemoteStatus, clean_message

_STATES = {
    "CREATED": RemoteState.QUEUED,
    "PENDING": RemoteState.QUEUED,
    "RUNNING": RemoteState.RUNNING,
    "SUCCEED": RemoteState.SUCCEEDED,
    "FAILED": RemoteState.FAILED,
    "REJECT": RemoteState.FAILED,  # internal, reported as FAILED, but cheap to be ready for
    "CANCEL": RemoteState.CANCELLED,
}
# The queue's running timeout, which the cloud reports as the running estimate until measured.
_RUNNING_TIMEOUT = 3600.0


# -- error text ---------------------------------------------------------------------------------

_ECHOED_VALUE = re.compile(r"(Failed to read [\w/]+), type=\w+, val=.*?: ", re.S)
_PY_OBJECT = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")
_NOT_IN_PIPELINE = re.compile(r"\[(.*?)\] are not in \S*model_pipeline\.json")
_URL_QUERY = re.compile(r"(https?://[^\s?]+)\?\S*")


def sanitise(text: str, secrets: tuple[str, ...] = ()) -> str:
    """The cloud's error text, made short, human and safe to store and show."""
    text = text.removeprefix("error: ").rstrip("!").strip()
    # "Failed to read input_image, type=base64, val=<first 100 chars of the input>: <why>"
    text = _ECHOED_VALUE.sub(r"\1: ", text)
    # Audio errors carry ffmpeg's whole stderr (~2.7 kB); its last line says what was wrong.
    head, banner, stderr = text.partition("ffmpeg version")
    if banner:
        lines = [line.strip() for line in stderr.splitlines() if line.strip().strip("!")]
        last = lines[-1] if lines else ""
        text = head + re.sub(r"^/\S+: ", "", last)
    text = _PY_OBJECT.sub("", text)
    text = _NOT_IN_PIPELINE.sub(
        lambda m: "the cloud does not offer " + " / ".join(p.strip(" '\"") for p in m.group(1).split(",")), text
    )
    text = _URL_QUERY.sub(r"\1", text)  # pre-signed URLs carry signatures
    return clean_message(text, secrets=secrets)


def error_text(response: httpx.Response) -> str:
    """The raw text of an error answer: `{"message": ...}`, FastAPI's `{"detail": ...}` or a page."""
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"  # a proxy's HTML page says nothing more
    if isinstance(body, dict):
        text = body.get("message", body.get("detail"))
        if isinstance(text, str):
            return text
    return json.dumps(body)[:300]


def too_frequent(response: httpx.Response) -> bool:
    return response.status_code == 400 and "visit too frequently" in error_text(response)


def is_app_error(response: httpx.Response) -> bool:
    """Whether a 500 is the platform's own answer (`error: ...!`) rather than a crash or a proxy."""
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and str(body.get("message", "")).startswith("error: ")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def to_status(task: dict, secrets: tuple[str, ...]) -> RemoteStatus:
    # A status this code does not know (a newer platform) is taken as still running: the task is
    # followed until it reaches one it does know.
    state = _STATES.get(str(task.get("status")), RemoteState.RUNNING)
    subtasks = [s for s in task.get("subtasks") or [] if isinstance(s, dict)]
    status = RemoteStatus(state)
    if state is RemoteState.FAILED:
        reasons = [s["fail_msg"] for s in subtasks if isinstance(s.get("fail_msg"), str) and s["fail_msg"]]
        # Sibling subtasks of a failed one say "other subtask failed": the root cause is elsewhere.
        reason = next((r for r in reasons if r != "other subtask failed"), reasons[0] if reasons else None)
        status.error = sanitise(reason, secrets) if reason else "the cloud reported the task failed"
    elif state in (RemoteState.QUEUED, RemoteState.RUNNING):
        status.progress = _progress(subtasks)
        # multi_stage tasks have several subtasks; the first active one says where the task is.
        for sub in subtasks:
            if sub.get("status") not in ("PENDING", "RUNNING"):
                continue
            order = sub.get("estimated_pending_order")
            if status.queue_position is None and isinstance(order, int):
                status.queue_position = order
            pending = _number(sub.get("estimated_pending_secs"))
            # With no worker on the queue the cloud divides by 1e-7 and "estimates" years.
            if status.pending_seconds is None and pending is not None and sub.get("ready_worker_count"):
                status.pending_seconds = pending
            running = _number(sub.get("estimated_running_secs"))
            # Until a worker has finished a task, the running "estimate" is the queue's timeout
            # (3600 s): a placeholder, not a figure to show anyone.
            if status.running_seconds is None and running is not None and running < _RUNNING_TIMEOUT:
                status.running_seconds = running
    return status


# A running stage's share, guessed from its time so far against the average, stops here: only
# the cloud's SUCCEED makes a stage whole.
_MAX_GUESSED_SHARE = 0.95


def _progress(subtasks: list[dict]) -> float | None:
    """How far a task has got, 0 to 1, from what the cloud reports, or None when it says nothing.

    The cloud has no percentage or step counter (cloud.md, "Progress"). What it has: which stages
    of a multi_stage task (text encoder, DiT, VAE decoder) have finished, and for a running stage
    its seconds so far (`elapses["RUNNING-"]`) and the queue's measured average run
    (`estimated_running_secs`, once a worker has finished a task; before that the 3600 s
    timeout, a placeholder that says nothing)."""
    if not subtasks:
        return None
    done, said = 0.0, len(subtasks) > 1
    for sub in subtasks:
        if sub.get("status") in ("SUCCEED", 4):
            done += 1
        elif sub.get("status") == "RUNNING":
            elapses = sub.get("elapses")
            ran = _number(elapses.get("RUNNING-")) if isinstance(elapses, dict) else None
            average = _number(sub.get("estimated_running_secs"))
            if ran is not None and average and 0 < average < _RUNNING_TIMEOUT:
                done += min(max(ran, 0.0) / average, _MAX_GUESSED_SHARE)
                said = True
    return done / len(subtasks) if said else None
