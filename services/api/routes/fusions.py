"""Fusions: combine a trained content with a trained style (the make stage), list, show, delete."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import JSONResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from b4m_contract.jobs import AssetKind, JobStatus, JobType
from b4m_contract.schemas import Accepted, FusionIn, FusionList, FusionOut
from b4m_core.config import plp_mismatch  # torch-free: settings only

from ...common import deletions
from ...common.models import Adapter as AdapterRow
from ...common.models import Asset, Fusion
from ...common.queries import Training, describe_unready, latest_job, page, training_state
from ..deps import DbSession, RuntimeDep, TenantId
from ..openapi import errors
from ..responses import accepted, owned_or_404
from ..submit import JobRequest, start_job
from ..views import fusion_out
from .common import MAX_OFFSET, IdempotencyKey, delete_adapters

router = APIRouter(tags=["fusions"])


def refuse_uncomposable(s: Session, content: Asset, style: Asset) -> None:
    """422 when both inputs are trained and their adapters cannot compose (trained on other
    base models, or under other PLP shapes, e.g. before the base model's defaults changed);
    inputs still training are checked by the fusion job itself."""
    if content.adapter_id is None or style.adapter_id is None:
        return
    c, st = s.get(AdapterRow, content.adapter_id).meta or {}, s.get(AdapterRow, style.adapter_id).meta or {}
    if c.get("base_model_hash") != st.get("base_model_hash"):
        raise HTTPException(422, f"{content.id} and {style.id} were trained on different base models")
    if c.get("method") != "b4m" or st.get("method") != "b4m" or not c.get("plp") or not st.get("plp"):
        return  # a baseline's adapter: the job explains
    if why := plp_mismatch(c["plp"], st["plp"]):
        raise HTTPException(422, f"{content.id} and {style.id} cannot be fused: {why}; train one of them again")


@router.post("/fusions", status_code=202, response_model=Accepted, responses=errors(401, 404, 409, 422))
def create_fusion(
    body: FusionIn, tenant: TenantId, rt: RuntimeDep, s: DbSession, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    """Combine a trained content with a trained style and fine-tune them into one adapter.
    Inputs still training are waited for; an input whose training failed is refused (409)."""

    def add_fusion(s: Session, req: JobRequest) -> str:
        trained: dict[str, Asset] = {}
        for aid, kind in ((body.content_id, AssetKind.CONTENT), (body.style_id, AssetKind.STYLE)):
            a = owned_or_404(s, Asset, tenant, aid, kind)
            if a.kind != kind:
                raise HTTPException(422, f"{aid} is a {a.kind}, not a {kind}")
            state, job = training_state(s, a)
            if state == Training.FAILED:
                raise HTTPException(409, describe_unready(a, job))
            trained[kind] = a
        if body.method == "b4m":
            refuse_uncomposable(s, trained[AssetKind.CONTENT], trained[AssetKind.STYLE])
        given = {
            "learning_rate": body.learning_rate,
            "seed": body.seed,
            "preview_prompts": body.preview_prompts or None,
        }
        f = Fusion(
            tenant_id=tenant,
            content_id=body.content_id,
            style_id=body.style_id,
            steps=body.steps,
            method=body.method,
            settings={k: v for k, v in given.items() if v is not None},
        )
        s.add(f)
        s.flush()
        return f.id

    req = JobRequest(tenant, idempotency_key, body.model_dump(), body.webhook_url, body.webhook_events)
    done = start_job(rt, s, req, JobType.FUSE, add_fusion)
    return accepted(done.target_id, done.job_id, done.status)


@router.get("/fusions", response_model=FusionList, responses=errors(401, 422))
def list_fusions(
    tenant: TenantId,
    s: DbSession,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
    status: JobStatus | None = Query(None, description="only those whose latest job has this status"),
    content_id: str | None = None,
    style_id: str | None = None,
):
    q = select(Fusion).where(Fusion.tenant_id == tenant)
    if content_id:
        q = q.where(Fusion.content_id == content_id)
    if style_id:
        q = q.where(Fusion.style_id == style_id)
    return page(s, tenant, Fusion, q, status, limit, offset, fusion_out).as_dict()


@router.get("/fusions/{fusion_id}", response_model=FusionOut, responses=errors(401, 404))
def get_fusion(fusion_id: str, tenant: TenantId, s: DbSession):
    f = owned_or_404(s, Fusion, tenant, fusion_id, "fusion")
    return fusion_out(f, latest_job(s, tenant, f.id))


@router.delete("/fusions/{fusion_id}", status_code=204, responses=errors(401, 404))
def delete_fusion(fusion_id: str, tenant: TenantId, s: DbSession, rt: RuntimeDep):
    """Delete the fusion and its fused adapter (generations made with it keep their images)."""
    f = owned_or_404(s, Fusion, tenant, fusion_id, "fusion")
    adapter_id = f.adapter_id
    s.delete(f)
    s.flush()
    rt.jobs.forget_targets(s, tenant, [fusion_id])  # its job stops; its key is free again
    keys = deletions.record(s, deletions.job_objects(s, tenant, [fusion_id]) + delete_adapters(s, [adapter_id]))
    s.commit()  # the rows and the record of their objects, together
    deletions.remove(rt.sessions, rt.store, keys)  # a store outage leaves them to the sweep
    return Response(status_code=204)
