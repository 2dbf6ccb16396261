"""Request validation shaped like the pydantic errors FastAPI returns (422), field by field.

The models are upstream's `VideoTaskRequest` and `ImageTaskRequest` (the JSON routes) and the
form routes' parameters, in pydantic's order: errors come out in that order, with pydantic's
types, messages and inputs.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from .asgi import Form, HTTPError


class _Invalid(Exception):
    def __init__(self, type_: str, msg: str, ctx: dict[str, Any] | None = None) -> None:
        super().__init__(msg)
        self.type, self.msg, self.ctx = type_, msg, ctx


Validator = Callable[[Any, tuple, list], Any]


def _error(type_: str, loc: tuple, msg: str, value: Any, ctx: dict | None = None) -> dict:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    detail = {"type": type_, "loc": list(loc), "msg": msg, "input": value}
    if ctx is not None:
        detail["ctx"] = ctx
    return detail


def _leaf(check: Callable[[Any], Any]) -> Validator:
    def validate(value: Any, loc: tuple, errors: list) -> Any:
        try:
            return check(value)
        except _Invalid as exc:
            errors.append(_error(exc.type, loc, exc.msg, value, exc.ctx))
            return None

    return validate


def _check_str(value: Any) -> str:
    # Pydantic never turns a number into a string: 123 for a str field is an error.
    if isinstance(value, str):
        return value
    raise _Invalid("string_type", "Input should be a valid string")


_INT_TEXT = re.compile(r"([+-]?\d+)(?:\.0*)?")


def _check_int(value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Invalid("finite_number", "Input should be a finite number")
        if value.is_integer():
            return int(value)
        raise _Invalid(
            "int_from_float", "Input should be a valid integer, got a number with a fractional part"
        )
    if isinstance(value, str):
        match = _INT_TEXT.fullmatch(value.strip())
        if match:
            return int(match.group(1))
        raise _Invalid(
            "int_parsing", "Input should be a valid integer, unable to parse string as an integer"
        )
    raise _Invalid("int_type", "Input should be a valid integer")


def _check_float(value: Any) -> float:
    if isinstance(value, (bool, int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise _Invalid(
                "float_parsing", "Input should be a valid number, unable to parse string as a number"
            ) from None
    raise _Invalid("float_type", "Input should be a valid number")


def _check_positive_float(value: Any) -> float:
    number = _check_float(value)
    if not number > 0:
        raise _Invalid("greater_than", "Input should be greater than 0", {"gt": 0.0})
    return number


_TRUE_TEXT = {"1", "on", "t", "true", "y", "yes"}
_FALSE_TEXT = {"0", "off", "f", "false", "n", "no"}


def _check_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE_TEXT | _FALSE_TEXT:
        return value.lower() in _TRUE_TEXT
    if isinstance(value, (int, float, str)):
        raise _Invalid("bool_parsing", "Input should be a valid boolean, unable to interpret input")
    raise _Invalid("bool_type", "Input should be a valid boolean")


def _optional(validate: Validator) -> Validator:
    def validate_optional(value: Any, loc: tuple, errors: list) -> Any:
        return None if value is None else validate(value, loc, errors)

    return validate_optional


def _list_of(validate: Validator) -> Validator:
    def validate_list(value: Any, loc: tuple, errors: list) -> Any:
        if not isinstance(value, list):
            errors.append(_error("list_type", loc, "Input should be a valid list", value))
            return None
        return [validate(item, (*loc, index), errors) for index, item in enumerate(value)]

    return validate_list


def _talk_object(value: Any, loc: tuple, errors: list) -> Any:
    if not isinstance(value, dict):
        errors.append(
            _error(
                "model_type",
                loc,
                "Input should be a valid dictionary or instance of TalkObject",
                value,
                {"class_name": "TalkObject"},
            )
        )
        return None
    result = {}
    for key in ("audio", "mask"):
        if key not in value:
            errors.append(_error("missing", (*loc, key), "Field required", value))
        else:
            result[key] = _STR(value[key], (*loc, key), errors)
    return result


_STR, _INT, _BOOL = _leaf(_check_str), _leaf(_check_int), _leaf(_check_bool)
_FLOAT = _leaf(_check_float)

# VideoTaskRequest's fields in pydantic's order (base classes first): errors come in this order.
_VIDEO_REQUEST_FIELDS: dict[str, Validator] = {
    "data_bootstrap_room": _optional(_INT),
    "disagg_phase1_receiver_engine_rank": _optional(_INT),
    "disagg_bootstrap_room": _optional(_INT),
    "disagg_decoder_bootstrap_room": _optional(_INT),
    "task_id": _STR,
    "prompt": _STR,
    "use_prompt_enhancer": _BOOL,
    "negative_prompt": _STR,
    "image_path": _STR,
    "last_frame_path": _STR,
    "image_mask_path": _STR,
    "save_result_path": _STR,
    "presigned_url": _STR,
    "infer_steps": _INT,
    "seed": _INT,
    "reuse": _BOOL,
    "target_shape": _list_of(_INT),
    "lora_name": _optional(_STR),
    "lora_strength": _FLOAT,
    "prefer_memory_result": _BOOL,
    "num_fragments": _INT,
    "target_video_length": _INT,
    "video_path": _STR,
    "sr_ratio": _leaf(_check_positive_float),
    "audio_path": _STR,
    "video_duration": _INT,
    "talk_objects": _optional(_list_of(_talk_object)),
    "target_fps": _optional(_INT),
    "resize_mode": _optional(_STR),
}

# ImageTaskRequest: the base request's fields, then its own two.
_IMAGE_REQUEST_FIELDS: dict[str, Validator] = {
    **_VIDEO_REQUEST_FIELDS,
    "aspect_ratio": _STR,
    "i2i_denoise_strength": _optional(_FLOAT),
}

# Defaults of the fields the demo inference reads, for JSON requests that leave them out.
REQUEST_DEFAULTS: dict[str, Any] = {
    "prompt": "",
    "image_path": "",
    "audio_path": "",
    "last_frame_path": "",
    "target_video_length": 81,
    "target_fps": 16,
    "aspect_ratio": "16:9",
}

# The form route's parameters in FastAPI's order, with their Form defaults (None = a file).
_FORM_FIELDS: dict[str, tuple[Validator | None, Any]] = {
    "image_file": (None, ...),
    "last_frame_file": (None, None),
    "prompt": (_STR, ""),
    "save_result_path": (_STR, ""),
    "use_prompt_enhancer": (_BOOL, False),
    "negative_prompt": (_STR, ""),
    "num_fragments": (_INT, 1),
    "infer_steps": (_INT, 5),
    "target_video_length": (_INT, 81),
    "seed": (_INT, 42),
    "audio_file": (None, None),
    "video_duration": (_INT, 5),
    "target_fps": (_INT, 16),
}
# `/v1/tasks/image/form`: the image file is optional there.
_IMAGE_FORM_FIELDS: dict[str, tuple[Validator | None, Any]] = {
    "image_file": (None, None),
    "prompt": (_STR, ""),
    "save_result_path": (_STR, ""),
    "use_prompt_enhancer": (_BOOL, False),
    "negative_prompt": (_STR, ""),
    "infer_steps": (_INT, 5),
    "seed": (_INT, 42),
    "aspect_ratio": (_STR, "16:9"),
}


def parse_video_request(raw: bytes, content_type: str | None, *, image: bool = False) -> dict[str, Any]:
    """The fields a JSON submission sets (`image`: to the image route), validated; unknown
    fields are dropped, as pydantic does. A refused one raises HTTPError: 422 with pydantic's
    errors, or FastAPI's 400."""
    body = _json_object(raw, content_type)
    values, errors = {}, []
    for name, validate in (_IMAGE_REQUEST_FIELDS if image else _VIDEO_REQUEST_FIELDS).items():
        if name in body:
            values[name] = validate(body[name], ("body", name), errors)
    if errors:
        raise HTTPError(422, errors)
    return values


def _json_object(raw: bytes, content_type: str | None) -> dict[str, Any]:
    """A JSON body read as FastAPI reads one for a pydantic model: 422 unless an object."""
    body: Any = None
    if raw:
        if _is_json_content_type(content_type):
            try:
                body = json.loads(raw)
            except json.JSONDecodeError as exc:
                detail = {
                    "type": "json_invalid",
                    "loc": ["body", exc.pos],
                    "msg": "JSON decode error",
                    "input": {},
                    "ctx": {"error": exc.msg},
                }
                raise HTTPError(422, [detail]) from None
            except UnicodeDecodeError:
                raise HTTPError(400, "There was an error parsing the body") from None
        else:
            body = raw  # pydantic then refuses it as "not a dictionary", input = the text
    if body is None:
        raise HTTPError(422, [_error("missing", ("body",), "Field required", None)])
    if not isinstance(body, dict):
        msg = "Input should be a valid dictionary or object to extract fields from"
        raise HTTPError(422, [_error("model_attributes_type", ("body",), msg, body)])
    return body


def _is_json_content_type(content_type: str | None) -> bool:
    # FastAPI parses the body as JSON without a content-type, or with application/*json.
    if content_type is None:
        return True
    mime = content_type.split(";", 1)[0].strip().lower()
    maintype, _, subtype = mime.partition("/")
    return maintype == "application" and (subtype == "json" or subtype.endswith("+json"))


def validate_form(form: Form, *, image: bool = False) -> dict[str, Any]:
    """A form route's parameters (`image`: the image route's): every one is passed to the
    runner, defaults included. HTTPError 422 with pydantic's errors if any is wrong."""
    values: dict[str, Any] = {}
    errors: list[dict] = []
    for name, (validate, default) in (_IMAGE_FORM_FIELDS if image else _FORM_FIELDS).items():
        loc = ("body", name)
        if validate is None:  # a file parameter
            upload = form.files.get(name)
            text = form.fields.get(name, "")
            if upload is not None:
                values[name] = upload
            elif text:
                msg = f"Value error, Expected UploadFile, received: {type(text)}"
                errors.append(_error("value_error", loc, msg, text, {"error": {}}))
            elif default is ...:
                errors.append(_error("missing", loc, "Field required", None))
            continue
        # FastAPI treats an empty form value as absent.
        text = form.fields.get(name, "")
        values[name] = validate(text, loc, errors) if text != "" else default
    if errors:
        raise HTTPError(422, errors)
    request = {name: value for name, value in values.items() if not name.endswith("_file")}
    for name, key in (
        ("image_file", "image_path"),
        ("last_frame_file", "last_frame_path"),
        ("audio_file", "audio_path"),
    ):
        if name not in values and image:
            continue  # the image form has no such field
        upload = values.get(name)
        request[key] = str(upload.path) if upload is not None and upload.path else ""
    return request


# -- the synchronous image routes

_OPT_STR, _OPT_INT, _OPT_FLOAT = _optional(_STR), _optional(_INT), _optional(_FLOAT)


def _literal(*allowed: str) -> Validator:
    expected = " or ".join(f"'{value}'" for value in allowed)

    def check(value: Any) -> str:
        if value in allowed:
            return value
        raise _Invalid("literal_error", f"Input should be {expected}", {"expected": expected})

    return _leaf(check)


def validate_sync_query(query: dict[str, str]) -> tuple[int, float]:
    """`/v1/tasks/image/sync`'s `timeout_seconds` (600) and `poll_interval_seconds` (0.5):
    422 if unreadable, 400 if not positive, as upstream."""
    errors: list[dict] = []
    timeout = _INT(query["timeout_seconds"], ("query", "timeout_seconds"), errors) if "timeout_seconds" in query else 600
    poll = _FLOAT(query["poll_interval_seconds"], ("query", "poll_interval_seconds"), errors) if "poll_interval_seconds" in query else 0.5
    if errors:
        raise HTTPError(422, errors)
    if timeout <= 0:
        raise HTTPError(400, "timeout_seconds must be > 0")
    if poll <= 0:
        raise HTTPError(400, "poll_interval_seconds must be > 0")
    return timeout, poll


# OpenAIImageGenerationRequest: `response_format` may only be b64_json on this route.
_GENERATION_FIELDS: dict[str, tuple[Validator, Any]] = {
    "prompt": (_STR, ...),
    "model": (_OPT_STR, None),
    "n": (_INT, 1),
    "size": (_OPT_STR, None),
    "response_format": (_literal("b64_json"), "b64_json"),
    "user": (_OPT_STR, None),
    "seed": (_OPT_INT, None),
}

# `/v1/images/edits`' form parameters after its files (`image`/`image[]`, `mask`).
_EDIT_FIELDS: dict[str, tuple[Validator, Any]] = {
    "prompt": (_STR, ...),
    "model": (_OPT_STR, None),
    "n": (_INT, 1),
    "size": (_OPT_STR, None),
    "response_format": (_literal("url", "b64_json"), "url"),
    "user": (_OPT_STR, None),
    "negative_prompt": (_STR, ""),
    "seed": (_OPT_INT, None),
    "i2i_denoise_strength": (_OPT_FLOAT, None),
}


def parse_generation_request(raw: bytes, content_type: str | None) -> dict[str, Any]:
    """`POST /v1/images/generations`' JSON body, every field with its default; 422 as pydantic."""
    body = _json_object(raw, content_type)
    values, errors = {}, []
    for name, (validate, default) in _GENERATION_FIELDS.items():
        if name in body:
            values[name] = validate(body[name], ("body", name), errors)
        elif default is ...:
            errors.append(_error("missing", ("body", name), "Field required", body))
        else:
            values[name] = default
    if errors:
        raise HTTPError(422, errors)
    return values


def validate_edit_form(form: Form) -> dict[str, Any]:
    """`POST /v1/images/edits`' text fields, every one with its default; 422 as pydantic."""
    values, errors = {}, []
    for name, (validate, default) in _EDIT_FIELDS.items():
        text = form.fields.get(name, "")
        if text != "":
            values[name] = validate(text, ("body", name), errors)
        elif default is ...:
            errors.append(_error("missing", ("body", name), "Field required", None))
        else:
            values[name] = default  # FastAPI treats an empty form value as absent
    if errors:
        raise HTTPError(422, errors)
    return values
