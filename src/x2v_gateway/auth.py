"""Who may call what: API keys, dashboard sign-in, CSRF, rate limits, daily quotas, the audit log.

One middleware (`AuthMiddleware`, in auth_middleware.py) sees every request after routing and
before any body is read, so an unauthenticated 2 GB upload is refused on its headers. `access()`
is the whole policy:

* open: `/healthz`, `/readyz` (probes), `/` (a redirect), static files, the OpenAPI docs, the
  sign-in page; `/metrics` when `X2V_METRICS_OPEN` says so;
* admin keys only: `/api/v1/keys`, `/api/v1/audit`, `/metrics`, and changes to nodes;
* everything else: any valid key (`Authorization: Bearer <key>`) or a dashboard session cookie.

A request that comes with a session cookie and changes something must also carry the session's
CSRF token (an `X-CSRFToken` header, which the dashboard sends on every htmx request and upload,
or a `_csrf_token` field of a small HTML form). A request with a Bearer key needs none: a browser
never adds an `Authorization` header to a request another site makes it send.

Why sign in with a key and not a username and password: the key already is the identity that
owns jobs, carries quotas and is admin or not; a second kind of account would need a user table,
password hashing, resets and guessing protection, and two things to revoke. A key holds 256
random bits, so it cannot be guessed, and revoking it ends its dashboard sessions too.

Keys are stored as their sha256 (see `m010_keys` in store/sqlite/schema.py); the key itself is shown once, when it is
made, and never logged. A key's jobs are its own: another key's job is a 404, as if it did not
exist; admin keys see every job.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import secrets
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from litestar import Request, Response

from .schemas import ApiError, ErrorBody, ErrorResponse
from .settings import cli_command

if TYPE_CHECKING:

    from .settings import Settings
    from .store import JobStore

log = logging.getLogger("x2v_gateway.auth")
audit_log = logging.getLogger("x2v_gateway.audit")

KEY_PREFIX = "x2v_"
SESSION_COOKIE = "x2v_session"
SIGN_IN_COOKIE = "x2v_sign_in"
SIGN_IN_FIELD = "_sign_in_token"
CSRF_HEADERS = ("x-csrftoken", "x-csrf-token")
CSRF_FIELD = "_csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# A form whose CSRF token is read by the middleware itself is read whole: only small ones.
MAX_CSRF_FORM_BYTES = 64 * 1024
FIRST_KEY_FILE = "first-admin-key"
# How long a key or session this process looked up is trusted without asking the store again.
# A revoke or sign-out in this process takes effect at once (the cache is told); one made by
# the CLI (another process) or another replica takes effect within this many seconds.
CALLER_CACHE_SECONDS = 2.0
# Only lookups that found a valid key or session are kept, so random keys add nothing; the
# bound keeps even a flood of valid sessions from growing the cache without limit.
CALLER_CACHE_SIZE = 10_000

OPEN_PATHS = frozenset({"/", "/healthz", "/readyz", "/schema", "/ui/sign-in"})
OPEN_PREFIXES = ("/static/", "/schema/")
ADMIN_ONLY = ("/api/v1/keys", "/api/v1/audit")
# Everyone may look at the nodes; only admins may add, drain or remove one.
ADMIN_CHANGES = ("/api/v1/nodes", "/ui/nodes")


def access(path: str, method: str, *, metrics_open: bool) -> str:
    """Who may make this request: "open", "admin" or "key" (any valid key or session)."""
    if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
        return "open"
    if path == "/metrics":
        return "open" if metrics_open else "admin"
    if under(path, ADMIN_ONLY):
        return "admin"
    if method not in SAFE_METHODS and under(path, ADMIN_CHANGES):
        return "admin"
    return "key"


def is_ui(path: str) -> bool:
    return path == "/ui" or path.startswith("/ui/")


def under(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(p + "/") for p in prefixes)


# -- keys ----------------------------------------------------------------------------------------


def new_key() -> str:
    """A new API key: `x2v_` and 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def same_secret(sent: str, expected: str) -> bool:
    """A token a client sent equals ours, in constant time. As bytes: `compare_digest` raises
    on a str with non-ASCII characters, and a header or form field may hold any."""
    return hmac.compare_digest(sent.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))


def page_path(url: str) -> str:
    """The path and query of the page htmx says it is on (`HX-Current-URL`, the client's to
    write: a malformed one, like `http://[::1`, means the dashboard's home)."""
    try:
        page = urlsplit(url)
    except ValueError:
        return "/ui/"
    return page.path + (f"?{page.query}" if page.query else "")


def parse_rate(text: str) -> float:
    """`60/min`, `2/s`, `600/h` or a bare `60` (per minute) -> requests per minute."""
    number, _, unit = text.strip().partition("/")
    per = {"": 1.0, "m": 1.0, "min": 1.0, "minute": 1.0, "s": 1 / 60, "sec": 1 / 60,
           "second": 1 / 60, "h": 60.0, "hour": 60.0}.get(unit.strip().lower())
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if per is None or not value > 0 or not math.isfinite(value):
        raise ValueError(f"rate must look like 60/min, 2/s or 600/h, got {text!r}")
    return value / per


@dataclass(frozen=True)
class Caller:
    """Who made a request: the key it came with, directly or through a dashboard session."""

    key_id: str
    name: str
    admin: bool
    daily_quota: int | None = None
    max_concurrent: int | None = None
    rate_per_min: float | None = None
    via: str = "key"  # "key" | "session" | "headerless" (X2V_HEADERLESS_KEY)
    csrf: str | None = None  # the session's CSRF token

    @classmethod
    def from_row(cls, row: dict[str, Any], via: str = "key") -> Caller:
        return cls(
            key_id=row["id"], name=row["name"], admin=row["admin"],
            daily_quota=row["daily_quota"], max_concurrent=row["max_concurrent"],
            rate_per_min=row["rate_per_min"], via=via,
        )

    @property
    def owner(self) -> str:
        """What a job this caller makes records as its owner."""
        return self.key_id

    @property
    def sees(self) -> str | None:
        """The owner whose jobs this caller may see and touch; None: every job (admins)."""
        return None if self.admin else self.key_id

    @property
    def label(self) -> str:
        """Who, for the audit log and log lines: the key's name and id, never the key."""
        return f"{self.name} ({self.key_id})"

    def may_touch(self, owner: str | None) -> bool:
        return self.admin or owner == self.key_id


def caller(request: Request) -> Caller:
    """The caller `AuthMiddleware` identified for this request."""
    found = request.scope.get("state", {}).get("caller")
    if found is None:  # an open route: nobody
        raise ApiError(401, "this needs an API key: Authorization: Bearer <key>")
    return found


class LimitError(ApiError):
    """A refusal the client can wait out: 429 with `Retry-After`."""

    def __init__(self, message: str, field: str, retry_after: float) -> None:
        super().__init__(429, message, field)
        self.retry_after = max(1, math.ceil(retry_after))


def limit_error_response(request: Request, exc: LimitError) -> Response[ErrorResponse]:
    return Response(
        ErrorResponse(ErrorBody(exc.status, exc.message, exc.field)), status_code=exc.status,
        headers={"retry-after": str(exc.retry_after)},
    )


def _utc_day(now: float | None = None) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(now))


def _seconds_to_utc_midnight(now: float | None = None) -> float:
    now = time.time() if now is None else now
    return 86400 - now % 86400


class JobCount:
    """Jobs counted against a daily quota by `Auth.counting_jobs`; `refund()` gives them back."""

    def __init__(self) -> None:
        self.refunded = False

    def refund(self) -> None:
        self.refunded = True


class CallerCache:
    """Callers found for a key's or a session cookie's hash, for a few seconds, so that a
    request does not wait for a reader thread just to learn who sent it.

    Keyed by the secret's sha256, never the secret. An entry lives `ttl` seconds (less when its
    session ends sooner); the oldest entry goes when `size` are held.
    """

    def __init__(self, ttl: float = CALLER_CACHE_SECONDS, size: int = CALLER_CACHE_SIZE) -> None:
        self.ttl = ttl
        self.size = size
        # secret hash -> (caller, monotonic time it stops being trusted)
        self._entries: OrderedDict[str, tuple[Caller, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, secret_hash: str) -> Caller | None:
        found = self._entries.get(secret_hash)
        if found is None:
            return None
        if found[1] <= time.monotonic():
            del self._entries[secret_hash]
            return None
        return found[0]

    def put(self, secret_hash: str, who: Caller, ends_at: float | None = None) -> None:
        """Trust `who` for `ttl` seconds, or until `ends_at` (wall clock) if that is sooner."""
        ttl = self.ttl if ends_at is None else min(self.ttl, ends_at - time.time())
        if ttl <= 0:
            return
        self._entries[secret_hash] = (who, time.monotonic() + ttl)
        self._entries.move_to_end(secret_hash)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def forget(self, secret_hash: str) -> None:
        self._entries.pop(secret_hash, None)

    def forget_key(self, key_id: str) -> None:
        """Drop the key and every session of it (a revoke: rare, so a walk of the cache is fine)."""
        for secret_hash in [h for h, (who, _) in self._entries.items() if who.key_id == key_id]:
            del self._entries[secret_hash]


class Auth:
    """Keys, sessions, limits and the audit log of one gateway (`gw.auth`)."""

    def __init__(self, settings: Settings, store: JobStore, *, callers: CallerCache | None = None) -> None:
        self.settings = settings
        self.store = store
        self.callers = CallerCache() if callers is None else callers

    # -- start ----------------------------------------------------------------------------------

    async def bootstrap(self) -> None:
        """Make `X2V_ADMIN_KEY` a working admin key, retiring a previous one; on a first start
        without it, make an admin key and show it once."""
        env_hash = hash_secret(self.settings.admin_key) if self.settings.admin_key else None
        keys = await self.store.keys()
        # The variable *is* the key: one that was replaced or removed from the settings stops
        # working, so rotating it is editing `.env` and restarting.
        for row in keys:
            if row["source"] == "env" and row["revoked_at"] is None and row["key_hash"] != env_hash:
                await self.revoke_key(row["id"], "X2V_ADMIN_KEY (changed or removed)", keep_admin=False)
        if env_hash is not None:
            known = await self.store.key_by_hash(env_hash)
            if known is None:
                await self._insert_key(
                    env_hash, name="admin (X2V_ADMIN_KEY)", prefix="", admin=True, source="env",
                    actor="X2V_ADMIN_KEY",
                )
            elif known["revoked_at"] is not None:
                # A revoked key stays revoked, wherever it is configured.
                log.warning("X2V_ADMIN_KEY holds a key that was revoked (%s); it does not work:"
                            " set a new one", known["id"])
        elif not keys:
            key = new_key()
            row = await self._insert_key(
                hash_secret(key), name="admin (first start)", prefix=key[:12], admin=True,
                source="first-start", actor="first start",
            )
            self._show_first_key(key, row["id"])

    def _show_first_key(self, key: str, key_id: str) -> None:
        # On a terminal the key is shown there, once; it never goes through logging. When the
        # output goes to a log (a service, a container), the key goes to a file only the
        # gateway's user can read, and the log says where.
        if sys.stdout.isatty():
            print(
                f"\n  No API key existed, so an admin key was made ({key_id}). It is shown once:\n\n"
                f"      {key}\n\n"
                "  Use it as `Authorization: Bearer <key>`, or sign in to the dashboard with it.\n"
                f"  Make more with `{cli_command()} keys create --name NAME`.\n",
                flush=True,
            )
            return
        path = self.settings.data_dir / FIRST_KEY_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key + "\n")
        log.warning(
            "no API key existed: made an admin key (%s) and wrote it to %s, readable by this user"
            " only. Copy it somewhere safe and delete the file.", key_id, path,
        )

    # -- keys -----------------------------------------------------------------------------------

    async def _insert_key(
        self, key_hash: str, *, name: str, prefix: str, admin: bool, source: str, actor: str,
        daily_quota: int | None = None, max_concurrent: int | None = None,
        rate_per_min: float | None = None, webhook: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        row = await self.store.create_key({
            "id": "k" + secrets.token_hex(4), "name": name, "key_hash": key_hash,
            "prefix": prefix, "admin": admin, "daily_quota": daily_quota,
            "max_concurrent": max_concurrent, "rate_per_min": rate_per_min, "source": source,
            **(webhook or {}),
        }, actor)
        self.note(actor, "key.create", row["id"], f"name={name} admin={admin}")
        return row

    async def create_key(
        self, *, name: str, actor: str, source: str, admin: bool = False,
        daily_quota: int | None = None, max_concurrent: int | None = None,
        rate_per_min: float | None = None, webhook: dict[str, Any] | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """A new key: (the key, to show once; its row). Raises store.KeyNameTaken. `webhook`:
        its webhook columns (webhooks.new_key_webhook: the secret, a default webhook)."""
        key = new_key()
        row = await self._insert_key(
            hash_secret(key), name=name, prefix=key[:12], admin=admin, source=source, actor=actor,
            daily_quota=daily_quota, max_concurrent=max_concurrent, rate_per_min=rate_per_min,
            webhook=webhook,
        )
        return key, row

    async def find_key(self, id_or_name: str) -> dict[str, Any] | None:
        """A key by its id, or an active key by its name."""
        keys = await self.store.keys()
        for row in keys:
            if row["id"] == id_or_name:
                return row
        for row in keys:
            if row["name"] == id_or_name and row["revoked_at"] is None:
                return row
        return None

    async def revoke_key(self, key_id: str, actor: str, *, keep_admin: bool = True) -> dict[str, Any] | None:
        """Revoke a key; None when no such key is active. Unless `keep_admin` is False (the CLI,
        run by the operator on the server), the key in X2V_ADMIN_KEY and the last admin key
        are refused with store.AdminKeyNeeded: through the API that would lock every admin out."""
        row = await self.store.revoke_key(key_id, actor, keep_admin=keep_admin)
        self.callers.forget_key(key_id)
        if row is not None:
            self.note(actor, "key.revoke", key_id, f"name={row['name']}")
        return row

    async def from_key(self, key: str) -> Caller | None:
        key_hash = hash_secret(key)
        if (who := self.callers.get(key_hash)) is not None:
            return who
        row = await self.store.key_by_hash(key_hash)
        if row is None or row["revoked_at"] is not None:
            return None
        who = Caller.from_row(row)
        self.callers.put(key_hash, who)
        return who

    async def headerless(self) -> Caller | None:
        """The caller a request without credentials on a compatible surface acts as: the key
        `X2V_HEADERLESS_KEY` names (id or name), if it is active. Looked up like a key (cached
        for a few seconds; a revoke in this process ends it at once)."""
        name = self.settings.headerless_key
        cache_key = "headerless:" + name
        if (who := self.callers.get(cache_key)) is not None:
            return who
        row = await self.find_key(name)
        if row is None or row["revoked_at"] is not None:
            return None
        who = Caller.from_row(row, via="headerless")
        self.callers.put(cache_key, who)
        return who

    # -- dashboard sessions ---------------------------------------------------------------------

    async def sign_in(self, key: str) -> tuple[str, Caller] | None:
        """A new session for a valid key: (the cookie's value, the caller). None: not a key."""
        found = await self.from_key(key)
        if found is None:
            return None
        cookie, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        expires = time.time() + self.settings.session_hours * 3600
        await self.store.create_session(hash_secret(cookie), found.key_id, csrf, expires)
        await self.audit(found.label, "sign-in", found.key_id)
        return cookie, replace(found, via="session", csrf=csrf)

    async def from_session(self, cookie: str) -> Caller | None:
        id_hash = hash_secret(cookie)
        if (who := self.callers.get(id_hash)) is not None:
            return who
        found = await self.store.session(id_hash)
        if found is None:
            return None
        row, csrf, expires_at = found
        who = replace(Caller.from_row(row), via="session", csrf=csrf)
        self.callers.put(id_hash, who, ends_at=expires_at)
        return who

    async def sign_out(self, cookie: str, who: Caller) -> None:
        id_hash = hash_secret(cookie)
        self.callers.forget(id_hash)
        await self.store.delete_session(id_hash)
        await self.audit(who.label, "sign-out", who.key_id)

    # -- limits ---------------------------------------------------------------------------------

    async def rate_limited(self, who: Caller) -> float:
        """0, or the seconds this caller must wait before its next request (on any replica)."""
        if who.rate_per_min is None:
            return 0.0
        return await self.store.take_request(who.key_id, who.rate_per_min)

    @asynccontextmanager
    async def counting_jobs(self, who: Caller, n: int = 1) -> AsyncIterator[JobCount]:
        """Count `n` jobs against the caller's daily quota, or refuse with 429 when that would
        go over it. The count is given back if the block fails or calls `refund()` (a replayed
        idempotent request makes no new job)."""
        day = _utc_day()
        if await self.store.reserve_jobs(who.key_id, day, n, who.daily_quota) is None:
            used = await self.store.jobs_used(who.key_id, day)
            raise LimitError(
                f"daily quota reached: this key may submit {who.daily_quota} jobs a day and has"
                f" submitted {used} today{'' if n == 1 else f'; this asks for {n} more'}. The"
                " quota resets at 00:00 UTC.",
                "quota", _seconds_to_utc_midnight(),
            )
        count = JobCount()
        try:
            yield count
        except BaseException:
            await self.store.release_jobs(who.key_id, day, n)
            raise
        if count.refunded:
            await self.store.release_jobs(who.key_id, day, n)

    async def jobs_today(self, key_id: str) -> int:
        return await self.store.jobs_used(key_id, _utc_day())

    # -- audit ----------------------------------------------------------------------------------

    async def audit(self, actor: str, action: str, target: str, detail: str = "") -> None:
        """Record who did what in the audit table and the log."""
        await self.store.record_audit(actor, action, target, detail)
        self.note(actor, action, target, detail)

    def note(self, actor: str, action: str, target: str, detail: str = "") -> None:
        """The log line of an audit entry the store already recorded."""
        audit_log.info("%s: %s %s%s", actor, action, target, f" ({detail})" if detail else "")
