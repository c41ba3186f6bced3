"""The webhook dispatcher on SQLite and PostgreSQL: give-up after the last retry, one delivery
when two dispatchers race, private addresses refused, the API's 422 for unsafe URLs."""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient

from services.api.webhooks import UnsafeWebhook, WebhookDispatcher, check_url
from services.common.db import make_engine, migrate, session_factory
from services.common.models import Job, Tenant
from services.common.settings import Settings
from services.embedded import create_embedded_app as create_app

from ..helpers.processes import free_port
from ..helpers.webhooks import Receiver


@pytest.fixture
def sessions(db_url):
    migrate(db_url)
    engine = make_engine(db_url)
    yield session_factory(engine)
    engine.dispose()


def ended_job(sessions, url: str, status: str = "succeeded") -> str:
    with sessions() as s:
        t = Tenant(name=f"t-{url[-12:]}-{status}")
        s.add(t)
        s.flush()
        job = Job(
            tenant_id=t.id, type="generate", target_id="g", status=status, webhook_url=url, webhook_status="pending"
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
        assert sorted(h["webhook-id"] for _, h, _ in rx.calls) == sorted(ids)  # each exactly once
        with sessions() as s:
            assert {s.get(Job, i).webhook_status for i in ids} == {"delivered"}
    finally:
        rx.close()


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
