"""Operations: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import msgspec
from litestar import Response, get
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec

from ..dispatch import Dispatcher
from ..metrics import Metrics
from ..schemas import errors
from ..store import JobStore


class Check(msgspec.Struct):
    ok: bool
    detail: str


class Readiness(msgspec.Struct):
    ready: bool
    checks: dict[str, Check]


# `security=[{}]`: open to callers without a key (auth.OPEN_PATHS), as probes are.
@get("/healthz", tags=["operations"], summary="The process is alive", security=[{}])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get(
    "/readyz", tags=["operations"], summary="Store writable and at least one upstream reachable",
    response_description="Ready", security=[{}],
    responses={503: ResponseSpec(Readiness, generate_examples=False, description="Not ready: `checks` says what failed")},
)
async def readyz(store: NamedDependency[JobStore], dispatcher: NamedDependency[Dispatcher]) -> Response[Readiness]:
    writable = await store.is_writable()
    reachable = [name for name, s in dispatcher.states.items() if s.up]
    checks = {
        "store": Check(writable, "writable" if writable else "cannot write to the job store"),
        "upstreams": Check(
            bool(reachable),
            f"reachable: {', '.join(reachable)}" if reachable else "no upstream reachable",
        ),
    }
    ready = all(c.ok for c in checks.values())
    return Response(Readiness(ready, checks), status_code=200 if ready else 503)


@get(
    "/metrics", tags=["operations"], summary="Prometheus metrics (admin keys, or anyone with X2V_METRICS_OPEN)",
    media_type="text/plain; version=0.0.4", responses=errors(403),
)
async def metrics(store: NamedDependency[JobStore], metrics: NamedDependency[Metrics]) -> Response[bytes]:
    counts = await store.counts_by_state()
    # Written on the event loop a slice at a time (`Metrics.render` says why not on a thread).
    return Response(await metrics.render(counts), media_type="text/plain; version=0.0.4")


ROUTES = [healthz, readyz, metrics]  # the nodes' routes: routes/nodes.py
