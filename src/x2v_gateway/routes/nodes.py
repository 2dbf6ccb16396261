"""The node registry over HTTP: list nodes; add, drain, undrain and remove them at run time.

Handlers are thin (parse, call the registry, shape the answer) so that the admin guard of the
API keys can be put on the controller without touching them.

Any key may look at the nodes, but only an admin sees the network layout (URLs, error details
naming hosts) and every job; an ordinary key sees capacity and state, and its own jobs.
"""

from __future__ import annotations

import statistics
from typing import Annotated

import msgspec
from litestar import Controller, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from msgspec import Meta

from ..auth import Caller
from ..dispatch import Dispatcher, UpstreamState
from ..schemas import TaskType, errors
from ..node_registry import NodeRegistry
from ..store import JobStore


class NodeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`POST /api/v1/nodes`: a LightX2V server to use from now on."""

    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    url: Annotated[str, Meta(min_length=1, max_length=2000)]
    # Tasks it runs at once; a LightX2V server runs one.
    capacity: Annotated[int, Meta(ge=1, le=64)] = 1
    # Omitted: learnt from the node's `/v1/service/metadata`.
    tasks: list[TaskType] | None = None


class NodeView(msgspec.Struct, kw_only=True):
    name: str
    kind: str  # selfhosted | cloud
    url: str | None  # admins only
    state: str  # up | down | unknown | draining
    drained: bool
    busy: bool
    capacity: int
    slots: int  # jobs kept in flight there: capacity + look-ahead
    tasks: list[str]
    model: str | None
    running: list[str]  # job ids (an ordinary key's own only)
    queued: list[str]  # job ids waiting in the node's own queue (an ordinary key's own only)
    typical_seconds: dict[str, float]  # median measured run time per task type
    recent_durations: dict[str, list[float]]
    last_error: str | None  # admins only: it may name hosts and addresses


async def node_view(store: JobStore, dispatcher: Dispatcher, state: UpstreamState, who: Caller) -> NodeView:
    """A node as `who` may see it."""
    jobs = [j for j in await store.active(state.name) if who.may_touch(j.owner)]
    recent = dispatcher.timings.recent(state.name)
    return NodeView(
        name=state.name,
        kind=state.upstream.kind,
        url=state.upstream.base_url if who.admin else None,
        state=state.status,
        drained=state.drained,
        busy=state.busy,
        capacity=state.capacity,
        slots=state.upstream.slots,
        tasks=sorted(state.upstream.tasks),
        model=state.model,
        running=[j.id for j in jobs if j.state == "running"],
        queued=[j.id for j in jobs if j.state == "submitted"],
        typical_seconds={t: round(statistics.median(d), 2) for t, d in recent.items()},
        recent_durations={t: [round(s, 2) for s in d[-10:]] for t, d in recent.items()},
        last_error=state.last_error if who.admin else None,
    )


async def node_views(store: JobStore, dispatcher: Dispatcher, who: Caller) -> list[NodeView]:
    """Every node as `who` may see it."""
    # A copy: a node added or removed (here or through another replica) while a view awaits the
    # store must not break the listing.
    return [await node_view(store, dispatcher, state, who) for state in list(dispatcher.states.values())]


class NodesController(Controller):
    path = "/api/v1/nodes"
    tags = ["nodes"]

    @get("/", summary="Nodes and hosted accounts: state, capacity, jobs, measured run times", responses=errors())
    async def list_nodes(
        self, store: NamedDependency[JobStore], dispatcher: NamedDependency[Dispatcher], who: NamedDependency[Caller],
    ) -> list[NodeView]:
        return await node_views(store, dispatcher, who)

    @get("/{name:str}", summary="One node", responses=errors(400, 404))
    async def get_node(
        self, store: NamedDependency[JobStore], dispatcher: NamedDependency[Dispatcher],
        registry: NamedDependency[NodeRegistry], who: NamedDependency[Caller], name: FromPath[str],
    ) -> NodeView:
        return await node_view(store, dispatcher, registry.get(name), who)

    @post("/", status_code=201, summary="Add a node (kept across restarts)", responses=errors(400, 403, 409, 413, 422))
    async def add_node(
        self, store: NamedDependency[JobStore], dispatcher: NamedDependency[Dispatcher],
        registry: NamedDependency[NodeRegistry], who: NamedDependency[Caller], data: JSONBody[NodeRequest],
    ) -> NodeView:
        state = await registry.add(data.name, data.url, capacity=data.capacity, tasks=data.tasks)
        return await node_view(store, dispatcher, state, who)

    @post(
        "/{name:str}/drain", status_code=200, summary="Finish what it has, take nothing new",
        responses=errors(400, 403, 404),
    )
    async def drain_node(
        self, store: NamedDependency[JobStore], dispatcher: NamedDependency[Dispatcher],
        registry: NamedDependency[NodeRegistry], who: NamedDependency[Caller], name: FromPath[str],
    ) -> NodeView:
        return await node_view(store, dispatcher, await registry.set_drained(name, True), who)

    @post("/{name:str}/undrain", status_code=200, summary="Take new jobs again", responses=errors(400, 403, 404))
    async def undrain_node(
        self, store: NamedDependency[JobStore], dispatcher: NamedDependency[Dispatcher],
        registry: NamedDependency[NodeRegistry], who: NamedDependency[Caller], name: FromPath[str],
    ) -> NodeView:
        return await node_view(store, dispatcher, await registry.set_drained(name, False), who)

    @delete(
        "/{name:str}", status_code=204, summary="Remove a node with no job in flight",
        responses=errors(400, 403, 404, 409),
    )
    async def remove_node(self, registry: NamedDependency[NodeRegistry], name: FromPath[str]) -> None:
        await registry.remove(name)
