"""The REST API's factory: the runtime's parts, background loops, middleware, routes.

A thin layer: validation and bookkeeping in the routes (`routes/`), the method in
`b4m_core` (run by workers), state in the database, files in the object store. The API
process imports no torch: it hands job ids to a queue. `services/embedded.py` composes
this app with an in-process worker for the one-process server.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, Counter

from ..common.broker import CeleryQueue, JobQueue
from ..common.db import make_engine, migrate, session_factory
from ..common.jobs import JobStore
from ..common.observability import GpuCollector, HttpMetrics, JobCollector
from ..common.reconciler import Reconciler
from ..common.settings import Settings, get_settings
from .deps import Runtime
from .errors import install_error_handlers
from .guards import RequestGuard
from .openapi import describe_openapi, document_webhooks
from .routes import ROUTERS
from .views import job_out
from .watch import JobWatcher
from .webhooks import WebhookDispatcher

UI_DIR = Path(__file__).parent / "ui"


def create_app(
    settings: Settings | None = None, *, queue: JobQueue | None = None, run_migrations: bool = True
) -> FastAPI:
    """The API over `settings`' database and store, handing jobs to `queue` (default: the
    Celery queue on `B4M_BROKER_URL`; the embedded server passes its in-process one)."""
    settings = settings or get_settings()
    if queue is None:
        if not settings.broker_url:
            raise ValueError(
                "no B4M_BROKER_URL: pass a queue, or run the embedded server "
                "(services.embedded.create_embedded_app, which `b4m serve` uses)"
            )
        queue = CeleryQueue(settings)
    url = settings.resolved_database_url
    if run_migrations:
        migrate(url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    rt = Runtime(
        settings=settings,
        engine=engine,
        sessions=sessions,
        jobs=JobStore(sessions),
        store=settings.object_store(),
        queue=queue,
        watcher=JobWatcher(sessions),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        stops = [WebhookDispatcher(sessions, settings, lambda job: job_out(job).model_dump(mode="json")).start_thread()]
        if settings.reconcile_every_s > 0:  # crash recovery: lost messages, dead workers, deadlines
            stops.append(
                Reconciler(
                    sessions,
                    settings,
                    queue.enqueue,
                    queue.waiting_ids,
                    store=rt.store,
                    on_orphans=app.state.orphans_removed.inc,
                ).start_thread()
            )
        rt.watcher.start()
        scrape = None
        if settings.metrics_port:  # the cluster-internal scrape port (no key)
            from prometheus_client import start_http_server

            scrape, _ = start_http_server(settings.metrics_port, registry=app.state.metrics)
        yield
        if scrape is not None:
            scrape.shutdown()
        await rt.watcher.close()
        for stop in stops:
            stop.set()
        queue.close()
        engine.dispose()

    app = FastAPI(
        title="B4M: Break-for-Make customization service",
        version="0.1.0",
        lifespan=lifespan,
        description="Train content and style adapters, fuse any pair, draw images. Every POST takes an "
        "`Idempotency-Key` header.",
        generate_unique_id_function=lambda route: route.name,  # operationIds generated clients can use
    )
    document_webhooks(app)
    app.state.runtime = rt
    _observe(app, rt)
    for router in ROUTERS:
        app.include_router(router)
    # the web UI: static files over the same public API (its JavaScript sends the key header)
    app.mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui")

    @app.get("/", include_in_schema=False)
    def root():
        return RedirectResponse("/ui/")

    def openapi() -> dict:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            app.openapi_schema = describe_openapi(
                get_openapi(
                    title=app.title,
                    version=app.version,
                    description=app.description,
                    routes=app.routes,
                    webhooks=app.webhooks.routes,
                )
            )
        return app.openapi_schema

    app.openapi = openapi
    install_error_handlers(app)
    app.add_middleware(RequestGuard, runtime=rt)  # outermost: before any body is read
    return app


def _observe(app: FastAPI, rt: Runtime) -> None:
    """Prometheus metrics (served by `GET /metrics`): jobs, durations and queue depth from the
    database and broker, HTTP requests by route, GPU memory where this process holds a GPU."""
    registry = CollectorRegistry()
    registry.register(JobCollector(rt.sessions, rt.queue.depths))
    registry.register(GpuCollector())
    app.state.metrics = registry
    app.state.orphans_removed = Counter(
        "b4m_orphaned_objects_removed", "objects no row pointed at, removed by this process's sweeps", registry=registry
    )
    http = HttpMetrics(registry)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        http.observe(request.method, getattr(route, "path", "unmatched"), response.status_code, started)
        return response
