"""Access over HTTP: dashboard sign-in and sign-out, API keys and the audit log (admins), and
`GET /api/v1/me`. Who may call each route is decided in one place, `auth.access()`."""

from __future__ import annotations

import logging
from typing import Annotated

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter
from litestar.response import Redirect
from msgspec import Meta

from ..auth import (
    SESSION_COOKIE,
    SIGN_IN_COOKIE,
    SIGN_IN_FIELD,
    Auth,
    Caller,
    same_secret,
)
from ..auth_middleware import safe_next, session_cookie_kwargs, sign_in_page
from ..inputs import read_form
from ..schemas import MAX_SQLITE_INT, ApiError, WebhookEvent, errors, iso
from ..reads import cut_page
from ..settings import Settings
from ..store import AdminKeyNeeded, JobStore, KeyNameTaken
from ..webhooks import new_key_webhook, redact

log = logging.getLogger("x2v_gateway.auth")


# -- the dashboard's sign-in ---------------------------------------------------------------------
# Out of the OpenAPI document: an HTML form and its redirects, for browsers; API clients send
# their key with every request instead.


@get("/ui/sign-in", include_in_schema=False)
async def sign_in_form(
    request: Request, next_path: Annotated[str | None, QueryParameter(name="next", max_length=2000)] = None,
) -> Response:
    return sign_in_page(request, next_path=next_path or "/ui/")


@post("/ui/sign-in", include_in_schema=False, request_max_body_size=16 * 1024, status_code=303)
async def sign_in(request: Request, auth: NamedDependency[Auth], settings: NamedDependency[Settings]) -> Response:
    """Sign in with an API key: a session cookie, then back to the page that asked."""
    form = await read_form(request)
    next_path = safe_next(str(form.get("next") or ""))
    sent, expected = str(form.get(SIGN_IN_FIELD) or ""), request.cookies.get(SIGN_IN_COOKIE, "")
    if not sent or not expected or not same_secret(sent, expected):
        return sign_in_page(request, status=403, next_path=next_path,
                            error="This sign-in form had expired. Paste your key again.")
    key = str(form.get("key") or "").strip()
    signed_in = await auth.sign_in(key) if key else None
    if signed_in is None:
        log.warning("dashboard sign-in refused from %s: not a valid key",
                    request.client.host if request.client else "?")
        return sign_in_page(request, status=401, next_path=next_path,
                            error="That key is not valid: it is unknown or was revoked.")
    cookie, _ = signed_in
    response = Redirect(next_path, status_code=303)
    response.set_cookie(SESSION_COOKIE, cookie, **session_cookie_kwargs(request, settings))
    response.delete_cookie(SIGN_IN_COOKIE, path="/ui/sign-in")
    return response


@post("/ui/sign-out", include_in_schema=False, request_max_body_size=16 * 1024, status_code=303)
async def sign_out(request: Request, auth: NamedDependency[Auth], who: NamedDependency[Caller]) -> Response:
    await auth.sign_out(request.cookies.get(SESSION_COOKIE, ""), who)
    response = Redirect("/ui/sign-in", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    if request.headers.get("hx-request"):
        response.headers["hx-redirect"] = "/ui/sign-in"
    return response


# -- keys ----------------------------------------------------------------------------------------


class KeyRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`POST /api/v1/keys`: a new key."""

    name: Annotated[str, Meta(min_length=1, max_length=100, pattern=r"^[\w.@+-][\w .@+-]*$")]
    admin: bool = False
    # Jobs it may submit per UTC day (retries count); none: no limit.
    daily_quota: Annotated[int, Meta(ge=0, le=10_000_000)] | None = None
    # Most of its jobs on nodes at once; the rest wait in the queue.
    max_concurrent: Annotated[int, Meta(ge=1, le=100_000)] | None = None
    # API requests per minute; more get 429 with Retry-After.
    rate_per_min: Annotated[float, Meta(gt=0, le=1_000_000)] | None = None
    # The default webhook of its jobs that name none, and its events (webhooks.py).
    webhook_url: Annotated[str, Meta(min_length=1, max_length=2000)] | None = None
    webhook_events: Annotated[list[WebhookEvent], Meta(max_length=12)] | None = None


class KeyView(msgspec.Struct, kw_only=True):
    id: str
    name: str
    prefix: str  # the first characters of a generated key, to tell keys apart
    admin: bool
    daily_quota: int | None
    max_concurrent: int | None
    rate_per_min: float | None
    jobs_today: int
    source: str | None
    created_at: str | None
    created_by: str | None
    revoked_at: str | None
    revoked_by: str | None
    webhook_url: str | None = None  # its default webhook, without user, password or query values
    webhook_events: list[str] | None = None
    has_webhook_secret: bool = False  # never the secret itself


class NewKeyView(msgspec.Struct, kw_only=True):
    key: str  # shown here once; the gateway keeps only its sha256
    # Signs its webhooks; shown here once (`POST /api/v1/me/webhook-secret` makes a new one).
    webhook_secret: str
    info: KeyView


async def key_view(auth: Auth, row: dict) -> KeyView:
    return KeyView(
        id=row["id"], name=row["name"], prefix=row["prefix"] or "", admin=row["admin"],
        daily_quota=row["daily_quota"], max_concurrent=row["max_concurrent"],
        rate_per_min=row["rate_per_min"], jobs_today=await auth.jobs_today(row["id"]),
        source=row["source"], created_at=iso(row["created_at"]), created_by=row["created_by"],
        revoked_at=iso(row["revoked_at"]), revoked_by=row["revoked_by"],
        webhook_url=redact(row["webhook_url"]) if row.get("webhook_url") else None,
        webhook_events=row["webhook_events"].split(",") if row.get("webhook_events") else None,
        has_webhook_secret=row.get("has_webhook_secret", False),
    )


class KeysController(Controller):
    path = "/api/v1/keys"
    tags = ["keys"]

    @get("/", summary="Every API key (never the keys themselves); admins only", responses=errors(403))
    async def list_keys(self, auth: NamedDependency[Auth], store: NamedDependency[JobStore]) -> list[KeyView]:
        return [await key_view(auth, row) for row in await store.keys()]

    @post(
        "/", status_code=201, summary="Make an API key; the key and its webhook secret are in this answer only",
        responses=errors(400, 403, 409, 413, 422),
    )
    async def create_key(
        self, auth: NamedDependency[Auth], settings: NamedDependency[Settings], who: NamedDependency[Caller],
        data: JSONBody[KeyRequest],
    ) -> NewKeyView:
        webhook, secret = await new_key_webhook(
            data.webhook_url, data.webhook_events, private_ok=settings.private_urls,
        )
        try:
            key, row = await auth.create_key(
                name=data.name, admin=data.admin, daily_quota=data.daily_quota,
                max_concurrent=data.max_concurrent, rate_per_min=data.rate_per_min,
                actor=who.label, source="api", webhook=webhook,
            )
        except KeyNameTaken as exc:
            raise ApiError(409, str(exc), "name") from None
        return NewKeyView(key=key, webhook_secret=secret, info=await key_view(auth, row))

    @delete(
        "/{key_id:str}", status_code=200,
        summary="Revoke a key; its dashboard sessions end. Not X2V_ADMIN_KEY's nor the last admin key (409)",
        responses=errors(400, 403, 404, 409),
    )
    async def revoke_key(
        self, auth: NamedDependency[Auth], who: NamedDependency[Caller], key_id: FromPath[str],
    ) -> KeyView:
        try:
            row = await auth.revoke_key(key_id, who.label)
        except AdminKeyNeeded as exc:
            raise ApiError(409, str(exc), "key_id") from None
        if row is None:
            raise ApiError(404, f"no active key {key_id}")
        return await key_view(auth, row)


@get(
    "/api/v1/me", tags=["keys"], summary="The key this request came with: its limits and use today",
    responses=errors(404),
)
async def me(auth: NamedDependency[Auth], who: NamedDependency[Caller]) -> KeyView:
    row = await auth.find_key(who.key_id)
    if row is None:
        raise ApiError(404, "this key no longer exists")
    return await key_view(auth, row)


# -- audit ---------------------------------------------------------------------------------------


class AuditEntry(msgspec.Struct):
    id: int
    at: str | None
    actor: str
    action: str
    target: str | None
    detail: str | None


class AuditPage(msgspec.Struct):
    entries: list[AuditEntry]
    next_before: int | None


@get(
    "/api/v1/audit", tags=["keys"], summary="Key, node and purge changes, newest first; admins only",
    responses=errors(400, 403),
)
async def audit(
    store: NamedDependency[JobStore],
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
    before: Annotated[int | None, QueryParameter(ge=1, le=MAX_SQLITE_INT, description="`next_before` of the previous page")] = None,
) -> AuditPage:
    rows, next_before = cut_page(await store.audit_log(limit=limit + 1, before_id=before), limit, _id)
    return AuditPage(
        entries=[AuditEntry(r["id"], iso(r["at"]), r["actor"], r["action"], r["target"], r["detail"])
                 for r in rows],
        next_before=next_before,
    )


def _id(row: dict) -> int:
    return row["id"]


ROUTES = [sign_in_form, sign_in, sign_out, KeysController, me, audit]
