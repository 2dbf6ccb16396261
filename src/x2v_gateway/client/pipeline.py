"""`x2v-gateway pipeline submit FILE.json`: a pipeline from one JSON document, followed step by
step, its finished video downloaded."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .commands import EXIT_CODES, _gateway_options

if TYPE_CHECKING:
    from .api import GatewayAPI
    from .run import Display

_INPUTS = ("image", "audio", "last_frame")
_FINISHED = ("succeeded", "failed", "cancelled")


@dataclass
class PipelineOutcome:
    pipeline: dict[str, Any]
    out: Path | None
    code: int
    steps: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        p = self.pipeline
        return {
            "id": p["id"], "state": p["state"], "error": p.get("error"),
            "out": str(self.out) if self.out else None,
            "steps": [{k: s.get(k) for k in ("n", "scene", "segment", "task", "job_id", "state", "error")}
                      for s in p.get("steps", [])],
        }

    def summary(self) -> str:
        p = self.pipeline
        done = f"; video in {self.out}" if self.out else ""
        error = f": {p['error']}" if p.get("error") else ""
        return f"pipeline {p['id']}: {p['state']} ({p['progress']['succeeded']} of {p['progress']['steps']} steps){error}{done}"


def read_document(path: Path) -> dict[str, Any]:
    """The JSON document, with every scene input that names a local file (relative to the
    document) replaced by the file's content in base64."""
    from .api import USAGE, ClientError

    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ClientError(f"{path}: not a JSON document ({exc})", USAGE) from None
    scenes = doc.get("scenes") if isinstance(doc, dict) else None
    if not isinstance(scenes, list):
        raise ClientError(f"{path}: a pipeline has a list of scenes", USAGE)
    for i, scene in enumerate(scenes):
        for role in _INPUTS:
            value = scene.get(role) if isinstance(scene, dict) else None
            if not isinstance(value, str) or value.startswith(("http://", "https://", "data:")):
                continue
            local = path.parent / value
            if local.is_file():
                scene[role] = base64.b64encode(local.read_bytes()).decode()
            elif len(value) < 260 and "." in value[-6:]:
                raise ClientError(f"{path}: scenes[{i}].{role}: no file {local}", USAGE)
    return doc


@click.group()
def pipeline() -> None:
    """Pipelines: scenes, chains and long speech joined into one finished video."""


@pipeline.command(epilog=EXIT_CODES)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Where the finished video goes. Default: ./<FILE's name>.mp4")
@click.option("--no-wait", is_flag=True, help="Return once the pipeline is accepted; print its id")
@_gateway_options
def submit(api: GatewayAPI, display: Display, file: Path, out: Path | None, no_wait: bool) -> tuple[PipelineOutcome, int]:
    """Submit a pipeline (one JSON document), follow its steps, and download its video.

    A scene's image, audio or last_frame may name a local file, relative to FILE: it is sent
    inline. Everything else is as `POST /api/v1/pipelines` takes it (see the README). Run it
    again after an interruption: it follows the pipeline the first run made (the document's
    content is its Idempotency-Key) rather than making another.

    \b
    Examples:
      x2v-gateway pipeline submit story.json --out story.mp4
      x2v-gateway pipeline submit talk.json --no-wait --json | jq -r .id
    """
    from .api import OK, SOME_FAILED, UNFINISHED

    doc = read_document(file)
    # The key is the document's content: the same command run again (after an interruption, a
    # lost answer) follows the pipeline the first run made instead of making another.
    body = json.dumps(doc, sort_keys=True).encode()
    key = "pipeline-" + hashlib.sha256(body).hexdigest()[:40]
    made = api._send("POST", "/api/v1/pipelines", content=body, headers={
        "Content-Type": "application/json", "Idempotency-Key": key,
    }).json()
    if no_wait:
        return PipelineOutcome(made, None, UNFINISHED), UNFINISHED
    done = follow(api, made["id"], display)
    if done["state"] != "succeeded":
        return PipelineOutcome(done, None, SOME_FAILED), SOME_FAILED
    target = out or Path(f"{file.resolve().stem}.mp4")
    api.download({"id": done["id"], "result": done["result"]}, target)
    return PipelineOutcome(done, target, OK), OK


def follow(api: GatewayAPI, pipeline_id: str, display: Display, interval: float = 1.0) -> dict[str, Any]:
    """The pipeline, read every `interval` seconds until it has finished (or failed: a failed
    step waits for a retry, which this does not make)."""
    while True:
        current = api.get(f"/api/v1/pipelines/{pipeline_id}")
        progress = current["progress"]
        detail = "joining" if progress["joining"] else f"{progress['running']} running, {progress['failed']} failed"
        display.bar("steps", progress["steps"], progress["succeeded"], detail)
        if current["state"] in _FINISHED:
            return current
        time.sleep(interval)
