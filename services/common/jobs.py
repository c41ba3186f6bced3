"""Job state in the database: the one place a job's truth lives.

The queue carries only job ids. Workers move a job through
queued -> running -> succeeded | failed | canceled with the conditional updates below,
so a redelivered or duplicated message cannot resurrect a finished job, attempts are
counted in the row, and cancellation is a flag the training loop polls.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from .models import JOB_STATUSES, Job, utcnow

TERMINAL = ("succeeded", "failed", "canceled")
# Training and generation get separate queues, so a long training never delays a drawing.
JOB_QUEUES = {"train_content": "training", "train_style": "training", "fuse": "training", "generate": "generation"}


class IdempotencyConflict(Exception):
    """The idempotency key was used before with a different request body."""


def request_hash(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


class JobStore:
    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions

    # ------------------------------------------------------------------ API side
    def find_idempotent(self, tenant_id: str, key: str | None, body_hash: str | None) -> Job | None:
        """The job an earlier request with this key made, or None; a different body is a conflict."""
        if not key:
            return None
        with self.sessions() as s:
            job = s.scalars(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key)).first()
        if job is not None and job.request_hash != body_hash:
            raise IdempotencyConflict(f"Idempotency-Key {key!r} was used with a different request")
        return job

    def add(self, session: Session, tenant_id: str, type: str, target_id: str, queue: str,
            idempotency_key: str | None = None, body_hash: str | None = None, max_attempts: int = 3) -> Job:
        """Add a queued job to `session` (committed with the resource it belongs to)."""
        job = Job(tenant_id=tenant_id, type=type, target_id=target_id, queue=queue, idempotency_key=idempotency_key,
                  request_hash=body_hash, max_attempts=max_attempts)
        session.add(job)
        return job

    def get(self, tenant_id: str, job_id: str) -> Job | None:
        with self.sessions() as s:
            return s.scalars(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id)).first()

    def list(self, tenant_id: str, status: str | None = None, limit: int = 50, offset: int = 0) -> tuple[list[Job], int]:
        q = select(Job).where(Job.tenant_id == tenant_id)
        if status:
            if status not in JOB_STATUSES:
                raise ValueError(f"status must be one of {JOB_STATUSES}")
            q = q.where(Job.status == status)
        with self.sessions() as s:
            total = s.scalar(select(func.count()).select_from(q.subquery()))
            rows = s.scalars(q.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)).all()
        return list(rows), int(total or 0)

    def request_cancel(self, tenant_id: str, job_id: str) -> Job | None:
        """Queued jobs end at once; running ones get the flag their loop checks between steps."""
        with self.sessions() as s, s.begin():
            s.execute(update(Job).where(Job.id == job_id, Job.tenant_id == tenant_id, Job.status == "queued")
                      .values(status="canceled", finished_at=utcnow(), cancel_requested=True))
            s.execute(update(Job).where(Job.id == job_id, Job.tenant_id == tenant_id, Job.status == "running")
                      .values(cancel_requested=True))
        return self.get(tenant_id, job_id)

    # ---------------------------------------------------------------- worker side
    def start(self, job_id: str) -> Job | None:
        """Claim a job for this attempt; None when it must not run (finished, canceled, out of attempts)."""
        with self.sessions() as s, s.begin():
            job = s.get(Job, job_id, with_for_update=True)
            if job is None or job.status in TERMINAL:
                return None
            if job.cancel_requested:
                job.status, job.finished_at = "canceled", utcnow()
                return None
            if job.attempts >= job.max_attempts:
                job.status, job.finished_at = "failed", utcnow()
                job.error = job.error or f"gave up after {job.attempts} attempts"
                return None
            job.status, job.attempts = "running", job.attempts + 1
            job.started_at = job.started_at or utcnow()
            s.flush()
            s.expunge(job)
            return job

    def progress(self, job_id: str, step: int, total: int, loss: float | None = None) -> None:
        with self.sessions() as s, s.begin():
            s.execute(update(Job).where(Job.id == job_id, Job.status == "running")
                      .values(progress_step=step, progress_total=total, loss=loss, updated_at=utcnow()))

    def cancel_requested(self, job_id: str) -> bool:
        with self.sessions() as s:
            return bool(s.scalar(select(Job.cancel_requested).where(Job.id == job_id)))

    def set_checkpoint(self, job_id: str, key: str | None) -> None:
        with self.sessions() as s, s.begin():
            s.execute(update(Job).where(Job.id == job_id).values(checkpoint_key=key, updated_at=utcnow()))

    def succeed(self, job_id: str, outputs: dict) -> bool:
        return self._end(job_id, "succeeded", outputs=outputs)

    def cancel(self, job_id: str) -> bool:
        return self._end(job_id, "canceled")

    def fail(self, job_id: str, error: str, retry: bool = True) -> str:
        """Record an error; back to `queued` while attempts remain (and retry), else `failed`."""
        with self.sessions() as s, s.begin():
            job = s.get(Job, job_id, with_for_update=True)
            if job is None or job.status in TERMINAL:
                return job.status if job else "missing"
            job.error = error[:4000]
            if retry and job.attempts < job.max_attempts and not job.cancel_requested:
                job.status = "queued"
            else:
                job.status, job.finished_at = "failed", utcnow()
            return job.status

    def _end(self, job_id: str, status: str, outputs: dict | None = None) -> bool:
        values = {"status": status, "finished_at": utcnow(), "updated_at": utcnow()}
        if outputs is not None:
            values["outputs"] = outputs
        with self.sessions() as s, s.begin():
            res = s.execute(update(Job).where(Job.id == job_id, Job.status == "running").values(**values))
            return res.rowcount == 1
