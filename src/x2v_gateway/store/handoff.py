"""Threads that run the store's blocking calls for the event loop, handed over cheaply."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
# What a call gave: (True, its result) or (False, the exception it raised).
Outcome = tuple[bool, Any]


def _settle(future: asyncio.Future, ok: bool, value: Any) -> None:
    if future.done():  # the awaiting task was cancelled meanwhile
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


class Handoff:
    """`threads` threads that run functions for the event loop, in the order they are given.

    What `loop.run_in_executor` does, without its two futures per call: a `ThreadPoolExecutor`
    makes a `concurrent.futures.Future` (with a `Condition` and an `RLock`) and chains it to an
    asyncio future, which a profile of `GET /api/v1/jobs/{id}` under load put at 8 % of the event
    loop's time. Here a call is a tuple in a queue and one asyncio future, settled from the thread
    with `call_soon_threadsafe`. A call whose awaiting task was cancelled before a thread took it
    is skipped, as the executor skips it. Threads start with the first call.

    The threads are daemons: `close()` (the store's, when the gateway stops) runs what was
    given and ends them; a process that exits without it loses only calls nobody can await.

    With `together`, a thread takes the calls waiting when it comes for one, up to `most`, and
    hands them to `together` at once, which runs them (the SQLite writer: one transaction for
    all of them) and gives back each one's outcome, in order.
    """

    def __init__(self, threads: int, name: str, *,
                 together: Callable[[list[Callable[..., Any]]], list[Outcome]] | None = None,
                 most: int = 1) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[..., Any], asyncio.Future, asyncio.AbstractEventLoop] | None]
        self._calls = queue.SimpleQueue()
        self._together, self._most = together, most if together is not None else 1
        self._size = threads
        self._name = name
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def run(self, fn: Callable[..., T]) -> asyncio.Future[T]:
        """`fn()` on one of the threads (with `together`, what it makes of `fn`); await the
        future for its result."""
        if not self._threads:
            self._start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._calls.put((fn, future, loop))
        return future

    def _start(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the store is closed")
            if self._threads:
                return
            # The names ThreadPoolExecutor gave them (a connection is known by its thread's).
            threads = [threading.Thread(target=self._work, name=f"{self._name}_{i}", daemon=True)
                       for i in range(self._size)]
            for thread in threads:
                thread.start()
            self._threads = threads

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            calls = [call]
            while len(calls) < self._most:
                try:
                    call = self._calls.get_nowait()
                except queue.Empty:
                    break
                if call is None:  # closing: after these
                    self._calls.put(None)
                    break
                calls.append(call)
            calls = [call for call in calls if not call[1].cancelled()]
            if not calls:
                continue
            try:
                if self._together is not None:
                    outcomes = self._together([fn for fn, _, _ in calls])
                else:
                    outcomes = [(True, calls[0][0]())]
            except BaseException as exc:  # handed to the awaiting tasks, as an executor does
                outcomes = [(False, exc)] * len(calls)
            for (_, future, loop), settled in zip(calls, outcomes, strict=True):
                try:
                    loop.call_soon_threadsafe(_settle, future, *settled)
                except RuntimeError:  # the loop is closed: nobody waits any more
                    pass
            del call, calls, outcomes  # no reference kept while the thread waits

    def close(self) -> None:
        """Run the calls already given, then end the threads."""
        with self._lock:
            self._closed = True
            threads, self._threads = self._threads, []
        for _ in threads:
            self._calls.put(None)
        for thread in threads:
            thread.join()
