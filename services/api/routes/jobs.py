"""Jobs: list, show, follow live (Server-Sent Events), cancel, retry; a job's loss curve and previews."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.sse import EventSourceResponse, ServerSentEvent

from b4m_contract.jobs import TERMINAL, JobStatus, JobType
from b4m_contract.schemas import JobList, JobOut

from ...common.models import Asset, Fusion, Generation, Job
from ...common.queries import owned
from ..deps import Jobs, RuntimeDep, TenantId, Watcher
from ..openapi import errors
from ..responses import STORED_FILE, stored_file
from ..views import job_out
from .common import MAX_OFFSET, IdempotencyKey

RECONNECT_MS = 2000  # the `retry:` of every event: how long a browser waits before it reconnects
router = APIRouter(tags=["jobs"])
log = logging.getLogger("b4m.api")


@router.get("/jobs", response_model=JobList, responses=errors(401, 422))
def list_jobs(
    tenant: TenantId,
    jobs: Jobs,
    status: JobStatus | None = None,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
):
    rows, total = jobs.list(tenant, status, limit, offset)
    return {"items": [job_out(j) for j in rows], "total": total, "limit": limit, "offset": offset}


def _job_or_404(jobs, tenant: str, job_id: str):
    job = jobs.get(tenant, job_id)
    if job is None:
        raise HTTPException(404, f"job {job_id} not found")
    return job


@router.get("/jobs/{job_id}", response_model=JobOut, responses=errors(401, 404))
def get_job(job_id: str, tenant: TenantId, jobs: Jobs):
    return job_out(_job_or_404(jobs, tenant, job_id))


@router.get(
    "/jobs/{job_id}/loss.png",
    responses={
        200: {"content": {"image/png": {}}, "description": "the loss curve (local store)"},
        **STORED_FILE,
        **errors(401, 404),
    },
)
def get_loss_curve(job_id: str, tenant: TenantId, jobs: Jobs, rt: RuntimeDep):
    """The loss curve of a training or fusion job that succeeded (raw loss and a moving average)."""
    job = jobs.get(tenant, job_id)
    key = (job.outputs or {}).get("loss_curve") if job else None
    if not key:
        raise HTTPException(404, f"job {job_id} has no loss curve")
    return stored_file(rt.store, key, "image/png")


async def _job_to_follow(job_id: str, tenant: TenantId, jobs: Jobs) -> Job:
    """The job an event stream follows; 404 before the stream starts (a dependency runs first)."""
    job = await run_in_threadpool(jobs.get, tenant, job_id)
    if job is None:
        raise HTTPException(404, f"job {job_id} not found")
    return job


@router.get(
    "/jobs/{job_id}/events",
    response_class=EventSourceResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "`progress` events while the job changes, one `end` event",
        },
        **errors(401, 404),
    },
)
async def job_events(
    job: Annotated[Job, Depends(_job_to_follow)],
    watcher: Watcher,
    interval: float = Query(
        0.5, ge=0.1, le=10, description="ignored (kept for old clients): events come as the job changes"
    ),
):
    """Server-Sent Events: a `progress` event (the job as in GET /jobs/{id}) each time its status,
    step or attempt changes, then an `end` event when it succeeded, failed or was canceled. Each
    has an `id:` and a `retry:` (ms before a browser reconnects); a quiet stream (a job waiting
    in the queue) gets keepalive comments, so proxies keep it open. An open stream holds no
    thread; the server ends it at shutdown (clients reconnect and get the job's state at once)."""
    n = 0
    async for current in watcher.follow(job):
        body = job_out(current)
        n += 1
        yield ServerSentEvent(
            event="end" if body.status in TERMINAL else "progress", data=body, id=str(n), retry=RECONNECT_MS
        )


@router.get(
    "/jobs/{job_id}/previews/{index}",
    responses={
        200: {"content": {"image/png": {}}, "description": "the preview (local store)"},
        **STORED_FILE,
        **errors(401, 404),
    },
)
def get_preview(job_id: str, index: int, tenant: TenantId, jobs: Jobs, rt: RuntimeDep):
    """A preview drawn with the adapter part-way through training (listed in the job's `previews`)."""
    job = jobs.get(tenant, job_id)
    keys = (job.outputs or {}).get("previews", []) if job else []
    if not 0 <= index < len(keys):
        raise HTTPException(404, "preview not found")
    return stored_file(rt.store, keys[index], "image/png")


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, responses=errors(401, 404))
def cancel_job(job_id: str, tenant: TenantId, jobs: Jobs, idempotency_key: IdempotencyKey = None):
    """A queued job ends canceled at once; a running one at its next step (the worker checks a flag)
    and its partial state (checkpoint, uploaded files) is removed. Canceling twice is harmless, so
    an `Idempotency-Key` is accepted and needs no bookkeeping."""
    job = jobs.request_cancel(tenant, job_id)
    if job is None:
        raise HTTPException(404, f"job {job_id} not found")
    return job_out(job)


@router.post("/jobs/{job_id}/retry", response_model=JobOut, responses=errors(401, 404, 409))
def retry_job(job_id: str, tenant: TenantId, rt: RuntimeDep, idempotency_key: IdempotencyKey = None):
    """Queue a failed job again with fresh attempts; a training resumes from its last
    checkpoint (kept when a job fails). 409 unless the job failed, or when what it works on
    was deleted. Retrying twice is harmless: the second finds the job no longer failed (409)."""
    job = rt.jobs.get(tenant, job_id)
    if job is None:
        raise HTTPException(404, f"job {job_id} not found")
    if job.status != JobStatus.FAILED:
        raise HTTPException(409, f"job {job_id} is {job.status}: only a failed job can be retried")
    target = {JobType.FUSE: Fusion, JobType.GENERATE: Generation}.get(JobType(job.type), Asset)
    with rt.sessions() as s:
        if owned(s, target, tenant, job.target_id) is None:
            raise HTTPException(409, f"job {job_id} works on {job.target_id}, which was deleted")
    job = rt.jobs.retry(tenant, job_id)
    if job is None:  # retried by a concurrent request in between
        raise HTTPException(409, f"job {job_id} is no longer failed")
    try:
        rt.queue.enqueue(job.id, JobType(job.type))
    except Exception as exc:  # the reconciler sends it
        log.warning("job %s queued again but not sent (the reconciler will): %s", job.id, exc)
    return job_out(job)
