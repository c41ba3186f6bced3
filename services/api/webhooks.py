"""Webhooks on job events: signed, delivered at least once, retried with exponential backoff
and jitter.

A job created with a `webhook_url` carries `webhook_status = pending` and the events it
wants (`webhook_events`: started and the end events; the end events by default). Whatever
path moves the job (worker, cancel, reconciler), the dispatcher derives each reached event
from the job's state into a row of `webhook_deliveries`, so no transition has to remember
to send one. A dispatcher claims a delivery by moving its `next_at` forward with a
conditional update, so several API replicas never send one event twice at once; receivers
dedupe on `webhook-id` (the delivery's id), which stays the same across retries.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from urllib.parse import urlsplit

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError

from b4m_contract.jobs import DEFAULT_WEBHOOK_EVENTS, TERMINAL
from b4m_contract.signing import new_secret, sign

from ..common.models import Job, Tenant, WebhookDelivery, utcnow
from ..common.settings import Settings

log = logging.getLogger("b4m.webhooks")
CLAIM_S = 60.0  # a claimed delivery is ours for this long (a dispatcher that dies frees it)


class UnsafeWebhook(ValueError):
    """The URL is not http(s), or resolves to an address the service must not call."""


def check_url(url: str, allow_private: bool) -> None:
    """Refuse URLs a tenant could use to reach the service's own network (SSRF)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeWebhook("webhook_url must be an http:// or https:// URL with a host")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise UnsafeWebhook(f"webhook_url host {parts.hostname!r} does not resolve: {exc}") from exc
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if not ip.is_global:
            raise UnsafeWebhook(f"webhook_url resolves to a non-public address ({ip})")


def tenant_secret(sessions, tenant_id: str) -> str:
    """The tenant's signing secret, made on first use."""
    with sessions() as s:
        t = s.get(Tenant, tenant_id)
        if not t.webhook_secret:
            s.execute(
                update(Tenant)
                .where(Tenant.id == tenant_id, Tenant.webhook_secret.is_(None))
                .values(webhook_secret=new_secret())
            )
            s.commit()
            s.refresh(t)
        return t.webhook_secret


class WebhookDispatcher:
    def __init__(self, sessions, settings: Settings, render: Callable[[Job], dict], client=None):
        self.sessions, self.settings, self.render = sessions, settings, render
        import httpx  # here, not at import: an API replica starts faster

        self.http = client or httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False)

    def backoff(self, attempts: int) -> float:
        """Seconds before the next try after `attempts` failed ones: base * 2^(n-1) (at most an
        hour), plus up to a quarter of it at random so retries of many jobs spread out."""
        delay = min(self.settings.webhook_backoff_s * 2 ** (attempts - 1), 3600.0)
        return delay * (1.0 + 0.25 * random.random())

    def deliver_due(self, limit: int = 20) -> int:
        """Record the events jobs have reached, then send every due delivery once; returns how
        many were attempted."""
        self.record_events(limit * 5)
        now = utcnow()
        with self.sessions() as s:
            due = s.execute(
                select(WebhookDelivery.id, WebhookDelivery.next_at)
                .where(
                    WebhookDelivery.status == "pending",
                    or_(WebhookDelivery.next_at.is_(None), WebhookDelivery.next_at <= now),
                )
                .order_by(WebhookDelivery.created_at)
                .limit(limit)
            ).all()
        sent = 0
        for delivery_id, next_at in due:
            if self._claim(delivery_id, next_at, now):
                self._deliver(delivery_id)
                sent += 1
        return sent

    def record_events(self, limit: int = 100) -> None:
        """A delivery for each wanted event a job with a webhook has reached (it started; it
        ended) and has none for yet. Derived from the job's state, so whichever path moved the
        job (worker, cancel, reconciler) needs to remember nothing; several dispatchers may
        race to record one, the unique (job, event) keeps one."""
        with self.sessions() as s:
            jobs = s.execute(
                select(Job.id, Job.status, Job.started_at, Job.webhook_events)
                .where(Job.webhook_status == "pending", or_(Job.started_at.is_not(None), Job.status.in_(TERMINAL)))
                .limit(limit)
            ).all()
            if not jobs:
                return
            have = set(
                s.execute(
                    select(WebhookDelivery.job_id, WebhookDelivery.event).where(
                        WebhookDelivery.job_id.in_([j.id for j in jobs])
                    )
                ).all()
            )
        for job in jobs:
            wanted = set(job.webhook_events or DEFAULT_WEBHOOK_EVENTS)
            events = []
            if "started" in wanted and job.started_at is not None:
                events.append("job.started")
            if job.status in TERMINAL:
                if job.status in wanted:
                    events.append(f"job.{job.status}")
                else:  # its end is not wanted: nothing more to send for this job
                    with self.sessions() as s, s.begin():
                        s.execute(
                            update(Job)
                            .where(Job.id == job.id, Job.webhook_status == "pending")
                            .values(webhook_status="skipped")
                        )
            for event in events:
                if (job.id, event) in have:
                    continue
                try:
                    with self.sessions() as s, s.begin():
                        s.add(WebhookDelivery(job_id=job.id, event=event))
                except IntegrityError:
                    pass  # another dispatcher recorded it first

    def _claim(self, delivery_id: str, next_at, now) -> bool:
        cond = WebhookDelivery.next_at.is_(None) if next_at is None else WebhookDelivery.next_at == next_at
        with self.sessions() as s, s.begin():
            res = s.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending", cond)
                .values(next_at=now + timedelta(seconds=CLAIM_S))
            )
            return res.rowcount == 1

    def _deliver(self, delivery_id: str) -> None:
        with self.sessions() as s:
            delivery = s.get(WebhookDelivery, delivery_id)
            job = s.get(Job, delivery.job_id)
            s.expunge_all()
        error = None
        try:
            check_url(job.webhook_url, self.settings.webhook_allow_private)  # again: DNS may have changed
            body = json.dumps(
                {"type": delivery.event, "job_id": job.id, "data": self.render(job)}, separators=(",", ":")
            ).encode()
            ts = int(time.time())
            headers = {
                "content-type": "application/json",
                "user-agent": "b4m-webhooks/1",
                "webhook-id": delivery.id,
                "webhook-timestamp": str(ts),
                "webhook-signature": sign(tenant_secret(self.sessions, job.tenant_id), delivery.id, ts, body),
            }
            r = self.http.post(job.webhook_url, content=body, headers=headers)
            if not 200 <= r.status_code < 300:
                error = f"HTTP {r.status_code}"
        except UnsafeWebhook as exc:
            error = f"refused: {exc}"
        except Exception as exc:  # connection refused, timeout: retried
            error = f"{type(exc).__name__}: {exc}"
        attempts = delivery.attempts + 1
        values = {"attempts": attempts, "error": error}
        if error is None:
            values.update(status="delivered", next_at=None)
        elif error.startswith("refused") or attempts >= self.settings.webhook_max_attempts:
            values.update(status="failed", next_at=None)
            log.warning("webhook %s of job %s failed after %d attempt(s): %s", delivery.event, job.id, attempts, error)
        else:
            values["next_at"] = utcnow() + timedelta(seconds=self.backoff(attempts))
            log.info("webhook %s of job %s: attempt %d failed (%s); retrying", delivery.event, job.id, attempts, error)
        with self.sessions() as s, s.begin():
            s.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery.id).values(**values))
            if delivery.event != "job.started":  # the job's end: the job shows how it went
                end = {"webhook_attempts": attempts, "webhook_error": error}
                if values.get("status") in ("delivered", "failed"):
                    end["webhook_status"] = values["status"]
                s.execute(update(Job).where(Job.id == job.id).values(**end))

    def start_thread(self) -> threading.Event:
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(self.settings.webhook_poll_s):
                try:
                    self.deliver_due()
                except Exception as exc:  # database hiccup: next round
                    log.warning("webhook dispatch: %s", exc)

        threading.Thread(target=loop, name="b4m-webhooks", daemon=True).start()
        return stop
