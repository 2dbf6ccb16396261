"""The job-change Notifier: who waits on a job (`?wait=`) is woken, and listeners (the
dashboard's SSE feed, the API's event streams) hear of every change."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator


async def wait_set(event: asyncio.Event, timeout: float) -> bool:
    """Wait until `event` is set or `timeout` seconds pass; whether it was set.

    Not asyncio.wait_for: on Python 3.11, when the event is set in the same loop turn as the
    waiting task is cancelled, wait_for returns and the cancel is lost, so a loop that waits
    like this may never stop (seen as a gateway hanging on shutdown). asyncio.timeout keeps it.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    return event.is_set()


class Notifier:
    """Wakes whoever waits on a job (`?wait=`), and streams job changes to subscribers (SSE)."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._subscribers: set[asyncio.Queue[str]] = set()
        # Wall time of the last change: a page rendered before it, whose stream connects after
        # it, missed that change (the dashboard's jobs list asks).
        self.changed_at = 0.0

    def changed(self, job_id: str) -> None:
        self.changed_at = time.time()
        for event in self._waiters.get(job_id, ()):
            event.set()
        for queue in self._subscribers:
            if queue.qsize() < 10_000:  # a stalled subscriber must not grow without bound
                queue.put_nowait(job_id)

    async def wait(self, job_id: str, timeout: float) -> None:
        event = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(event)
        try:
            await wait_set(event, timeout)
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[job_id]

    def subscribe(self) -> asyncio.Queue[str]:
        queue: asyncio.Queue[str] = asyncio.Queue()
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[str]) -> None:
        self._subscribers.discard(queue)

    @contextlib.contextmanager
    def listen(self) -> Iterator[Changes]:
        """Every change from now on, until the block ends: `await changes.next(...)`.

        An SSE stream listens *before* it reads what it sends first, so that nothing changed
        between that read and the first wait is missed."""
        queue = self.subscribe()
        try:
            yield Changes(queue)
        finally:
            self.unsubscribe(queue)


class Changes:
    """The job ids a listener has not seen yet, taken a burst at a time."""

    def __init__(self, queue: asyncio.Queue[str]) -> None:
        self._queue = queue

    async def next(self, quiet: float, gather: float, not_before: float = 0.0) -> set[str]:
        """The next changes: after the first, others are gathered for `gather` seconds (and until
        the monotonic time `not_before`), so a burst of changes is one answer. An empty set when
        `quiet` seconds pass with none: the time for an SSE keep-alive."""
        try:
            async with asyncio.timeout(quiet):  # not wait_for: see wait_set
                first = await self._queue.get()
        except TimeoutError:
            return set()
        await asyncio.sleep(max(gather, not_before - time.monotonic()))
        ids = {first}
        while not self._queue.empty():
            ids.add(self._queue.get_nowait())
        return ids
