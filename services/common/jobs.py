"""Job state in the database: the one place a job's truth lives.

The queue carries only job ids. Workers move a job through
queued -> running -> succeeded | failed | canceled with the conditional updates below,
so a redelivered or duplicated message cannot resurrect a finished job, attempts are
counted in the row, and cancellation is a flag the training loop polls.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

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
            idempotency_key: str | None = None, body_hash: str | None = None, max_attempts: int = 3,
            webhook_url: str | None = None) -> Job:
        """Add a queued job to `session` (committed with the resource it belongs to)."""
        job = Job(tenant_id=tenant_id, type=type, target_id=target_id, queue=queue, idempotency_key=idempotency_key,
                  request_hash=body_hash, max_attempts=max_attempts, enqueued_at=utcnow(), webhook_url=webhook_url,
                  webhook_status="pending" if webhook_url else None)
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
    def start(self, job_id: str, lease_s: float = 60.0) -> Job | None:
        """Claim a job for one attempt; None when it must not run here.

        A queued job is claimed; so is a running one whose lease ran out (its worker died
        and the message came back). A running job with a live lease belongs to another
        worker: a duplicated message never runs it twice. The returned row carries the
        attempt's `claim_token`, which every later write of this attempt must present."""
        now = utcnow()
        with self.sessions() as s, s.begin():
            job = s.get(Job, job_id, with_for_update=True)
            if job is None or job.status in TERMINAL:
                return None
            if job.status == "running" and job.lease_expires_at and _aware(job.lease_expires_at) > now:
                return None
            if job.cancel_requested:
                job.status, job.finished_at = "canceled", now
                return None
            if job.attempts >= job.max_attempts:
                job.status, job.finished_at = "failed", now
                job.error = job.error or f"gave up after {job.attempts} attempts"
                return None
            job.status, job.attempts = "running", job.attempts + 1
            job.claim_token = uuid.uuid4().hex
            job.lease_expires_at = now + timedelta(seconds=lease_s)
            job.started_at = job.started_at or now
            s.flush()
            s.expunge(job)
            return job

    def heartbeat(self, job_id: str, token: str, lease_s: float) -> bool:
        """Renew this attempt's lease; False when the attempt no longer holds the job."""
        with self.sessions() as s, s.begin():
            res = s.execute(update(Job).where(Job.id == job_id, Job.claim_token == token, Job.status == "running")
                            .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s)))
            return res.rowcount == 1

    def progress(self, job_id: str, step: int, total: int, loss: float | None = None) -> None:
        with self.sessions() as s, s.begin():
            s.execute(update(Job).where(Job.id == job_id, Job.status == "running")
                      .values(progress_step=step, progress_total=total, loss=loss, updated_at=utcnow()))

    def cancel_requested(self, job_id: str) -> bool:
        with self.sessions() as s:
            return bool(s.scalar(select(Job.cancel_requested).where(Job.id == job_id)))

    def set_checkpoint(self, job_id: str, key: str | None, step: int = 0) -> None:
        with self.sessions() as s, s.begin():
            s.execute(update(Job).where(Job.id == job_id)
                      .values(checkpoint_key=key, checkpoint_step=step, updated_at=utcnow()))

    def add_preview(self, job_id: str, token: str, key: str) -> bool:
        """List a preview image (a storage key) in the job's outputs while this attempt holds it."""
        with self.sessions() as s, s.begin():
            job = s.get(Job, job_id, with_for_update=True)
            if job is None or job.status != "running" or job.claim_token != token:
                return False
            outputs = dict(job.outputs or {})
            outputs["previews"] = [k for k in outputs.get("previews", []) if k != key] + [key]
            job.outputs = outputs
            return True

    def finish(self, job_id: str, token: str, write: Callable[[Session], dict]) -> dict:
        """Commit an attempt's results and `succeeded` in one transaction.

        `write` adds the result rows (adapter, image list) in the same transaction, so a
        job that succeeds has exactly one result and one that lost its claim has none.
        Raises ClaimLost when this attempt no longer holds the job."""
        with self.sessions() as s, s.begin():
            job = s.get(Job, job_id, with_for_update=True)
            if job is None or job.status != "running" or job.claim_token != token:
                raise ClaimLost(f"job {job_id} is no longer held by this attempt")
            outputs = write(s)
            if (job.outputs or {}).get("previews"):  # drawn during training: they stay with the job
                outputs = {**outputs, "previews": job.outputs["previews"]}
            job.status, job.outputs, job.finished_at = "succeeded", outputs, utcnow()
            job.claim_token, job.lease_expires_at = None, None
            return outputs

    def cancel(self, job_id: str, token: str | None = None) -> bool:
        return self._end(job_id, "canceled", token)

    def fail(self, job_id: str, error: str, retry: bool = True, token: str | None = None) -> str:
        """Record an error; back to `queued` while attempts remain (and retry), else `failed`."""
        with self.sessions() as s, s.begin():
            job = s.get(Job, job_id, with_for_update=True)
            if job is None or job.status in TERMINAL:
                return job.status if job else "missing"
            if token is not None and job.claim_token != token:
                return "lost"  # another attempt holds the job now: leave it alone
            job.error = error[:4000]
            job.claim_token, job.lease_expires_at = None, None
            if retry and job.attempts < job.max_attempts and not job.cancel_requested:
                job.status, job.enqueued_at = "queued", utcnow()
            else:
                job.status, job.finished_at = "failed", utcnow()
            return job.status

    def defer(self, job_id: str, token: str) -> str:
        """Back to `queued` without using up an attempt: the job waits on another one."""
        with self.sessions() as s, s.begin():
            res = s.execute(update(Job).where(Job.id == job_id, Job.claim_token == token, Job.status == "running")
                            .values(status="queued", attempts=Job.attempts - 1, claim_token=None,
                                    lease_expires_at=None, enqueued_at=utcnow()))
            return "queued" if res.rowcount == 1 else "lost"

    def mark_enqueued(self, job_ids: list[str]) -> None:
        with self.sessions() as s, s.begin():
            s.execute(update(Job).where(Job.id.in_(job_ids)).values(enqueued_at=utcnow()))

    def _end(self, job_id: str, status: str, token: str | None = None) -> bool:
        q = update(Job).where(Job.id == job_id, Job.status == "running")
        if token is not None:
            q = q.where(Job.claim_token == token)
        values = {"status": status, "finished_at": utcnow(), "updated_at": utcnow(), "claim_token": None,
                  "lease_expires_at": None}
        with self.sessions() as s, s.begin():
            return s.execute(q.values(**values)).rowcount == 1


class NotReady(Exception):
    """The job depends on another that has not finished yet (a fusion of a content in training)."""


class ClaimLost(Exception):
    """This attempt no longer holds its job (the lease ran out and another attempt took it)."""


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)  # SQLite hands back naive datetimes
