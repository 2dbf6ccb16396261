"""The app factory: `create_app(settings)` builds a complete gateway with no global state."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from litestar import Litestar, Request, Response
from litestar.config.cors import CORSConfig
from litestar.di import Provide
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.template.config import TemplateConfig

from .auth import Auth, LimitError, caller
from .auth_middleware import AuthMiddleware
from .blobs import BlobStoreUnavailable, open_blobs
from .checker import CHECKER
from .compat import error_response, surface
from .di import resolve_in_line
from .dispatch import Dispatcher, Notifier
from .inputs import PublicOnlyTransport
from .jobs import JobService
from .metrics import Metrics
from .node_registry import NodeRegistry
from .pipelines import PipelineService
from .posters import Posters
from .request_bodies import BodyReader
from .routes import access, dashboard, events, lightx2v_api, openai_api, openai_images, seed_services
from .routes import webhooks as webhook_routes
from .routes.api import JobsController, ModelsController
from .routes.batches import BatchesController
from .routes.nodes import NodesController
from .routes.ops import ROUTES as OPS_ROUTES
from .routes.pipelines import PipelinesController
from .routes.posters import job_poster
from .schemas import ApiError, ErrorBody, ErrorResponse, plain
from .settings import Settings, load_settings
from .store import JobStore
from .streams import StreamSlots
from .tasks import NODE_TASKS
from .upstream import Upstream, cloud_account, self_hosted_node
from .webhook_worker import WebhookWorker
from .webhooks import JobWebhooks

log = logging.getLogger("x2v_gateway")


class DemoNode:
    """The built-in demo node, served from a thread of this process."""

    def __init__(self, data_dir: Path, port: int, job_seconds: float) -> None:
        from .demo import IN_PROCESS_THREAD, build_demo_server, quiet_in_process_server

        if port == 0:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._server = build_demo_server(
            "127.0.0.1", port, data_dir, job_seconds=job_seconds, tasks=sorted(NODE_TASKS),
        )
        # Its polls would flood the gateway's terminal; the start-up block says where it is.
        quiet_in_process_server()
        self._thread = threading.Thread(target=self._server.run, name=IN_PROCESS_THREAD, daemon=True)

    async def start(self, timeout: float = 15.0) -> None:
        """Serve, and return once it listens: the dispatcher's first health check must not find
        a refused port and report its own node down."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the built-in demo node did not start listening on {self.url}")
            await asyncio.sleep(0.02)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


class Gateway:
    """Everything one running gateway holds: builds its services, starts and stops them, and
    hands each handler those it declares (`dependencies`)."""

    def __init__(self, settings: Settings, upstreams: list[Upstream] | None = None) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(settings.store_location)
        self.blobs = open_blobs(settings)
        self.notifier = Notifier()
        self.metrics = Metrics()
        self.demo_node: DemoNode | None = None
        self.registry = NodeRegistry(settings, self.store)
        nodes: list[Upstream] = []
        if upstreams is None:
            nodes = [self.registry.build(config) for config in self.registry.load()]
            upstreams = self._upstreams_from_settings(nodes)
        self.dispatcher = Dispatcher(
            self.store, self.blobs, upstreams, self.notifier, self.metrics,
            poll_interval=settings.poll_interval, retention_hours=settings.retention_hours,
            start_deadline=settings.start_deadline,
            # Before concluding that an unanswered submission never arrived.
            reconcile_grace=2 * settings.request_timeout,
            replica_id=settings.replica_id or None, replica_lease=settings.replica_lease,
        )
        # The registry's nodes come with their capacity, task types and drained flag.
        self.registry.attach(self.dispatcher, nodes)
        for name in self.registry.drained_upstreams() & set(self.dispatcher.states):
            self.dispatcher.set_drained(name, True)
        # Fetches the inputs users give as URLs.
        self.http = httpx.AsyncClient(
            timeout=settings.request_timeout,
            transport=None if settings.private_urls else PublicOnlyTransport(),
        )
        self.auth = Auth(settings, self.store)
        self.webhooks = JobWebhooks(self.store, private_ok=settings.private_urls)
        self.bodies = BodyReader(settings, self.store, self.blobs, self.dispatcher)
        self.jobs = JobService(
            settings, self.store, self.blobs, self.dispatcher, self.notifier, self.http, self.auth,
            self.bodies, self.webhooks,
        )
        self.pipelines = PipelineService(settings, self.store, self.blobs, self.jobs, self.notifier, self.auth)
        self.posters = Posters(self.store, self.blobs)
        self.streams = StreamSlots(settings.event_streams)
        self.webhook_worker = WebhookWorker(settings, self.store, self.notifier, self.metrics)

    def dependencies(self) -> dict[str, Provide]:
        """What handlers are given, by parameter name (`jobs: NamedDependency[JobService]`): each
        handler declares the services it uses, and none reaches for the whole gateway."""
        services: dict[str, Any] = {
            "settings": self.settings, "store": self.store, "blobs": self.blobs, "jobs": self.jobs,
            "auth": self.auth, "dispatcher": self.dispatcher, "notifier": self.notifier,
            "registry": self.registry, "metrics": self.metrics, "pipelines": self.pipelines,
            "posters": self.posters, "streams": self.streams,
            "webhooks": self.webhooks, "bodies": self.bodies,
        }
        provided = {name: Provide(_given(service), use_cache=True, sync_to_thread=False)
                    for name, service in services.items()}
        # The key the request came with, as the auth middleware found it.
        provided["who"] = Provide(caller, sync_to_thread=False)
        return provided

    def _upstreams_from_settings(self, nodes: list[Upstream]) -> list[Upstream]:
        """The upstreams besides the registry's nodes: cloud accounts, or the demo node."""
        s = self.settings
        upstreams: list[Upstream] = []
        if s.clouds:
            # One upstream per token: each account has its own limits (3 active tasks, 0.05 s
            # between submits), so each gets its own slots and its own pacing.
            upstreams += [
                cloud_account(c.name, c.base_url, c.token, models=s.cloud_models, timeout=s.request_timeout)
                for c in s.clouds
            ]
        if not upstreams and not nodes:
            self.demo_node = DemoNode(s.data_dir / "demo-node", s.demo_node_port, s.demo_job_seconds)
            upstreams.append(self_hosted_node(
                "demo", self.demo_node.url, slots=1 + s.lookahead, timeout=s.request_timeout,
                form_threshold=s.form_threshold_mb * 1024 * 1024,
            ))
        return upstreams

    async def start(self) -> None:
        if self.demo_node is not None:
            # `x2v-gateway serve` says where it is, once it listens (cli.py).
            await self.demo_node.start()
        CHECKER.configure(workers=self.settings.media_checkers, max_megapixels=self.settings.max_image_megapixels)
        CHECKER.warm()
        await self.auth.bootstrap()
        log.info("blobs: kept in %s", self.blobs.describe())
        try:
            await self.blobs.check()
        except BlobStoreUnavailable:
            # Not fatal: a replica may start before its bucket does. Until it answers, jobs with
            # files get 503 and finished videos wait on their nodes.
            log.warning("blobs: the store does not answer yet; jobs with files get 503 until it does")
        await self.registry.save_settings()
        await self.dispatcher.start()
        self.dispatcher.spawn(self.registry.follow_store())  # nodes changed through other replicas
        await self.pipelines.start()
        await self.webhook_worker.start()
        log.info("upstreams: %s", ", ".join(
            f"{s.upstream.name} ({s.upstream.kind}, {s.upstream.base_url})"
            for s in self.dispatcher.states.values()
        ))

    async def stop(self) -> None:
        await self.pipelines.stop()
        await self.webhook_worker.stop()
        await self.dispatcher.stop()
        await self.http.aclose()
        await self.blobs.aclose()
        if self.demo_node is not None:
            self.demo_node.stop()
        self.store.close()


def settle_heap() -> None:
    """Once the gateway has started (`serve`): everything alive then (modules, routes, the app,
    the nodes' states) lives as long as the process, so it leaves the cycle collector's view
    (`gc.freeze`). A full collection walks every object it tracks, holding the interpreter and
    so the event loop: with 1,000 nodes it took 74-100 ms every 2 s, and 6-19 ms with those
    objects and the nodes' series (`Metrics.add_upstream`) out of its view (bench/plan.py).
    Objects freed by their last reference go as before; only cycles among them would be kept."""
    gc.collect()
    gc.freeze()


def _given(service: Any) -> Callable[[], Any]:
    def provide() -> Any:
        return service

    return provide


def _error(request: Request, status: int, message: str, field: str | None = None,
           headers: dict[str, str] | None = None, where: str | None = None) -> Response:
    # A compatible surface's clients get the shape they read (compat.py); the rest, the API's.
    return error_response(request.url.path, status, message, field, headers, where) or Response(
        ErrorResponse(ErrorBody(status, message, field)), status_code=status, headers=headers,
    )


def _api_error(request: Request, exc: ApiError) -> Response:
    return _error(request, exc.status, exc.message, exc.field)


def _limit_error(request: Request, exc: LimitError) -> Response:
    return _error(request, exc.status, exc.message, exc.field, {"retry-after": str(exc.retry_after)})


def _validation_error(request: Request, exc: ValidationException) -> Response:
    extra = exc.extra if isinstance(exc.extra, list) else []
    first = extra[0] if extra and isinstance(extra[0], dict) else {}
    field = first.get("key")
    message = f"{field} {plain(str(first.get('message')))}" if field else exc.detail
    # FastAPI (the compatible surfaces' model) says 422 for a query parameter out of range.
    return _error(request, 422 if surface(request.url.path) else 400, message, field, where=first.get("source"))


def _http_error(request: Request, exc: HTTPException) -> Response:
    headers = {"allow": exc.headers["allow"]} if exc.headers and "allow" in exc.headers else None
    if exc.status_code == 405 and surface(request.url.path):
        return _error(request, 405, "Method Not Allowed", headers=headers)
    return _error(request, exc.status_code, exc.detail, headers=headers)


def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _error(request, 500, "internal error; the gateway logged the details")


# Swagger UI, served from the gateway's own /static (static/VENDORED.md): Litestar's default loads
# it from a CDN, which leaves /schema blank on a machine without internet.
SWAGGER_UI = "/static/vendor/swagger-ui-dist-5.35.0"


def _swagger_ui() -> SwaggerRenderPlugin:
    return SwaggerRenderPlugin(
        js_url=f"{SWAGGER_UI}/swagger-ui-bundle.js",
        css_url=f"{SWAGGER_UI}/swagger-ui.css",
        standalone_preset_js_url=f"{SWAGGER_UI}/swagger-ui-standalone-preset.js",
        # Litestar's default favicon is an image on a CDN too; "data:," asks for nothing.
        favicon="<link rel='icon' href='data:,'>",
    )


def create_app(settings: Settings | None = None, *, upstreams: list[Upstream] | None = None) -> Litestar:
    """Build the gateway. `settings` default: the environment and `.env`."""
    settings = settings or load_settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # httpx logs every request at INFO: one line per status poll drowns what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    gw = Gateway(settings, upstreams)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    app = Litestar(
        # Logging is set up above from X2V_LOG_LEVEL; Litestar's own default would reset it.
        logging_config=None,
        route_handlers=[
            JobsController, BatchesController, ModelsController, NodesController, PipelinesController, *OPS_ROUTES,
            *events.ROUTES, job_poster,  # event streams (SSE); poster frames
            # The dashboard: pages under /ui (one Router: the place for sign-in and CSRF guards),
            # its static files, and / landing on it.
            dashboard.router(), dashboard.static_files(), dashboard.root,
            # Sign-in and sign-out, API keys, the audit log (auth.py decides who may call what).
            *access.ROUTES,
            # The APIs existing clients speak, over the same jobs (compat.py): LightX2V's server API, OpenAI's, the services the gateway replaces.
            *lightx2v_api.ROUTES, *openai_api.ROUTES, *openai_images.ROUTES, *seed_services.ROUTES,
            # A job's webhook deliveries, keys' webhook secrets and defaults.
            *webhook_routes.ROUTES,
        ],
        # Every request: who is calling, may they, CSRF for sessions, the key's rate limit.
        middleware=[AuthMiddleware()],
        dependencies=gw.dependencies(),
        # Off unless X2V_CORS_ORIGINS lists origins. Keys travel in a header, never in cookies,
        # so browsers on those origins need no credentials mode.
        cors_config=CORSConfig(
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Range", "Prefer", "Last-Event-ID"],
            expose_headers=["Location", "Retry-After", "Idempotent-Replayed", "Content-Range",
                            "Preference-Applied", "X2V-Wait"],
        ) if settings.cors_origins else None,
        template_config=TemplateConfig(
            directory=dashboard.templates_dir(), engine=JinjaTemplateEngine,
            engine_callback=dashboard.setup_templates,
        ),
        lifespan=[lifespan],
        exception_handlers={
            LimitError: _limit_error,
            ApiError: _api_error,
            ValidationException: _validation_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
        openapi_config=OpenAPIConfig(
            title="x2v-gateway", version="0.1.0", path="/schema",
            render_plugins=[_swagger_ui()],
            components=Components(security_schemes={"BearerAuth": SecurityScheme(
                type="http", scheme="bearer",
                description="An API key: `x2v-gateway keys create --name NAME` makes one.",
            )}),
            security=[{"BearerAuth": []}],
        ),
    )
    resolve_in_line(app)  # the services and the caller without a task each (di.py)
    # For the auth middleware (which runs before any handler) and the CLI's start-up block.
    app.state.gateway = gw
    return app
