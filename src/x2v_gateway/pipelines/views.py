"""A pipeline as the API and the dashboard show it: its state, progress, and each step live."""

from __future__ import annotations

from typing import Any

import msgspec

from ..schemas import iso
from ..store import Job, JobStore, Pipeline, Reads


class StepResult(msgspec.Struct):
    url: str  # the step's output (a video, or an image), downloaded as a job's
    sha256: str
    duration: float | None = None


class StepView(msgspec.Struct, kw_only=True):
    n: int
    scene: int
    segment: int | None
    kind: str  # "clip" (a span of the video) | "image" (made for a later step)
    task: str
    seconds: float | None  # its span of the finished video
    # What it takes from earlier steps: role -> "steps[N]'s last frame" / "steps[N]'s output".
    takes: dict[str, str]
    job_id: str | None
    # The job's state, or "waiting" (for an earlier step's output).
    state: str
    error: str | None
    result: StepResult | None


class PipelineResult(msgspec.Struct, kw_only=True):
    url: str
    sha256: str
    size: int | None = None
    duration: float | None = None
    frames: int | None = None
    width: int | None = None
    height: int | None = None
    has_audio: bool | None = None


class Progress(msgspec.Struct):
    steps: int
    succeeded: int
    running: int
    failed: int
    joining: bool  # every step succeeded; the clips are being joined


class PipelineView(msgspec.Struct, kw_only=True):
    id: str
    name: str | None
    state: str  # running | succeeded | failed (a step can be retried) | cancelled
    error: str | None
    output: dict[str, Any]
    created_at: str | None
    finished_at: str | None
    progress: Progress
    result: PipelineResult | None
    files_expired: bool
    steps: list[StepView]


class PipelineList(msgspec.Struct):
    pipelines: list[PipelineView]
    next_cursor: str | None


def pipeline_view(pipeline: Pipeline, jobs: dict[str, Job]) -> PipelineView:
    steps = []
    for step in pipeline.steps:
        job = jobs.get(step.job_id or "")
        result = None
        if job is not None and job.result_sha and not job.files_expired:
            result = StepResult(
                url=f"/api/v1/jobs/{job.id}/{'image' if step.kind == 'image' else 'video'}", sha256=job.result_sha,
                duration=(job.result_meta or {}).get("duration"),
            )
        steps.append(StepView(
            n=step.n, scene=step.scene, segment=step.segment, kind=step.kind, task=step.task, seconds=step.seconds,
            takes={role: f"steps[{need['step']}]'s " + ("last frame" if need["take"] == "last_frame" else "output")
                   for role, need in step.needs.items()},
            job_id=step.job_id, state=job.state if job is not None else "waiting",
            error=job.error if job is not None else None, result=result,
        ))
    states = [s.state for s in steps]
    succeeded = states.count("succeeded")
    result = None
    if pipeline.result_sha and not pipeline.files_expired:
        meta = pipeline.result_meta or {}
        result = PipelineResult(
            url=f"/api/v1/pipelines/{pipeline.id}/video", sha256=pipeline.result_sha, size=meta.get("size"),
            duration=meta.get("seconds"), frames=meta.get("frames"), width=meta.get("width"),
            height=meta.get("height"), has_audio=meta.get("has_audio"),
        )
    return PipelineView(
        id=pipeline.id, name=pipeline.name, state=pipeline.state, error=pipeline.error,
        output=pipeline.output, created_at=iso(pipeline.created_at), finished_at=iso(pipeline.finished_at),
        progress=Progress(
            steps=len(steps), succeeded=succeeded,
            running=sum(s in ("queued", "submitted", "running") for s in states),
            failed=sum(s in ("failed", "cancelled") for s in states),
            joining=pipeline.state == "running" and succeeded == len(steps),
        ),
        result=result, files_expired=pipeline.files_expired, steps=steps,
    )


def pipeline_views(r: Reads, pipelines: list[Pipeline]) -> list[PipelineView]:
    """These pipelines as the API shows them, their steps' jobs read with `r` (a reader thread)."""
    ids = [s.job_id for p in pipelines for s in p.steps if s.job_id]
    jobs = {job.id: job for job in r.jobs_by_id(ids)}
    return [pipeline_view(p, jobs) for p in pipelines]


async def view(store: JobStore, pipeline: Pipeline) -> PipelineView:
    """One pipeline with its steps' jobs, read in one hop."""
    return (await store.read(lambda r: pipeline_views(r, [pipeline])))[0]


async def views(store: JobStore, pipelines: list[Pipeline]) -> list[PipelineView]:
    return await store.read(lambda r: pipeline_views(r, pipelines))
