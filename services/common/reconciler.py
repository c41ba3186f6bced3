"""The reconciler: puts right what crashes and lost messages leave behind.

The database is the truth about jobs; the broker only carries their ids. A sweep
  1. ends jobs queued or running past the deadline (`failed`, with the reason),
  2. queues again running jobs whose lease ran out (their worker died): they resume
     from their last checkpoint; a job that lost its worker `max_attempts` times fails,
  3. sends again queued jobs whose message is not in the broker (Redis restarted
     empty, or the publish after the commit failed).
Sending a message twice is harmless: `JobStore.start` claims a job for one attempt only.
The API runs a sweep every `reconcile_every_s`; `b4m reconcile` runs it on its own.
On PostgreSQL a transaction-level advisory lock lets one sweep run at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import or_, select, text
from sqlalchemy.orm import Session, sessionmaker

from . import deletions
from .jobs import CANCELED, FAILED, QUEUED, RUNNING
from .models import Job, utcnow
from .settings import Settings

log = logging.getLogger("b4m.reconciler")
ADVISORY_LOCK = 0x6234_6D72  # "b4mr"


class Reconciler:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: Settings,
        enqueue: Callable[[str, str], None],
        waiting_ids: Callable[[], set[str] | None],
        store=None,
        on_orphans: Callable[[int], None] | None = None,
    ):
        self.sessions, self.settings, self.store = sessions, settings, store
        self.enqueue, self.waiting_ids = enqueue, waiting_ids
        self.on_orphans = on_orphans  # counts removed orphans (a metric)
        self._orphans_due = 0.0  # monotonic time of the next orphan sweep

    def sweep(self, orphans: bool | None = None) -> dict[str, list[str]]:
        """One pass; `orphans` forces (or skips) the slower sweep for unreferenced objects,
        which otherwise runs every `orphan_sweep_every_s`."""
        st = self.settings
        try:
            waiting = self.waiting_ids()
        except Exception as exc:  # broker unreachable: nothing can be sent now anyway
            log.warning("broker not readable: %s", exc)
            waiting = None
        now = utcnow()
        report: dict[str, list[str]] = {"deadline": [], "lease_expired": [], "gave_up": [], "resent": []}
        send: list[tuple[str, str]] = []
        ended_checkpoints: list[str] = []
        with self.sessions() as s, s.begin():
            if s.get_bind().dialect.name == "postgresql" and not s.scalar(
                text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": ADVISORY_LOCK}
            ):
                return report  # another sweep is running
            live = Job.status.in_((QUEUED, RUNNING))
            for job in s.scalars(
                select(Job)
                .where(live, Job.created_at < now - timedelta(seconds=st.job_deadline_s))
                .with_for_update(skip_locked=True)
            ):
                job.status, job.finished_at, job.cancel_requested = FAILED, now, True
                job.claim_token = job.lease_expires_at = None
                job.error = f"deadline exceeded: not finished {st.job_deadline_s} s after it was created"
                report["deadline"].append(job.id)
                ended_checkpoints.append(job.checkpoint_key)
                job.checkpoint_key = None  # the object goes below: nothing may point at it
            for job in s.scalars(
                select(Job).where(Job.status == RUNNING, Job.lease_expires_at < now).with_for_update(skip_locked=True)
            ):
                job.claim_token = job.lease_expires_at = None
                # the worker died, not the job: count it apart, give the attempt back
                job.worker_losses = (job.worker_losses or 0) + 1
                job.attempts = max(0, job.attempts - 1)
                if job.worker_losses >= st.max_worker_losses or job.cancel_requested:
                    job.status, job.finished_at = (CANCELED if job.cancel_requested else FAILED), now
                    job.error = job.error or f"its worker was lost {job.worker_losses} times"
                    report["gave_up"].append(job.id)
                    if job.cancel_requested:  # a failed job keeps its checkpoint for a retry
                        ended_checkpoints.append(job.checkpoint_key)
                        job.checkpoint_key = None
                else:
                    job.status, job.enqueued_at = QUEUED, now
                    send.append((job.id, job.type))
                    report["lease_expired"].append(job.id)
            if waiting is not None:
                stale = now - timedelta(seconds=st.requeue_grace_s)
                for job in s.scalars(
                    select(Job)
                    .where(Job.status == QUEUED, or_(Job.enqueued_at.is_(None), Job.enqueued_at < stale))
                    .with_for_update(skip_locked=True)
                ):
                    if job.id not in waiting:
                        job.enqueued_at = now
                        send.append((job.id, job.type))
                        report["resent"].append(job.id)
        if self.store is not None:
            # a job that ended keeps no partial state; objects whose removal failed earlier go now
            deletions.remove(self.sessions, self.store, ended_checkpoints, recorded=False)
            report["objects_removed"] = deletions.sweep(self.sessions, self.store)
            if orphans or (orphans is None and time.monotonic() >= self._orphans_due):
                self._orphans_due = time.monotonic() + st.orphan_sweep_every_s
                try:
                    report["orphans_removed"] = deletions.sweep_orphans(self.sessions, self.store, st.orphan_grace_s)
                except Exception as exc:  # the store is down: next time
                    log.warning("orphan sweep: %s", exc)
                if self.on_orphans and report.get("orphans_removed"):
                    self.on_orphans(len(report["orphans_removed"]))
        for job_id, job_type in send:
            try:
                self.enqueue(job_id, job_type)
            except Exception as exc:  # the next sweep tries again
                log.warning("could not send job %s: %s", job_id, exc)
        if any(report.values()):
            log.info("reconciler: %s", {k: len(v) for k, v in report.items()})
        return report

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.sweep()
            except Exception:
                log.exception("reconciler sweep failed")
            stop.wait(self.settings.reconcile_every_s)

    def start_thread(self) -> threading.Event:
        stop = threading.Event()
        threading.Thread(target=self.run_forever, args=(stop,), name="b4m-reconciler", daemon=True).start()
        return stop
