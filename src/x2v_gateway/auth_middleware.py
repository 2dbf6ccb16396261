"""The door every request passes: `AuthMiddleware` (after routing, before any body is read) and
the dashboard's sign-in page. Who may call what is decided in auth.py (`access()`, `Auth`)."""

from __future__ import annotations

import json
import logging
import math
import secrets
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from litestar import Request, Response
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.response import Template
from litestar.utils.scope.state import ScopeState
from markupsafe import escape

from .auth import (
    access, ADMIN_CHANGES, Auth, Caller, CSRF_FIELD, CSRF_HEADERS, is_ui, limit_error_response, LimitError, MAX_CSRF_FORM_BYTES, page_path, SAFE_METHODS, same_secret, SESSION_COOKIE, SIGN_IN_COOKIE, under,
)
from .compat import error_response, surface
from .inputs import declared_size
from .schemas import ErrorBody, ErrorResponse

if TYPE_CHECKING:
    from litestar.types import ASGIApp, Message, Receive, Scope, Send

    from .settings import Settings

log = logging.getLogger("x2v_gateway.auth")


# -- the sign-in page ----------------------------------------------------------------------------


def is_https(request: Request) -> bool:
    # uvicorn sets the scheme from X-Forwarded-Proto when the proxy is trusted
    # (FORWARDED_ALLOW_IPS, 127.0.0.1 by default), so this is true behind an https proxy.
    return request.url.scheme == "https"


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path on this gateway, never another site."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/ui/"
    if urlsplit(target).path == "/ui/sign-in":
        return "/ui/"
    return target


def sign_in_page(
    request: Request, *, status: int = 200, error: str | None = None, next_path: str | None = None
) -> Response:
    """The sign-in form, with a fresh token in a cookie and in the form (double submit), so no
    other site can sign a browser in with the other site's key."""
    token = secrets.token_urlsafe(32)
    if next_path is None:
        next_path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    response = Template(
        "sign_in.html",
        context={"sign_in_token": token, "next": safe_next(next_path), "error": error},
        status_code=status, headers={"cache-control": "no-store"},
    )
    response.set_cookie(
        SIGN_IN_COOKIE, token, path="/ui/sign-in", max_age=3600, httponly=True,
        samesite="strict", secure=is_https(request),
    )
    return response


def session_cookie_kwargs(request: Request, settings: Settings) -> dict[str, Any]:
    # Lax, not Strict: a link to a job page in an email or a chat must open signed in; Lax still
    # keeps the cookie off every cross-site POST, and the CSRF token guards the rest.
    return {
        "path": "/", "httponly": True, "samesite": "lax", "secure": is_https(request),
        "max_age": int(settings.session_hours * 3600),
    }


# -- the middleware ------------------------------------------------------------------------------


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(ErrorResponse(ErrorBody(status, message, None)), status_code=status, headers=headers)


def _ui_message(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(
        f"<p class=\"error\">{escape(message)}</p>", status_code=status, media_type="text/html",
        headers=headers,
    )


class AuthMiddleware(ASGIMiddleware):
    """Identifies the caller of every request and applies `access()`, CSRF and the rate limit."""

    scopes = (ScopeType.HTTP,)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        auth: Auth = scope["litestar_app"].state.gateway.auth
        path, method = scope["path"], scope["method"]
        need = access(path, method, metrics_open=auth.settings.metrics_open)
        # OPTIONS: CORS preflights carry no credentials by design.
        if need == "open" or method == "OPTIONS":
            await next_app(scope, receive, send)
            return
        request: Request = Request(scope, receive)
        who, refusal = await self._identify(request, auth)
        if refusal is None and who is not None:
            if need == "admin" and not who.admin:
                refusal = self._refuse(request, 403, "this needs an admin key")
            elif who.via in ("key", "headerless") and (wait := await auth.rate_limited(who)):
                limit = LimitError(
                    f"rate limit: this key may make {who.rate_per_min:g} requests a minute;"
                    f" try again in {math.ceil(wait)} s", "rate", wait,
                )
                refusal = error_response(path, 429, limit.message, limit.field, {
                    "retry-after": str(limit.retry_after),
                }) or limit_error_response(request, limit)
        if refusal is not None:
            await refusal.to_asgi_response(None, request)(scope, receive, send)
            return
        assert who is not None
        scope.setdefault("state", {})["caller"] = who
        if who.csrf is not None:
            # What the templates' `csrf_token()` puts in the page for htmx to send back.
            ScopeState.from_scope(scope).csrf_token = who.csrf
        if method not in SAFE_METHODS and under(path, ADMIN_CHANGES):
            await self._audited(scope, receive, send, next_app, auth, who)
        else:
            await next_app(scope, receive, send)

    async def _identify(self, request: Request, auth: Auth) -> tuple[Caller | None, Response | None]:
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, key = header.strip().partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                return None, self._refuse(request, 401, "send the key as Authorization: Bearer <key>")
            who = await auth.from_key(key.strip())
            if who is None:
                return None, self._refuse(request, 401, "this API key is not valid (unknown or revoked)")
            return who, None
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie is None and surface(request.url.path) and auth.settings.headerless_key:
            # A LightX2V or old-service client sends no header: on a trusted network, the
            # operator may name the key such requests act as (X2V_HEADERLESS_KEY).
            who = await auth.headerless()
            if who is None:
                return None, self._refuse(request, 401, "X2V_HEADERLESS_KEY names no active key;"
                                          " send one as Authorization: Bearer <key>")
            return who, None
        who = await auth.from_session(cookie) if cookie else None
        if who is None:
            return None, self._unauthenticated(request, expired=bool(cookie))
        if request.method not in SAFE_METHODS and not await self._csrf_ok(request, who):
            return None, self._refuse(
                request, 403, "missing or wrong CSRF token: reload the page and try again"
            )
        return who, None

    async def _csrf_ok(self, request: Request, who: Caller) -> bool:
        sent = next((v for h in CSRF_HEADERS if (v := request.headers.get(h))), None)
        content_type = request.headers.get("content-type", "")
        length = declared_size(request)
        if (sent is None and content_type.startswith("application/x-www-form-urlencoded")
                and length is not None and length <= MAX_CSRF_FORM_BYTES):
            # A plain HTML form (sign-out). The parsed form is kept for the handler.
            value = (await request.form()).get(CSRF_FIELD)
            sent = value if isinstance(value, str) else None
        return bool(sent) and who.csrf is not None and same_secret(sent, who.csrf)

    def _refuse(self, request: Request, status: int, message: str) -> Response:
        if is_ui(request.url.path):
            return _ui_message(status, message)
        headers = {"www-authenticate": 'Bearer realm="x2v-gateway"'} if status == 401 else None
        return error_response(request.url.path, status, message, None, headers) or _error(status, message, headers)

    def _unauthenticated(self, request: Request, *, expired: bool) -> Response:
        message = "your session has ended: sign in again" if expired else "sign in first"
        if not is_ui(request.url.path):
            return self._refuse(request, 401, "this needs an API key: Authorization: Bearer <key>")
        if request.headers.get("hx-request"):
            # htmx follows HX-Redirect whatever the status: the whole page goes to sign-in.
            back = page_path(request.headers.get("hx-current-url", "/ui/"))
            return _ui_message(401, message, {"hx-redirect": "/ui/sign-in?next=" + quote(safe_next(back))})
        if request.method in SAFE_METHODS:
            return sign_in_page(request, status=401, error=message if expired else None)
        return _ui_message(401, message)

    async def _audited(
        self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp, auth: Auth, who: Caller
    ) -> None:
        """Run a node change and, when it worked, record it in the audit log with who did it.

        The record is written before the last part of the answer goes out, so a client that has
        its answer finds the change in `GET /api/v1/audit`.
        """
        status = 500
        body = bytearray()

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                if len(body) < 16384:
                    body.extend(message.get("body", b""))
                if not message.get("more_body", False) and status < 400:
                    await self._record_node_change(scope, auth, who, bytes(body))
            await send(message)

        await next_app(scope, receive, capture)

    async def _record_node_change(self, scope: Scope, auth: Auth, who: Caller, body: bytes) -> None:
        path, method = scope["path"], scope["method"]
        parts = path.split("/")[4:] if path.startswith("/api/v1/nodes") else path.split("/")[3:]
        parts = [p for p in parts if p]
        name = parts[0] if parts else ""
        if not name:
            try:
                name = str(json.loads(body).get("name", ""))
            except (ValueError, AttributeError):
                name = ""
        if len(parts) > 1:
            action = f"node.{parts[1]}"
        else:
            action = {"POST": "node.add", "DELETE": "node.remove"}.get(method, f"node.{method.lower()}")
        await auth.audit(who.label, action, name or path, f"{method} {path}")
