"""Pipelines: one finished video from several steps and scenes, each step an ordinary job.

`plan` (the JSON document and the steps it becomes), `service` (accepting, advancing as jobs
finish, joining, cancel and retry), `media` (splitting speech, last frames, joining: PyAV in a
helper process).
"""

from .service import PipelineService

__all__ = ["PipelineService"]
