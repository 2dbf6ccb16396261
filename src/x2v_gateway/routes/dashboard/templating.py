"""The dashboard's templates: where they and the static files are, and the filters they use."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from litestar import MediaType, Request, Response
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Template
from litestar.static_files import create_static_files_router
from markupsafe import Markup

from ...auth import Caller
from ...batch_plan import LABELS, MODES, RESIZE_MODES, TASK_LABELS, TASKS
from ...tasks import TASK_INPUTS, makes
from ...schemas import iso
from ...store import STATES, TERMINAL

if TYPE_CHECKING:
    from litestar.types import ControllerRouterHandler

PACKAGE_DIR = Path(__file__).resolve().parents[2]
STATIC_DIR = PACKAGE_DIR / "static"


def templates_dir() -> Path:
    """`templates/` at the repository root, or `x2v_gateway/templates` inside an installed wheel."""
    packaged = PACKAGE_DIR / "templates"
    if packaged.is_dir():
        return packaged
    return PACKAGE_DIR.parents[1] / "templates"



def _static_versions() -> dict[str, str]:
    # A hash of each file in the URL: browsers cache static files, and a new version of
    # dashboard.js must not meet an old cached one.
    return {
        path.relative_to(STATIC_DIR).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()[:10]
        for path in STATIC_DIR.rglob("*") if path.is_file()
    }


def setup_templates(engine: JinjaTemplateEngine) -> None:
    """Filters and globals the dashboard's templates use."""
    versions = _static_versions()
    env = engine.engine
    env.globals.update(
        static=lambda name: f"/static/{name}?v={versions.get(name, '0')}",
        STATES=STATES, TASKS=TASKS, MODES=MODES, LABELS=LABELS, RESIZE_MODES=RESIZE_MODES,
        TERMINAL=TERMINAL, makes=makes, TASK_LABELS=TASK_LABELS, ALL_TASKS=tuple(TASK_INPUTS),
    )
    env.filters.update(when=_when, seconds=_seconds, size=_size, params_text=_params_text, eta=_eta)
    engine.register_template_callable("signed_in", _signed_in)
    env.trim_blocks = env.lstrip_blocks = True


def static_files() -> ControllerRouterHandler:
    """htmx, its SSE extension, the dashboard's CSS and JS: open to everyone, like /healthz."""
    return create_static_files_router(
        # The dashboard's own files, not part of the API.
        path="/static", directories=[STATIC_DIR], include_in_schema=False,
    )


def _signed_in(context: Mapping[str, Any]) -> Caller | None:
    """The key the page is shown to (None on open pages, like sign-in)."""
    request = context.get("request")
    return request.scope.get("state", {}).get("caller") if request is not None else None


def _when(ts: float | None) -> Markup:
    if ts is None:
        return Markup("—")
    text = iso(ts) or ""
    # The browser rewrites it in local time (dashboard.js); UTC is what a page without JS shows.
    return Markup('<time datetime="{0}">{1}</time>').format(text, text[:19].replace("T", " ") + " UTC")


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    value = max(0, round(value))
    if value < 60:
        return f"{value} s"
    if value < 3600:
        return f"{value // 60} min {value % 60:02d} s"
    return f"{value // 3600} h {value % 3600 // 60:02d} min"


def _eta(info: dict[str, Any] | None) -> str:
    """What the upstream expects for a job on it, e.g. " · starts in about 12 s · runs about 40 s".

    A filter, not a macro: the batch table renders it 500 times.
    """
    info = info or {}
    parts = []
    if info.get("pending_seconds") is not None:
        parts.append(f"starts in about {_seconds(info['pending_seconds'])}")
    if info.get("running_seconds") is not None:
        parts.append(f"runs about {_seconds(info['running_seconds'])}")
    return "".join(f" · {part}" for part in parts)


def _size(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _params_text(params: dict[str, Any]) -> str:
    """The parameters besides prompt and seed, short: `infer_steps=4, target_shape=480×832`."""
    parts = []
    for key, value in params.items():
        if key in ("prompt", "negative_prompt", "seed"):
            continue
        if key == "target_shape" and isinstance(value, list):
            value = "×".join(str(v) for v in value)
        parts.append(f"{key}={value}")
    return ", ".join(parts)



def render(request: Request, name: str, **context: Any) -> str:
    return request.app.template_engine.get_template(name).render(**context)


async def off_loop_page(request: Request, name: str, context: dict[str, Any]) -> Response:
    """A template rendered on a worker thread, for the pages of up to 500 rows: rendering one
    takes tens of ms, which the event loop would otherwise spend not answering anyone else."""
    full = Template(name, context=context).create_template_context(request)
    html = await asyncio.to_thread(lambda: request.app.template_engine.get_template(name).render(**full))
    return Response(html, media_type=MediaType.HTML)
