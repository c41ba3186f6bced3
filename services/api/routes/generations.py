"""Generations: draw images with a fusion, a content, a style or the bare base model."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from b4m_contract.jobs import ACTIVE, AssetKind, JobStatus, JobType
from b4m_contract.schemas import Accepted, GenerateDone, GenerateIn, GenerationList, GenerationOut

from ...common.models import Asset, Fusion, Generation
from ...common.queries import latest_job, owned, page
from ..deps import DbSession, RuntimeDep, TenantId, Watcher
from ..openapi import errors
from ..responses import STORED_FILE, accepted, owned_or_404, stored_file
from ..submit import JobRequest, start_job
from ..views import generation_out
from .common import MAX_OFFSET, IdempotencyKey

router = APIRouter(tags=["generate"])


@router.post(
    "/generate",
    status_code=202,
    response_model=Accepted,
    responses={
        200: {"model": GenerateDone, "description": "the images, when `wait` was long enough"},
        **errors(401, 404, 409, 422),
    },
)
async def generate(
    body: GenerateIn, tenant: TenantId, rt: RuntimeDep, watcher: Watcher, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    """Draw images with a fusion, a content, a style, or the bare base model. With `wait`, the
    answer waits for the images (200) up to that many seconds, else 202; waiting holds no thread."""
    if sum(x is not None for x in (body.fusion_id, body.content_id, body.style_id)) > 1:
        raise HTTPException(422, "give at most one of fusion_id, content_id, style_id")
    halves = (body.content_scale, body.style_scale) != (1.0, 1.0)
    if halves and body.fusion_id is None and body.content_id is None and body.style_id is None:
        raise HTTPException(422, "content_scale and style_scale need a fusion, a content or a style")

    def add_generation(s: Session, req: JobRequest) -> str:
        if body.fusion_id is not None:
            f = owned_or_404(s, Fusion, tenant, body.fusion_id, "fusion")
            if halves and f.method != "b4m":
                raise HTTPException(
                    422, f"content_scale and style_scale need a B4M fusion; a {f.method} fusion has no separate halves"
                )
        for aid, kind in ((body.content_id, AssetKind.CONTENT), (body.style_id, AssetKind.STYLE)):
            if aid is not None:
                a = owned_or_404(s, Asset, tenant, aid, kind)
                if a.kind != kind:
                    raise HTTPException(422, f"{aid} is a {a.kind}, not a {kind}")
        g = Generation(tenant_id=tenant, **body.model_dump(exclude={"wait", "webhook_url", "webhook_events"}))
        s.add(g)
        s.flush()
        return g.id

    def create():  # the database and the queue: on a worker thread, briefly
        req = JobRequest(
            tenant, idempotency_key, body.model_dump(exclude={"wait"}), body.webhook_url, body.webhook_events
        )
        with rt.sessions() as s:
            done = start_job(rt, s, req, JobType.GENERATE, add_generation)
        return done, rt.jobs.get(tenant, done.job_id)

    done, job = await run_in_threadpool(create)
    if body.wait and job.status in ACTIVE:
        job = await watcher.wait(job, body.wait)
    if job.status == JobStatus.SUCCEEDED:
        return JSONResponse(
            {
                "id": done.target_id,
                "job_id": job.id,
                "status": job.status,
                "images": [f"/generations/{done.target_id}/images/{i}" for i in range(body.num_images)],
            }
        )
    return accepted(done.target_id, job.id, job.status)


@router.get("/generations", response_model=GenerationList, responses=errors(401, 422))
def list_generations(
    tenant: TenantId,
    s: DbSession,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
    status: JobStatus | None = Query(None, description="only those whose job has this status"),
    fusion_id: str | None = None,
):
    q = select(Generation).where(Generation.tenant_id == tenant)
    if fusion_id:
        q = q.where(Generation.fusion_id == fusion_id)
    return page(s, tenant, Generation, q, status, limit, offset, generation_out).as_dict()


@router.get("/generations/{generation_id}", response_model=GenerationOut, responses=errors(401, 404))
def get_generation(generation_id: str, tenant: TenantId, s: DbSession):
    g = owned_or_404(s, Generation, tenant, generation_id, "generation")
    return generation_out(g, latest_job(s, tenant, g.id))


@router.get(
    "/generations/{generation_id}/images/{index}",
    responses={
        200: {"content": {"image/png": {}}, "description": "the PNG (local store)"},
        **STORED_FILE,
        **errors(401, 404),
    },
)
def get_generation_image(generation_id: str, index: int, tenant: TenantId, s: DbSession, rt: RuntimeDep):
    g = owned(s, Generation, tenant, generation_id)
    if g is None or not 0 <= index < len(g.images or []):
        raise HTTPException(404, "image not found")
    ref = g.images[index]
    return stored_file(rt.store, ref["key"], "image/png", sha256=ref["sha256"])
