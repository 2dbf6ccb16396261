"""A pipeline as it is asked for (`PipelineRequest`, one JSON document) and the steps it becomes.

Scenes are joined in order into one video. A scene's image may be a file, the last frame of the
scene before it (`"first_frame": "previous"`), or an image made first from a prompt
(`"image_prompt"`, a t2i step): the scene's steps then wait for the one that makes it.
Whichever it is, `"image_refine"` has it made over first from a prompt (an i2i step: t2i → i2i →
i2v), and the scene starts from the refined image.
An s2v scene lasts as long as its audio; audio longer than a node takes in one task
(`X2V_SPEECH_PART_SECONDS`) is split at its silences into parts, each a step of its own with
the same portrait and seed, joined with the whole audio under them.

Everything a client controls is bounded here, before any work proportional to it.
"""

from __future__ import annotations

import math
import re
import secrets
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from ..schemas import TASK_INPUTS, ApiError, GenerationParams, Seed, generation_params, plain
from ..store import PipelineStep

MAX_SCENES = 50
MAX_STEPS = 200  # scenes, their speech parts and image steps, together
MAX_SCENE_SECONDS = 30.0
MAX_VIDEO_SECONDS = 600.0  # the joined video
MAX_AUDIO_SECONDS = 600.0  # every scene's audio, together
MIN_SIDE, MAX_SIDE = 16, 4096
# The task that makes a scene's image from its `image_prompt`, and the one that refines it.
IMAGE_TASK = "t2i"
REFINE_TASK = "i2i"
# Parameters the pipeline sets from a scene's duration and the output's frame rate.
_TIMING = ("target_video_length", "video_duration", "target_fps")
SCENE_INPUTS = ("image", "audio", "last_frame")


PipelineEvent = Literal["pipeline.succeeded", "pipeline.failed", "pipeline.cancelled"]
SceneTask = Literal["s2v", "i2v", "t2v", "flf2v"]
SCENE_TASKS = frozenset(SceneTask.__args__)  # the video tasks a scene may be


class SceneRequest(GenerationParams, kw_only=True, forbid_unknown_fields=True):
    """One scene: a clip of the finished video."""

    task: SceneTask = "t2v"
    # Seconds of the finished video (an s2v scene lasts as long as its audio).
    duration: Annotated[float, Meta(ge=1, le=MAX_SCENE_SECONDS)] | None = None
    # Inputs, as for a job: http(s) URLs, data URLs or base64 strings.
    image: str | None = None
    audio: str | None = None
    last_frame: str | None = None
    # "previous": the image is the last frame of the scene before (continuity).
    first_frame: Literal["previous"] | None = None
    # The image made first from this prompt (a t2i step): a generated first frame or portrait.
    image_prompt: Annotated[str, Meta(min_length=1, max_length=4000)] | None = None
    # The scene's image (given, first_frame or image_prompt) made over from this prompt first
    # (an i2i step), the scene starting from what it makes.
    image_refine: Annotated[str, Meta(min_length=1, max_length=4000)] | None = None


class OutputRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    fps: Annotated[int, Meta(ge=1, le=60)] = 16
    # "WIDTHxHEIGHT"; none: the first clip's size.
    resolution: Annotated[str, Meta(pattern=r"^\d{1,5}x\d{1,5}$")] | None = None


class PipelineRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`POST /api/v1/pipelines`: scenes joined, in order, into one video."""

    scenes: Annotated[list[SceneRequest], Meta(min_length=1, max_length=MAX_SCENES)]
    output: OutputRequest = msgspec.field(default_factory=OutputRequest)
    name: Annotated[str, Meta(max_length=200)] | None = None
    # Every scene's seed unless it sets its own; none: one drawn for the pipeline.
    seed: Seed | None = None
    priority: Annotated[int, Meta(ge=-100, le=100)] = 0
    # Where the pipeline's end is POSTed, signed, as a job's events are (webhooks.py); none:
    # the key's default, if any. Events: all three unless named.
    webhook_url: Annotated[str, Meta(min_length=1, max_length=2000)] | None = None
    webhook_events: Annotated[list[PipelineEvent], Meta(max_length=6)] | None = None


_PATH = re.compile(r" - at `\$((?:\.\w+|\[\d+\])+)`")


def parse_request(raw: bytes) -> PipelineRequest:
    """The JSON document as a request; 400/422 naming the field (`scenes[2].duration`)."""
    try:
        return msgspec.json.decode(raw, type=PipelineRequest)
    except msgspec.ValidationError as exc:
        message = str(exc)
        at = _PATH.search(message)
        named = re.search(r"(missing required|unknown) field `(\w+)`", message)
        prefix = at.group(1).lstrip(".") if at else ""
        if named:
            field = f"{prefix}.{named.group(2)}".lstrip(".")
            what = "is required" if named.group(1) == "missing required" else "is not a field of a pipeline"
            raise ApiError(422, f"{field} {what}", field) from None
        field = prefix or None
        rule = plain(message[:at.start()] if at else message)
        raise ApiError(422, f"{field} {rule}" if field else f"the pipeline {rule}", field) from None
    except msgspec.DecodeError:
        raise ApiError(400, "the body is not a JSON document", "body") from None


def output_size(request: PipelineRequest) -> list[int] | None:
    """[width, height] of the finished video, or None (the first clip's)."""
    if request.output.resolution is None:
        return None
    width, height = (int(v) for v in request.output.resolution.split("x"))
    for side in (width, height):
        if not MIN_SIDE <= side <= MAX_SIDE or side % 2:
            raise ApiError(422, f"output.resolution sides must be even numbers from {MIN_SIDE} to {MAX_SIDE}",
                           "output.resolution")
    return [width, height]


def check_scenes(request: PipelineRequest, runnable: set[str], prompt_missing: Any) -> None:
    """Every scene's own rules, before any input is fetched: 422 naming the field."""
    total = 0.0
    for i, scene in enumerate(request.scenes):
        at = f"scenes[{i}]"
        for name in _TIMING:
            if getattr(scene, name) is not None:
                raise ApiError(422, f"{at}.{name} is set by the pipeline: give the scene a duration"
                               " and the pipeline output.fps", f"{at}.{name}")
        if scene.task not in runnable:
            raise ApiError(422, f"{at}.task: no configured upstream runs {scene.task} jobs", f"{at}.task")
        if scene.image_prompt is not None:
            if "image" not in TASK_INPUTS[scene.task]:
                raise ApiError(422, f"{at}.image_prompt: a {scene.task} scene takes no image", f"{at}.image_prompt")
            if scene.image or scene.first_frame:
                raise ApiError(422, f"{at}: give one of image, first_frame and image_prompt", f"{at}.image_prompt")
            if IMAGE_TASK not in runnable:
                raise ApiError(422, f"{at}.image_prompt: no configured upstream runs {IMAGE_TASK} jobs,"
                               " which make the image", f"{at}.image_prompt")
        if scene.image_refine is not None:
            if not (scene.image or scene.first_frame or scene.image_prompt):
                raise ApiError(422, f"{at}.image_refine refines the scene's image: give it an image,"
                               " first_frame or image_prompt", f"{at}.image_refine")
            if REFINE_TASK not in runnable:
                raise ApiError(422, f"{at}.image_refine: no configured upstream runs {REFINE_TASK} jobs,"
                               " which refine the image", f"{at}.image_refine")
        if scene.first_frame is not None:
            if i == 0:
                raise ApiError(422, f"{at}.first_frame: the first scene has no scene before it", f"{at}.first_frame")
            if "image" not in TASK_INPUTS[scene.task]:
                raise ApiError(422, f"{at}.first_frame: a {scene.task} scene takes no image", f"{at}.first_frame")
            if scene.image:
                raise ApiError(422, f"{at}: give image or first_frame, not both", f"{at}.image")
        made = scene.first_frame or scene.image_prompt
        given = {role for role in SCENE_INPUTS if getattr(scene, role)} | ({"image"} if made else set())
        for role in TASK_INPUTS[scene.task]:
            if role not in given:
                raise ApiError(422, f"{at}.{role} is required for {scene.task} scenes", f"{at}.{role}")
        for role in sorted(given - set(TASK_INPUTS[scene.task])):
            raise ApiError(422, f"{at}.{role} is not used by {scene.task} scenes", f"{at}.{role}")
        if scene.task == "s2v":
            if scene.duration is not None:
                raise ApiError(422, f"{at}.duration: an s2v scene lasts as long as its audio", f"{at}.duration")
        elif scene.duration is None:
            raise ApiError(422, f"{at}.duration is required for {scene.task} scenes: its seconds in the video",
                           f"{at}.duration")
        else:
            total += scene.duration
        if why := prompt_missing(scene.task, scene.prompt):
            raise ApiError(422, f"{at}.prompt is required: {why}", f"{at}.prompt")
    if total > MAX_VIDEO_SECONDS:
        raise ApiError(422, f"scenes last {total:g} s together; a pipeline's video may last at most"
                       f" {MAX_VIDEO_SECONDS:g} s", "scenes")


def plan_steps(
    request: PipelineRequest,
    inputs: list[dict[str, str]],
    speech: dict[int, dict[str, Any]],
) -> list[PipelineStep]:
    """The steps of a checked request, in order. `inputs[i]`: scene i's kept files (role ->
    sha256); `speech[i]`: an s2v scene's audio, {"seconds", "parts": [[start, end, sha256 or
    None]]} (one part with None: not split)."""
    fps = request.output.fps
    pipeline_seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
    steps: list[PipelineStep] = []
    last_clip: int | None = None  # the step whose last frame the next scene may start from
    for i, scene in enumerate(request.scenes):
        params = generation_params(scene)
        params["seed"] = scene.seed if scene.seed is not None else pipeline_seed
        params["target_fps"] = fps
        needs = {}
        given = dict(inputs[i])
        if scene.first_frame == "previous":
            assert last_clip is not None  # check_scenes refused it for the first scene
            needs["image"] = {"step": last_clip, "take": "last_frame"}
        elif scene.image_prompt is not None:
            # A step of its own before the scene's clips, whose image they all start from.
            steps.append(_image_step(len(steps), i, IMAGE_TASK, scene.image_prompt, params["seed"], scene, {}, {}))
            needs["image"] = {"step": len(steps) - 1, "take": "output"}
        if scene.image_refine is not None:
            # The image as it would have been (given, or taken from an earlier step) goes to an
            # i2i step instead; the clips take what that makes.
            source = {"image": given.pop("image")} if "image" in given else {}
            steps.append(_image_step(len(steps), i, REFINE_TASK, scene.image_refine, params["seed"], scene,
                                     source, dict(needs)))
            needs["image"] = {"step": len(steps) - 1, "take": "output"}
        if scene.task == "s2v":
            audio_sha = given["audio"]
            parts = speech[i]["parts"]
            for j, (start, end, part_sha) in enumerate(parts):
                seconds = end - start
                steps.append(PipelineStep(
                    n=len(steps), scene=i, segment=j if len(parts) > 1 else None, kind="clip", task="s2v",
                    params={**params, "video_duration": max(1, math.ceil(seconds))},
                    inputs={**given, "audio": part_sha or audio_sha}, needs=dict(needs),
                    seconds=round(seconds, 3), audio={"sha256": audio_sha, "offset": start},
                ))
        else:
            duration = float(scene.duration or 0)
            # Wan models take 4n + 1 frames; a clip at least as long as its span.
            frames = 4 * math.ceil(duration * fps / 4) + 1
            steps.append(PipelineStep(
                n=len(steps), scene=i, kind="clip", task=scene.task,
                params={**params, "target_video_length": frames, "video_duration": max(1, math.ceil(duration))},
                inputs=given, needs=needs, seconds=duration,
            ))
        last_clip = len(steps) - 1
    if len(steps) > MAX_STEPS:
        raise ApiError(422, f"the pipeline would run {len(steps)} steps; at most {MAX_STEPS}", "scenes")
    return steps


def _image_step(
    n: int, scene_n: int, task: str, prompt: str, seed: int, scene: SceneRequest,
    inputs: dict[str, str], needs: dict[str, dict[str, Any]],
) -> PipelineStep:
    """A step that makes (t2i) or refines (i2i) an image a scene's clips start from."""
    params: dict[str, Any] = {"prompt": prompt, "seed": seed}
    if scene.target_shape:
        params["target_shape"] = scene.target_shape
    return PipelineStep(n=n, scene=scene_n, kind="image", task=task, params=params, inputs=inputs, needs=needs)
