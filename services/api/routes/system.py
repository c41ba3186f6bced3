"""Operations: liveness, readiness, Prometheus metrics; the tenant's webhook signing key."""

from __future__ import annotations

import asyncio
import hmac

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from b4m_contract.schemas import BaseModelList, BaseModelOut, ReadyOut, WebhookSecretOut
from b4m_core.base_info import model_facts

from ..deps import RuntimeDep, TenantId
from ..openapi import errors
from ..webhooks import tenant_secret

router = APIRouter()


@router.get("/base-models", tags=["base models"], response_model=BaseModelList, responses=errors(401))
def list_base_models(tenant: TenantId, rt: RuntimeDep) -> BaseModelList:
    """The base models uploads may name (`B4M_BASE_MODELS`), each with the training defaults
    a run on it gets (read from its files; nothing is loaded)."""
    settings = rt.settings
    default = settings.allowed_base_model(settings.base_model)
    return BaseModelList(
        items=[
            BaseModelOut(name=name, source=source, default=name == default, **model_facts(source))
            for name, source in sorted(settings.base_model_table().items())
        ]
    )


@router.get("/healthz", tags=["ops"])
async def healthz():
    """Liveness: answered on the event loop itself, so it stays fast while every worker thread
    is busy (a stalled store, a flood of uploads)."""
    return {"status": "ok"}


@router.get("/readyz", tags=["ops"], response_model=ReadyOut, responses={503: {"model": ReadyOut}})
async def readyz(rt: RuntimeDep):
    """Readiness: database, storage and broker each answer within `B4M_READY_TIMEOUT_S`. The
    broker alone down is `degraded`, still 200: requests are taken (jobs wait in the database
    and are sent when it returns), so the API stays in rotation."""
    limit = rt.settings.ready_timeout_s

    async def check(fn) -> str:
        try:
            await asyncio.wait_for(asyncio.to_thread(fn), limit)
            return "ok"
        except TimeoutError:
            return f"error: no answer within {limit:g} s"
        except Exception as exc:
            return f"error: {exc}"

    names = ("database", "storage", "broker")
    fns = (lambda: rt.engine.connect().close(), rt.store.check, rt.queue.check)
    checks = dict(zip(names, await asyncio.gather(*(check(fn) for fn in fns))))
    if checks["database"] != "ok" or checks["storage"] != "ok":
        return JSONResponse({"status": "unavailable", "checks": checks}, 503)
    return JSONResponse({"status": "ok" if checks["broker"] == "ok" else "degraded", "checks": checks}, 200)


@router.get(
    "/metrics",
    tags=["ops"],
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}, **errors(401)},
)
def metrics(request: Request, rt: RuntimeDep):
    """Jobs by state and type, job durations (last hour), queue depth, HTTP requests, GPU memory.
    They count every tenant's jobs: with auth on, only the operator's `B4M_METRICS_TOKEN` reads
    them here (or scrape `B4M_METRICS_PORT`, which is not exposed outside the cluster)."""
    if rt.settings.auth:
        token = rt.settings.metrics_token
        given = request.headers.get("authorization", "")
        if not token or not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "metrics need the operator's B4M_METRICS_TOKEN (or scrape B4M_METRICS_PORT)")
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)


@router.get("/webhooks/secret", tags=["webhooks"], response_model=WebhookSecretOut, responses=errors(401))
def get_webhook_secret(tenant: TenantId, rt: RuntimeDep):
    """The key that signs this tenant's webhooks. Each event is a POST of `{"type": "job.started" |
    "job.succeeded" | "job.failed" | "job.canceled", "job_id", "data": <the job>}` (the job's
    `webhook_events` choose which; the end events by default) with headers `webhook-id` (one per
    event, the same on every retry, so dedupe on it), `webhook-timestamp` and `webhook-signature`.
    A receiver that does not answer 2xx is retried with exponential backoff and jitter."""
    return {"secret": tenant_secret(rt.sessions, tenant)}
