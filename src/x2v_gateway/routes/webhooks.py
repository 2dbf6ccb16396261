"""Webhooks over HTTP: a job's deliveries, a key's signing secret made anew, a key's default."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter
from msgspec import Meta

from ..auth import Auth, Caller
from ..reads import visible
from ..schemas import ApiError, WebhookEvent, errors, iso
from ..store import JobStore, JobWebhook, Reads
from ..webhooks import JobWebhooks, describe_webhook, redact, rotate_secret, set_key_default
from .access import KeyView, key_view


class DeliveryView(msgspec.Struct, kw_only=True):
    id: str  # the `webhook-id` header of every attempt: receivers drop a message seen before
    # job.queued, job.started, job.succeeded, job.failed, job.cancelled, batch.finished;
    # pipeline.succeeded, pipeline.failed, pipeline.cancelled
    type: str
    url: str  # without what may be a secret in it: user and password, query values
    created_at: str | None
    attempts: int
    last_attempt_at: str | None
    last_status: int | None  # the receiver's HTTP status at the last attempt
    last_error: str | None
    next_attempt_at: str | None  # None once delivered or given up
    delivered_at: str | None
    gave_up_at: str | None


class JobWebhookView(msgspec.Struct):
    url: str
    events: list[str]


class JobDeliveries(msgspec.Struct):
    webhook: JobWebhookView | None  # where the job's events go, and which (None: nowhere)
    deliveries: list[DeliveryView]


@get(
    "/api/v1/jobs/{job_id:str}/webhooks", tags=["webhooks"],
    summary="A job's webhook and its deliveries: attempts, last answer, next attempt",
    responses=errors(400, 404),
)
async def job_webhooks(store: NamedDependency[JobStore], who: NamedDependency[Caller], job_id: FromPath[str]) -> JobDeliveries:
    def read(r: Reads) -> JobDeliveries:
        seen = visible(r.get(job_id), job_id, who).id
        return deliveries_view(r.job_webhook(seen), r.job_deliveries(seen))

    return await store.read(read)


def deliveries_view(hook: JobWebhook | None, rows: list[dict]) -> JobDeliveries:
    """A webhook and its deliveries (a job's or a pipeline's) as the API shows them."""
    found = _section(hook, rows)
    return JobDeliveries(
        webhook=JobWebhookView(**found["webhook"]) if found["webhook"] else None,
        deliveries=[_delivery(d) for d in found["deliveries"]],
    )


def webhook_section(r: Reads, job_id: str) -> dict:
    """A job's webhook and deliveries as they may be shown (the API, the job's page): URLs
    without their secrets."""
    return _section(r.job_webhook(job_id), r.job_deliveries(job_id))


def _section(hook: JobWebhook | None, rows: list[dict]) -> dict:
    deliveries = [{**d, "url": redact(d["url"])} for d in rows]
    return {
        "webhook": describe_webhook(hook) if hook else None, "deliveries": deliveries,
        "pending": sum(1 for d in deliveries if not d["delivered_at"] and not d["gave_up_at"]),
    }


def _delivery(row: dict) -> DeliveryView:
    return DeliveryView(
        id=row["id"], type=row["type"], url=row["url"], created_at=iso(row["created_at"]),
        attempts=row["attempts"], last_attempt_at=iso(row["last_attempt_at"]),
        last_status=row["last_status"], last_error=row["last_error"],
        next_attempt_at=None if row["delivered_at"] or row["gave_up_at"] else iso(row["next_attempt_at"]),
        delivered_at=iso(row["delivered_at"]), gave_up_at=iso(row["gave_up_at"]),
    )


class NewSecret(msgspec.Struct):
    webhook_secret: str  # shown here once: `Webhook(secret).verify(body, headers)` checks deliveries
    previous_valid_until: str | None  # until when the secret it replaced signs too


KeepPrevious = Annotated[float, QueryParameter(
    ge=0, le=24 * 30, description="Hours the secret it replaces still signs too (both signatures are sent); 0: it stops at once",
)]


async def _rotate(store: JobStore, hooks: JobWebhooks, key_id: str, who: Caller, hours: float) -> NewSecret:
    made = await rotate_secret(store, hooks, key_id, who.label, keep_previous_hours=hours)
    if made is None:
        raise ApiError(404, f"no key {key_id}")
    return NewSecret(made[0], iso(made[1]))


@post(
    "/api/v1/me/webhook-secret", tags=["webhooks"], status_code=201,
    summary="A new webhook signing secret for this key; the secret is in this answer only",
    responses=errors(400, 403, 404),
)
async def my_webhook_secret(
    store: NamedDependency[JobStore], webhooks: NamedDependency[JobWebhooks], who: NamedDependency[Caller],
    keep_previous_hours: KeepPrevious = 24.0,
) -> NewSecret:
    return await _rotate(store, webhooks, who.key_id, who, keep_previous_hours)


@post(
    "/api/v1/keys/{key_id:str}/webhook-secret", tags=["keys"], status_code=201,
    summary="A new webhook signing secret for a key (admins); the secret is in this answer only",
    responses=errors(400, 403, 404),
)
async def key_webhook_secret(
    store: NamedDependency[JobStore], webhooks: NamedDependency[JobWebhooks], who: NamedDependency[Caller],
    key_id: FromPath[str], keep_previous_hours: KeepPrevious = 24.0,
) -> NewSecret:
    return await _rotate(store, webhooks, key_id, who, keep_previous_hours)


class KeyWebhookRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`PATCH /api/v1/keys/{id}`: the key's default webhook, for its jobs that name none."""

    webhook_url: Annotated[str, Meta(min_length=1, max_length=2000)] | None  # null: no default
    webhook_events: Annotated[list[WebhookEvent], Meta(max_length=12)] | None = None


@patch(
    "/api/v1/keys/{key_id:str}", tags=["keys"], summary="Set or remove a key's default webhook (admins)",
    responses=errors(400, 403, 404, 409, 413, 422), request_max_body_size=16 * 1024,
)
async def update_key(
    auth: NamedDependency[Auth], store: NamedDependency[JobStore], webhooks: NamedDependency[JobWebhooks],
    who: NamedDependency[Caller], key_id: FromPath[str], data: JSONBody[KeyWebhookRequest],
) -> KeyView:
    if not await set_key_default(store, webhooks, key_id, data.webhook_url, data.webhook_events, who.label):
        raise ApiError(404, f"no key {key_id}")
    row = await store.read(lambda r: r.key(key_id))
    return await key_view(auth, row)


ROUTES = [job_webhooks, my_webhook_secret, key_webhook_secret, update_key]
