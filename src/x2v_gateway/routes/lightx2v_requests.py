"""What a LightX2V client's request says, read as the server reads it (pydantic: optional fields,
unknown ones ignored, lax values) and turned into the gateway job it describes; its 422s are
pydantic's (`{"detail": [{"type", "loc", "msg", "input"}]}`). The routes: lightx2v_api.py."""

from __future__ import annotations

import posixpath
from typing import Any, TypeVar

import msgspec
from litestar import Request, Response

from ..compat import looks_like_server_path
from ..schemas import PARAM_FIELDS

T = TypeVar("T")

# The LightX2V fields that name inputs, and the job input each becomes.
INPUT_FIELDS = {"image_path": "image", "audio_path": "audio", "last_frame_path": "last_frame"}
NAMES = {role: name for name, role in INPUT_FIELDS.items()}


class BaseTask(msgspec.Struct, kw_only=True):
    """`BaseTaskRequest` as the server reads it: every field optional, unknown ones ignored.
    None marks a field the client did not set: the node's model config decides it then."""

    task_id: str = ""
    prompt: str = ""
    negative_prompt: str = ""
    image_path: str = ""
    last_frame_path: str = ""
    image_mask_path: str = ""
    save_result_path: str = ""
    presigned_url: str = ""
    infer_steps: int | None = None
    seed: int | None = None
    target_shape: list[int] | None = None
    use_prompt_enhancer: bool | None = None
    reuse: bool | None = None
    lora_name: str | None = None
    lora_strength: float | None = None


class VideoTask(BaseTask, kw_only=True):
    """`VideoTaskRequest` (`POST /v1/tasks/video/`)."""

    audio_path: str = ""
    video_path: str = ""
    num_fragments: int | None = None
    target_video_length: int | None = None
    video_duration: int | None = None
    target_fps: int | None = None
    resize_mode: str | None = None
    sr_ratio: float | None = None
    talk_objects: list[Any] | None = None


class ImageTask(BaseTask, kw_only=True):
    """`ImageTaskRequest` (`POST /v1/tasks/image/`): an image (i2i) or none (t2i) in, a PNG out."""

    aspect_ratio: str | None = None
    i2i_denoise_strength: float | None = None


class VideoForm(msgspec.Struct, kw_only=True):
    """`/v1/tasks/video/form`'s text fields, with the server's defaults (its files: FORM_FILES)."""

    prompt: str = ""
    negative_prompt: str = ""
    save_result_path: str = ""
    use_prompt_enhancer: bool = False
    num_fragments: int = 1
    infer_steps: int = 5
    target_video_length: int = 81
    seed: int = 42
    video_duration: int = 5
    target_fps: int = 16


class ImageForm(msgspec.Struct, kw_only=True):
    """`/v1/tasks/image/form`'s text fields, with the server's defaults (its file: `image_file`)."""

    prompt: str = ""
    negative_prompt: str = ""
    save_result_path: str = ""
    use_prompt_enhancer: bool = False
    infer_steps: int = 5
    seed: int = 42
    aspect_ratio: str = "16:9"


def task_type(task: BaseTask, has: set[str]) -> str:
    """LightX2V requests carry no task type (a node runs the one it was started with): the
    route and the inputs say which job this is."""
    if isinstance(task, ImageTask):
        return "i2i" if "image" in has else "t2i"
    if "image" in has and "audio" in has:
        return "s2v"
    if "image" in has and "last_frame" in has:
        return "flf2v"
    return "i2v" if "image" in has else "t2v"


def decode(raw: bytes, struct: type[T]) -> T:
    """A JSON body as `struct`, or pydantic's 422 for it."""
    if not raw.strip():
        raise PydanticError("missing", [], "Field required")
    try:
        doc = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise PydanticError("json_invalid", [], f"JSON decode error: {exc}") from None
    if not isinstance(doc, dict):
        raise PydanticError("model_attributes_type", [], "Input should be a valid dictionary or object to extract fields from")
    try:
        # Lax, as pydantic is: "42" is a fine seed.
        return msgspec.convert(doc, struct, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc)
        field = message.rsplit("$.", 1)[-1].split("[")[0].rstrip("`") if "$." in message else None
        raise PydanticError("value_error", [field] if field else [], message.split(" - at ")[0]) from None


class PydanticError(Exception):
    """A body the server's pydantic would refuse: 422 with its `detail` list."""

    def __init__(self, kind: str, loc: list[Any], msg: str) -> None:
        super().__init__(msg)
        self.detail = [{"type": kind, "loc": ["body", *loc], "msg": msg, "input": None}]


def pydantic_error(request: Request, exc: PydanticError) -> Response:
    return Response({"detail": exc.detail}, status_code=422)


def job_values(task: BaseTask, uploaded: set[str]) -> dict[str, Any]:
    """The gateway job a LightX2V request describes (inputs still as the client gave them)."""
    for name, what in (("video_path", "a video input"), ("image_mask_path", "a mask"),
                       ("talk_objects", "several speakers")):
        if getattr(task, name, None):
            raise field_error(name, f"{name}: the gateway does not pass {what} on to nodes")
    values: dict[str, Any] = {}
    for name in task.__struct_fields__:
        value = getattr(task, name)
        if name in PARAM_FIELDS and value not in (None, "", []):
            values[name] = value
    for name, role in INPUT_FIELDS.items():
        value = getattr(task, name, "")
        if not value:
            continue
        if not value.startswith(("http://", "https://", "data:")) and looks_like_server_path(value):
            raise field_error(name, f"{name}: {value!r} is a path on a node, which the gateway cannot"
                              " read; send the file as base64, a data URL or an http(s) URL, or"
                              " upload it to a /form route")
        values[role] = value
    values["task"] = task_type(task, uploaded | {role for role in INPUT_FIELDS.values() if role in values})
    return values


def field_error(field: str, message: str) -> PydanticError:
    return PydanticError("value_error", [field], message)


def file_name(task_id: str, save_result_path: str, ext: str) -> str:
    """The file a node would write: `save_result_path`'s name (default: the task id), with
    `.mp4` (`.png` for an image) added when it has no extension; the status reports this name."""
    name = posixpath.basename((save_result_path or task_id).replace("\\", "/")) or task_id
    return name if posixpath.splitext(name)[1] else name + ext


# The form route's fields, with the server's defaults: its form endpoints pass every field.
FORM_DEFAULTS = {"num_fragments": 1, "infer_steps": 5, "target_video_length": 81, "seed": 42,
                 "video_duration": 5, "target_fps": 16}
FORM_FILES = {"image_file": "image", "last_frame_file": "last_frame", "audio_file": "audio"}
