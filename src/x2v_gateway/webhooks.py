"""Webhooks: what a job's webhook is, how a target is checked, how a message is signed.

A job (or its key, by default) names a URL and the events it wants; each event becomes a
delivery recorded before it is attempted (webhook_worker.py), signed per the Standard Webhooks
specification (https://www.standardwebhooks.com/): `webhook-id` (the delivery's stable id, the
same on every attempt), `webhook-timestamp` (the attempt's time, in seconds) and
`webhook-signature` (`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, one per secret, space
separated). Receivers check it with the `standardwebhooks` package: `Webhook(secret).verify(body,
headers)`.

Secrets are per key, `whsec_` and 24 random bytes in base64: a receiver of one key's webhooks
cannot sign messages another key's receiver would take. A key's secret is shown once, when it is
made; rotating it keeps the previous one signing too for a while, so receivers can switch over.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import random
import secrets
import socket
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from standardwebhooks.webhooks import Webhook

from .inputs import is_public_address
from .schemas import ApiError
from .store import JobStore, JobWebhook

# What a filter may name, and the message type each is sent as.
JOB_EVENTS = ("queued", "started", "succeeded", "failed", "cancelled")
BATCH_FINISHED = "batch.finished"
EVENTS = (*JOB_EVENTS, BATCH_FINISHED)
# A webhook that names no events hears of how each job (and its batch) ended.
DEFAULT_EVENTS = ("succeeded", "failed", "cancelled", BATCH_FINISHED)
# What a pipeline's webhook may name (all of them by default): how the pipeline ended. Its
# steps' jobs send nothing of their own.
PIPELINE_EVENTS = ("pipeline.succeeded", "pipeline.failed", "pipeline.cancelled")
SECRET_PREFIX = "whsec_"
MAX_URL_LENGTH = 2000
# The longest wait between two attempts of one delivery.
MAX_RETRY_GAP = 3600.0
# The job events that put a job in the queue as a new run (a job sent back to the queue by the
# gateway itself, a node full or gone, is no news to its owner).
NEW_RUN_DETAILS = ("accepted", "retry requested")


def message_type(event: str) -> str:
    """`succeeded` -> `job.succeeded`; `batch.finished` and `pipeline.failed` stay."""
    return event if "." in event else f"job.{event}"


def job_event(state: str, detail: str) -> str | None:
    """The webhook event a job's timeline entry (job_events) is, if any."""
    if state in ("succeeded", "failed", "cancelled"):
        return state
    if state == "running":
        return "started"
    if detail.startswith(NEW_RUN_DETAILS):  # queued, or resumed upstream by a retry
        return "queued"
    return None


def parse_events(
    value: str | Iterable[str] | None, field: str = "webhook_events", *,
    among: tuple[str, ...] = EVENTS, default: tuple[str, ...] = DEFAULT_EVENTS,
) -> tuple[str, ...]:
    """A filter as the API takes it (a list, or comma-separated text) -> the events, in order.
    None or empty: the default. (`among`, `default`: a pipeline's.)"""
    names = value.split(",") if isinstance(value, str) else list(value or ())
    names = [n.strip() for n in names if n.strip()]
    if len(names) > len(among) * 2:
        raise ApiError(422, f"{field} names {len(names)} events; there are {len(among)}", field)
    for name in names:
        if name not in among:
            raise ApiError(422, f"{field} must name events among {', '.join(among)}; got {name[:40]!r}", field)
    return tuple(e for e in among if e in names) or default


async def check_url(url: str, *, private_ok: bool, field: str = "webhook_url") -> str:
    """A webhook target as given: http(s), with a host, and (unless X2V_PRIVATE_URLS) one that
    resolves to public addresses only. Checked again at each attempt: DNS can change."""
    url = url.strip()
    if len(url) > MAX_URL_LENGTH:
        raise ApiError(422, f"{field} is longer than {MAX_URL_LENGTH} characters", field)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        raise ApiError(422, f"{field} is not a URL", field) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(422, f"{field} must be an http:// or https:// URL with a host", field)
    if parts.fragment:
        raise ApiError(422, f"{field} must not have a #fragment (it is never sent)", field)
    if not private_ok:
        why = await not_public(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        if why:
            raise ApiError(422, f"{field}: {why}", field)
    return url


async def not_public(host: str, port: int) -> str | None:
    """Why the gateway will not send to this host (None: it will): it does not resolve, or it
    names a private, loopback or link-local address."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        infos = []
    addresses = [info[4][0] for info in infos]
    if not addresses:
        return f"{host} does not resolve"
    if not all(is_public_address(ipaddress.ip_address(a.split("%")[0])) for a in addresses):
        return (f"{host} is a private or local address; the gateway sends webhooks to public"
                " addresses only")
    return None


def redact(url: str) -> str:
    """A URL as it may be shown: without what may be a secret in it (user and password, the
    values of its query)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "(not a URL)"
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    if parts.username is not None or parts.password is not None:
        netloc = "***@" + netloc
    query = urlencode([(k, "***") for k, _ in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def new_secret() -> str:
    """A signing secret: `whsec_` and 24 random bytes, base64 (the Standard Webhooks form)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def new_message_id() -> str:
    return "msg_" + secrets.token_urlsafe(16)


def signed_headers(secrets_: Iterable[str], message_id: str, at: float, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt: one signature per secret (two while a key's
    secret is being rotated, so that a receiver with either accepts it)."""
    when = dt.datetime.fromtimestamp(at, dt.UTC)
    signatures = [Webhook(secret).sign(message_id, when, body) for secret in secrets_]
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(at)),
        "webhook-signature": " ".join(signatures),
        "content-type": "application/json",
    }


def retry_delay(attempts: int, first: float, rand: random.Random | None = None) -> float:
    """Seconds before the next attempt, after `attempts` failed ones: `first`, then doubling, at
    most an hour, each drawn between half and all of it so that deliveries that failed together
    (a receiver down) do not all come back at the same moment."""
    gap = min(MAX_RETRY_GAP, first * 2 ** min(max(attempts - 1, 0), 32))
    return gap * (0.5 + (rand or random).random() / 2)


def short_error(exc: BaseException, url: str) -> str:
    """What went wrong with an attempt, for the job's deliveries list: never the URL's secrets."""
    text = str(exc) or type(exc).__name__
    return text.replace(url, redact(url))[:300]


def describe_webhook(hook: JobWebhook) -> dict[str, Any]:
    """A job's webhook as the API and the dashboard show it."""
    return {"url": redact(hook.url), "events": list(hook.events)}


# How long a key's default webhook, as read, is used without reading it again: a change made
# with the CLI (another process) applies to new jobs within this time, as a revoke does.
KEY_CACHE_SECONDS = 2.0


class JobWebhooks:
    """What a new job's webhook is: the one it names (checked), else its key's default."""

    def __init__(self, store: JobStore, *, private_ok: bool) -> None:
        self.store = store
        self.private_ok = private_ok
        self._keys: dict[str, tuple[float, dict[str, Any] | None]] = {}

    async def for_job(
        self, url: str | None, events: Iterable[str] | None, owner: str | None, *, pipeline: bool = False,
    ) -> JobWebhook | None:
        """The webhook of a job (`pipeline`: a pipeline) `owner` submits with these fields (None:
        it has none). 422 naming the field for a URL the gateway will not send to, or a key with
        no secret."""
        among = PIPELINE_EVENTS if pipeline else EVENTS
        default = PIPELINE_EVENTS if pipeline else DEFAULT_EVENTS
        key = await self._key(owner) if owner else None
        if url is None:
            if key is None or not key["webhook_url"]:
                if events:
                    raise ApiError(422, "webhook_events needs a webhook_url (this key has no default"
                                   " webhook)", "webhook_events")
                return None
            if pipeline and not events:
                # The key's filter names job events: its pipelines hear of the ends it names.
                ends = parse_events(key["webhook_events"])
                chosen = tuple(e for e in PIPELINE_EVENTS if e.split(".")[1] in ends)
                return JobWebhook(key["webhook_url"], chosen, owner) if chosen else None
            chosen = parse_events(events or key["webhook_events"], among=among, default=default)
            return JobWebhook(key["webhook_url"], chosen, owner)
        checked = await check_url(url, private_ok=self.private_ok)
        if key is None or not key["has_webhook_secret"]:
            raise ApiError(
                422, "this key has no webhook signing secret yet: POST /api/v1/me/webhook-secret"
                " makes one (shown once)", "webhook_url",
            )
        return JobWebhook(checked, parse_events(events, among=among, default=default), owner)

    async def _key(self, key_id: str) -> dict[str, Any] | None:
        now = time.monotonic()
        cached = self._keys.get(key_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        row = await self.store.read(lambda r: r.key(key_id))
        if len(self._keys) > 10_000:  # bounded: keys are few, but never without a limit
            self._keys.clear()
        self._keys[key_id] = (now + KEY_CACHE_SECONDS, row)
        return row

    def forget(self, key_id: str) -> None:
        """A key's webhook or secret changed in this process: new jobs see it at once."""
        self._keys.pop(key_id, None)


# -- a key's webhook: its default and its secret (the keys API and `x2v-gateway keys`) ----------


async def new_key_webhook(
    url: str | None, events: Iterable[str] | str | None, *, private_ok: bool,
) -> tuple[dict[str, Any], str]:
    """The webhook columns of a new key: a new secret and its default webhook (checked); and the
    secret, to show once."""
    secret = new_secret()
    columns: dict[str, Any] = {"webhook_secret": secret}
    columns.update(await key_default(url, events, private_ok=private_ok))
    return columns, secret


async def key_default(
    url: str | None, events: Iterable[str] | str | None, *, private_ok: bool,
) -> dict[str, Any]:
    """A key's default webhook columns from what was given (url None: no default)."""
    if not url:
        if events:
            raise ApiError(422, "webhook_events needs a webhook_url", "webhook_events")
        return {"webhook_url": None, "webhook_events": None}
    return {
        "webhook_url": await check_url(url, private_ok=private_ok),
        "webhook_events": ",".join(parse_events(events)),
    }


async def set_key_default(
    store: JobStore, hooks: JobWebhooks, key_id: str, url: str | None,
    events: Iterable[str] | str | None, actor: str,
) -> bool:
    """Set (or, url None, remove) a key's default webhook; False: no such key. 409 for a key
    with no signing secret yet: its jobs' deliveries could not be signed."""
    columns = await key_default(url, events, private_ok=hooks.private_ok)
    row = await store.read(lambda r: r.key(key_id))
    if row is None:
        return False
    if columns["webhook_url"] and not row["has_webhook_secret"]:
        raise ApiError(
            409, f"key {key_id} has no webhook signing secret yet: make one first"
            f" (POST /api/v1/keys/{key_id}/webhook-secret)", "webhook_url",
        )
    chosen = tuple(columns["webhook_events"].split(",")) if columns["webhook_url"] else None
    found = await store.set_key_webhook(key_id, columns["webhook_url"], chosen, actor)
    hooks.forget(key_id)
    return found


async def rotate_secret(
    store: JobStore, hooks: JobWebhooks, key_id: str, actor: str, *, keep_previous_hours: float,
) -> tuple[str, float | None] | None:
    """A new signing secret for a key: (the secret, to show once; until when the previous one
    still signs, if it does). None: no such key."""
    secret = new_secret()
    until = time.time() + keep_previous_hours * 3600 if keep_previous_hours > 0 else None
    if not await store.set_webhook_secret(key_id, secret, actor, previous_until=until):
        return None
    hooks.forget(key_id)
    return secret, until
