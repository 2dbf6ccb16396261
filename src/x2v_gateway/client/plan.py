"""Forming jobs from local files, the four ways the dashboard's batch form does.

`x2v-gateway submit` reads a folder, files or a CSV/JSONL manifest and makes the jobs the batch
form would make from the same files (`batches.py` plans the form on the gateway): every image ×
every audio, images and audio (or, for animate, driving videos; for flf2v, last frames) paired
by file name, one job per manifest row, or input sets × prompts × seeds. Everything here is local: a mistake is found before a byte is uploaded, and
each job gets a fingerprint of its content, from which the Idempotency-Key that makes a second
run of the same command safe is derived.

Parameter values are sent as text, as the form sends them, and checked by the gateway (a 422
names the field); only the names are checked here.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import manifest

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
AUDIO_SUFFIXES = frozenset({".wav", ".mp3", ".flac", ".m4a", ".aac", ".ogg", ".opus"})
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi"})  # animate's driving videos
MANIFEST_SUFFIXES = frozenset({".csv", ".jsonl", ".ndjson"})
TASKS = ("s2v", "i2v", "t2v", "flf2v", "t2i", "i2i", "animate")  # the task types made from these files
TASK_INPUTS = {  # as tasks.TASK_INPUTS
    "s2v": ("image", "audio"), "i2v": ("image",), "t2v": (), "flf2v": ("image", "last_frame"), "t2i": (),
    "i2i": ("image",), "animate": ("image", "video"),
}
# flf2v's frames by file name: `shot01_first.png` (or plain `shot01.png`) with `shot01_last.png`.
_LAST_FRAME = re.compile(r"^(.*?)[ _.-]last$", re.I)
_FIRST_FRAME = re.compile(r"^(.*?)[ _.-]first$", re.I)
_FROM_PROMPT = ("t2v", "t2i")  # task types that render their prompt alone
MODES = ("each", "pair", "manifest", "grid")
# The gateway's GenerationParams fields (schemas.py); tests/test_client.py keeps the two equal.
# The client does not import the server's models: it runs on laptops against remote gateways.
PARAMS = (
    "prompt", "negative_prompt", "seed", "infer_steps", "target_shape", "target_video_length",
    "video_duration", "target_fps", "num_fragments", "resize_mode", "sr_ratio",
    "use_prompt_enhancer", "lora_name", "lora_strength", "aspect_ratio", "i2i_denoise_strength",
)
# What `--set` may give besides them: every job of the run goes to `upstream` / uses `model`.
JOB_FIELDS = (*PARAMS, "priority", "upstream", "model")
MANIFEST_COLUMNS = (*manifest.FILE_COLUMNS, *PARAMS, "priority")


class PlanError(Exception):
    """Jobs cannot be formed; each problem says what to fix. Nothing was uploaded."""

    def __init__(self, problems: list[str], option: str | None = None) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
        self.option = option


@dataclass
class PlannedJob:
    """One job to submit: its multipart fields (text) and files (role -> local path)."""

    number: int
    source: str  # where it came from: "face.png + voice.wav", "manifest line 3"
    fields: dict[str, str]
    files: dict[str, Path] = field(default_factory=dict)
    fingerprint: str = ""  # of task, fields and file contents: equal jobs, equal fingerprints

    @property
    def upload_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files.values())


@dataclass
class Inputs:
    """The files named on the command line, sorted into images, audio, videos and a manifest."""

    images: list[Path] = field(default_factory=list)
    audios: list[Path] = field(default_factory=list)
    videos: list[Path] = field(default_factory=list)
    manifest: Path | None = None
    skipped: list[Path] = field(default_factory=list)  # files in a folder that are none of these

    @property
    def files(self) -> list[Path]:
        return self.images + self.audios + self.videos


def collect(paths: list[Path]) -> Inputs:
    """Sort the given paths (a folder: its files, not its subfolders) by file name suffix."""
    found = Inputs()
    manifests: list[Path] = []
    for path in paths:
        if path.is_dir():
            entries = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            given = False
        elif path.is_file():
            entries, given = [path], True
        else:
            raise PlanError([f"{path}: no such file or folder"], "PATHS")
        for entry in entries:
            suffix = entry.suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                found.images.append(entry)
            elif suffix in AUDIO_SUFFIXES:
                found.audios.append(entry)
            elif suffix in VIDEO_SUFFIXES:
                found.videos.append(entry)
            elif suffix in MANIFEST_SUFFIXES:
                manifests.append(entry)
            elif given:
                raise PlanError([f"{entry}: not an image ({', '.join(sorted(IMAGE_SUFFIXES))}), audio"
                                 f" ({', '.join(sorted(AUDIO_SUFFIXES))}), a video ({', '.join(sorted(VIDEO_SUFFIXES))})"
                                 " or a .csv/.jsonl manifest"], "PATHS")
            else:
                found.skipped.append(entry)
    if len(manifests) > 1:
        raise PlanError([f"more than one manifest: {', '.join(map(str, manifests))}; give one"], "PATHS")
    found.manifest = manifests[0] if manifests else None
    return found


def plan_jobs(
    inputs: Inputs, *, task: str, mode: str | None, base: dict[str, str],
    prompts: list[str] | None = None, seeds: str | None = None,
) -> list[PlannedJob]:
    """The jobs these inputs make in `mode` (None: manifest when one is given, grid when prompts
    or seeds are, else every image × every audio); raises PlanError listing every problem."""
    if mode is None:
        mode = "manifest" if inputs.manifest else "grid" if (prompts or seeds) else "each"
    if mode == "manifest" and inputs.manifest is None:
        raise PlanError(["--mode manifest needs a .csv or .jsonl manifest among PATHS"], "--mode")
    if mode != "manifest" and inputs.manifest is not None:
        raise PlanError([f"{inputs.manifest} is a manifest: use --mode manifest, or leave it out"], "--mode")
    if (prompts or seeds) and mode != "grid":
        raise PlanError(["--prompts and --seeds form a prompt × seed grid: use them with --mode grid"], "--mode")
    if mode == "pair" and task not in ("s2v", "animate", "flf2v"):
        raise PlanError(["pairing by file name is for s2v jobs (an image and an audio each), animate jobs"
                         " (an image and a driving video each) and flf2v jobs (a first and a last frame)"], "--mode")
    errors: list[str] = []
    rows: list[tuple[str, dict[str, Path], dict[str, Any]]]
    if mode == "each":
        rows = [(_source(s), s, {}) for s in _input_sets(task, inputs, errors)]
    elif mode == "pair":
        rows = [(_source(s), s, {}) for s in _pairs(task, inputs, errors)]
    elif mode == "grid":
        sets = _input_sets(task, inputs, errors)
        seed_list = _seeds(seeds or "")
        rows = [
            (_source(s), s, {"prompt": line, "seed": "" if seed is None else str(seed)})
            for s, line, seed in itertools.product(sets, prompts or [base.get("prompt", "")], seed_list)
        ]
    else:
        assert inputs.manifest is not None
        rows = _manifest_rows(task, inputs, errors)
    if errors:
        raise PlanError(errors)
    jobs = []
    for number, (source, files, overrides) in enumerate(rows, start=1):
        values = {**base, **{k: _text(v) for k, v in overrides.items() if v is not None and _text(v) != ""}}
        fields = {"task": task, **{k: v for k, v in values.items() if v != ""}}
        jobs.append(PlannedJob(number, source, fields, files))
    if task in _FROM_PROMPT:
        missing = [j.source for j in jobs if not j.fields.get("prompt", "").strip()]
        if missing:
            raise PlanError([f"{task} jobs render their prompt: give --prompt (or a prompt for {', '.join(missing[:3])})"],
                            "--prompt")
    return jobs


def _input_sets(task: str, inputs: Inputs, errors: list[str]) -> list[dict[str, Path]]:
    """Every image with every audio (s2v), every image (i2v, i2i), each image with its driving
    video (animate) or its last frame (flf2v) by file name, nothing (t2v, t2i)."""
    if task in _FROM_PROMPT:
        if inputs.files:
            errors.append(f"{task} jobs take no files: leave out the images and audio, or choose --task s2v or i2v")
        return [{}]
    if task in ("animate", "flf2v"):
        return _pairs(task, inputs, errors)
    if inputs.videos:
        errors.append(f"{task} jobs take no video: leave out {', '.join(p.name for p in inputs.videos[:3])},"
                      " or choose --task animate")
    if not inputs.images:
        errors.append("no image among PATHS: give a folder with images, or image files")
    if task in ("i2v", "i2i"):
        if inputs.audios:
            errors.append(f"{task} jobs take no audio: leave out the audio files, or choose --task s2v")
        return [{"image": i} for i in inputs.images]
    if not inputs.audios:
        errors.append("no audio among PATHS: s2v jobs need an image and an audio each")
    return [{"image": i, "audio": a} for i, a in itertools.product(inputs.images, inputs.audios)]


def _pairs(task: str, inputs: Inputs, errors: list[str]) -> list[dict[str, Path]]:
    """Files matched by file name without extension: an image with its audio (s2v, face01.png +
    face01.wav) or its driving video (animate, face01.mp4); a first frame with its last one
    (flf2v, shot01_first.png or shot01.png + shot01_last.png)."""
    second, noun, example = {
        "animate": ("video", "driving video", "face01.png and face01.mp4"),
        "flf2v": ("last_frame", "last frame", "shot01_first.png and shot01_last.png"),
    }.get(task, ("audio", "audio", "face01.png and face01.wav"))
    taken = {"audio": inputs.audios, "video": inputs.videos}.get(second, [])
    for path in inputs.audios + inputs.videos:
        if path not in taken:
            errors.append(f"{path.name}: {task} jobs take no such file; leave it out")
    groups: dict[str, dict[str, list[Path]]] = {}
    for path in inputs.images + taken:
        role, stem = ("image" if path in inputs.images else second), path.stem
        if task == "flf2v":  # both frames are images: the name says which is which
            if last := _LAST_FRAME.match(stem):
                role, stem = second, last.group(1)
            elif first := _FIRST_FRAME.match(stem):
                stem = first.group(1)
        groups.setdefault(stem.lower(), {}).setdefault(role, []).append(path)
    if not groups:
        errors.append(f"no files: give files whose names match, like {example}")
    sets = []
    for stem, roles in groups.items():
        firsts, seconds = roles.get("image", []), roles.get(second, [])
        first_noun = "first frame" if task == "flf2v" else "image"
        if len(firsts) > 1 or len(seconds) > 1:
            errors.append(f"{', '.join(p.name for p in firsts + seconds)}: several files are named {stem!r}; rename or remove one")
        elif not firsts:
            errors.append(f"no {first_noun} named {stem}.* to go with {seconds[0].name}: add one, or leave the {noun} out")
        elif not seconds:
            errors.append(f"no {noun} named {stem}.* to go with {firsts[0].name}: add one, or leave the {first_noun} out")
        else:
            sets.append({"image": firsts[0], second: seconds[0]})
    return sets


def _seeds(text: str) -> list[int | None]:
    """`1, 2, 10-12` -> [1, 2, 10, 11, 12]; empty -> one job with a random seed."""
    seeds: list[int | None] = []
    for part in re.findall(r"[^,\s]+", text):
        if m := re.fullmatch(r"(\d{1,10})-(\d{1,10})", part):
            first, last = int(m.group(1)), int(m.group(2))
            if last < first:
                raise PlanError([f"--seeds: {part} runs backwards; write it as {last}-{first}"], "--seeds")
            seeds += range(first, last + 1)
        elif part.isdigit() and len(part) <= 10:
            seeds.append(int(part))
        else:
            raise PlanError([f"--seeds: {part[:40]} is not a seed; write numbers separated by commas, or a range like 1-8"],
                            "--seeds")
    return seeds or [None]


def _manifest_rows(task: str, inputs: Inputs, errors: list[str]) -> list[tuple[str, dict[str, Path], dict[str, Any]]]:
    """One job per manifest row; its image and audio cells name files among PATHS or next to the
    manifest."""
    path = inputs.manifest
    assert path is not None
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError([f"{path}: cannot be read as UTF-8 text ({exc})"], "PATHS") from None
    rows, problems = manifest.read_rows(text, MANIFEST_COLUMNS)
    errors += [f"{path.name} {problem}" for problem in problems]

    def next_to_manifest(name: str) -> Path | None:
        return candidate if (candidate := path.parent / name).is_file() else None

    jobs = []
    for row in rows:
        files = manifest.take_files(row, task, TASK_INPUTS[task], {p.name: p for p in inputs.files},
                                    "{name} is neither among PATHS nor next to the manifest", next_to_manifest)
        errors += [f"{row.where}: {problem}" for problem in row.problems]
        jobs.append((f"{path.name} {row.where}", files, row.values))
    return jobs


def _text(value: Any) -> str:
    """A manifest or option value as the form field the gateway reads: [480, 832] -> `480,832`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value).strip()


def _source(files: dict[str, Path]) -> str:
    return " + ".join(p.name for p in files.values()) or "prompt only"


# -- what makes a second run of the same command safe --------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(jobs: list[PlannedJob]) -> None:
    """Give each job the hash of what it asks for: task, fields and its files' contents (each
    file read once, however many jobs use it)."""
    hashes: dict[Path, str] = {}
    for job in jobs:
        contents = {role: hashes.setdefault(path, file_sha256(path)) for role, path in job.files.items()}
        job.fingerprint = hashlib.sha256(json.dumps([job.fields, contents], sort_keys=True).encode()).hexdigest()


def derive_batch_id(jobs: list[PlannedJob], owner: str) -> str:
    """The same inputs, sent with the same key, make the same batch id: `b` + 32 hex digits."""
    digest = hashlib.sha256(json.dumps([owner, sorted(j.fingerprint for j in jobs)]).encode())
    return "b" + digest.hexdigest()[:32]


def idempotency_keys(jobs: list[PlannedJob], batch_id: str) -> list[str]:
    """A key per job, from its batch, its content and how many equal jobs came before it (two
    equal rows are two jobs; adding a file to the folder changes no other job's key)."""
    seen: dict[str, int] = {}
    keys = []
    for job in jobs:
        nth = seen[job.fingerprint] = seen.get(job.fingerprint, 0) + 1
        digest = hashlib.sha256(f"{batch_id}:{job.fingerprint}:{nth}".encode()).hexdigest()
        keys.append(f"x2v-cli-{digest[:48]}")
    return keys
