"""The API's event streams (Server-Sent Events): a job's, a batch's, and every job of the key's.
See streams.py for what they send; here they are parsed, opened, and documented."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from litestar import Response, get
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, HeaderParameter
from litestar.response import ServerSentEvent

from ..auth import Caller
from ..dispatch import Dispatcher
from ..notify import Notifier
from ..schemas import errors
from ..settings import Settings
from ..store import JobStore
from ..streams import EventStream, Scope, StreamSlots, last_event_id, open_stream

_LAST_EVENT_ID = HeaderParameter(
    name="Last-Event-ID", max_length=40,
    description="Resume after this event (an EventSource sends it by itself when it reconnects)",
)

_DESCRIPTION = (
    "Server-Sent Events. `state` (with an `id`): a state change from the job's durable timeline,"
    " `{job_id, state, detail, at, batch_id, url, final}`. `progress` (no `id`): where a job not"
    " finished stands, `{job_id, state, queue, started_at}`. Comments every `X2V_EVENT_KEEPALIVE`"
    " seconds keep a quiet stream open. Reconnect with `Last-Event-ID` to get what was missed."
)


class StreamEvent(msgspec.Struct, omit_defaults=True):
    """One event of a stream, as an SSE client reads it (keep-alive comments aside)."""

    event: Literal["state", "progress"] | None = None
    data: str | None = None  # a JSON object
    id: str | None = None  # `state` events only: resume after it with Last-Event-ID
    retry: int | None = None  # milliseconds an EventSource waits before it reconnects


def _responses(ends: str) -> dict[int, ResponseSpec]:
    return {
        200: ResponseSpec(StreamEvent, media_type="text/event-stream", generate_examples=False,
                          description=f"{_DESCRIPTION} {ends}"),
        204: ResponseSpec(None, description="Finished, and nothing after `Last-Event-ID`: an EventSource stops reconnecting"),
        **errors(400, 404, 429),
    }


async def _answer(stream: EventStream, slots: StreamSlots) -> Response:
    if not await stream.opening():
        return Response(content=b"", status_code=204)
    # No buffering by a proxy (nginx): each event must reach the client as it is sent.
    return ServerSentEvent(open_stream(stream, slots), headers={"x-accel-buffering": "no"})


async def _stream(
    scope: Scope, header: str | None, store: JobStore, notifier: Notifier, dispatcher: Dispatcher,
    settings: Settings, slots: StreamSlots,
) -> Response:
    after = last_event_id(header)
    if after is None:
        # A job's stream starts with its whole timeline (a few events); a batch's or a key's
        # with what happens from now on.
        after = 0 if scope.job_id else await store.newest_event_id()
    stream = EventStream(scope, store, notifier, dispatcher, settings.event_keepalive, after)
    return await _answer(stream, slots)


@get(
    "/api/v1/jobs/{job_id:str}/events", tags=["events"], summary="A job's state changes and progress, live (SSE)",
    responses=_responses("Ends after the job's final state."),
)
async def job_events(
    store: NamedDependency[JobStore], notifier: NamedDependency[Notifier],
    dispatcher: NamedDependency[Dispatcher], settings: NamedDependency[Settings],
    streams: NamedDependency[StreamSlots], who: NamedDependency[Caller], job_id: FromPath[str],
    last_id: Annotated[str | None, _LAST_EVENT_ID] = None,
) -> Response:
    return await _stream(Scope(who, job_id=job_id), last_id, store, notifier, dispatcher, settings, streams)


@get(
    "/api/v1/batches/{batch_id:str}/events", tags=["events"],
    summary="A batch's state changes and progress, live (SSE)",
    responses=_responses("Ends once every job of the batch has finished."),
)
async def batch_events(
    store: NamedDependency[JobStore], notifier: NamedDependency[Notifier],
    dispatcher: NamedDependency[Dispatcher], settings: NamedDependency[Settings],
    streams: NamedDependency[StreamSlots], who: NamedDependency[Caller], batch_id: FromPath[str],
    last_id: Annotated[str | None, _LAST_EVENT_ID] = None,
) -> Response:
    return await _stream(Scope(who, batch_id=batch_id), last_id, store, notifier, dispatcher, settings, streams)


@get(
    "/api/v1/events", tags=["events"],
    summary="State changes and progress of every job of the key (an admin key: every job), live (SSE)",
    responses=_responses("Runs until the client closes it."),
)
async def key_events(
    store: NamedDependency[JobStore], notifier: NamedDependency[Notifier],
    dispatcher: NamedDependency[Dispatcher], settings: NamedDependency[Settings],
    streams: NamedDependency[StreamSlots], who: NamedDependency[Caller],
    last_id: Annotated[str | None, _LAST_EVENT_ID] = None,
) -> Response:
    return await _stream(Scope(who), last_id, store, notifier, dispatcher, settings, streams)


ROUTES = [job_events, batch_events, key_events]
