"""A finished job's poster frame (a JPEG still of its video), for lists and galleries."""

from __future__ import annotations

from litestar import Response, get
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath

from ..auth import Caller
from ..posters import Posters
from ..reads import find_job
from ..schemas import ApiError, errors
from ..store import JobStore
from .files import ranged_file


@get(
    "/api/v1/jobs/{job_id:str}/poster", tags=["jobs"], media_type="image/jpeg",
    summary="A finished video's poster frame (JPEG, at most 640 pixels a side)",
    responses={
        200: ResponseSpec(bytes, media_type="image/jpeg", generate_examples=False, description=(
            "The video's first frame; made when the video was checked, or now for a job that"
            " finished before posters existed"
        )),
        **errors(400, 404, 410),
    },
)
async def job_poster(
    store: NamedDependency[JobStore], posters: NamedDependency[Posters], who: NamedDependency[Caller],
    job_id: FromPath[str],
) -> Response:
    job = await find_job(store, job_id, who)
    if job.files_expired:
        raise ApiError(410, "this job's files have expired and were deleted")
    if job.state != "succeeded" or not job.result_sha:
        raise ApiError(404, f"this job has no video: it is {job.state}")
    poster = await posters.path(job)
    if poster is None:
        raise ApiError(404, "no poster could be made of this job's video")
    response = ranged_file(poster, None, media_type="image/jpeg", filename=f"{job.id}.jpg")
    # A poster never changes for its job (a new run is a new video, so a new poster):
    # browsers keep it, and the gallery does not fetch it again.
    response.headers["cache-control"] = "private, max-age=86400"
    return response
