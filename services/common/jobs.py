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
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from b4m_contract.jobs import JOB_QUEUES, TERMINAL, JobStatus, JobType

from . import deletions
from .models import Adapter, Asset, Fusion, Generation, Job, WebhookDelivery, as_utc, utcnow

# short names for the conditional updates (plain strings, as the database column holds them)
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED = (status.value for status in JobStatus)


@dataclass(frozen=True)
class NewAdapter:
    """An adapter file a job uploaded; its row is written when the job succeeds."""

    id: str
    kind: str
    method: str
    storage_key: str
    sha256: str
    size: int
    meta: dict


@dataclass
class JobResult:
    """What an attempt made, committed by `JobStore.finish` with `succeeded`: a training or
    fusion job's adapter, or a generation's images ({key, sha256} each), plus extra outputs."""

    adapter: NewAdapter | None = None
    images: list[dict] | None = None
    outputs: dict = field(default_factory=dict)


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

    def add(
        self,
        session: Session,
        tenant_id: str,
        type: JobType,
        target_id: str,
        idempotency_key: str | None = None,
        body_hash: str | None = None,
        max_attempts: int = 3,
        webhook_url: str | None = None,
        webhook_events: list[str] | None = None,
    ) -> Job:
        """Add a queued job to `session` (committed with the resource it belongs to)."""
        job = Job(
            tenant_id=tenant_id,
            type=type,
            target_id=target_id,
            queue=JOB_QUEUES[type],
            idempotency_key=idempotency_key,
            request_hash=body_hash,
            max_attempts=max_attempts,
            enqueued_at=utcnow(),
            webhook_url=webhook_url,
            webhook_events=webhook_events if webhook_url else None,
            webhook_status="pending" if webhook_url else None,
        )
        session.add(job)
        return job

    def get(self, tenant_id: str, job_id: str) -> Job | None:
        with self.sessions() as s:
            return s.scalars(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id)).first()

    def list(
        self, tenant_id: str, status: str | None = None, limit: int = 50, offset: int = 0
    ) -> tuple[list[Job], int]:
        q = select(Job).where(Job.tenant_id == tenant_id)
        if status:
            if status not in set(JobStatus):
                raise ValueError(f"status must be one of {', '.join(JobStatus)}")
            q = q.where(Job.status == status)
        with self.sessions() as s:
            total = s.scalar(select(func.count()).select_from(q.subquery()))
            rows = s.scalars(q.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)).all()
        return list(rows), int(total or 0)

    def request_cancel(self, tenant_id: str, job_id: str) -> Job | None:
        """Queued jobs end at once; running ones get the flag their loop checks between steps."""
        with self.sessions() as s, s.begin():
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.tenant_id == tenant_id, Job.status == QUEUED)
                .values(status=CANCELED, finished_at=utcnow(), cancel_requested=True)
            )
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.tenant_id == tenant_id, Job.status == RUNNING)
                .values(cancel_requested=True)
            )
        return self.get(tenant_id, job_id)

    def forget_targets(self, s: Session, tenant_id: str, target_ids) -> None:
        """The targets are being deleted (in `s`'s transaction): their jobs stop (queued ones at
        once, running ones at their next step) and give up their Idempotency-Keys, so a retried
        request with the same key makes a new resource instead of answering the deleted one."""
        mine = (Job.tenant_id == tenant_id, Job.target_id.in_(list(target_ids)))
        s.execute(
            update(Job)
            .where(*mine, Job.status == QUEUED)
            .values(status=CANCELED, finished_at=utcnow(), cancel_requested=True)
        )
        s.execute(update(Job).where(*mine, Job.status == RUNNING).values(cancel_requested=True))
        s.execute(update(Job).where(*mine).values(idempotency_key=None))

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
            if job.status == RUNNING and job.lease_expires_at and as_utc(job.lease_expires_at) > now:
                return None
            if job.cancel_requested:
                job.status, job.finished_at = CANCELED, now
                return None
            if job.attempts >= job.max_attempts:
                job.status, job.finished_at = FAILED, now
                job.error = job.error or f"gave up after {job.attempts} attempts"
                return None
            job.status, job.attempts = RUNNING, job.attempts + 1
            job.claim_token = uuid.uuid4().hex
            job.lease_expires_at = now + timedelta(seconds=lease_s)
            job.started_at = job.started_at or now
            s.flush()
            s.expunge(job)
            return job

    def heartbeat(self, job_id: str, token: str, lease_s: float) -> bool:
        """Renew this attempt's lease; False when the attempt no longer holds the job."""
        with self.sessions() as s, s.begin():
            res = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.claim_token == token, Job.status == RUNNING)
                .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
            )
            return res.rowcount == 1

    def progress(self, job_id: str, step: int, total: int, loss: float | None = None) -> None:
        with self.sessions() as s, s.begin():
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == RUNNING)
                .values(progress_step=step, progress_total=total, loss=loss, updated_at=utcnow())
            )

    def cancel_requested(self, job_id: str) -> bool:
        with self.sessions() as s:
            return bool(s.scalar(select(Job.cancel_requested).where(Job.id == job_id)))

    def set_checkpoint(self, job_id: str, key: str | None, step: int = 0) -> None:
        with self.sessions() as s, s.begin():
            s.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(checkpoint_key=key, checkpoint_step=step, updated_at=utcnow())
            )

    def add_preview(self, job_id: str, token: str, key: str) -> bool:
        """List a preview image (a storage key) in the job's outputs while this attempt holds it."""
        with self.sessions() as s, s.begin():
            job = s.get(Job, job_id, with_for_update=True)
            if job is None or job.status != RUNNING or job.claim_token != token:
                return False
            outputs = dict(job.outputs or {})
            outputs["previews"] = [k for k in outputs.get("previews", []) if k != key] + [key]
            job.outputs = outputs
            return True

    def finish(self, job_id: str, token: str, result: JobResult) -> dict:
        """Commit an attempt's results and `succeeded` in one transaction.

        The result rows (the adapter and the asset or fusion pointing at it, or the
        generation's images) are written in the same transaction, so a job that succeeds
        has exactly one result and one that lost its claim has none. Raises ClaimLost
        when this attempt no longer holds the job."""
        with self.sessions() as s, s.begin():
            job = s.get(Job, job_id, with_for_update=True)
            if job is None or job.status != RUNNING or job.claim_token != token:
                raise ClaimLost(f"job {job_id} is no longer held by this attempt")
            if job.cancel_requested:  # canceled, or what it works on was deleted, while it ran
                raise JobCanceled(f"job {job_id} was canceled")
            outputs = {**_write_result(s, job, result), **result.outputs}
            if (job.outputs or {}).get("previews"):  # drawn during training: they stay with the job
                outputs = {**outputs, "previews": job.outputs["previews"]}
            job.status, job.outputs, job.finished_at = SUCCEEDED, outputs, utcnow()
            if job.outage_since is not None:  # the outage it waited out is over
                job.outage_since, job.error = None, None
            job.claim_token, job.lease_expires_at = None, None
            if job.checkpoint_key:  # done with it: recorded for removal in this transaction, removed after
                deletions.record(s, [job.checkpoint_key])
                job.checkpoint_key, job.checkpoint_step = None, 0
            return outputs

    def cancel(self, job_id: str, token: str | None = None) -> bool:
        return self._end(job_id, CANCELED, token)

    def fail(self, job_id: str, error: str, retry: bool = True, token: str | None = None) -> str:
        """Record an error; back to `queued` while attempts remain (and retry), else `failed`."""
        with self.sessions() as s, s.begin():
            job = s.get(Job, job_id, with_for_update=True)
            if job is None or job.status in TERMINAL:
                return job.status if job else "missing"  # not a status: nothing to do
            if token is not None and job.claim_token != token:
                return "lost"  # another attempt holds the job now: leave it alone
            job.error = error[:4000]
            job.claim_token, job.lease_expires_at = None, None
            if retry and job.attempts < job.max_attempts and not job.cancel_requested:
                job.status, job.enqueued_at = QUEUED, utcnow()
            else:
                job.status, job.finished_at = FAILED, utcnow()
            return job.status

    def defer(self, job_id: str, token: str, outage: str | None = None) -> str:
        """Back to `queued` without using up an attempt: the job waits on another one, or
        (`outage`: the error) waits out an unavailable store; `outage_since` marks when that began."""
        values = {
            "status": QUEUED,
            "attempts": Job.attempts - 1,
            "claim_token": None,
            "lease_expires_at": None,
            "enqueued_at": utcnow(),
        }
        if outage is not None:
            values.update(error=outage[:4000], outage_since=func.coalesce(Job.outage_since, utcnow()))
        with self.sessions() as s, s.begin():
            res = s.execute(
                update(Job).where(Job.id == job_id, Job.claim_token == token, Job.status == RUNNING).values(**values)
            )
            return QUEUED if res.rowcount == 1 else "lost"

    def retry(self, tenant_id: str, job_id: str) -> Job | None:
        """A failed job queued again with fresh attempts (it resumes from its last checkpoint);
        None when the tenant has no such failed job."""
        with self.sessions() as s, s.begin():
            res = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.tenant_id == tenant_id, Job.status == FAILED)
                .values(
                    status=QUEUED,
                    attempts=0,
                    error=None,
                    finished_at=None,
                    outage_since=None,
                    cancel_requested=False,
                    enqueued_at=utcnow(),
                    webhook_status=case((Job.webhook_url.is_not(None), "pending"), else_=None),
                    webhook_attempts=0,
                    webhook_error=None,
                    started_at=None,  # a new run: its events are sent again
                )
            )
            if res.rowcount != 1:
                return None
            s.execute(delete(WebhookDelivery).where(WebhookDelivery.job_id == job_id))
        return self.get(tenant_id, job_id)

    def _end(self, job_id: str, status: str, token: str | None = None) -> bool:
        q = update(Job).where(Job.id == job_id, Job.status == RUNNING)
        if token is not None:
            q = q.where(Job.claim_token == token)
        values = {
            "status": status,
            "finished_at": utcnow(),
            "updated_at": utcnow(),
            "claim_token": None,
            "lease_expires_at": None,
        }
        with self.sessions() as s, s.begin():
            return s.execute(q.values(**values)).rowcount == 1


def _write_result(s: Session, job: Job, result: JobResult) -> dict:
    if result.adapter is not None:
        a = result.adapter
        s.add(
            Adapter(
                id=a.id,
                tenant_id=job.tenant_id,
                kind=a.kind,
                method=a.method,
                storage_key=a.storage_key,
                sha256=a.sha256,
                size=a.size,
                meta=a.meta,
            )
        )
        s.flush()
        owner = Fusion if job.type == JobType.FUSE else Asset
        s.get(owner, job.target_id).adapter_id = a.id
        return {"adapter_id": a.id}
    if result.images is not None:
        s.get(Generation, job.target_id).images = result.images
        return {"images": len(result.images)}
    return {}


class NotReady(Exception):
    """The job depends on another that has not finished yet (a fusion of a content in training)."""


class JobCanceled(Exception):
    """The job was canceled (or its target deleted) before its results could commit."""


class ClaimLost(Exception):
    """This attempt no longer holds its job (the lease ran out and another attempt took it)."""
