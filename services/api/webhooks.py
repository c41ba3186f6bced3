"""Webhooks on job end: signed, delivered at least once, retried with exponential backoff.

A job created with a `webhook_url` carries `webhook_status = pending`. Whatever path
ends the job (worker, cancel, reconciler), the dispatcher finds it by that column once
the job is terminal, so no transition has to remember to send it. A dispatcher claims
a delivery by moving its `webhook_next_at` forward with a conditional update, so several
API replicas never send one event twice at once; receivers dedupe on `webhook-id` (the
job id), which stays the same across retries.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from urllib.parse import urlsplit

from sqlalchemy import or_, select, update

from b4m_contract.jobs import TERMINAL
from b4m_contract.signing import new_secret, sign

from ..common.models import Job, Tenant, utcnow
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
        """Seconds before the next try after `attempts` failed ones: base * 2^(n-1), at most an hour."""
        return min(self.settings.webhook_backoff_s * 2 ** (attempts - 1), 3600.0)

    def deliver_due(self, limit: int = 20) -> int:
        """Send every due delivery once; returns how many were attempted."""
        now = utcnow()
        with self.sessions() as s:
            due = s.execute(
                select(Job.id, Job.webhook_next_at)
                .where(
                    Job.webhook_status == "pending",
                    Job.status.in_(TERMINAL),
                    or_(Job.webhook_next_at.is_(None), Job.webhook_next_at <= now),
                )
                .limit(limit)
            ).all()
        sent = 0
        for job_id, next_at in due:
            if self._claim(job_id, next_at, now):
                self._deliver(job_id)
                sent += 1
        return sent

    def _claim(self, job_id: str, next_at, now) -> bool:
        cond = Job.webhook_next_at.is_(None) if next_at is None else Job.webhook_next_at == next_at
        with self.sessions() as s, s.begin():
            res = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.webhook_status == "pending", cond)
                .values(webhook_next_at=now + timedelta(seconds=CLAIM_S))
            )
            return res.rowcount == 1

    def _deliver(self, job_id: str) -> None:
        with self.sessions() as s:
            job = s.get(Job, job_id)
            s.expunge(job)
        error = None
        try:
            check_url(job.webhook_url, self.settings.webhook_allow_private)  # again: DNS may have changed
            body = json.dumps(
                {"type": f"job.{job.status}", "job_id": job.id, "data": self.render(job)}, separators=(",", ":")
            ).encode()
            ts = int(time.time())
            headers = {
                "content-type": "application/json",
                "user-agent": "b4m-webhooks/1",
                "webhook-id": job.id,
                "webhook-timestamp": str(ts),
                "webhook-signature": sign(tenant_secret(self.sessions, job.tenant_id), job.id, ts, body),
            }
            r = self.http.post(job.webhook_url, content=body, headers=headers)
            if not 200 <= r.status_code < 300:
                error = f"HTTP {r.status_code}"
        except UnsafeWebhook as exc:
            error = f"refused: {exc}"
        except Exception as exc:  # connection refused, timeout: retried
            error = f"{type(exc).__name__}: {exc}"
        attempts = job.webhook_attempts + 1
        values = {"webhook_attempts": attempts, "webhook_error": error}
        if error is None:
            values.update(webhook_status="delivered", webhook_next_at=None)
        elif error.startswith("refused") or attempts >= self.settings.webhook_max_attempts:
            values.update(webhook_status="failed", webhook_next_at=None)
            log.warning("webhook for job %s failed after %d attempt(s): %s", job.id, attempts, error)
        else:
            values["webhook_next_at"] = utcnow() + timedelta(seconds=self.backoff(attempts))
            log.info("webhook for job %s: attempt %d failed (%s); retrying", job.id, attempts, error)
        with self.sessions() as s, s.begin():
            s.execute(update(Job).where(Job.id == job.id).values(**values))

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
