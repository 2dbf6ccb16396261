"""The webhook worker: job events into deliveries, deliveries into signed POSTs, retried for hours.

Each round, in one hop to a reader thread, it reads the job events after its cursor whose job has
a webhook (job_events is the durable record of every state change), keeps those the webhook's
filter wants, and builds each message's body (the job as `GET /api/v1/jobs/{id}` shows it). It
then records the new deliveries and moves the cursor in one transaction: a delivery exists, with its stable id and body, before anything is sent, and a crash
at any point only redoes work (at least once, never lost). A pipeline's ends (pipeline_events,
recorded as it moves) are turned into deliveries the same way, after a cursor of their own, in
the same round and transaction. Due deliveries are attempted at most
`X2V_WEBHOOK_CONCURRENCY` at once, each taken with a lease (replicas sharing the store never
attempt one together; one an attempt left unfinished is due again when the lease ends), each
bounded in time (`X2V_WEBHOOK_TIMEOUT`, connecting
included) and in what is read of the answer, so a slow receiver holds one slot and nothing else.
A failed attempt is tried again after `X2V_WEBHOOK_FIRST_RETRY` seconds, then twice as long each
time (with jitter, at most an hour), until `X2V_WEBHOOK_RETRY_HOURS` after the event.

Targets are checked again at each attempt (PublicOnlyTransport): a name that resolved to a public
address when the job was accepted may point inside the network now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec

from .dispatch import Notifier
from .inputs import NotPublic, PublicOnlyTransport
from .metrics import Metrics
from .notify import wait_set
from .pipelines.views import pipeline_views
from .schemas import iso, job_view
from .settings import Settings
from .store import JobStore, JobWebhook, Reads
from .webhooks import (
    BATCH_FINISHED, job_event, message_type, new_message_id, redact, retry_delay, short_error,
    signed_headers,
)

log = logging.getLogger("x2v_gateway.webhooks")

# Job events turned into deliveries per round (a round takes the next ones at once).
EVENTS_PER_ROUND = 200
# What is read of a receiver's answer: its status is all that counts.
MAX_ANSWER_BYTES = 4096
# Rounds are at least this far apart: every job change wakes the worker, and a burst of them
# must not turn into a read of the store per change.
MIN_ROUND_GAP = 0.2
# With nothing due sooner, the worker looks again this often (deliveries recorded by another
# process: none today, but cheap).
IDLE_ROUND_GAP = 2.0
USER_AGENT = "x2v-gateway-webhooks"
# Due deliveries looked at per round to fill the free slots, the most overdue first (those to a
# receiver at its share of the slots are passed over by URL before this window is cut).
DUE_WINDOW = 200
# A delivery taken for an attempt is due again this long after the attempt's timeout, should the
# attempt never be recorded (the gateway killed meanwhile).
LEASE_MARGIN = 5.0


class WebhookWorker:
    """Turns job events into signed webhook deliveries and makes them; started and stopped with
    the gateway."""

    def __init__(
        self, settings: Settings, store: JobStore, notifier: Notifier, metrics: Metrics,
        *, transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`transport`: how attempts reach receivers (default: public addresses only, unless
        X2V_PRIVATE_URLS; a test gives one that resolves names its own way)."""
        self.settings = settings
        self.store = store
        self.notifier = notifier
        self.metrics = metrics
        self.http = httpx.AsyncClient(
            # The whole attempt is bounded by asyncio.timeout below; these bound each step.
            timeout=settings.webhook_timeout,
            follow_redirects=False,  # a redirect is an answer that is not 2xx: retried, never followed
            transport=transport or (None if settings.private_urls else PublicOnlyTransport()),
            headers={"user-agent": USER_AGENT},
        )
        self._inflight: dict[str, asyncio.Task[None]] = {}
        # Delivery id -> (its receiver, its URL), for those in flight.
        self._targets: dict[str, tuple[str, str]] = {}
        self._changed = asyncio.Event()  # a job changed: new events to record, maybe
        self._due = asyncio.Event()  # deliveries recorded, or a slot freed: attempt what is due
        self._cursor: int | None = None  # the cursor as last written
        self._pipeline_cursor: int | None = None  # the pipeline events' one
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        changes = self.notifier.subscribe()
        self._tasks = [
            asyncio.create_task(self._record_loop(), name="webhooks-record"),
            asyncio.create_task(self._send_loop(), name="webhooks-send"),
            asyncio.create_task(self._listen(changes), name="webhooks-listen"),
        ]

    async def stop(self) -> None:
        # Attempts cut short stay due: the next start makes them again once their lease ends.
        for task in [*self._tasks, *self._inflight.values()]:
            task.cancel()
        for task in [*self._tasks, *self._inflight.values()]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.http.aclose()

    async def _listen(self, changes: asyncio.Queue[str]) -> None:
        try:
            while True:
                await changes.get()
                self._changed.set()
        finally:
            self.notifier.unsubscribe(changes)

    async def _record_loop(self) -> None:
        while True:
            more = False
            try:
                more = await self.record()
            except Exception:  # the store busy, a bug: the next round tries again
                log.exception("recording webhook deliveries failed")
            if more:  # a backlog (a batch finished, a restart): on at once
                await asyncio.sleep(0)
                continue
            await asyncio.sleep(MIN_ROUND_GAP)
            await wait_set(self._changed, IDLE_ROUND_GAP)
            self._changed.clear()

    async def _send_loop(self) -> None:
        while True:
            delay = IDLE_ROUND_GAP
            try:
                delay = await self.send()
            except Exception:
                log.exception("starting webhook deliveries failed")
            await wait_set(self._due, delay)
            self._due.clear()

    async def round(self) -> None:
        """Record what new job events make, then start what is due (the two loops' work, once)."""
        await self.record()
        await self.send()

    async def record(self) -> bool:
        """Turn new job events into deliveries; True when more events wait."""
        found = await self.store.read(_read_round)
        if found.deliveries or found.cursor != self._cursor or found.pipeline_cursor != self._pipeline_cursor:
            await self.store.record_deliveries(found.deliveries, found.cursor, found.pipeline_cursor)
            self._cursor, self._pipeline_cursor = found.cursor, found.pipeline_cursor
        if found.deliveries:
            self._due.set()
        return found.more

    async def send(self) -> float:
        """Start due deliveries in the free slots; the seconds until the next one is due."""
        free = self.settings.webhook_concurrency - len(self._inflight)
        if free > 0 and await self._start(time.time(), free):
            return 0.0  # some taken: maybe more are due, for the slots left
        next_at = await self.store.read(lambda r: r.next_delivery_at())
        if next_at is None or next_at <= time.time():
            # Nothing pending, or what is due waits for a slot (all taken, or its receiver's
            # share): a finished attempt wakes this loop before then.
            return IDLE_ROUND_GAP
        return min(IDLE_ROUND_GAP, next_at - time.time())

    async def _start(self, now: float, free: int) -> int:
        """Take due deliveries for the free slots, at most half of all slots per receiver (so a
        slow one leaves the others theirs), with a lease (past it, one an attempt left
        unfinished is due again), and attempt each, signed with its key's secrets; how many
        were taken."""
        per_target = max(1, self.settings.webhook_concurrency // 2)
        busy = Counter(target for target, _ in self._targets.values())
        # A receiver at its share: its messages are passed over in the store, not read.
        full = {url for target, url in self._targets.values() if busy[target] >= per_target}
        due = await self.store.read(lambda r: r.due_deliveries(now, DUE_WINDOW, full))
        chosen = []
        for delivery_id, url in due:
            target = _target(url)
            if len(chosen) < free and delivery_id not in self._inflight and busy[target] < per_target:
                busy[target] += 1
                chosen.append(delivery_id)
        lease = now + self.settings.webhook_timeout + LEASE_MARGIN
        rows = await self.store.claim_deliveries(chosen, now, lease)
        if not rows:
            return 0
        keys = {row["key_id"] for row in rows if row["key_id"]}
        secrets = await self.store.read(lambda r: {key: r.webhook_secrets(key) for key in keys})
        for row in rows:
            task = asyncio.create_task(self._attempt(row, secrets.get(row["key_id"] or "", [])))
            self._inflight[row["id"]] = task
            self._targets[row["id"]] = (_target(row["url"]), row["url"])
            task.add_done_callback(lambda _, key=row["id"]: self._done(key))
        return len(rows)

    def _done(self, delivery_id: str) -> None:
        self._inflight.pop(delivery_id, None)
        self._targets.pop(delivery_id, None)
        self._due.set()  # a slot is free

    async def _attempt(self, row: dict[str, Any], secrets: list[str]) -> None:
        """One attempt at one delivery, and its outcome recorded."""
        url, started = row["url"], time.time()
        status, error = None, None
        if not secrets:
            error = "the key has no webhook signing secret (make one: POST /api/v1/me/webhook-secret)"
        else:
            body = row["payload"].encode()
            headers = signed_headers(secrets, row["id"], started, body)
            try:
                async with asyncio.timeout(self.settings.webhook_timeout):
                    async with self.http.stream("POST", url, content=body, headers=headers) as answer:
                        status = answer.status_code
                        read = 0
                        async for chunk in answer.aiter_raw():
                            read += len(chunk)
                            if read >= MAX_ANSWER_BYTES:
                                break
            except (TimeoutError, httpx.TimeoutException):
                status, error = None, f"no answer within {self.settings.webhook_timeout:g} s"
            except NotPublic as exc:
                error = f"{str(exc).split(';')[0]}; webhooks go to public addresses only"
            except httpx.HTTPError as exc:
                error = short_error(exc, url)
        delivered = status is not None and 200 <= status < 300
        if status is not None and not delivered:
            error = f"answered {status}"
        next_at = None
        if not delivered:
            next_at = time.time() + retry_delay(row["attempts"] + 1, self.settings.webhook_first_retry)
            if next_at > row["created_at"] + self.settings.webhook_retry_hours * 3600:
                next_at = None
                log.warning("webhook %s (%s to %s) given up after %d attempts: %s", row["id"],
                            row["type"], redact(url), row["attempts"] + 1, error)
        await self.store.delivery_attempted(
            row["id"], at=started, status=status, error=error, next_attempt_at=next_at,
        )
        outcome = "delivered" if delivered else "failed" if next_at is not None else "given_up"
        self.metrics.webhook_attempts.labels(outcome).inc()


class _Round(msgspec.Struct):
    deliveries: list[dict[str, Any]]
    cursor: int
    pipeline_cursor: int
    more: bool
    next_at: float | None


def _read_round(r: Reads) -> _Round:
    """On a reader thread: the new events' deliveries, and when the next recorded one is due."""
    events, cursor = r.webhook_events(EVENTS_PER_ROUND)
    ends, pipeline_cursor = r.pipeline_webhook_events(EVENTS_PER_ROUND)
    more = len(events) == EVENTS_PER_ROUND or len(ends) == EVENTS_PER_ROUND
    deliveries = _deliveries(r, events) + _pipeline_deliveries(r, ends)
    return _Round(deliveries, cursor, pipeline_cursor, more, r.next_delivery_at())


def _deliveries(r: Reads, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The deliveries these job events make, each with the body every attempt will send."""
    found: list[dict[str, Any]] = []
    last_of_batch: dict[tuple[str, str | None], int | None] = {}
    now = time.time()

    def add(event: dict[str, Any], kind: str, hook: JobWebhook, data: Any) -> None:
        body = {"type": message_type(kind), "timestamp": iso(event["at"]), "data": data}
        found.append({
            "id": new_message_id(), "event_id": event["id"], "type": message_type(kind),
            "job_id": event["job_id"], "url": hook.url, "key_id": hook.key_id,
            "payload": msgspec.json.encode(body).decode(), "created_at": now,
        })

    for event in events:
        kind = job_event(event["state"], event["detail"])
        hook: JobWebhook = event["webhook"]
        if kind is not None and kind in hook.events:
            job = r.get(event["job_id"])
            if job is not None:
                view = job_view(
                    job, blob_sizes=r.blob_sizes(job.inputs.values()), queue_position=r.queue_position(job),
                    events=r.events(job.id),
                )
                add(event, kind, hook, view)
        if event["batch_id"] and event["state"] in ("succeeded", "failed", "cancelled"):
            batch = (event["batch_id"], event["owner"])
            if batch not in last_of_batch:
                last_of_batch[batch] = r.batch_last_event(*batch)
            # Only the batch's last event: jobs that finished together make one message.
            if last_of_batch[batch] == event["id"]:
                data = _batch_data(r, *batch)
                for batch_hook in r.batch_webhooks(*batch):
                    add(event, BATCH_FINISHED, batch_hook, data)
    return found


def _pipeline_deliveries(r: Reads, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The deliveries these pipeline ends make, each with the pipeline as
    `GET /api/v1/pipelines/{id}` shows it (its steps and their jobs) when it was recorded."""
    found: list[dict[str, Any]] = []
    now = time.time()
    for event in events:
        kind = f"pipeline.{event['state']}"
        hook: JobWebhook = event["webhook"]
        pipeline = r.pipeline(event["pipeline_id"]) if kind in hook.events else None
        if pipeline is None:
            continue
        body = {"type": kind, "timestamp": iso(event["at"]), "data": pipeline_views(r, [pipeline])[0]}
        found.append({
            "id": new_message_id(), "event_id": event["id"], "type": kind, "pipeline_id": pipeline.id,
            "url": hook.url, "key_id": hook.key_id, "payload": msgspec.json.encode(body).decode(),
            "created_at": now,
        })
    return found


def _batch_data(r: Reads, batch_id: str, owner: str | None) -> dict[str, Any]:
    counts = r.batch_counts(batch_id, owner=owner)
    record = r.batch(batch_id)
    name = record.get("name") if record and record.get("owner") == owner else None
    return {"batch_id": batch_id, "name": name, "jobs": sum(counts.values()), "counts": counts}


def _target(url: str) -> str:
    """The receiver a URL names (its host and port), whose share of the slots is bounded."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
