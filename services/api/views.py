"""Rows as the API shows them: database rows in, the contract's response models out.

Storage keys never leave the service: a job's loss curve and previews, a generation's
images become the API routes that serve them."""

from __future__ import annotations

import time

from b4m_contract.jobs import JobStatus
from b4m_contract.schemas import AssetOut, FusionOut, GenerationOut, JobOut, WebhookOut

from ..common.models import Asset, Fusion, Generation, Job, as_utc


def iso(dt) -> str | None:
    """ISO 8601 with the UTC offset."""
    return as_utc(dt).isoformat() if dt else None


def job_out(job: Job) -> JobOut:
    eta = None
    if job.status == JobStatus.RUNNING and job.started_at and 0 < job.progress_step < job.progress_total:
        elapsed = time.time() - as_utc(job.started_at).timestamp()
        eta = elapsed / job.progress_step * (job.progress_total - job.progress_step)
    outputs = dict(job.outputs or {})
    if "loss_curve" in outputs:
        outputs["loss_curve"] = f"/jobs/{job.id}/loss.png"
    previews = outputs.pop("previews", [])
    webhook = None
    if job.webhook_url:
        webhook = WebhookOut(
            url=job.webhook_url,
            status=job.webhook_status or "pending",
            attempts=job.webhook_attempts or 0,
            error=job.webhook_error,
        )
    return JobOut(
        id=job.id,
        type=job.type,
        target_id=job.target_id,
        status=job.status,
        progress_step=job.progress_step,
        progress_total=job.progress_total,
        loss=job.loss,
        eta_seconds=eta,
        attempts=job.attempts,
        worker_losses=job.worker_losses or 0,
        error=job.error,
        outputs=outputs,
        previews=[f"/jobs/{job.id}/previews/{i}" for i in range(len(previews))],
        webhook=webhook,
        created_at=iso(job.created_at),
        started_at=iso(job.started_at),
        finished_at=iso(job.finished_at),
    )


def _latest(job: Job | None) -> dict:
    return {"status": job.status if job else None, "job_id": job.id if job else None}


def asset_out(a: Asset, job: Job | None) -> AssetOut:
    return AssetOut(
        id=a.id,
        kind=a.kind,
        name=a.name,
        word=a.word,
        token=a.token,
        base_model=a.base_model,
        adapter_id=a.adapter_id,
        images=len(a.images),
        captions=[im.caption for im in sorted(a.images, key=lambda im: im.position)],
        created_at=iso(a.created_at),
        **_latest(job),
    )


def fusion_out(f: Fusion, job: Job | None) -> FusionOut:
    return FusionOut(
        id=f.id,
        content_id=f.content_id,
        style_id=f.style_id,
        steps=f.steps,
        method=f.method,
        adapter_id=f.adapter_id,
        created_at=iso(f.created_at),
        **_latest(job),
    )


def generation_out(g: Generation, job: Job | None) -> GenerationOut:
    return GenerationOut(
        id=g.id,
        fusion_id=g.fusion_id,
        content_id=g.content_id,
        style_id=g.style_id,
        prompt=g.prompt,
        negative_prompt=g.negative_prompt,
        seed=g.seed,
        steps=g.steps,
        guidance=g.guidance,
        strength=g.strength,
        content_scale=g.content_scale,
        style_scale=g.style_scale,
        scheduler=g.scheduler,
        width=g.width,
        height=g.height,
        num_images=g.num_images,
        images=[f"/generations/{g.id}/images/{i}" for i in range(len(g.images or []))],
        created_at=iso(g.created_at),
        **_latest(job),
    )
