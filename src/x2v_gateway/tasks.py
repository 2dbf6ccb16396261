"""The task types the gateway runs, what each takes in and what it makes: said once, here.

Both upstreams run more than talking heads (shared/lightx2v/*.md): a self-hosted node serves
video tasks on `/v1/tasks/video/` and image tasks (t2i, i2i) on `/v1/tasks/image/`; the hosted
cloud runs those and `animate` (an image driven by a video). A job makes a video or, for an
image task, an image; everything that stores, serves, zips or shows a result asks `makes()`.
"""

from __future__ import annotations

from typing import Literal

TaskType = Literal["s2v", "i2v", "t2v", "flf2v", "t2i", "i2i", "animate"]

# The inputs each task type needs; any other input is a mistake worth telling the user about.
TASK_INPUTS: dict[str, tuple[str, ...]] = {
    "s2v": ("image", "audio"),
    "i2v": ("image",),
    "flf2v": ("image", "last_frame"),
    "t2v": (),
    "t2i": (),
    "i2i": ("image",),
    "animate": ("image", "video"),
}
INPUT_ROLES = ("image", "audio", "last_frame", "video")
# Roles whose file is a picture (checked by Pillow, bounded in megapixels).
IMAGE_ROLES = frozenset({"image", "last_frame"})

VIDEO_TASKS = frozenset({"s2v", "i2v", "t2v", "flf2v"})
IMAGE_TASKS = frozenset({"t2i", "i2i"})
# What a self-hosted LightX2V server can be asked for: it has no route for `animate`.
NODE_TASKS = VIDEO_TASKS | IMAGE_TASKS
ALL_TASKS = frozenset(TASK_INPUTS)

# Task types that mean nothing without a prompt, whatever runs them: a text-to-video (or image)
# job with no text. (A self-hosted node renders one anyway, from an empty string; the cloud
# refuses every task type without a prompt, which `JobService.prompt_missing` adds for jobs
# bound to it.)
PROMPT_REQUIRED = frozenset({"t2v", "t2i"})

Output = Literal["video", "image"]


def makes(task: str) -> Output:
    """What a job of this task type makes."""
    return "image" if task in IMAGE_TASKS else "video"


# A result's stored kind (its extension, as the media checks name it) -> its content type.
MEDIA_TYPES = {
    "mp4": "video/mp4", "png": "image/png", "jpg": "image/jpeg", "webp": "image/webp",
    "gif": "image/gif", "bmp": "image/bmp", "tiff": "image/tiff",
}


def media_type(kind: str | None, task: str) -> str:
    """The content type of a result stored as `kind` (None: a row from before results had one)."""
    return MEDIA_TYPES.get(kind or "", "image/png" if makes(task) == "image" else "video/mp4")
