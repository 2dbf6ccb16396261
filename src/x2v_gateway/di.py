"""Handlers' dependencies given in line: Litestar's injection without a task per dependency."""

from __future__ import annotations

from litestar import Litestar
from litestar.routes import HTTPRoute


def resolve_in_line(app: Litestar) -> int:
    """Have every HTTP handler of `app` resolve its synchronous dependencies one after the
    other; returns how many groups were changed.

    Litestar resolves a handler's dependencies of one depth concurrently, in an anyio task group
    with a task per dependency (litestar-org/litestar#4563). The gateway's are synchronous
    functions handing out a service or the caller, which never wait: a task each only costs. On
    `GET /api/v1/jobs/{id}` (four of them) the task group was a fifth of the event loop's time
    per request in a profile under load. Groups with an async dependency are left as they are.
    """
    changed = 0
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for _handler, model in route.route_handler_map.values():
            batches = []
            for batch in model.dependency_batches:
                if len(batch) > 1 and all(d.provide.has_sync_callable for d in batch):
                    # Sorted by name: the order of a set would differ from run to run.
                    batches += [{d} for d in sorted(batch, key=lambda d: d.key)]
                    changed += 1
                else:
                    batches.append(batch)
            model.dependency_batches = batches
    return changed
