"""Event streams for API clients: a job's, a batch's or a key's state changes as Server-Sent Events.

Every state change of a job is a row of the store's durable timeline (`job_events`), whose id
only grows: it is each `state` event's SSE id. A stream first sends what came after the client's
`Last-Event-ID` (a reconnection misses nothing, even across a gateway restart), then follows the
store live, woken by the Notifier (nothing polls): each wake-up reads the events after the last
one sent, so a change is sent once, in order, whether it was replayed or seen live.

Queue position and progress are not history: `progress` events carry no id, so a reconnection
neither replays them nor moves the client's Last-Event-ID. A job's stream ends after its final
state; a batch's once each of its jobs has finished; a key's stream runs until the client leaves.
A stream with nothing left to send answers 204, which tells an EventSource to stop reconnecting.
"""

from __future__ import annotations

import json
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from litestar.response import ServerSentEventMessage

from .auth import Caller
from .dispatch import Dispatcher
from .notify import Notifier
from .reads import read_batch_summary, visible
from .schemas import MAX_SQLITE_INT, ApiError, QueueInfo, iso
from .store import TERMINAL, Job, JobStore, Reads

# Changes gathered for a moment and sent together (as the dashboard's feed does).
GATHER_SECONDS = 0.25
# Events read from the store per query: a long replay is sent a page at a time.
PAGE = 500
# Events read and sent per turn of a long replay (a reconnection after a day away, say).
REPLAY_PART = 10 * PAGE
# Changed jobs looked at per wake-up for `progress` events: they are only hints, and a burst of
# thousands of changes must not cost every open stream thousands of reads.
PROGRESS_JOBS = 200
# How long an EventSource waits before it reconnects after the stream breaks (milliseconds).
RETRY_MS = 3000


def last_event_id(value: str | None) -> int | None:
    """The `Last-Event-ID` header as an event id; 400 naming it when it is not one given out here."""
    if value is None or value.strip() == "":
        return None
    value = value.strip()
    if not (value.isascii() and value.isdigit() and len(value) <= 19 and int(value) <= MAX_SQLITE_INT):
        raise ApiError(400, "Last-Event-ID must be the id of an event this gateway sent (digits)", "Last-Event-ID")
    return int(value)


class StreamSlots:
    """Open streams per API key, at most `limit` each: one more is refused with 429."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: Counter[str] = Counter()

    def open_for(self, key_id: str) -> int:
        return self._open[key_id]

    def take(self, key_id: str) -> Callable[[], None]:
        """A slot for `key_id` (429 when it holds `limit`); call what it returns to give it back."""
        if self._open[key_id] >= self.limit:
            raise ApiError(
                429, f"this key already has {self.limit} event streams open; close one first", "events",
            )
        self._open[key_id] += 1
        given_back = False

        def give_back() -> None:
            nonlocal given_back
            if not given_back:
                given_back = True
                self._open[key_id] -= 1
                if self._open[key_id] <= 0:
                    del self._open[key_id]

        return give_back


@dataclass
class Scope:
    """What one stream follows: a job, a batch, or every job of the caller (`owner`; None: all)."""

    who: Caller
    job_id: str | None = None
    batch_id: str | None = None

    @property
    def owner(self) -> str | None:
        return self.who.sees

    def events_after(self, r: Reads, after: int) -> list[dict[str, Any]]:
        return r.events_after(after, job_id=self.job_id, batch_id=self.batch_id, owner=self.owner, limit=PAGE)

    def holds(self, job: Job) -> bool:
        if not self.who.may_touch(job.owner):
            return False
        if self.job_id is not None:
            return job.id == self.job_id
        return self.batch_id is None or job.batch_id == self.batch_id

    def finished(self, r: Reads) -> bool:
        """Nothing more will happen here (NotFound for a job or batch this caller cannot see)."""
        if self.job_id is not None:
            return visible(r.get(self.job_id), self.job_id, self.who).finished
        if self.batch_id is not None:
            summary = read_batch_summary(r, self.batch_id, self.who)
            return summary.left == 0
        return False


@dataclass
class EventStream:
    """One client's stream: replay after `after`, then live until the scope has finished."""

    scope: Scope
    store: JobStore
    notifier: Notifier
    dispatcher: Dispatcher
    keepalive: float
    after: int
    # What each job's last `progress` event said: unchanged, it is not sent again.
    _progress: dict[str, Any] = field(default_factory=dict)

    async def opening(self) -> bool:
        """Check what the client asked for (4xx), and whether anything is left to send (False: 204)."""

        def check(r: Reads) -> bool:
            finished = self.scope.finished(r)
            return not finished or bool(self.scope.events_after(r, self.after))

        return await self.store.read(check)

    async def messages(self, give_back: Callable[[], None]) -> AsyncIterator[ServerSentEventMessage]:
        try:
            with self.notifier.listen() as changes:  # before the replay: nothing falls between
                yield ServerSentEventMessage(data=None, comment="x2v-gateway events", retry=RETRY_MS)
                ended = False
                ids: set[str] = {self.scope.job_id} if self.scope.job_id else set()
                while not ended:
                    # What the scope was before the events are read: if it had finished then, every
                    # event up to its end is among them.
                    finished, (events, more) = await self.store.read(
                        lambda r: (self.scope.finished(r), self._all_after(r))
                    )
                    for event in events:
                        yield _state_message(event)
                        self.after = event["id"]
                    if more:
                        continue  # a long replay: its next part at once
                    if finished:
                        break
                    for message in await self._progress_messages(ids):
                        yield message
                    ids = await changes.next(self.keepalive, GATHER_SECONDS)
                    if not ids:
                        yield ServerSentEventMessage(data=None, comment="keep-alive")
                        ended = await self._revoked()
        finally:
            give_back()

    def _all_after(self, r: Reads) -> tuple[list[dict[str, Any]], bool]:
        """The events after the last one sent, up to REPLAY_PART of them; True: there are more.
        A long replay is sent a part at a time, so that memory stays bounded."""
        events, after = [], self.after
        while page := self.scope.events_after(r, after):
            events += page
            after = page[-1]["id"]
            if len(page) < PAGE:
                return events, False
            if len(events) >= REPLAY_PART:
                return events, True
        return events, False

    async def _progress_messages(self, ids: set[str]) -> list[ServerSentEventMessage]:
        """Where the jobs that changed now stand in a queue; for a job's own stream, also when
        others moved (its place in the gateway's queue moves as jobs ahead of it leave)."""
        scope = self.scope
        wanted = [scope.job_id] if scope.job_id else sorted(ids)[:PROGRESS_JOBS]
        if scope.job_id and scope.job_id not in ids:
            last = self._progress.get(scope.job_id)
            if last is None or last["state"] != "queued":
                wanted = []  # another job changed: only a place in the gateway's queue can move
        if not wanted:
            return []

        def read(r: Reads) -> list[tuple[Job, int | None, dict[str, float] | None]]:
            jobs = [job for job in r.jobs_by_id(wanted) if not job.finished and scope.holds(job)]
            positions = r.queue_positions(jobs)
            return [(job, position := positions.get(job.id),
                     self.dispatcher.estimate(r, job, position) if scope.job_id else None) for job in jobs]

        out = []
        found = await self.store.read(read)
        for job_id in ids - {job.id for job, _, _ in found}:
            self._progress.pop(job_id, None)  # finished (or not ours): nothing more to compare
        for job, position, estimate in found:
            if position is not None:
                queue = QueueInfo(position=position, where="gateway", **(estimate or {}))
            elif job.queue_info:
                queue = QueueInfo(where="upstream", **job.queue_info)
            else:
                queue = None
            data = {"job_id": job.id, "state": job.state, "queue": msgspec.to_builtins(queue)}
            if job.started_at is not None:
                data["started_at"] = iso(job.started_at)
            if self._progress.get(job.id) != data:
                self._progress[job.id] = data
                out.append(ServerSentEventMessage(event="progress", data=json.dumps(data)))
        return out

    async def _revoked(self) -> bool:
        """The key was revoked while its stream was open: the stream ends."""
        key_id = self.scope.who.key_id
        key = await self.store.read(lambda r: r.key(key_id))
        return key is not None and key.get("revoked_at") is not None


def _state_message(event: dict[str, Any]) -> ServerSentEventMessage:
    data = {
        "job_id": event["job_id"], "state": event["state"], "detail": event["detail"],
        "at": iso(event["at"]), "batch_id": event["batch_id"], "url": f"/api/v1/jobs/{event['job_id']}",
        "final": event["state"] in TERMINAL,
    }
    return ServerSentEventMessage(event="state", id=str(event["id"]), data=json.dumps(data))


def open_stream(stream: EventStream, slots: StreamSlots) -> AsyncIterator[ServerSentEventMessage]:
    """The stream's messages, holding one of its key's slots until it ends, however it ends."""
    give_back = slots.take(stream.scope.who.key_id)
    messages = stream.messages(give_back)
    # A client that leaves before the first message never runs the generator's `finally`.
    weakref.finalize(messages, give_back)
    return messages
