"""The dashboard's pipelines: a form that lists scenes, the pipelines made, and a pipeline's page
with each step live (fetched again every second while it runs), cancel, retry of a step and the
downloads. Each handler calls the pipeline service once."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

from litestar import Response, get, post
from litestar.di import NamedDependency
from litestar.datastructures import UploadFile
from litestar.params import FromPath
from litestar.plugins.htmx import ClientRedirect, HTMXRequest
from litestar.response import Redirect, Template

from ...auth import Caller
from ...inputs import read_form
from ...jobs import JobService
from ...pipelines import PipelineService
from ...pipelines.plan import SCENE_TASKS
from ...pipelines.views import view, views
from ...schemas import ApiError
from ...store import JobStore

# Rows of the form's scene list; a blank row is skipped. Longer pipelines: the API or the CLI.
FORM_SCENES = 6
# The form's files travel inline (base64) in the document: bounded like a JSON body.
_FORM_BYTES = 48 * 1024 * 1024


@get("/pipelines", include_in_schema=False)
async def pipelines_page(
    store: NamedDependency[JobStore], jobs: NamedDependency[JobService], who: NamedDependency[Caller],
) -> Template:
    return await _list_page(store, jobs, who, {}, None)


async def _list_page(
    store: JobStore, jobs: JobService, who: Caller, form: dict[str, str], error: ApiError | None,
    *, fragment: bool = False,
) -> Template:
    context = {"rows": range(FORM_SCENES), "form": form, "error": error,
               "available_tasks": sorted(jobs.runnable_tasks() & SCENE_TASKS)}
    status = error.status if error else 200
    if fragment:  # htmx swaps the form alone, with what to fix
        return Template("partials/pipeline_form.html", status_code=status, context=context)
    made = await views(store, await store.pipelines(owner=who.sees, limit=50))
    return Template("pipelines.html", status_code=status, context={**context, "pipelines": made})


@post("/pipelines", include_in_schema=False, request_max_body_size=_FORM_BYTES, status_code=200)
async def create_pipeline(
    request: HTMXRequest, pipelines: NamedDependency[PipelineService], store: NamedDependency[JobStore],
    jobs: NamedDependency[JobService], who: NamedDependency[Caller],
) -> Response:
    form = await read_form(request)
    text = {k: str(v) for k, v in form.items() if isinstance(v, str)}
    try:
        doc = await _document(form, text)
        pipeline, _ = await pipelines.submit(who, "application/json", _once(json.dumps(doc).encode()), size=None)
    except ApiError as exc:
        if exc.status not in (413, 422):
            raise
        return await _list_page(store, jobs, who, text, exc, fragment=bool(request.htmx))
    if request.htmx:
        return ClientRedirect(f"/ui/pipelines/{pipeline.id}")
    return Redirect(f"/ui/pipelines/{pipeline.id}", status_code=303)


async def _document(form: Any, text: dict[str, str]) -> dict[str, Any]:
    """The form's filled-in rows as a pipeline's JSON document (files inline, in base64)."""
    scenes = []
    for i in range(FORM_SCENES):
        prompt = text.get(f"prompt-{i}", "").strip()
        files = {role: form.get(f"{role}-{i}") for role in ("image", "audio")}
        files = {role: f for role, f in files.items() if isinstance(f, UploadFile) and f.filename}
        if not prompt and not files and not text.get(f"duration-{i}", "").strip():
            continue
        scene: dict[str, Any] = {"task": text.get(f"task-{i}", "t2v"), "prompt": prompt}
        if duration := text.get(f"duration-{i}", "").strip():
            try:
                scene["duration"] = float(duration)
            except ValueError:
                raise ApiError(422, f"Scene {len(scenes) + 1}: the duration is a number of seconds", f"duration-{i}") from None
        if text.get(f"previous-{i}"):
            scene["first_frame"] = "previous"
        for field in ("image_prompt", "image_refine"):
            if value := text.get(f"{field}-{i}", "").strip():
                scene[field] = value
        for role, upload in files.items():
            scene[role] = base64.b64encode(await upload.read()).decode()
        scenes.append(scene)
    doc: dict[str, Any] = {"scenes": scenes, "output": {}}
    if name := text.get("name", "").strip():
        doc["name"] = name
    try:
        if fps := text.get("fps", "").strip():
            doc["output"]["fps"] = int(fps)
        if seed := text.get("seed", "").strip():
            doc["seed"] = int(seed)
    except ValueError:
        raise ApiError(422, "The frame rate and the seed are whole numbers", "fps") from None
    if resolution := text.get("resolution", "").strip():
        doc["output"]["resolution"] = resolution
    return doc


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


@get(["/pipelines/{pipeline_id:str}", "/pipelines/{pipeline_id:str}/live"], include_in_schema=False)
async def pipeline_page(
    request: HTMXRequest, pipelines: NamedDependency[PipelineService], store: NamedDependency[JobStore],
    who: NamedDependency[Caller], pipeline_id: FromPath[str],
) -> Template:
    """A pipeline's page, or (`/live`, fetched every second while it runs) its steps alone."""
    p = await view(store, await pipelines.find(pipeline_id, who))
    live = request.url.path.endswith("/live")
    return Template("partials/pipeline_live.html" if live else "pipeline.html", context={"p": p})


@post("/pipelines/{pipeline_id:str}/cancel", include_in_schema=False, status_code=200)
async def cancel_pipeline(
    pipelines: NamedDependency[PipelineService], store: NamedDependency[JobStore],
    who: NamedDependency[Caller], pipeline_id: FromPath[str],
) -> Template:
    p = await view(store, await pipelines.cancel(pipeline_id, who))
    return Template("partials/pipeline_live.html", context={"p": p})


@post("/pipelines/{pipeline_id:str}/steps/{n:int}/retry", include_in_schema=False, status_code=200)
async def retry_step(
    pipelines: NamedDependency[PipelineService], store: NamedDependency[JobStore],
    who: NamedDependency[Caller], pipeline_id: FromPath[str], n: FromPath[int],
) -> Template:
    p = await view(store, await pipelines.retry_step(pipeline_id, n, who))
    return Template("partials/pipeline_live.html", context={"p": p})


ROUTES = [pipelines_page, create_pipeline, pipeline_page, cancel_pipeline, retry_step]
