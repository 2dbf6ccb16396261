"""The dashboard: batches made, watched, fixed and downloaded in the browser (Jinja2 + htmx).

Every route lives under `/ui` in one `Router` (see `router()`). Sign-in, CSRF and "admins
only" are decided before a handler runs (`auth.AuthMiddleware`); here, each handler acts as the
signed-in key (`caller()`): it sees and touches that key's jobs only (an admin key: every job),
and the jobs it makes count against that key's quota. Pages are rendered on the server; htmx
swaps fragments, and one Server-Sent Events stream per open page pushes each changed job's new
row (the htmx SSE extension swaps it in). Nothing polls.

A batch is made in three steps, so that nothing typed or uploaded is lost when something is
wrong: each dropped file is uploaded on its own (with progress) into the blob store and checked
by its content; the form is then planned into jobs and previewed, every row that cannot run
saying why; only then are the jobs created, from the stored files' hashes, all in one
transaction.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import io
import itertools
import json
import logging
import re
import secrets
import time
import zipfile
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.exceptions import HTTPException, ValidationException
from litestar.params import FromPath, QueryParameter
from litestar.plugins.htmx import ClientRedirect, HTMXRequest
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Redirect, ServerSentEvent, ServerSentEventMessage, Stream, Template
from litestar.static_files import create_static_files_router
from litestar.types import Guard
from markupsafe import Markup
from PIL import Image

from ..auth import Caller, LimitError, caller
from ..models import TASK_INPUTS, ApiError, GenerationParams, generation_params, iso
from ..store import STATES, TERMINAL, BatchItem, BatchJobSpec, Job
from .api import ranged_file
from .nodes import NodeView, node_view

if TYPE_CHECKING:
    from litestar.types import ControllerRouterHandler

    from ..app import Gateway

log = logging.getLogger("x2v_gateway.dashboard")

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
TASKS = ("s2v", "i2v", "t2v")
MODES = {
    "each": "Every image with every audio",
    "pair": "Images and audio paired by file name",
    "manifest": "A CSV or JSONL manifest",
    "grid": "Prompts × seeds",
}
# A batch is one transaction and one preview page; bigger runs are split by the user.
MAX_BATCH_JOBS = 2000
BATCH_PAGE_ROWS = 500
LIST_PAGE_ROWS = 50
# The form's parameters besides prompt and seed (the "usual" ones); a manifest may set any
# generation parameter.
FORM_PARAMS = ("infer_steps", "target_shape", "video_duration", "target_fps", "resize_mode")
LABELS = {
    "prompt": "Prompt", "negative_prompt": "Negative prompt", "seed": "Seed",
    "infer_steps": "Steps", "target_shape": "Size (height,width)",
    "video_duration": "Video length (s)", "target_fps": "Frames per second",
    "resize_mode": "Resize mode", "priority": "Priority", "target_video_length": "Frames",
    "num_fragments": "Fragments", "sr_ratio": "Super-resolution ratio",
    "use_prompt_enhancer": "Prompt enhancer", "lora_name": "LoRA", "lora_strength": "LoRA strength",
}
RESIZE_MODES = ("adaptive", "keep_ratio_fixed_area", "fixed_min_area", "fixed_max_area",
                "fixed_shape", "fixed_min_side")
MANIFEST_COLUMNS = ("image", "audio", *GenerationParams.__struct_fields__, "priority")


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway


# -- templates and static files ---------------------------------------------------------------


def templates_dir() -> Path:
    """`templates/` at the repository root, or `x2v_gateway/templates` inside an installed wheel."""
    packaged = Path(__file__).resolve().parent.parent / "templates"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "templates"


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
        TERMINAL=TERMINAL,
    )
    env.filters.update(when=_when, seconds=_seconds, size=_size, params_text=_params_text)
    engine.register_template_callable("signed_in", _signed_in)
    env.trim_blocks = env.lstrip_blocks = True


def static_files() -> ControllerRouterHandler:
    """htmx, its SSE extension, the dashboard's CSS and JS: open to everyone, like /healthz."""
    return create_static_files_router(
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


def _render(request: Request, name: str, **context: Any) -> str:
    return request.app.template_engine.get_template(name).render(**context)


# -- planning a batch: the form -> jobs, each one checked ---------------------------------------


@dataclass
class Upload:
    """A file dropped on the form: kept in the blob store (`sha256`), or refused (`error`)."""

    name: str
    role: str  # image | audio
    sha256: str | None = None
    size: int | None = None
    error: str | None = None

    def as_json(self) -> str:
        data = {"name": self.name, "role": self.role}
        if self.error:
            data["error"] = self.error
        else:
            data.update(sha256=self.sha256, size=self.size)
        return json.dumps(data)


@dataclass
class PlannedJob:
    number: int
    source: str  # where the row came from: "face.png + voice.wav", "line 3"
    files: dict[str, str] = field(default_factory=dict)  # role -> file name
    inputs: dict[str, str] = field(default_factory=dict)  # role -> sha256
    params: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class BatchPlan:
    task: str
    mode: str
    jobs: list[PlannedJob]
    errors: list[str]  # about the whole form: nothing can be created until they are fixed
    summary: str = ""

    @property
    def bad_rows(self) -> int:
        return sum(1 for job in self.jobs if job.errors)

    @property
    def ok(self) -> bool:
        return bool(self.jobs) and not self.errors and not self.bad_rows


Image.init()
# Pillow's format names, as `media.inspect_image` records them: how a stored blob is known to be
# an image. Anything else that passed the upload checks is audio.
_IMAGE_KINDS = {fmt.lower().replace("jpeg", "jpg") for fmt in Image.registered_extensions().values()}


def _uploads(gw: Gateway, values: list[str]) -> list[Upload]:
    """The files listed in the form, checked against the blob store (the form is not trusted)."""
    uploads: dict[str, Upload] = {}
    for raw in values:
        try:
            data = json.loads(raw)
            name, role = str(data["name"]), str(data.get("role", "image"))
        except (ValueError, KeyError, TypeError):
            continue
        if data.get("error"):
            uploads[name] = Upload(name, role, error=str(data["error"]))
            continue
        sha = str(data.get("sha256", ""))
        blob = gw.store.blob(sha) if re.fullmatch(r"[0-9a-f]{64}", sha) else None
        if blob is None or not gw.blobs.exists(sha):
            uploads[name] = Upload(name, role, error=f"{name} is no longer stored on the gateway"
                                   " (uploaded more than an hour ago?); add it again")
            continue
        role = "image" if blob["kind"] in _IMAGE_KINDS else "audio"
        uploads[name] = Upload(name, role, sha, blob["size"])
    return list(uploads.values())


def _field_error(exc: msgspec.ValidationError) -> str:
    """msgspec's message for one parameter, in the form's words: `Seed: must be a whole number ≥ 0`."""
    message = str(exc)
    match = re.search(r" - at `\$\.(\w+)(?:\[\d+\])?`", message)
    text = message[:match.start()] if match else message
    if match and match.group(1) == "resize_mode":
        text = "must be one of " + ", ".join(RESIZE_MODES)
    words = {"int": "a whole number", "float": "a number", "str": "text", "bool": "true or false",
             "array": "a list"}
    text = re.sub(r"Expected `(\w+)(?: \| null)?`", lambda m: f"must be {words.get(m.group(1), m.group(1))}", text)
    text = re.sub(r", got `\w+`", "", text).replace(">=", "≥").replace("<=", "≤")
    if match:
        return f"{LABELS.get(match.group(1), match.group(1))}: {text}"
    return text


def _target_shape(value: Any) -> Any:
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,x×* ]+", value.strip()) if p]
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError
        return [int(p) for p in parts]
    return value


def _check_params(values: dict[str, Any]) -> tuple[dict[str, Any], int, list[str]]:
    """Validated generation parameters and priority from form or manifest values (text or JSON)."""
    values = {k: v for k, v in values.items() if v is not None and v != ""}
    priority = values.pop("priority", 0)
    if "target_shape" in values:
        try:
            values["target_shape"] = _target_shape(values["target_shape"])
        except ValueError:
            return {}, 0, [f"{LABELS['target_shape']}: write it as height,width, for example 480,832"]
    try:
        params = generation_params(msgspec.convert(values, GenerationParams, strict=False))
    except msgspec.ValidationError as exc:
        return {}, 0, [_field_error(exc)]
    try:
        priority = int(priority)
        if not -100 <= priority <= 100:
            raise ValueError
    except (TypeError, ValueError):
        return params, 0, ["Priority: must be a whole number from -100 to 100"]
    return params, priority, []


def _seeds(text: str) -> list[int | None]:
    """`1, 2, 10-12` -> [1, 2, 10, 11, 12]; empty -> one random seed."""
    seeds: list[int | None] = []
    for part in filter(None, (p.strip() for p in re.split(r"[,\s]+", text.strip()))):
        if m := re.fullmatch(r"(\d+)-(\d+)", part):
            first, last = int(m.group(1)), int(m.group(2))
            if last < first or last - first >= MAX_BATCH_JOBS:
                raise ValueError(part)
            seeds += range(first, last + 1)
        elif part.isdigit():
            seeds.append(int(part))
        else:
            raise ValueError(part)
    return seeds or [None]


def _input_sets(task: str, uploads: list[Upload], errors: list[str]) -> list[dict[str, Upload]]:
    """Every image with every audio (s2v), every image (i2v), nothing (t2v)."""
    images = [u for u in uploads if u.role == "image"]
    audios = [u for u in uploads if u.role == "audio"]
    if task == "t2v":
        if uploads:
            errors.append("t2v jobs take no files: remove the uploaded files, or choose s2v or i2v")
        return [{}]
    if not images:
        errors.append("Add at least one image (drop it on the file area or choose it)")
    if task == "i2v":
        if audios:
            errors.append("i2v jobs take no audio: remove the audio files, or choose s2v")
        return [{"image": i} for i in images]
    if not audios:
        errors.append("Add at least one audio file: s2v jobs need an image and an audio")
    return [{"image": i, "audio": a} for i, a in itertools.product(images, audios)]


def _paired(uploads: list[Upload], errors: list[str]) -> list[tuple[dict[str, Upload], list[str]]]:
    """Images and audio matched by file name without extension: face01.png + face01.wav."""
    groups: dict[str, dict[str, list[Upload]]] = {}
    for upload in uploads:
        groups.setdefault(Path(upload.name).stem.lower(), {}).setdefault(upload.role, []).append(upload)
    if not groups:
        errors.append("Add images and audio files whose names match, like face01.png and face01.wav")
    sets = []
    for stem, roles in groups.items():
        images, audios = roles.get("image", []), roles.get("audio", [])
        problems = []
        if len(images) > 1 or len(audios) > 1:
            names = ", ".join(u.name for u in images + audios)
            problems.append(f"{names}: several files are named {stem!r}; rename or remove one")
        if not images:
            problems.append(f"no image named {stem}.* to go with {audios[0].name}: add one, or remove the audio")
        if not audios:
            problems.append(f"no audio named {stem}.* to go with {images[0].name}: add one, or remove the image")
        chosen = {"image": images[0]} if images else {}
        if audios:
            chosen["audio"] = audios[0]
        sets.append((chosen, problems))
    return sets


def _manifest_rows(text: str, errors: list[str]) -> list[tuple[str, dict[str, Any], list[str]]]:
    """(where, values, problems) per row of a CSV (with a header) or JSONL manifest."""
    if not text.strip():
        errors.append("The manifest is empty: paste CSV or JSONL rows, or load a manifest file")
        return []
    rows: list[tuple[str, dict[str, Any], list[str]]] = []
    if text.lstrip().startswith("{"):
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"line {number}"
            try:
                values = json.loads(line)
            except ValueError as exc:
                rows.append((where, {}, [f"not valid JSON ({exc.args[0].split(':')[0]}): fix this line"]))
                continue
            if not isinstance(values, dict):
                rows.append((where, {}, ["each line must be a JSON object like {\"image\": \"face.png\"}"]))
                continue
            unknown = sorted(set(values) - set(MANIFEST_COLUMNS))
            problems = [f"unknown key {k!r}; keys can be: " + ", ".join(MANIFEST_COLUMNS) for k in unknown]
            rows.append((where, values, problems))
        return rows
    reader = csv.DictReader(io.StringIO(text.strip() + "\n"), skipinitialspace=True)
    header = [(h or "").strip().lower() for h in reader.fieldnames or []]
    unknown = [h for h in header if h not in MANIFEST_COLUMNS]
    if unknown:
        errors.append(
            "The manifest's first line names columns; these are not ones it can have: "
            + ", ".join(repr(h) for h in unknown) + ". Columns can be: " + ", ".join(MANIFEST_COLUMNS)
        )
        return []
    reader.fieldnames = header
    for row in reader:
        where = f"line {reader.line_num}"
        problems = []
        if None in row:  # more cells than the header has
            problems.append(f"{len(header) + len(row[None])} cells but the header names {len(header)}: check the commas")
            del row[None]
        rows.append((where, {k: (v or "").strip() for k, v in row.items()}, problems))
    if not rows:
        errors.append("The manifest has a header but no rows")
    return rows


def plan_batch(gw: Gateway, form: dict[str, str], files: list[str]) -> BatchPlan:
    """The jobs a filled-in batch form would create, each with what stops it from running."""
    task = form.get("task", "s2v")
    mode = form.get("mode", "each")
    errors: list[str] = []
    if task not in TASKS:
        errors.append(f"Choose a task type: {', '.join(TASKS)}")
        task = "s2v"
    if mode not in MODES:
        errors.append("Choose how to form the jobs")
        mode = "each"
    if not any(task in s.upstream.tasks for s in gw.dispatcher.states.values()):
        errors.append(f"No node of this gateway runs {task} jobs; choose another task type")
    uploads = _uploads(gw, files)
    by_name = {u.name: u for u in uploads}
    by_lower = {u.name.lower(): u for u in uploads}
    base = {name: form.get(name, "") for name in ("prompt", "negative_prompt", "seed", "priority", *FORM_PARAMS)}

    # (where, chosen inputs, value overrides, problems) per job
    rows: list[tuple[str, dict[str, Upload], dict[str, Any], list[str]]] = []
    if mode == "each":
        rows = [(_source(s), s, {}, []) for s in _input_sets(task, uploads, errors)]
    elif mode == "pair":
        if task != "s2v":
            errors.append("Pairing by file name is for s2v jobs (an image and an audio each)")
        rows = [(_source(s), s, {}, p) for s, p in _paired(uploads, errors)]
    elif mode == "grid":
        prompts = [line.strip() for line in form.get("prompts", "").splitlines() if line.strip()]
        try:
            seeds = _seeds(form.get("seeds", ""))
        except ValueError as exc:
            errors.append(f"Seeds: {exc} is not a seed; write numbers separated by commas, or a range like 1-8")
            seeds = []
        sets = _input_sets(task, uploads, errors)
        for inputs, prompt, seed in itertools.product(sets, prompts or [base["prompt"]], seeds):
            overrides = {"prompt": prompt, "seed": seed if seed is not None else ""}
            rows.append((_source(inputs), inputs, overrides, []))
    else:
        needed = TASK_INPUTS[task]
        for where, values, problems in _manifest_rows(form.get("manifest", ""), errors):
            inputs: dict[str, Upload] = {}
            for role in ("image", "audio"):
                name = str(values.pop(role, "") or "").strip()
                if not name:
                    if role in needed:
                        problems.append(f"no {role}: {task} jobs need " + " and ".join(needed))
                    continue
                if role not in needed:
                    problems.append(f"{task} jobs take no {role}: empty the {role} cell, or choose another task type")
                    continue
                upload = by_name.get(name) or by_lower.get(name.lower())
                if upload is None:
                    problems.append(f"{name} is not among the uploaded files: add it, or fix the name")
                    continue
                inputs[role] = upload
            overrides = {k: v for k, v in values.items() if k in MANIFEST_COLUMNS}
            rows.append((where, inputs, overrides, problems))

    if len(rows) > MAX_BATCH_JOBS:
        errors.append(f"This makes {len(rows)} jobs; a batch holds at most {MAX_BATCH_JOBS}: split it")
        rows = rows[:MAX_BATCH_JOBS]
    jobs = []
    for number, (where, inputs, overrides, problems) in enumerate(rows, start=1):
        job = PlannedJob(number=number, source=where, errors=list(problems))
        for role, upload in inputs.items():
            job.files[role] = upload.name
            if upload.error:
                job.errors.append(upload.error)
            elif upload.role != role:
                job.errors.append(f"{upload.name} is {'an image' if upload.role == 'image' else 'audio'},"
                                  f" not {'an image' if role == 'image' else 'audio'}: check the {role} column")
            else:
                job.inputs[role] = upload.sha256 or ""
        values = {**base, **{k: v for k, v in overrides.items() if v is not None and v != ""}}
        job.params, job.priority, problems = _check_params(values)
        job.errors += problems
        jobs.append(job)
    return BatchPlan(task=task, mode=mode, jobs=jobs, errors=errors, summary=_plan_summary(mode, uploads, jobs))


def _source(inputs: dict[str, Upload]) -> str:
    return " + ".join(u.name for u in inputs.values()) or "prompt only"


def _plan_summary(mode: str, uploads: list[Upload], jobs: list[PlannedJob]) -> str:
    n = len(jobs)
    jobs_text = f"{n} job" + ("" if n == 1 else "s")
    if mode == "each":
        images = sum(1 for u in uploads if u.role == "image")
        audios = sum(1 for u in uploads if u.role == "audio")
        if audios:
            return f"{jobs_text}: {images} image{'s' * (images != 1)} × {audios} audio file{'s' * (audios != 1)}"
        if images:
            return f"{jobs_text}: one per image"
    return jobs_text


def _new_batch_id() -> str:
    return "b" + base64.b32encode(secrets.token_bytes(10)).decode().lower()


async def create_batch(
    gw: Gateway, who: Caller, form: dict[str, str], files: list[str],
) -> tuple[BatchPlan, str | None]:
    """Plan the form again (never trust a preview) and, when every row can run, queue the jobs
    as `who`'s, counted against its daily quota."""
    plan = plan_batch(gw, form, files)
    if not plan.ok:
        return plan, None
    batch_id = form.get("batch_id", "")
    if not re.fullmatch(r"b[a-z0-9]{8,40}", batch_id):
        batch_id = _new_batch_id()
    specs = [
        BatchJobSpec(task=plan.task, params=job.params, inputs=job.inputs, files=job.files,
                     priority=job.priority)
        for job in plan.jobs
    ]
    kept_form = {k: v for k, v in form.items() if k not in ("batch_id",)}
    kept_form["files"] = [json.loads(f).get("name") for f in files]
    name = form.get("name", "").strip()[:200] or None
    existing = gw.store.batch(batch_id)
    if existing is not None:
        if not who.may_touch(existing["owner"]):
            batch_id = _new_batch_id()  # a guessed id of someone else's batch: a new one
        else:
            return plan, batch_id  # a second click on Create: show the batch the first one made
    async with gw.auth.counting_jobs(who, len(specs)) as count:
        made = await gw.jobs.submit_batch(
            batch_id, specs, owner=who.owner,
            batch={"name": name, "task": plan.task, "mode": plan.mode, "form": kept_form},
        )
        if made is None:
            count.refund()  # made by a click a moment earlier
    return plan, batch_id


# -- what the pages show -----------------------------------------------------------------------


@dataclass
class BatchSummary:
    id: str
    name: str
    task: str | None
    created_at: float | None
    counts: dict[str, int]
    eta: float | None  # seconds left, when there is enough to estimate from

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def done(self) -> int:
        return sum(self.counts[s] for s in TERMINAL)

    @property
    def left(self) -> int:
        return self.total - self.done

    @property
    def percent(self) -> int:
        return int(100 * self.done / self.total) if self.total else 0


def batch_summary(gw: Gateway, batch_id: str, who: Caller) -> BatchSummary:
    """Counts, progress and time left of the batch's jobs this caller may see."""
    batch = gw.store.batch(batch_id)
    if batch is not None and not who.may_touch(batch["owner"]):
        batch = None
    counts = gw.store.batch_counts(batch_id, owner=who.sees)
    if batch is None and not any(counts.values()):
        # Another key's batch looks exactly like one that does not exist.
        raise ApiError(404, f"There is no batch {batch_id}. The list of batches is on the Batches page.")
    created = batch["created_at"] if batch else gw.store.batch_created_at(batch_id, owner=who.sees)
    name = (batch or {}).get("name") or f"Batch {batch_id}"
    summary = BatchSummary(batch_id, name, (batch or {}).get("task"), created, counts, None)
    # Throughput so far, queueing included: jobs that ran to an end per second since the batch
    # was made. Cancelled jobs end at once and say nothing about speed.
    worked = counts["succeeded"] + counts["failed"]
    busy = counts["queued"] + counts["submitted"] + counts["running"]
    if worked and busy and created:
        summary.eta = busy * (time.time() - created) / worked
    return summary


@dataclass
class JobRow:
    item: BatchItem
    queue_position: int | None

    @property
    def job(self) -> Job:
        return self.item.job

    @property
    def took(self) -> float | None:
        """Seconds on a node (from when it was sent there: a fast job may never be seen running)."""
        job = self.job
        began = job.started_at or job.submitted_at
        if began is None:
            return None
        return (job.finished_at or time.time()) - began


def _rows(gw: Gateway, items: list[BatchItem]) -> list[JobRow]:
    positions = gw.store.queue_positions(item.job for item in items)
    return [JobRow(item, positions.get(item.job.id)) for item in items]


def _item(gw: Gateway, job_id: str, who: Caller) -> BatchItem:
    item = gw.store.batch_item(job_id)
    if item is None or not who.may_touch(item.job.owner):
        raise ApiError(404, f"There is no job {job_id}. Look for it in the Jobs list.")
    return item


def _list_filters(state: str | None, task: str | None, batch: str | None) -> dict[str, str]:
    filters = {}
    if state:
        if state not in STATES:
            raise ApiError(400, f"{state!r} is not a job state; states are " + ", ".join(STATES))
        filters["state"] = state
    if task:
        if task not in TASK_INPUTS:
            raise ApiError(400, f"{task!r} is not a task type; task types are " + ", ".join(TASK_INPUTS))
        filters["task"] = task
    if batch:
        filters["batch"] = batch.strip()
    return filters


def _jobs_page(
    gw: Gateway, who: Caller, filters: dict[str, str], before: int | None,
) -> tuple[list[JobRow], int | None]:
    jobs = gw.store.list_jobs(
        states=[filters["state"]] if "state" in filters else (),
        task=filters.get("task"), batch_id=filters.get("batch"), owner=who.sees, before_seq=before,
        limit=LIST_PAGE_ROWS + 1,
    )
    more = len(jobs) > LIST_PAGE_ROWS
    jobs = jobs[:LIST_PAGE_ROWS]
    positions = gw.store.queue_positions(jobs)
    rows = [JobRow(BatchItem(job, None, {}, None), positions.get(job.id)) for job in jobs]
    return rows, (jobs[-1].seq if more else None)


def node_rows(gw: Gateway) -> list[NodeView]:
    """The nodes as `GET /api/v1/nodes` shows them."""
    return [node_view(gw, state) for state in gw.dispatcher.states.values()]


# -- actions -----------------------------------------------------------------------------------


def _retry_params(job: Job, prompt: str, seed: str) -> dict[str, Any]:
    values = {**job.params, "prompt": prompt}
    values.pop("seed", None)
    if seed.strip():
        values["seed"] = seed.strip()
    params, _, problems = _check_params(values)
    if problems:
        raise ApiError(422, problems[0], "seed" if "Seed" in problems[0] else "prompt")
    return params


async def run_again(gw: Gateway, who: Caller, job: Job, prompt: str, seed: str) -> tuple[Job, bool]:
    """Retry a job; with an edited prompt or seed, as a new job in its batch. (job, is_new).

    Either way it costs a GPU as much as a new job, so it counts against the caller's quota.
    """
    if not job.finished:
        raise ApiError(409, f"This job is {job.state}: cancel it first, or wait for it to end")
    params = _retry_params(job, prompt, seed)
    unchanged = params.get("prompt", "") == job.params.get("prompt", "") and (
        not seed.strip() or params.get("seed") == job.params.get("seed")
    )
    async with gw.auth.counting_jobs(who):
        if unchanged and job.state in ("failed", "cancelled"):
            if job.files_expired:
                raise ApiError(410, "This job's input files have expired; submit it again with its files")
            return await gw.dispatcher.retry(job.id), False
        item = gw.store.batch_item(job.id)
        return await gw.jobs.run_again(job, params, item.files if item else {}), True


async def cancel_batch(gw: Gateway, who: Caller, batch_id: str) -> int:
    cancelled = 0
    for item in _all_items(gw, batch_id, who.sees):
        if not item.job.finished:
            job = await gw.dispatcher.cancel(item.job.id)
            cancelled += job is not None and job.state == "cancelled"
    return cancelled


async def retry_failed(gw: Gateway, who: Caller, batch_id: str) -> tuple[int, int, str | None]:
    """Failed jobs of the batch back to the queue: (retried, skipped because their files
    expired, why the rest was not retried: the caller's quota ran out).

    A failed job already run again with an edited prompt or seed is left alone: its new run
    stands for it.
    """
    retried = expired = 0
    for item in list(_all_items(gw, batch_id, who.sees)):
        if item.job.state != "failed" or item.retried_as:
            continue
        if item.job.files_expired:
            expired += 1
            continue
        try:
            async with gw.auth.counting_jobs(who):
                await gw.dispatcher.retry(item.job.id)
        except LimitError as exc:
            return retried, expired, exc.message
        retried += 1
    return retried, expired, None


def _all_items(gw: Gateway, batch_id: str, owner: str | None) -> Iterable[BatchItem]:
    after = 0
    while items := gw.store.batch_items(batch_id, after_seq=after, limit=1000, owner=owner):
        yield from items
        after = items[-1].job.seq


# -- the zip of a batch's videos ---------------------------------------------------------------


class _ZipSink(io.RawIOBase):
    """A write-only, unseekable file for `zipfile`: what was written is taken out as it comes.

    Unseekable, zipfile writes each member's sizes after its data (data descriptors), so the
    archive streams out while it is made and is never whole in memory.
    """

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._chunks.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data


MANIFEST_FIELDS = (
    "file", "job_id", "position", "state", "task", "image", "audio", "prompt", "negative_prompt",
    "seed", "parameters", "node", "attempts", "created_at", "started_at", "finished_at",
    "seconds", "error", "retry_of",
)


def _video_name(item: BatchItem, taken: set[str]) -> str:
    stems = [Path(name).stem for name in item.files.values()]
    label = "_".join([f"{item.position:04d}" if item.position else item.job.id, *stems])
    label = re.sub(r"[^\w.\-]+", "-", label).strip("-")[:120] or item.job.id
    name, n = f"{label}.mp4", 1
    while name in taken:
        n += 1
        name = f"{label}-{n}.mp4"
    taken.add(name)
    return name


def _manifest_row(item: BatchItem, file: str) -> dict[str, Any]:
    job = item.job
    params = dict(job.params)
    began = job.started_at or job.submitted_at
    took = job.finished_at - began if job.finished_at and began else None
    return {
        "file": file, "job_id": job.id, "position": item.position or "", "state": job.state,
        "task": job.task, "image": item.files.get("image", ""), "audio": item.files.get("audio", ""),
        "prompt": params.pop("prompt", ""), "negative_prompt": params.pop("negative_prompt", ""),
        "seed": params.pop("seed", ""), "parameters": json.dumps(params, sort_keys=True) if params else "",
        "node": job.upstream or "", "attempts": job.attempts, "created_at": iso(job.created_at),
        "started_at": iso(job.started_at) or "", "finished_at": iso(job.finished_at) or "",
        "seconds": f"{took:.1f}" if took is not None else "", "error": job.error or "",
        "retry_of": item.retry_of or "",
    }


async def batch_zip(gw: Gateway, batch_id: str, owner: str | None) -> AsyncIterator[bytes]:
    """The batch's videos and a manifest.csv describing every job, as a zip made while it streams."""
    videos: list[tuple[str, Path]] = []
    manifest = io.StringIO()
    writer = csv.DictWriter(manifest, fieldnames=MANIFEST_FIELDS)
    writer.writeheader()
    taken: set[str] = set()
    for item in _all_items(gw, batch_id, owner):
        job, file = item.job, ""
        if job.state == "succeeded" and job.result_sha and not job.files_expired:
            path = gw.blobs.path(job.result_sha)
            if path.is_file():
                file = _video_name(item, taken)
                videos.append((file, path))
        writer.writerow(_manifest_row(item, file))
    sink = _ZipSink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, path in videos:
            info = zipfile.ZipInfo(name, date_time=time.localtime(path.stat().st_mtime)[:6])
            info.file_size = path.stat().st_size  # lets zipfile pick zip64 up front for huge files
            with path.open("rb") as source, archive.open(info, "w") as member:
                while chunk := await asyncio.to_thread(source.read, 1024 * 1024):
                    member.write(chunk)
                    yield sink.take()
            yield sink.take()
        archive.writestr("manifest.csv", manifest.getvalue())
    yield sink.take()


# -- live updates ------------------------------------------------------------------------------

# Changes are gathered for a moment and sent together: a batch of 200 jobs finishing at once is
# one burst of rows, not 200 separate renders per open page.
COALESCE_SECONDS = 0.25
HEARTBEAT_SECONDS = 15.0


@dataclass
class Feed:
    """What one open page wants to hear about, as SSE messages, for the key it is shown to."""

    request: Request
    who: Caller
    view: str  # batch | list | job | home | nodes
    key: str | None  # the batch or job id
    since: float
    min_interval: float = COALESCE_SECONDS
    # What each job looked like when last sent: the dispatcher reports a job "changed" more
    # often than it visibly changes, and an unchanged row is not sent again.
    _sent: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.view in ("home", "nodes"):
            self.min_interval = 1.5  # whole tables are fetched again: at most this often

    @property
    def gw(self) -> Gateway:
        return gateway(self.request)

    def stale(self) -> bool:
        """Did what the page shows change between its render and this connection?"""
        if self.view == "job" and self.key:
            job = self.gw.store.get(self.key)
            return job is not None and self.who.may_touch(job.owner) and job.updated_at > self.since
        if self.view == "batch" and self.key:
            return any(item.job.updated_at > self.since
                       for item in _all_items(self.gw, self.key, self.who.sees))
        return False

    def messages(self, ids: set[str]) -> list[ServerSentEventMessage]:
        store, out = self.gw.store, []
        if self.view in ("home", "nodes"):
            return [ServerSentEventMessage(event="changed", data="")]
        if self.view == "job":
            job = store.get(self.key or "") if self.key in ids else None
            if job and self.who.may_touch(job.owner) and self._changed(job):
                out.append(ServerSentEventMessage(event=f"job-{job.id}", data=self._job_live(job)))
            return out
        added, changed = False, []
        for job_id in sorted(ids):
            item = store.batch_item(job_id)
            if item is None or not self.who.may_touch(item.job.owner):
                continue
            if self.view == "batch" and item.job.batch_id != self.key:
                continue
            if not self._changed(item.job):
                continue
            if item.job.created_at > self.since:
                added = True
                if self.view == "batch":
                    continue  # the table is fetched again, with this row in its place
            changed.append(item)
        template = "partials/batch_row.html" if self.view == "batch" else "partials/job_row.html"
        for row in _rows(self.gw, changed):  # queue positions: one query for all of them
            out.append(ServerSentEventMessage(
                event=f"job-{row.job.id}", data=_render(self.request, template, row=row),
            ))
        if added:
            self.since = time.time()
            out.append(ServerSentEventMessage(event="added", data=""))
        if self.view == "batch" and (out or added):
            summary = batch_summary(self.gw, self.key or "", self.who)
            out.append(ServerSentEventMessage(
                event="summary", data=_render(self.request, "partials/batch_summary.html", s=summary),
            ))
        return out

    def _changed(self, job: Job) -> bool:
        look = (job.state, job.updated_at, json.dumps(job.queue_info, sort_keys=True))
        if self._sent.get(job.id) == look:
            return False
        self._sent[job.id] = look
        return True

    def _job_live(self, job: Job) -> str:
        return _render(self.request, "partials/job_live.html", **_job_context(self.gw, job))


async def _event_stream(feed: Feed) -> AsyncIterator[ServerSentEventMessage]:
    notifier = feed.gw.notifier
    queue = notifier.subscribe()
    try:
        # `retry`: how long the browser waits before it reconnects after the stream breaks.
        yield ServerSentEventMessage(data=None, comment="live", retry=3000)
        if feed.stale():
            yield ServerSentEventMessage(event="resync", data="")
        last = 0.0
        while True:
            try:
                first = await asyncio.wait_for(queue.get(), HEARTBEAT_SECONDS)
            except TimeoutError:
                # Keeps proxies from closing an idle stream, and shows a dead one to the browser.
                yield ServerSentEventMessage(data=None, comment="keep-alive")
                if feed.view == "nodes":  # node health changes without any job changing
                    yield ServerSentEventMessage(event="changed", data="")
                continue
            await asyncio.sleep(max(COALESCE_SECONDS, feed.min_interval - (time.monotonic() - last)))
            ids = {first}
            while not queue.empty():
                ids.add(queue.get_nowait())
            for message in feed.messages(ids):
                yield message
            last = time.monotonic()
    finally:
        notifier.unsubscribe(queue)


# -- pages and fragments -----------------------------------------------------------------------


def _form_values(form: Any) -> tuple[dict[str, str], list[str]]:
    values = {k: str(v) for k, v in form.items() if k != "file" and isinstance(v, str)}
    return values, [v for v in form.getall("file") if isinstance(v, str)] if "file" in form else []


def _recent(gw: Gateway, who: Caller) -> list[BatchSummary]:
    return [batch_summary(gw, batch_id, who)
            for batch_id in gw.store.recent_batch_ids(limit=20, owner=who.sees)]


@get("/", include_in_schema=False)
async def home(request: HTMXRequest) -> Template:
    gw, who = gateway(request), caller(request)
    return Template("home.html", context={
        "counts": gw.store.owner_counts(who.sees), "batches": _recent(gw, who),
        "nodes": node_rows(gw), "since": time.time(),
    })


@get("/batches/recent", include_in_schema=False)
async def recent_batches(request: HTMXRequest) -> Template:
    gw, who = gateway(request), caller(request)
    return Template("partials/batch_list.html", context={
        "counts": gw.store.owner_counts(who.sees), "batches": _recent(gw, who),
    })


@get("/batches/new", include_in_schema=False)
async def new_batch(request: HTMXRequest) -> Template:
    gw = gateway(request)
    tasks = {t for s in gw.dispatcher.states.values() for t in s.upstream.tasks}
    return Template("batch_new.html", context={
        "batch_id": _new_batch_id(), "available_tasks": tasks,
        "max_file_mb": gw.settings.max_file_mb, "max_jobs": MAX_BATCH_JOBS,
        "manifest_columns": MANIFEST_COLUMNS,
    })


_UPLOAD_HINTS = {
    ("audio", True): ": export it again as WAV, MP3 or M4A",
    ("image", True): ": save it again as PNG or JPEG",
}


@post("/uploads", include_in_schema=False, request_max_body_size=None, status_code=200)
async def upload(request: HTMXRequest) -> Template:
    """One file from the batch form into the blob store; answers with its line in the file list."""
    gw = gateway(request)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ApiError(415, "upload files as multipart/form-data")
    declared = request.headers.get("content-length", "")
    size = int(declared) if declared.isdigit() else 0
    # Refused on the headers, before a byte of the body is read.
    if size > gw.settings.max_file_mb * 1024 * 1024 + 64 * 1024:
        raise ApiError(413, f"This file is larger than the {gw.settings.max_file_mb} MiB a file may be")
    gw.jobs.check_free_space(size)
    try:
        kept = await gw.jobs.keep_upload(content_type, request.stream())
    except ApiError as exc:
        if exc.status != 422:
            raise
        name = request.query_params.get("name") or "file"
        role = exc.field if exc.field in ("image", "audio") else "image"
        refused = Upload(name, role, error=exc.message + _UPLOAD_HINTS.get((role, "readable" in exc.message), ""))
        return Template("partials/upload_item.html", context={"u": refused}, status_code=422)
    uploaded = Upload(kept.name, kept.role, kept.sha256, kept.size)
    return Template("partials/upload_item.html", context={"u": uploaded})


@post("/batches/preview", include_in_schema=False, request_max_body_size=8 * 1024 * 1024, status_code=200)
async def preview_batch(request: HTMXRequest) -> Template:
    values, files = _form_values(await request.form())
    plan = plan_batch(gateway(request), values, files)
    return Template("partials/preview.html", context={"plan": plan},
                    status_code=200 if plan.ok else 422)


@post("/batches", include_in_schema=False, request_max_body_size=8 * 1024 * 1024, status_code=200)
async def create_batch_route(request: HTMXRequest) -> Response:
    values, files = _form_values(await request.form())
    plan, batch_id = await create_batch(gateway(request), caller(request), values, files)
    if batch_id is None:
        return Template("partials/preview.html", context={"plan": plan}, status_code=422)
    return ClientRedirect(f"/ui/batches/{batch_id}")


@get("/batches/{batch_id:str}", include_in_schema=False)
async def batch_page(
    request: HTMXRequest, batch_id: FromPath[str],
    after: Annotated[int, QueryParameter(ge=0)] = 0,
) -> Template:
    gw, who = gateway(request), caller(request)
    summary = batch_summary(gw, batch_id, who)
    items = gw.store.batch_items(batch_id, after_seq=after, limit=BATCH_PAGE_ROWS + 1, owner=who.sees)
    return Template("batch.html", context={
        "s": summary, "rows": _rows(gw, items[:BATCH_PAGE_ROWS]), "after": after,
        "next_after": items[BATCH_PAGE_ROWS - 1].job.seq if len(items) > BATCH_PAGE_ROWS else None,
        "page_rows": BATCH_PAGE_ROWS, "since": time.time(),
    })


@get("/batches/{batch_id:str}/rows", include_in_schema=False)
async def batch_rows(
    request: HTMXRequest, batch_id: FromPath[str],
    after: Annotated[int, QueryParameter(ge=0)] = 0,
) -> Template:
    gw, who = gateway(request), caller(request)
    batch_summary(gw, batch_id, who)  # 404 for a batch this key cannot see
    items = gw.store.batch_items(batch_id, after_seq=after, limit=BATCH_PAGE_ROWS, owner=who.sees)
    return Template("partials/batch_rows.html", context={"rows": _rows(gw, items)})


@get("/batches/{batch_id:str}/summary", include_in_schema=False)
async def batch_summary_fragment(request: HTMXRequest, batch_id: FromPath[str]) -> Template:
    summary = batch_summary(gateway(request), batch_id, caller(request))
    return Template("partials/batch_summary.html", context={"s": summary})


@post("/batches/{batch_id:str}/cancel", include_in_schema=False, status_code=200)
async def cancel_batch_route(request: HTMXRequest, batch_id: FromPath[str]) -> Template:
    gw, who = gateway(request), caller(request)
    batch_summary(gw, batch_id, who)  # 404 for a batch this key cannot see
    n = await cancel_batch(gw, who, batch_id)
    message = f"Cancelled {n} job{'s' * (n != 1)}." if n else "Nothing to cancel: every job had ended."
    return _flash(message)


@post("/batches/{batch_id:str}/retry-failed", include_in_schema=False, status_code=200)
async def retry_failed_route(request: HTMXRequest, batch_id: FromPath[str]) -> Template:
    gw, who = gateway(request), caller(request)
    batch_summary(gw, batch_id, who)
    retried, expired, stopped = await retry_failed(gw, who, batch_id)
    message = f"Queued {retried} failed job{'s' * (retried != 1)} again." if retried else "No failed job was retried."
    if expired:
        message += f" {expired} could not be retried: their input files have expired; submit them again."
    if stopped:
        message += f" The rest were not: {stopped}."
    return _flash(message)


def _flash(message: str) -> Template:
    # The table and counts refetch themselves on `rows-changed`, whether or not SSE is connected.
    return Template("partials/flash.html", context={"message": message}, headers={"HX-Trigger": "rows-changed"})


@get("/batches/{batch_id:str}/videos.zip", include_in_schema=False)
async def batch_videos(request: HTMXRequest, batch_id: FromPath[str]) -> Stream:
    gw, who = gateway(request), caller(request)
    batch_summary(gw, batch_id, who)
    return Stream(
        batch_zip(gw, batch_id, who.sees), media_type="application/zip",
        headers={"content-disposition": f'attachment; filename="{batch_id}.zip"', "cache-control": "no-store"},
    )


@get("/jobs", include_in_schema=False)
async def jobs_page(
    request: HTMXRequest,
    state_filter: Annotated[str | None, QueryParameter(name="state")] = None,
    task: Annotated[str | None, QueryParameter()] = None,
    batch: Annotated[str | None, QueryParameter()] = None,
    before: Annotated[int | None, QueryParameter(ge=1)] = None,
) -> Template:
    gw, who = gateway(request), caller(request)
    filters = _list_filters(state_filter, task, batch)
    rows, next_before = _jobs_page(gw, who, filters, before)
    return Template("jobs.html", context={
        "rows": rows, "filters": filters, "before": before, "next_before": next_before,
        "counts": gw.store.owner_counts(who.sees), "since": time.time(),
    })


@get("/jobs/rows", include_in_schema=False)
async def jobs_rows(
    request: HTMXRequest,
    state_filter: Annotated[str | None, QueryParameter(name="state")] = None,
    task: Annotated[str | None, QueryParameter()] = None,
    batch: Annotated[str | None, QueryParameter()] = None,
) -> Template:
    """The newest page of the jobs list again (new jobs arrived, or the stream reconnected)."""
    filters = _list_filters(state_filter, task, batch)
    rows, _ = _jobs_page(gateway(request), caller(request), filters, None)
    return Template("partials/job_rows.html", context={"rows": rows, "filters": filters})


def _job_context(gw: Gateway, job: Job) -> dict[str, Any]:
    item = gw.store.batch_item(job.id)
    return {
        "job": job, "item": item, "events": gw.store.events(job.id),
        "queue_position": gw.store.queue_position(job),
        "batch": gw.store.batch(job.batch_id) if job.batch_id else None,
    }


@get("/jobs/{job_id:str}", include_in_schema=False)
async def job_page(request: HTMXRequest, job_id: FromPath[str]) -> Template:
    gw = gateway(request)
    job = _item(gw, job_id, caller(request)).job
    inputs = {role: gw.store.blob(sha) for role, sha in job.inputs.items()}
    return Template("job.html", context={**_job_context(gw, job), "inputs": inputs, "since": time.time()})


@get("/jobs/{job_id:str}/live", include_in_schema=False)
async def job_live(request: HTMXRequest, job_id: FromPath[str]) -> Template:
    gw = gateway(request)
    return Template("partials/job_live.html", context=_job_context(gw, _item(gw, job_id, caller(request)).job))


@get("/jobs/{job_id:str}/retry-form", include_in_schema=False)
async def retry_form(request: HTMXRequest, job_id: FromPath[str]) -> Template:
    """The retry form of a row of the batch page, prefilled with the job's prompt and seed."""
    job = _item(gateway(request), job_id, caller(request)).job
    return Template("partials/retry_form.html", context={"job": job})


_MEDIA_TYPES = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif",
                "wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac", "ogg": "audio/ogg",
                "m4a": "audio/mp4", "aac": "audio/aac", "webm": "audio/webm"}


@get("/jobs/{job_id:str}/inputs/{role:str}", include_in_schema=False)
async def job_input(request: HTMXRequest, job_id: FromPath[str], role: FromPath[str]) -> Response:
    """An input file of a job (for the thumbnail and the audio player), with Range support."""
    gw = gateway(request)
    item = _item(gw, job_id, caller(request))
    sha = item.job.inputs.get(role)
    if sha is None:
        raise ApiError(404, f"This job has no {role} input")
    path = gw.blobs.path(sha)
    if item.job.files_expired or not path.is_file():
        raise ApiError(410, "This input file has expired and was deleted")
    blob = gw.store.blob(sha) or {}
    kind = blob.get("kind", "bin")
    return ranged_file(
        path, request.headers.get("range"), media_type=_MEDIA_TYPES.get(kind, "application/octet-stream"),
        filename=re.sub(r"[^\w.\- ]", "_", item.files.get(role) or f"{role}.{kind}"),
    )


def _job_fragment(gw: Gateway, who: Caller, job: Job, view: str, headers: dict[str, str] | None = None) -> Template:
    if view == "job":
        return Template("partials/job_live.html", context=_job_context(gw, job), headers=headers)
    (row,) = _rows(gw, [_item(gw, job.id, who)])
    template = "partials/batch_row.html" if view == "batch" else "partials/job_row.html"
    return Template(template, context={"row": row}, headers=headers)


@post("/jobs/{job_id:str}/cancel", include_in_schema=False, status_code=200)
async def cancel_job(
    request: HTMXRequest, job_id: FromPath[str], view: Annotated[str, QueryParameter()] = "list",
) -> Template:
    gw, who = gateway(request), caller(request)
    _item(gw, job_id, who)
    job = await gw.dispatcher.cancel(job_id)
    return _job_fragment(gw, who, job, view, headers={"HX-Trigger": "rows-changed"})


@post("/jobs/{job_id:str}/retry", include_in_schema=False, status_code=200, request_max_body_size=64 * 1024)
async def retry_job(
    request: HTMXRequest, job_id: FromPath[str], view: Annotated[str, QueryParameter()] = "list",
) -> Response:
    gw, who = gateway(request), caller(request)
    old = _item(gw, job_id, who).job
    form = await request.form()
    prompt = str(form.get("prompt", old.params.get("prompt", "")))
    seed = str(form.get("seed", ""))
    job, is_new = await run_again(gw, who, old, prompt, seed)
    if view == "job" and is_new:
        return ClientRedirect(f"/ui/jobs/{job.id}")
    shown = gw.store.get(old.id) if is_new else job
    return _job_fragment(gw, who, shown, view, headers={"HX-Trigger": "rows-changed"})


@get("/nodes", include_in_schema=False)
async def nodes_page(request: HTMXRequest) -> Template:
    return Template("nodes.html", context={"nodes": node_rows(gateway(request))})


@get("/nodes/table", include_in_schema=False)
async def nodes_table(request: HTMXRequest) -> Template:
    return Template("partials/nodes_table.html", context={"nodes": node_rows(gateway(request))})


@post("/nodes/{name:str}/drain", include_in_schema=False, status_code=200, request_max_body_size=4096)
async def drain_node(request: HTMXRequest, name: FromPath[str]) -> Template:
    """The drain switch. Admin keys only (auth.ADMIN_CHANGES), and audited there."""
    gw = gateway(request)
    drained = (await request.form()).get("drained") == "on"
    await gw.registry.set_drained(name, drained)
    return Template("partials/nodes_table.html", context={"nodes": node_rows(gw)})


@get("/events", include_in_schema=False)
async def events(
    request: HTMXRequest,
    view: Annotated[str, QueryParameter(pattern=r"^(batch|list|job|home|nodes)$")] = "list",
    key: Annotated[str | None, QueryParameter(max_length=100)] = None,
    since: Annotated[float | None, QueryParameter()] = None,
) -> ServerSentEvent:
    """Server-Sent Events for one open page: changed rows as HTML, ready to swap in."""
    feed = Feed(request, caller(request), view, key, since if since is not None else time.time())
    return ServerSentEvent(_event_stream(feed))


# -- errors ------------------------------------------------------------------------------------


def _error_page(request: Request, status: int, message: str) -> Response:
    if request.headers.get("hx-request"):
        return Template("partials/error_message.html", context={"message": message}, status_code=status)
    return Template("error.html", context={"status": status, "message": message}, status_code=status)


def _api_error(request: Request, exc: ApiError) -> Response:
    response = _error_page(request, exc.status, exc.message)
    if isinstance(exc, LimitError):
        response.headers["retry-after"] = str(max(1, round(exc.retry_after)))
    return response


def _validation_error(request: Request, exc: ValidationException) -> Response:
    extra = exc.extra if isinstance(exc.extra, list) else []
    first = extra[0] if extra and isinstance(extra[0], dict) else {}
    where = f"{first.get('key')}: " if first.get("key") else ""
    return _error_page(request, 400, f"{where}{first.get('message') or exc.detail}. Check the address.")


def _http_error(request: Request, exc: HTTPException) -> Response:
    return _error_page(request, exc.status_code, exc.detail)


def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _error_page(request, 500, "Something went wrong on the gateway; its log has the details. Try again.")


@get("/", include_in_schema=False)
async def root() -> Redirect:
    """The gateway's front door is the dashboard."""
    return Redirect("/ui/")


ROUTES = [
    home, recent_batches, new_batch, upload, preview_batch, create_batch_route, batch_page,
    batch_rows, batch_summary_fragment, cancel_batch_route, retry_failed_route, batch_videos,
    jobs_page, jobs_rows, job_page, job_live, retry_form, job_input, cancel_job, retry_job, nodes_page,
    nodes_table, drain_node, events,
]


def router(guards: Sequence[Guard] = ()) -> Router:
    """Every dashboard route, under /ui.

    Sign-in and CSRF are checked for all of them by `auth.AuthMiddleware` (the templates send
    the session's `X-CSRFToken` on every htmx request and upload); `guards` can add more.
    """
    return Router(
        path="/ui", route_handlers=ROUTES, guards=list(guards), request_class=HTMXRequest,
        exception_handlers={
            # LimitError too: the app's own handler for it answers JSON.
            ApiError: _api_error, LimitError: _api_error, ValidationException: _validation_error,
            HTTPException: _http_error, Exception: _internal_error,
        },
        include_in_schema=False,
    )
