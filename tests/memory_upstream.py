"""An upstream that lives in memory: the `Upstream` protocol and nothing else, for tests of the
scheduler that need no HTTP server, no process and no video (as httpx's `MockTransport` is for
its clients).

Each node runs `capacity` tasks at once, in the order they arrive; a task runs for `seconds`
(or until the test ends it with `finish`). A run ends as a failure unless the test says
otherwise: the scheduler only needs the slot back, and a failure frees it without a video to
fetch and check.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

from x2v_gateway.upstream.base import (
    Capabilities, NodeHealth, RemoteState, RemoteStatus, SubmitRequest, Unavailable,
    UnknownTask, Upstream,
)


@dataclass
class MemoryTask:
    task_id: str
    job_id: str
    task: str
    arrived: float
    started: float | None = None
    ended: float | None = None
    state: RemoteState = RemoteState.QUEUED
    error: str | None = None


@dataclass
class MemoryUpstream(Upstream):
    """One node in memory. `log` holds every task it was given, in order; `most_running` is the
    largest number of our tasks it ever held at once (queued or running)."""

    name: str
    tasks: frozenset[str] = frozenset({"t2v"})
    slots: int = 2
    capacity: int = 1
    seconds: float | None = None  # None: runs until `finish`
    kind: str = "memory"
    base_url: str = "memory://"
    capabilities: Capabilities = field(default_factory=lambda: Capabilities(chooses_task_id=True))
    down: bool = False
    log: list[MemoryTask] = field(default_factory=list)
    most_held: int = 0
    status_calls: int = 0

    def __post_init__(self) -> None:
        self.board: dict[str, MemoryTask] = {}
        self._ids = itertools.count()

    # -- what a test looks at and does ----------------------------------------------------------

    def held(self) -> list[MemoryTask]:
        """Tasks queued or running here."""
        self._advance()
        return [t for t in self.board.values() if t.state in (RemoteState.QUEUED, RemoteState.RUNNING)]

    def finish(self, task_id: str, state: RemoteState = RemoteState.FAILED) -> None:
        task = self.board[task_id]
        task.state, task.ended = state, time.monotonic()
        task.error = "ended by the test" if state == RemoteState.FAILED else None
        self._advance()

    @property
    def jobs(self) -> list[str]:
        """Job ids in the order they were submitted here."""
        return [t.job_id for t in self.log]

    def _advance(self) -> None:
        """Runs that are due end; queued tasks start while a slot of the GPU is free."""
        now = time.monotonic()
        running = [t for t in self.board.values() if t.state == RemoteState.RUNNING]
        for task in running:
            if self.seconds is not None and task.started is not None and now >= task.started + self.seconds:
                task.state, task.ended, task.error = RemoteState.FAILED, task.started + self.seconds, "ran"
        running = [t for t in running if t.state == RemoteState.RUNNING]
        for task in self.board.values():
            if len(running) >= self.capacity:
                break
            if task.state == RemoteState.QUEUED:
                task.state, task.started = RemoteState.RUNNING, now
                running.append(task)

    def _check_up(self) -> None:
        if self.down:
            raise Unavailable(f"{self.name} is down")

    # -- the protocol ---------------------------------------------------------------------------

    async def submit(self, request: SubmitRequest) -> str:
        self._check_up()
        if request.task not in self.tasks:
            raise AssertionError(f"{self.name} got a {request.task} job it does not run")
        task = MemoryTask(request.task_id or f"{self.name}-{next(self._ids)}", request.job_id,
                          request.task, time.monotonic())
        self.board[task.task_id] = task
        self.log.append(task)
        self._advance()
        self.most_held = max(self.most_held, len(self.held()))
        return task.task_id

    async def poll(self, task_ids: list[str]) -> dict[str, RemoteStatus | None]:
        self._check_up()
        self.status_calls += 1
        self._advance()
        statuses: dict[str, RemoteStatus | None] = {}
        for task_id in task_ids:
            task = self.board.get(task_id)
            statuses[task_id] = None if task is None else RemoteStatus(task.state, error=task.error)
        return statuses

    async def cancel(self, task_id: str) -> None:
        self._check_up()
        task = self.board.get(task_id)
        if task is not None and task.state in (RemoteState.QUEUED, RemoteState.RUNNING):
            task.state, task.ended = RemoteState.CANCELLED, time.monotonic()
            self._advance()

    async def fetch_result(self, task_id: str, dest: Path, *, kind: str = "video") -> None:
        raise UnknownTask(f"{self.name} keeps no videos")

    async def find_task(self, request: SubmitRequest) -> str | None:
        self._check_up()
        return request.task_id if request.task_id in self.board else None

    async def health(self) -> NodeHealth:
        self.status_calls += 1
        if self.down:
            return NodeHealth(reachable=False, detail="down")
        return NodeHealth(reachable=True, active=len(self.held()))

    async def learn_model(self) -> str | None:
        return None

    async def aclose(self) -> None:
        pass
