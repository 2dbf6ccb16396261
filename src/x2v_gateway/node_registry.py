"""The node registry: which LightX2V nodes the gateway uses, their capacity, task types and drain.

Nodes come from `X2V_NODES` (with `X2V_NODE_TASKS` and `X2V_NODE_CAPACITY`) and from the admin
API. Both live as rows of the store's `nodes` table, so a node added, drained or removed at run
time stays so after a restart, and is taken up by every other gateway replica sharing the store
within seconds (`follow_store`). Settings decide a settings node's URL, capacity and task types at
every start, unless it was removed or replaced through the API: then the API's row wins (and the
start-up log says so).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from .dispatch import Dispatcher, UpstreamState
from .schemas import ApiError
from .settings import Settings, SettingsError, parse_nodes
from .tasks import NODE_TASKS
from .store import JobStore
from .upstream import Upstream, self_hosted_node

log = logging.getLogger("x2v_gateway.nodes")


@dataclass(frozen=True, slots=True)
class NodeConfig:
    name: str
    url: str
    capacity: int
    tasks: frozenset[str] | None  # None: learnt from the node's metadata
    source: str  # "settings" | "api"
    drained: bool = False


class NodeRegistry:
    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings = settings
        self.store = store
        self.dispatcher: Dispatcher | None = None
        self.configs: dict[str, NodeConfig] = {}

    # -- start ----------------------------------------------------------------------------------

    def load(self) -> list[NodeConfig]:
        """The nodes to use: settings merged with the store's rows (read only; `save_settings`
        writes the settings' part once the gateway runs)."""
        s = self.settings
        rows = {row["name"]: row for row in self.store.read_blocking(lambda r: r.nodes())}
        configs: dict[str, NodeConfig] = {}
        for spec in s.nodes:
            row = rows.get(spec.name)
            if row is not None and row["source"] == "api" and row["url"]:
                if row["url"] != spec.url or row["removed"]:
                    log.warning(
                        "%s is in X2V_NODES but was %s through the API; the API's version holds"
                        " (POST /api/v1/nodes to change it)", spec.name,
                        "removed" if row["removed"] else f"replaced ({row['url']})",
                    )
                continue
            configs[spec.name] = NodeConfig(
                name=spec.name,
                url=spec.url,
                capacity=s.node_capacity.get(spec.name, s.node_capacity.get("*", 1)),
                tasks=s.node_tasks.get(spec.name),
                source="settings",
                drained=bool(row and row["drained"]),
            )
        for name, row in rows.items():
            if row["source"] == "api" and row["url"] and not row["removed"]:
                configs[name] = NodeConfig(
                    name=name, url=row["url"], capacity=row["capacity"] or 1,
                    tasks=frozenset(row["tasks"]) if row["tasks"] is not None else None,
                    source="api", drained=row["drained"],
                )
        self.configs = configs
        return list(configs.values())

    def drained_upstreams(self) -> set[str]:
        """Upstreams that are not nodes (cloud accounts) drained through the API."""
        return {row["name"] for row in self.store.read_blocking(lambda r: r.nodes()) if row["drained"] and not row["url"]}

    def build(self, config: NodeConfig) -> Upstream:
        s = self.settings
        return self_hosted_node(
            config.name, config.url, slots=config.capacity + s.lookahead, timeout=s.request_timeout,
            form_threshold=s.form_threshold_mb * 1024 * 1024, tasks=config.tasks,
        )

    def attach(self, dispatcher: Dispatcher, upstreams: Iterable[Upstream]) -> None:
        """Hand the nodes to the dispatcher, with capacity, task types and drain."""
        self.dispatcher = dispatcher
        for upstream in upstreams:
            config = self.configs.get(upstream.name)
            if config is None:
                continue
            dispatcher.add_upstream(
                upstream, capacity=config.capacity, drained=config.drained,
                learn_tasks=config.tasks is None,
            )

    async def save_settings(self) -> None:
        for config in self.configs.values():
            if config.source == "settings":
                await self.store.save_node(
                    config.name, url=config.url, capacity=config.capacity, tasks=config.tasks,
                    source="settings",
                )

    # -- admin ----------------------------------------------------------------------------------

    def get(self, name: str) -> UpstreamState:
        assert self.dispatcher is not None
        state = self.dispatcher.states.get(name)
        if state is None:
            raise ApiError(404, f"no node named {name!r}")
        return state

    async def add(
        self, name: str, url: str, *, capacity: int = 1, tasks: Iterable[str] | None = None
    ) -> UpstreamState:
        """Add a node at run time; it gets jobs as soon as it answers its status route."""
        assert self.dispatcher is not None
        try:
            # The same rules as X2V_NODES: a plain name, an http(s) URL.
            (spec,) = parse_nodes("node", f"{name}={url}")
        except (SettingsError, ValueError) as exc:
            raise ApiError(422, str(exc), "url" if "URL" in str(exc) else "name") from None
        if spec.name != name or "," in url:
            raise ApiError(422, "a node name may hold only letters, digits, - and _", "name")
        url = spec.url
        if name in self.dispatcher.states:
            raise ApiError(409, f"there is already a node named {name!r}; remove it first", "name")
        task_set = frozenset(tasks) if tasks is not None else None
        if task_set is not None and (not task_set or task_set - NODE_TASKS):
            raise ApiError(422, "tasks must be some of " + ", ".join(sorted(NODE_TASKS)), "tasks")
        await self.store.save_node(name, url=url, capacity=capacity, tasks=task_set, source="api")
        config = NodeConfig(name, url, capacity, task_set, "api")
        self.configs[name] = config
        drained = any(r["name"] == name and r["drained"] for r in await self.store.nodes())
        # `sync` may have taken it up from its row meanwhile: one follow loop per node.
        state = self.dispatcher.states.get(name) or self.dispatcher.add_upstream(
            self.build(config), capacity=capacity, drained=drained, learn_tasks=task_set is None,
        )
        log.info("node %s added (%s, capacity %d)", name, url, capacity)
        return state

    async def set_drained(self, name: str, drained: bool) -> UpstreamState:
        """A drained node finishes what it has (its look-ahead job too) and gets nothing new."""
        state = self.get(name)
        await self.store.set_node_flags(name, drained=drained)
        assert self.dispatcher is not None
        self.dispatcher.set_drained(name, drained)
        log.info("node %s %s", name, "drained" if drained else "undrained")
        return state

    async def remove(self, name: str) -> None:
        """Forget a node with nothing in flight. A node from X2V_NODES stays removed across
        restarts until it is added again through the API."""
        self.get(name)  # a 404 for a name it does not know
        if name in {cloud.name for cloud in self.settings.clouds}:
            raise ApiError(409, f"{name} is a hosted-cloud account: drain it, or remove its token")
        inflight, pinned = await self.store.read(
            lambda r: (r.inflight_counts().get(name, 0), r.count_pinned(name))
        )
        if inflight:
            raise ApiError(
                409, f"{name} still has {inflight} job(s) in flight: drain it and wait until they"
                " finish", "name",
            )
        if pinned:
            raise ApiError(409, f"{pinned} queued job(s) are pinned to {name}; cancel them first", "name")
        config = self.configs.pop(name, None)
        if config is not None and config.source == "settings":
            # The row now speaks for the node: settings no longer bring it back on restart.
            await self.store.save_node(name, url=config.url, capacity=config.capacity,
                                       tasks=config.tasks, source="api")
            await self.store.set_node_flags(name, removed=True, drained=False)
        else:
            await self.store.delete_node(name)
        assert self.dispatcher is not None
        if name in self.dispatcher.states:  # else `sync` removed it meanwhile, from its row
            self.dispatcher.remove_upstream(name)
        log.info("node %s removed", name)

    # -- replicas sharing the store -------------------------------------------------------------

    async def follow_store(self, interval: float = 2.0) -> None:
        """While other replicas share the store: take up the nodes they added, drained or
        removed through their API (each replica holds its upstreams in memory)."""
        assert self.dispatcher is not None
        while True:
            await asyncio.sleep(interval)
            if self.dispatcher.replicas.others <= 0:
                continue
            try:
                await self.sync()
            except Exception:
                log.exception("reading the node registry failed; trying again")

    async def sync(self) -> None:
        """Make this replica's upstreams match the registry's rows: drain flags, nodes added
        through the API, nodes removed."""
        dispatcher = self.dispatcher
        assert dispatcher is not None
        rows = {row["name"]: row for row in await self.store.nodes()}
        for name, row in rows.items():
            state = dispatcher.states.get(name)
            if state is not None and not row["removed"] and state.drained != row["drained"]:
                dispatcher.set_drained(name, row["drained"])
                log.info("node %s %s through another replica", name, "drained" if row["drained"] else "undrained")
            elif state is None and row["source"] == "api" and row["url"] and not row["removed"]:
                config = NodeConfig(
                    name=name, url=row["url"], capacity=row["capacity"] or 1,
                    tasks=frozenset(row["tasks"]) if row["tasks"] is not None else None,
                    source="api", drained=row["drained"],
                )
                self.configs[name] = config
                dispatcher.add_upstream(
                    self.build(config), capacity=config.capacity, drained=config.drained,
                    learn_tasks=config.tasks is None,
                )
                log.info("node %s added through another replica (%s)", name, config.url)
        for name in list(self.configs):
            row = rows.get(name)
            if (row is None or row["removed"]) and name in dispatcher.states:
                del self.configs[name]
                dispatcher.remove_upstream(name)
                log.info("node %s removed through another replica", name)
