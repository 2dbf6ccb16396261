"""Measured run times per node and task type: what ETAs, routing and following are computed from."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable

# Run times kept per node and task type; their median is the node's typical time.
TIMINGS_KEPT = 20
_UNKNOWN = object()  # a median not computed yet (None: no runs to compute it from)


class Timings:
    """Measured run times per node and task type: what ETAs and routing are computed from.

    Read by dispatch rounds on a reader thread while the event loop records: a lock keeps a
    record from changing the dicts under a read that walks them."""

    def __init__(self) -> None:
        self._runs: dict[tuple[str, str], deque[float]] = {}
        self._typical: dict[tuple[str, str], float | None] = {}
        self._lock = threading.Lock()

    def record(self, node: str, task: str, seconds: float) -> None:
        if seconds <= 0:
            return
        with self._lock:
            self._runs.setdefault((node, task), deque(maxlen=TIMINGS_KEPT)).append(seconds)
            self._typical.pop((node, task), None)
            self._typical.pop(("", task), None)

    def load(self, runs: Iterable[tuple[str, str, float]]) -> None:
        """Record the run times of recent history (node, task type, seconds; oldest first), and
        each node's median of them: the first dispatch round after a start weighs every node."""
        for node, task, seconds in runs:
            self.record(node, task, seconds)
        with self._lock:
            for key, kept in self._runs.items():
                self._typical[key] = _median(sorted(kept))

    def typical(self, node: str, task: str) -> float | None:
        """The median run time of this task type on this node; else on any node; else None."""
        with self._lock:
            return self._typical_of(node, task)

    def typicals(self, tasks_of: dict[str, Iterable[str]]) -> dict[str, dict[str, float | None]]:
        """`typical` of each node's task types, by node, under one hold of the lock (a dispatch
        round weighs every free node)."""
        with self._lock:
            return {node: {task: self._typical_of(node, task) for task in tasks} for node, tasks in tasks_of.items()}

    def _typical_of(self, node: str, task: str) -> float | None:
        # A median is kept until a run of its task type is recorded (`record`), then computed
        # again when next asked: a dispatch round asks for every free node's.
        typical = self._typical
        if node:  # "": any node's
            found = typical.get((node, task), _UNKNOWN)
            if found is _UNKNOWN:
                runs = self._runs.get((node, task))
                found = typical[(node, task)] = _median(sorted(runs)) if runs else None
            if found is not None:
                return found
        found = typical.get(("", task), _UNKNOWN)
        if found is _UNKNOWN:
            runs = sorted(s for (_, t), d in self._runs.items() if t == task for s in d)
            found = typical[("", task)] = _median(runs) if runs else None
        return found

    def quickest(self, node: str, task: str) -> float | None:
        """The shortest recent run of this task type on this node (else on any node), or None:
        the earliest a run of it can be expected to end, for whoever waits for that end."""
        with self._lock:
            runs = self._runs.get((node, task)) or [
                s for (_, t), d in self._runs.items() if t == task for s in d
            ]
            return min(runs) if runs else None

    def recent(self, node: str) -> dict[str, list[float]]:
        with self._lock:
            return {task: list(runs) for (n, task), runs in self._runs.items() if n == node and runs}

    def forget(self, node: str) -> None:
        with self._lock:
            for key in [k for k in self._runs if k[0] == node]:
                del self._runs[key]
            self._typical.clear()


def _median(ordered: list[float]) -> float:
    """`statistics.median` of a sorted list, without its checks and its copy: `load` computes
    one per node at a start."""
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
