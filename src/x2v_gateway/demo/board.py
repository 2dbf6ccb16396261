"""The demo node's task board: every task it knows, in memory only, as upstream's TaskManager.

Upstream keeps at most 1000 tasks and evicts the oldest finished ones beyond that; it counts
pending + processing tasks against `max_queue_size`; cancelling a running task does not stop it.
"""

from __future__ import annotations

import enum
import logging
import secrets
import string
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

log = logging.getLogger(__name__)

# Upstream's TaskManager keeps this many tasks and evicts the oldest finished ones beyond it.
MAX_TASKS_KEPT = 1000


def new_task_id() -> str:
    """Upstream's generated id: five groups of four [A-Z0-9]."""
    alphabet = string.ascii_uppercase + string.digits
    return "-".join("".join(secrets.choice(alphabet) for _ in range(4)) for _ in range(5))


class TaskStatus(enum.StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


_ACTIVE = (TaskStatus.PENDING, TaskStatus.PROCESSING)


@dataclass(slots=True, eq=False)
class Task:
    task_id: str
    # The validated request fields the client set (JSON) or every form field (form).
    request: dict[str, Any]
    save_result_path: str
    output: str = "video"  # or "image": what its route makes (`<id>.mp4` or `<id>.png`)
    status: TaskStatus = TaskStatus.PENDING
    start_time: datetime = field(default_factory=datetime.now)
    end_time: datetime | None = None
    error: str | None = None
    error_type: str | None = None
    # Tasks the node held (pending or running) once this one was accepted, itself included:
    # journalled, so a test can tell whether the node was ever given more than its slots.
    held: int = 0
    # The sync and OpenAI image routes (upstream's prefer_memory_result): the PNG is kept here,
    # nothing is written to outputs/.
    in_memory: bool = False
    result_png: bytes | None = None

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


class Refused(Exception):
    """A submission upstream answers with 503 (queue full, duplicate task id)."""


class TaskBoard:
    """Every task the node knows, in memory only; mirrors upstream's TaskManager."""

    def __init__(self, max_queue_size: int) -> None:
        self.max_queue_size = max_queue_size
        self._tasks: OrderedDict[str, Task] = OrderedDict()
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        # The task whose inference holds the worker, cancelled or not ("busy" until it ends).
        self._current: str | None = None
        self._total = self._completed = self._failed = 0

    def create(
        self, task_id: str, request: dict[str, Any], save_result_path: str, output: str = "video",
        *, in_memory: bool = False,
    ) -> Task:
        with self._wakeup:
            if task_id in self._tasks:
                raise Refused(f"Task ID {task_id} already exists")
            if self._active_count() >= self.max_queue_size:
                raise Refused(f"Task queue is full (max {self.max_queue_size} tasks)")
            task = Task(task_id=task_id, request=request, save_result_path=save_result_path, output=output,
                        in_memory=in_memory)
            self._tasks[task_id] = task
            task.held = self._active_count()
            self._total += 1
            self._evict_old_tasks()
            self._wakeup.notify()
            return task

    def next_task(self, timeout: float) -> Task | None:
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

    def complete(self, task: Task, save_result_path: str) -> None:
        with self._lock:
            # Also for a task cancelled while running: upstream flips it to completed and
            # keeps error = "Task cancelled by user".
            if self._end(task, TaskStatus.COMPLETED):
                task.save_result_path = save_result_path
                self._completed += 1

    def fail(self, task: Task, error: str, error_type: str | None) -> None:
        with self._lock:
            if self._end(task, TaskStatus.FAILED):
                task.error = error
                task.error_type = error_type
                self._failed += 1

    def _end(self, task: Task, status: TaskStatus) -> bool:
        """Give a task its final status; False if it was evicted meanwhile."""
        if task.task_id not in self._tasks:
            log.warning("task %s was evicted before it %s", task.task_id, status.value)
            return False
        task.status = status
        task.end_time = datetime.now()
        return True

    def release(self, task: Task) -> None:
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

    def result_png(self, task_id: str) -> bytes | None:
        """The PNG an in-memory task made, once it completed."""
        with self._lock:
            task = self._tasks.get(task_id)
            return task.result_png if task and task.status == TaskStatus.COMPLETED else None

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

    def _first_pending(self) -> Task | None:
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

