"""Planning a batch: a filled-in form -> the jobs it would create, every row checked.

A batch is made in three steps, so that nothing typed or uploaded is lost when something is
wrong: each dropped file is uploaded on its own into the blob store and checked by its content
(`BodyReader.keep_dropped`); the form is then planned into jobs (here), every row that cannot
run saying why; only then are the jobs created (`JobService.create_batch`), from the stored
files' hashes, all in one transaction. Nothing here knows about HTTP, and nothing here writes.
"""

from __future__ import annotations

import base64
import functools
import itertools
import json
import re
import secrets
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from . import manifest
from .blobs import BlobStore
from .media import VIDEO_KINDS
from .schemas import TASK_INPUTS, ApiError, GenerationParams, field_problem, generation_params
from .store import BatchJobSpec, JobStore

TASKS = ("s2v", "i2v", "t2v", "flf2v", "t2i", "i2i", "animate")
# What the form says of each task type (its <select>).
TASK_LABELS = {
    "s2v": "s2v: talking video from an image and a voice-over",
    "i2v": "i2v: video from an image",
    "t2v": "t2v: video from the prompt alone",
    "flf2v": "flf2v: video from a first and a last frame",
    "t2i": "t2i: image from the prompt alone",
    "i2i": "i2i: image from an image",
    "animate": "animate: video of an image moving as a driving video does",
}
# flf2v pairs a first frame with a last frame by file name: `shot01_first.png` (or plain
# `shot01.png`) with `shot01_last.png`.
_LAST_FRAME = re.compile(r"^(.*?)[ _.-]last$", re.I)
_FIRST_FRAME = re.compile(r"^(.*?)[ _.-]first$", re.I)
MODES = {
    "each": "Every image with every audio",
    "pair": "Images and audio paired by file name",
    "manifest": "A CSV or JSONL manifest",
    "grid": "Prompts × seeds",
}
# A batch is one transaction and one preview page; bigger runs are split by the user.
MAX_BATCH_JOBS = 2000
# Two files a job at most (an image and an audio, a last frame or a video), so a form listing more cannot be a batch.
MAX_BATCH_FILES = 2 * MAX_BATCH_JOBS
# The form's parameters besides prompt and seed (the "usual" ones); a manifest may set any
# generation parameter.
FORM_PARAMS = ("infer_steps", "target_shape", "video_duration", "target_fps", "resize_mode", "aspect_ratio")
LABELS = {
    "prompt": "Prompt", "negative_prompt": "Negative prompt", "seed": "Seed",
    "infer_steps": "Steps", "target_shape": "Size (height,width)",
    "video_duration": "Video length (s)", "target_fps": "Frames per second",
    "resize_mode": "Resize mode", "priority": "Priority", "target_video_length": "Frames",
    "num_fragments": "Fragments", "sr_ratio": "Super-resolution ratio",
    "use_prompt_enhancer": "Prompt enhancer", "lora_name": "LoRA", "lora_strength": "LoRA strength",
    "aspect_ratio": "Image shape (width:height)", "i2i_denoise_strength": "Denoise strength (i2i)",
}
RESIZE_MODES = ("adaptive", "keep_ratio_fixed_area", "fixed_min_area", "fixed_max_area",
                "fixed_shape", "fixed_min_side")
MANIFEST_COLUMNS = (*manifest.FILE_COLUMNS, *GenerationParams.__struct_fields__, "priority")


# -- planning: the form -> jobs, each one checked ------------------------------------------------


@dataclass
class Upload:
    """A file dropped on the form: kept in the blob store (`sha256`), or refused (`error`)."""

    name: str
    role: str  # image | audio | video
    sha256: str | None = None
    size: int | None = None
    error: str | None = None

    def as_json(self) -> str:
        """The form's hidden field for this file, sent back with every preview and create."""
        data = {"name": self.name, "role": self.role}
        if self.error:
            data["error"] = self.error
        else:
            data.update(sha256=self.sha256, size=self.size)
        return json.dumps(data)


@dataclass
class PlannedJob:
    """One row of a planned batch: the job it would create, and what stops it from running."""

    number: int
    source: str  # where the row came from: "face.png + voice.wav", "line 3"
    files: dict[str, str] = field(default_factory=dict)  # role -> file name
    inputs: dict[str, str] = field(default_factory=dict)  # role -> sha256
    params: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class BatchPlan:
    """The jobs a filled-in form would create; it can be created only when `ok`."""

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

    def specs(self) -> list[BatchJobSpec]:
        """The jobs to create, once the plan is `ok`."""
        return [
            BatchJobSpec(task=self.task, params=job.params, inputs=job.inputs, files=job.files,
                         priority=job.priority)
            for job in self.jobs
        ]


@functools.cache
def _image_kinds() -> frozenset[str]:
    """Pillow's format names, as `media.inspect_image` records them: how a stored blob is known
    to be an image. Anything else that passed the upload checks is audio. (Pillow is imported
    here only: the gateway leaves decoding to the media checker.)"""
    from PIL import Image

    Image.init()
    return frozenset(fmt.lower().replace("jpeg", "jpg") for fmt in Image.registered_extensions().values())

# (where, chosen inputs, value overrides, problems): one job of a plan before it is checked.
_Row = tuple[str, dict[str, Upload], dict[str, Any], list[str]]


def plan_batch(
    form: dict[str, str], uploads: list[Upload] | TooMany, *,
    runnable: Collection[str], prompt_missing: Callable[[str, Any], str | None],
) -> BatchPlan:
    """The jobs a filled-in batch form would create, each with what stops it from running.

    `uploads`: the form's files as `find_uploads` found them; `runnable`: the task types some
    upstream runs; `prompt_missing`: why a job of a task type needs the prompt it lacks (the
    API's own rule, `JobService.prompt_missing`). Up to 2,000 rows, each checked: callers run
    it on a worker thread.
    """
    task = form.get("task", "s2v")
    mode = form.get("mode", "each")
    errors: list[str] = []
    if task not in TASKS:
        errors.append(f"Choose a task type: {', '.join(TASKS)}")
        task = "s2v"
    if mode not in MODES:
        errors.append("Choose how to form the jobs")
        mode = "each"
    if task not in runnable:
        errors.append(f"No node of this gateway runs {task} jobs; choose another task type")
    base = {name: form.get(name, "") for name in ("prompt", "negative_prompt", "seed", "priority", *FORM_PARAMS)}

    # Every count the form controls (files, prompts, seeds, manifest rows, and their products)
    # is measured before anything proportional to it is built: a 7 KB grid of 1,000 prompts ×
    # seeds 1-1999 once made 2 million rows, and stalled every request, before this cap said no.
    rows: list[_Row] = []
    try:
        if isinstance(uploads, TooMany):
            raise uploads
        if mode == "each":
            rows = [(_source(s), s, {}, []) for s in _input_sets(task, uploads, errors)]
        elif mode == "pair" and task == "flf2v":
            rows = [(_source(s), s, {}, p) for s, p in _frame_pairs(uploads, errors)]
        elif mode == "pair":
            if task not in ("s2v", "animate"):
                errors.append("Pairing by file name is for s2v jobs (an image and an audio each),"
                              " animate jobs (an image and a driving video each)"
                              " and flf2v jobs (a first and a last frame each)")
            rows = [(_source(s), s, {}, p) for s, p in _paired(task, uploads, errors)]
        elif mode == "grid":
            rows = _grid_rows(task, form, base["prompt"], uploads, errors)
        else:
            rows = _manifest_jobs(task, form.get("manifest", ""), uploads, errors)
    except TooMany as exc:
        errors.append(str(exc))
        return BatchPlan(task=task, mode=mode, jobs=[], errors=errors, summary=exc.summary)
    jobs = [_checked_job(number, row, base) for number, row in enumerate(rows, start=1)]
    for job in jobs:
        if why := prompt_missing(task, job.params.get("prompt")):
            job.errors.append(f"Prompt: required, {why}")
    return BatchPlan(task=task, mode=mode, jobs=jobs, errors=errors, summary=_plan_summary(task, mode, uploads, jobs))

class TooMany(Exception):
    """A count in the form is over what a batch holds; said before anything that big is built."""

    def __init__(self, field: str, what: str, jobs: int | None = None, limit: int = MAX_BATCH_JOBS) -> None:
        unit = "jobs" if limit == MAX_BATCH_JOBS else "files"
        super().__init__(f"{field}: {what}; a batch holds at most {limit} {unit}: split it into several batches")
        self.summary = f"{jobs:,} jobs, more than one batch holds" if jobs else "more than one batch holds"


def _count(what: str, n: int) -> str:
    """`1,999 seeds`, `1 image`."""
    return f"{n:,} {what}" + ("" if n == 1 else "s")


def _jobs_of(field: str, factors: list[tuple[str, int]]) -> int:
    """The product of the form's counts, refused over the cap before a row of it is made."""
    jobs = 1
    for _, n in factors:
        jobs *= n
    if jobs > MAX_BATCH_JOBS:
        what = " × ".join(_count(name, n) for name, n in factors)
        raise TooMany(field, f"{what} make {jobs:,} jobs", jobs)
    return jobs


async def find_uploads(store: JobStore, blobs: BlobStore, values: list[str]) -> list[Upload] | TooMany:
    """The files listed in the form, checked against the blob store (the form is not trusted);
    more than a batch can hold is a `TooMany` for the plan to say. Looked up on a reader thread."""
    # Each listed file costs a look-up in the store: count them first.
    if len(values) > MAX_BATCH_FILES:
        return TooMany("Files", f"{_count('file', len(values))} are listed", limit=MAX_BATCH_FILES)
    fields = list(filter(None, map(_file_field, values)))
    shas = {sha for data in fields if re.fullmatch(r"[0-9a-f]{64}", sha := str(data.get("sha256", "")))}
    found = await store.read(lambda r: {sha: r.blob(sha) for sha in shas})
    uploads: dict[str, Upload] = {}
    for data in fields:
        name, role = str(data["name"]), str(data.get("role", "image"))
        if data.get("error"):
            uploads[name] = Upload(name, role, error=str(data["error"]))
            continue
        sha = str(data.get("sha256", ""))
        blob = found.get(sha)
        if blob is None or not await blobs.exists(sha):
            uploads[name] = Upload(name, role, error=f"{name} is no longer stored on the gateway"
                                   " (uploaded more than an hour ago?); add it again")
            continue
        # The content decides; an mp4 or webm is a video only if it was checked as one.
        kind = blob["kind"]
        role = "image" if kind in _image_kinds() else "video" if role == "video" and kind in VIDEO_KINDS else "audio"
        uploads[name] = Upload(name, role, sha, blob["size"])
    return list(uploads.values())


def listed_names(values: list[str]) -> list[str]:
    """The names of the files the form lists, as a batch keeps them with its form."""
    return [str(data["name"]) for data in filter(None, map(_file_field, values))]

def _file_field(raw: str) -> dict[str, Any] | None:
    """One `file` field of the form (`Upload.as_json`), or None when it is not one."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) and "name" in data else None


def _input_sets(task: str, uploads: list[Upload], errors: list[str]) -> list[dict[str, Upload]]:
    """Every image with every audio (s2v), every image (i2v, i2i), each first frame with its
    last one (flf2v), each image with its driving video by name (animate), nothing (t2v, t2i)."""
    images = [u for u in uploads if u.role == "image"]
    audios = [u for u in uploads if u.role == "audio"]
    if not TASK_INPUTS[task]:
        if uploads:
            errors.append(f"{task} jobs take no files: remove the uploaded files, or choose another task type")
        return [{}]
    if task == "flf2v":
        pairs = _frame_pairs(uploads, errors)
        for _, problems in pairs:
            errors.extend(problems)
        return [inputs for inputs, _ in pairs]
    if task == "animate":
        pairs = _paired(task, uploads, errors)
        for _, problems in pairs:
            errors.extend(problems)
        return [inputs for inputs, _ in pairs]
    if videos := [u.name for u in uploads if u.role == "video"]:
        errors.append(f"{task} jobs take no video: remove {', '.join(videos[:3])}, or choose animate")
    if not images:
        errors.append("Add at least one image (drop it on the file area or choose it)")
    if task in ("i2v", "i2i"):
        if audios:
            errors.append(f"{task} jobs take no audio: remove the audio files, or choose s2v")
        _jobs_of("Files", [("image", len(images))])
        return [{"image": i} for i in images]
    if not audios:
        errors.append("Add at least one audio file: s2v jobs need an image and an audio")
    _jobs_of("Files", [("image", len(images)), ("audio file", len(audios))])
    return [{"image": i, "audio": a} for i, a in itertools.product(images, audios)]


def _paired(task: str, uploads: list[Upload], errors: list[str]) -> _Pairs:
    """Images matched by file name without extension with audio (face01.png + face01.wav) or,
    for animate, with driving videos (face01.png + face01.mp4)."""
    second, noun, example = ("video", "driving video", "face01.mp4") if task == "animate" else ("audio", "audio", "face01.wav")
    groups: dict[str, dict[str, list[Upload]]] = {}
    for upload in uploads:
        if upload.role not in ("image", second):
            errors.append(f"{upload.name}: {task} jobs take an image and {_A[second]} each; remove it")
            continue
        groups.setdefault(Path(upload.name).stem.lower(), {}).setdefault(upload.role, []).append(upload)
    if not groups:
        errors.append(f"Add images and {noun} files whose names match, like face01.png and {example}")
    _jobs_of("Files", [("file name", len(groups))])
    return _matched(
        {stem: (roles.get("image", []), roles.get(second, [])) for stem, roles in groups.items()},
        ("image", second),
        lambda stem, other: f"no image named {stem}.* to go with {other.name}: add one, or remove the {noun}",
        lambda stem, image: f"no {noun} named {stem}.* to go with {image.name}: add one, or remove the image",
    )


_Pairs = list[tuple[dict[str, Upload], list[str]]]


def _matched(
    groups: dict[str, tuple[list[Upload], list[Upload]]], roles: tuple[str, str],
    no_first: Callable[[str, Upload], str], no_second: Callable[[str, Upload], str],
) -> _Pairs:
    """Files grouped by a shared name, as the inputs of one job each (`roles`), with what is
    wrong with a group: two files where one belongs, or a missing half (`no_first`/`no_second`
    say what to add, given the half that is there)."""
    sets = []
    for stem, (firsts, seconds) in groups.items():
        problems = []
        if len(firsts) > 1 or len(seconds) > 1:
            names = ", ".join(u.name for u in firsts + seconds)
            problems.append(f"{names}: several files are named {stem!r}; rename or remove one")
        if not firsts:
            problems.append(no_first(stem, seconds[0]))
        if not seconds:
            problems.append(no_second(stem, firsts[0]))
        chosen = {roles[0]: firsts[0]} if firsts else {}
        if seconds:
            chosen[roles[1]] = seconds[0]
        sets.append((chosen, problems))
    return sets


def _frame_pairs(uploads: list[Upload], errors: list[str]) -> _Pairs:
    """flf2v: each first frame with its last one, by file name (`shot_first.png` or `shot.png`
    with `shot_last.png`)."""
    firsts: dict[str, list[Upload]] = {}
    lasts: dict[str, list[Upload]] = {}
    for upload in uploads:
        if upload.role != "image":
            errors.append(f"{upload.name}: flf2v jobs take images only (a first and a last frame); remove it")
            continue
        stem = Path(upload.name).stem
        if last := _LAST_FRAME.match(stem):
            lasts.setdefault(last.group(1).lower(), []).append(upload)
        else:
            first = _FIRST_FRAME.match(stem)
            firsts.setdefault((first.group(1) if first else stem).lower(), []).append(upload)
    if not uploads:
        errors.append("Add first and last frames whose names match, like shot01_first.png and shot01_last.png")
    stems = sorted(firsts.keys() | lasts.keys())
    _jobs_of("Files", [("frame pair", len(stems))])
    return _matched(
        {stem: (firsts.get(stem, []), lasts.get(stem, [])) for stem in stems}, ("image", "last_frame"),
        lambda stem, last: f"no first frame for {last.name}: add {stem}_first.png (or {stem}.png), or remove it",
        lambda stem, first: f"no last frame for {first.name}: add {stem}_last.png, or remove it",
    )


def _grid_rows(
    task: str, form: dict[str, str], prompt: str, uploads: list[Upload], errors: list[str],
) -> list[_Row]:
    """Every input set × every prompt (one a line; the form's prompt if none) × every seed."""
    prompts = list(itertools.islice(_lines(form.get("prompts", "")), MAX_BATCH_JOBS + 1))
    if len(prompts) > MAX_BATCH_JOBS:
        raise TooMany("Prompts", f"more than {MAX_BATCH_JOBS} lines, a job each")
    try:
        seeds = _seeds(form.get("seeds", ""))
    except ValueError as exc:
        errors.append(f"Seeds: {exc} is not a seed; write numbers separated by commas, or a range like 1-8")
        seeds = []
    sets = _input_sets(task, uploads, errors)
    _jobs_of("Prompts × seeds", [("file set", len(sets)), ("prompt", len(prompts or [prompt])),
                                  ("seed", len(seeds))])
    return [
        (_source(inputs), inputs, {"prompt": line, "seed": seed if seed is not None else ""}, [])
        for inputs, line, seed in itertools.product(sets, prompts or [prompt], seeds)
    ]


def _lines(text: str) -> Iterator[str]:
    """The text's non-blank lines, stripped, one at a time (as `str.splitlines` cuts them)."""
    for match in re.finditer(r"[^\n\r\v\f\x1c-\x1e\x85\u2028\u2029]+", text):
        if line := match.group().strip():
            yield line


def _seeds(text: str) -> list[int | None]:
    """`1, 2, 10-12` -> [1, 2, 10, 11, 12]; empty -> one random seed."""
    # Ranges are counted before they are expanded: `1-99999999` is one short part.
    count = 0
    parts: list[range | int] = []
    for match in re.finditer(r"[^,\s]+", text):
        part = match.group()
        if m := re.fullmatch(r"(\d{1,10})-(\d{1,10})", part):
            first, last = int(m.group(1)), int(m.group(2))
            if last < first:
                raise ValueError(part)
            parts.append(range(first, last + 1))
            count += last - first + 1
        elif part.isdigit() and len(part) <= 10:
            parts.append(int(part))
            count += 1
        else:
            raise ValueError(part[:40] + ("…" if len(part) > 40 else ""))
        if count > MAX_BATCH_JOBS:
            raise TooMany("Seeds", f"more than {MAX_BATCH_JOBS} seeds (counted up to {part}), a job each")
    seeds: list[int | None] = []
    for item in parts:
        seeds += item if isinstance(item, range) else [item]
    return seeds or [None]


def _manifest_jobs(task: str, text: str, uploads: list[Upload], errors: list[str]) -> list[_Row]:
    """One job per manifest row, its image and audio cells looked up among the uploaded files."""
    try:
        rows, problems = manifest.read_rows(text, MANIFEST_COLUMNS, MAX_BATCH_JOBS)
    except manifest.TooManyRows as exc:
        raise TooMany("Manifest", str(exc)) from None
    errors += [f"The manifest {problem}" for problem in problems]
    by_name = {u.name: u for u in uploads}
    missing = "{name} is not among the uploaded files: add it, or fix the name"
    jobs: list[_Row] = []
    for row in rows:
        inputs = manifest.take_files(row, task, TASK_INPUTS[task], by_name, missing)
        overrides = {k: v for k, v in row.values.items() if k in MANIFEST_COLUMNS}
        jobs.append((row.where, inputs, overrides, row.problems))
    return jobs


def _checked_job(number: int, row: _Row, base: dict[str, str]) -> PlannedJob:
    """A planned row with its files and parameters checked; the form's values fill the gaps."""
    where, inputs, overrides, problems = row
    job = PlannedJob(number=number, source=where, errors=list(problems))
    for role, upload in inputs.items():
        job.files[role] = upload.name
        if upload.error:
            job.errors.append(upload.error)
        elif upload.role != (expected := role if role in ("audio", "video") else "image"):
            job.errors.append(f"{upload.name} is {_A[upload.role]}, not {_A[expected]}: check the {role} column")
        else:
            job.inputs[role] = upload.sha256 or ""
    values = {**base, **{k: v for k, v in overrides.items() if v is not None and v != ""}}
    job.params, job.priority, problems = _check_params(values)
    job.errors += problems
    return job


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


def _target_shape(value: Any) -> Any:
    """`480,832`, `480x832` or `480 × 832` as [480, 832]; a list (from JSONL) as it is."""
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,x×* ]+", value.strip()) if p]
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError
        return [int(p) for p in parts]
    return value


def _field_error(exc: msgspec.ValidationError) -> str:
    """msgspec's message for one parameter, in the form's words: `Seed: must be a whole number ≥ 0`."""
    field, text = field_problem(exc, GenerationParams)
    if field is None:
        return text
    return f"{LABELS.get(field, field)}: {text.removeprefix(field + ' ')}"


_A = {"image": "an image", "audio": "audio", "video": "a video"}


def _source(inputs: dict[str, Upload]) -> str:
    """Where a row came from, by its files: `face.png + voice.wav`."""
    return " + ".join(u.name for u in inputs.values()) or "prompt only"


def _plan_summary(task: str, mode: str, uploads: list[Upload], jobs: list[PlannedJob]) -> str:
    """The preview's title: `6 jobs: 2 images × 3 audio files`."""
    n = len(jobs)
    jobs_text = f"{n} job" + ("" if n == 1 else "s")
    if task == "flf2v" and mode in ("each", "pair"):
        return f"{jobs_text}: one per first and last frame"
    if task == "animate" and mode in ("each", "pair"):
        return f"{jobs_text}: one per image and driving video"
    if mode == "each":
        images = sum(1 for u in uploads if u.role == "image")
        audios = sum(1 for u in uploads if u.role == "audio")
        if audios:
            return f"{jobs_text}: {images} image{'s' * (images != 1)} × {audios} audio file{'s' * (audios != 1)}"
        if images:
            return f"{jobs_text}: one per image"
    return jobs_text


def retry_params(params: dict[str, Any], prompt: str, seed: str) -> dict[str, Any]:
    """A job's parameters with the retry form's prompt and seed (no seed: a new random one), checked
    as a batch row's are; the first problem is a 422 naming its field."""
    values = {**params, "prompt": prompt}
    values.pop("seed", None)
    if seed.strip():
        values["seed"] = seed.strip()
    checked, _, problems = _check_params(values)
    if problems:
        raise ApiError(422, problems[0], "seed" if "Seed" in problems[0] else "prompt")
    return checked


def new_batch_id() -> str:
    """A fresh batch id; the form carries it so that a second click on Create makes nothing new."""
    return "b" + base64.b32encode(secrets.token_bytes(10)).decode().lower()


