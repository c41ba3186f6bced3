"""The webhook dispatcher on SQLite and PostgreSQL: give-up after the last retry, one delivery
when two dispatchers race, the events a job asks for (job.started, an end filtered out),
jittered backoff, signatures the `standardwebhooks` package accepts, private addresses
refused, the API's 422 for unsafe URLs and unknown events."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient

from services.api.webhooks import UnsafeWebhook, WebhookDispatcher, check_url
from services.common.db import make_engine, migrate, session_factory
from services.common.models import Job, Tenant
from services.common.settings import Settings
from services.embedded import create_embedded_app as create_app

from ..helpers.images import png
from ..helpers.processes import free_port
from ..helpers.webhooks import Receiver


@pytest.fixture
def sessions(db_url):
    migrate(db_url)
    engine = make_engine(db_url)
    yield session_factory(engine)
    engine.dispose()


def ended_job(sessions, url: str, status: str = "succeeded", events=None, started: bool = False) -> str:
    with sessions() as s:
        t = Tenant(name=f"t-{url[-12:]}-{status}-{events}")
        s.add(t)
        s.flush()
        job = Job(
            tenant_id=t.id,
            type="generate",
            target_id="g",
            status=status,
            webhook_url=url,
            webhook_status="pending",
            webhook_events=events,
            started_at=datetime.now(UTC) if started else None,
        )
        s.add(job)
        s.commit()
        return job.id


def render(job: Job) -> dict:
    return {"id": job.id, "status": job.status}


def test_gives_up_after_the_last_attempt(sessions, tmp_path):
    settings = Settings(
        data_dir=tmp_path,
        webhook_allow_private=True,
        webhook_max_attempts=3,
        webhook_backoff_s=0.01,
        webhook_timeout_s=2,
    )
    job_id = ended_job(sessions, f"http://127.0.0.1:{free_port()}/nobody-listens")
    d = WebhookDispatcher(sessions, settings, render)
    for _ in range(200):
        d.deliver_due()
        with sessions() as s:
            job = s.get(Job, job_id)
        if job.webhook_status != "pending":
            break
    assert job.webhook_status == "failed" and job.webhook_attempts == 3
    assert "ConnectError" in job.webhook_error
    assert d.deliver_due() == 0  # nothing left to send


def test_racing_dispatchers_deliver_once(sessions, tmp_path):
    rx = Receiver(failures=0)
    try:
        settings = Settings(data_dir=tmp_path, webhook_allow_private=True)
        ids = [ended_job(sessions, rx.url, status) for status in ("succeeded", "failed", "canceled")]
        dispatchers = [WebhookDispatcher(sessions, settings, render) for _ in range(4)]
        threads = [threading.Thread(target=d.deliver_due) for d in dispatchers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(json.loads(body)["job_id"] for _, _, body in rx.calls) == sorted(ids)  # each exactly once
        assert len({h["webhook-id"] for _, h, _ in rx.calls}) == 3
        with sessions() as s:
            assert {s.get(Job, i).webhook_status for i in ids} == {"delivered"}
    finally:
        rx.close()


def test_jobs_get_the_events_they_ask_for_signed_as_standard_webhooks(sessions, tmp_path):
    from standardwebhooks import Webhook

    from services.api.webhooks import tenant_secret

    rx = Receiver(failures=0)
    try:
        settings = Settings(data_dir=tmp_path, webhook_allow_private=True)
        d = WebhookDispatcher(sessions, settings, render)
        # running, asked for started and failed: job.started now; its success is not sent
        skipped = ended_job(sessions, rx.url, "running", events=["started", "failed"], started=True)
        # asked for started and succeeded, already ended: both, started first
        both = ended_job(sessions, rx.url, "succeeded", events=["started", "succeeded"], started=True)
        # the default: the end events only
        plain = ended_job(sessions, rx.url, "canceled", started=True)
        queued = ended_job(sessions, rx.url, "queued", events=["started"])  # nothing yet
        d.deliver_due()
        sent = [(json.loads(b)["job_id"], json.loads(b)["type"]) for _, _, b in rx.calls]
        assert sorted(sent) == sorted(
            [(skipped, "job.started"), (both, "job.started"), (both, "job.succeeded"), (plain, "job.canceled")]
        )
        assert sent.index((both, "job.started")) < sent.index((both, "job.succeeded"))
        with sessions() as s:
            s.get(Job, skipped).status = "succeeded"
            s.commit()
        assert d.deliver_due() == 0 and len(rx.calls) == 4
        with sessions() as s:
            assert s.get(Job, skipped).webhook_status == "skipped"
            assert s.get(Job, both).webhook_status == s.get(Job, plain).webhook_status == "delivered"
            assert s.get(Job, queued).webhook_status == "pending"
            tenants = {i: s.get(Job, i).tenant_id for i in (skipped, both, plain)}
        for _, headers, body in rx.calls:  # the reference implementation accepts every one
            job_id = json.loads(body)["job_id"]
            event = Webhook(tenant_secret(sessions, tenants[job_id])).verify(body, headers)
            assert event["job_id"] == job_id
        assert len({h["webhook-id"] for _, h, _ in rx.calls}) == 4  # one id per message
    finally:
        rx.close()


def test_backoff_doubles_with_jitter(sessions, tmp_path):
    d = WebhookDispatcher(sessions, Settings(data_dir=tmp_path, webhook_backoff_s=2.0), render)
    for attempts, base in ((1, 2.0), (2, 4.0), (3, 8.0)):
        delays = [d.backoff(attempts) for _ in range(50)]
        assert all(base <= x <= 1.25 * base for x in delays)
        assert len(set(delays)) > 1  # spread out, not in lockstep
    assert d.backoff(30) <= 1.25 * 3600


def test_private_addresses_refused_unless_allowed(sessions, tmp_path):
    for url in ("http://127.0.0.1:9/x", "http://10.1.2.3/x", "http://[::1]/x", "http://169.254.169.254/latest"):
        with pytest.raises(UnsafeWebhook):
            check_url(url, allow_private=False)
        check_url(url, allow_private=True)
    for url in ("ftp://example.com/x", "file:///etc/passwd", "http:///nohost"):
        with pytest.raises(UnsafeWebhook):
            check_url(url, allow_private=True)
    # a job whose URL turned private (DNS changed) is not called and not retried
    job_id = ended_job(sessions, "http://127.0.0.1:9/x")
    WebhookDispatcher(sessions, Settings(data_dir=tmp_path), render).deliver_due()
    with sessions() as s:
        job = s.get(Job, job_id)
    assert job.webhook_status == "failed" and job.webhook_error.startswith("refused")


def test_api_refuses_unsafe_webhook_urls_and_changes_nothing(db_url, tmp_path):
    app = create_app(Settings(data_dir=tmp_path, database_url=db_url))
    with TestClient(app) as client:
        for body in (
            {"content_id": "a", "style_id": "b", "webhook_url": "http://127.0.0.1:8000/x"},
            {"content_id": "a", "style_id": "b", "webhook_url": "gopher://example.com"},
        ):
            r = client.post("/fusions", json=body)
            assert r.status_code == 422, r.text
        r = client.post("/generate", json={"prompt": "x", "webhook_url": "http://192.168.1.1/x"})
        assert r.status_code == 422 and "non-public" in r.json()["detail"]
        r = client.post(
            "/contents",
            files=[("images", ("a.png", b"x", "image/png"))],
            data={"class_word": "dog", "name": "n", "webhook_url": "http://localhost/x"},
        )
        assert r.status_code == 422
        assert client.get("/jobs").json()["total"] == 0


def test_api_takes_the_events_a_webhook_wants(db_url, tmp_path):
    app = create_app(Settings(data_dir=tmp_path, database_url=db_url, webhook_allow_private=True))
    hook = "http://127.0.0.1:9/hook"
    with TestClient(app) as client:
        for body, why in (
            ({"prompt": "x", "webhook_url": hook, "webhook_events": ["started", "finished"]}, "finished"),
            ({"prompt": "x", "webhook_events": ["started"]}, "needs a webhook_url"),
        ):
            r = client.post("/generate", json=body)
            assert r.status_code == 422 and why in r.text, r.text
        r = client.post(
            "/contents",
            files=[("images", ("a.png", png(0), "image/png"))],
            data={"class_word": "dog", "name": "n", "webhook_url": hook, "webhook_events": ["started", "bogus"]},
        )
        assert r.status_code == 422 and "bogus" in r.text
        assert client.get("/jobs").json()["total"] == 0  # nothing made by the refused requests
        r = client.post(
            "/contents",
            files=[("images", ("a.png", png(0), "image/png"))],
            data={"class_word": "dog", "name": "n", "steps": "1", "webhook_url": hook, "webhook_events": ["started"]},
        )
        assert r.status_code == 202, r.text
        app.state.runtime.queue.join()
        with app.state.runtime.sessions() as s:
            assert s.get(Job, r.json()["job_id"]).webhook_events == ["started"]
