"""The dashboard: batches made, watched, fixed and downloaded in the browser (Jinja2 + htmx).

Every route lives under `/ui` in one `Router` (see `router()`). Sign-in, CSRF and "admins
only" are decided before a handler runs (`auth.AuthMiddleware`); here, each handler acts as the
signed-in key (`who`): it sees and touches that key's jobs only (an admin key: every job), and
the jobs it makes count against that key's quota. Pages are rendered on the server; htmx swaps
fragments, and one Server-Sent Events stream per open page pushes each changed job's new row.

`pages.py` holds the pages and fragments, `actions.py` the forms and buttons (each calls the job
service once), `feed.py` the live updates, `rows.py` what the pages show, `templating.py` the
templates' filters, `pipelines.py` the pipelines' form and pages. Here: the router and its error pages.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from litestar import Request, Response, Router, get
from litestar.exceptions import HTTPException, ValidationException
from litestar.plugins.htmx import HTMXRequest
from litestar.response import Redirect, Template
from litestar.types import Guard

from ...auth import LimitError
from ...schemas import ApiError, plain
from ...reads import NotFound
from . import actions, feed, pages, pipelines
from .templating import setup_templates, static_files, templates_dir

__all__ = ["root", "router", "setup_templates", "static_files", "templates_dir"]

log = logging.getLogger("x2v_gateway.dashboard")

# A job or batch the signed-in key cannot see, said with where to look instead.
_NOT_FOUND = {
    "job": "There is no job {}. Look for it in the Jobs list.",
    "batch": "There is no batch {}. The list of batches is on the Batches page.",
    "pipeline": "There is no pipeline {}. The list of pipelines is on the Pipelines page.",
}


def _error_page(request: Request, status: int, message: str) -> Response:
    if request.headers.get("hx-request"):
        return Template("partials/error_message.html", context={"message": message}, status_code=status)
    return Template("error.html", context={"status": status, "message": message}, status_code=status)


def _api_error(request: Request, exc: ApiError) -> Response:
    message = _NOT_FOUND[exc.kind].format(exc.ident) if isinstance(exc, NotFound) else exc.message
    response = _error_page(request, exc.status, message)
    if isinstance(exc, LimitError):
        response.headers["retry-after"] = str(max(1, round(exc.retry_after)))
    return response


def _validation_error(request: Request, exc: ValidationException) -> Response:
    extra = exc.extra if isinstance(exc.extra, list) else []
    first = extra[0] if extra and isinstance(extra[0], dict) else {}
    key = first.get("key")
    problem = f"{key} {plain(str(first.get('message')))}" if key else exc.detail
    return _error_page(request, 400, f"{problem}. Check the address.")


def _http_error(request: Request, exc: HTTPException) -> Response:
    return _error_page(request, exc.status_code, exc.detail)


def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _error_page(request, 500, "Something went wrong on the gateway; its log has the details. Try again.")


@get("/", include_in_schema=False)  # a browser's way in, not part of the API
async def root() -> Redirect:
    """The gateway's front door is the dashboard."""
    return Redirect("/ui/")


def router(guards: Sequence[Guard] = ()) -> Router:
    """Every dashboard route, under /ui.

    Sign-in and CSRF are checked for all of them by `auth.AuthMiddleware` (the templates send
    the session's `X-CSRFToken` on every htmx request and upload); `guards` can add more.
    """
    return Router(
        path="/ui", route_handlers=[*pages.ROUTES, *actions.ROUTES, *pipelines.ROUTES, feed.events], guards=list(guards),
        request_class=HTMXRequest,
        exception_handlers={
            # LimitError too: the app's own handler for it answers JSON.
            ApiError: _api_error, LimitError: _api_error, ValidationException: _validation_error,
            HTTPException: _http_error, Exception: _internal_error,
        },
        # Pages, htmx fragments, an SSE stream and zips for a signed-in browser, each shaped for
        # the page that asks: not the API that /schema documents (the JSON API does all of it).
        include_in_schema=False,
    )
