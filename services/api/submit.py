"""Starting a job from a request, the same way for every POST that starts one.

An `Idempotency-Key` seen before answers the job it made (409 if the body differs); the
resource and its queued job commit in one transaction; objects written for a request
that does not commit are removed; a concurrent request with the same key that commits
first wins, and this one answers its job. The job id goes to the queue after the commit:
if that fails the job stays queued and the reconciler sends it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from b4m_contract.jobs import WEBHOOK_EVENTS, JobType

from ..common import deletions
from ..common.jobs import IdempotencyConflict, request_hash
from .deps import Runtime
from .webhooks import UnsafeWebhook, check_url

log = logging.getLogger("b4m.api")


@dataclass
class Started:
    target_id: str
    job_id: str
    status: str
    new: bool  # False when an earlier request with the same Idempotency-Key made it


@dataclass
class JobRequest:
    """One job-starting request: who, its key, what it asks for (hashed for idempotency)."""

    tenant: str
    idempotency_key: str | None
    body: Any
    webhook_url: str | None = None
    webhook_events: list[str] | None = None
    written: list[str] = field(default_factory=list)  # object keys to remove if the request does not commit

    @property
    def body_hash(self) -> str:
        return request_hash(self.body)


def check_webhook(rt: Runtime, url: str | None, events: list[str] | None = None) -> None:
    if events and url is None:
        raise HTTPException(422, "webhook_events needs a webhook_url")
    if unknown := sorted(set(events or ()) - set(WEBHOOK_EVENTS)):
        raise HTTPException(422, f"webhook_events: unknown {unknown}; choose from {list(WEBHOOK_EVENTS)}")
    if url is not None:
        try:
            check_url(url, rt.settings.webhook_allow_private)
        except UnsafeWebhook as exc:
            raise HTTPException(422, str(exc)) from exc


def earlier(rt: Runtime, req: JobRequest) -> Started | None:
    """The job an earlier request with this key made, or None; 409 when the body differs."""
    try:
        job = rt.jobs.find_idempotent(req.tenant, req.idempotency_key, req.body_hash)
    except IdempotencyConflict as exc:
        raise HTTPException(409, str(exc)) from exc
    return Started(job.target_id, job.id, job.status, new=False) if job else None


def start_job(
    rt: Runtime, s: Session, req: JobRequest, job_type: JobType, create: Callable[[Session, JobRequest], str]
) -> Started:
    """Run `create` (validate, add the target rows, return the target id) and add its job,
    committed together; then send the job. `create` raises HTTPException for bad input."""
    check_webhook(rt, req.webhook_url, req.webhook_events)
    if found := earlier(rt, req):
        return found
    try:
        target_id = create(s, req)
        job = rt.jobs.add(
            s,
            req.tenant,
            job_type,
            target_id,
            idempotency_key=req.idempotency_key,
            body_hash=req.body_hash,
            max_attempts=rt.settings.job_max_attempts,
            webhook_url=req.webhook_url,
            webhook_events=req.webhook_events or None,
        )
        s.commit()
    except BaseException as exc:
        s.rollback()
        deletions.remove(rt.sessions, rt.store, req.written, recorded=False)  # no orphan objects
        if isinstance(exc, IntegrityError) and req.idempotency_key and (found := earlier(rt, req)):
            return found  # a concurrent request with the same key committed first
        raise
    try:
        rt.queue.enqueue(job.id, job_type)
    except Exception as exc:
        log.warning("job %s recorded but not sent (the reconciler will): %s", job.id, exc)
    return Started(target_id, job.id, job.status, new=True)
