"""Job state transitions on real PostgreSQL and SQLite."""

import pytest

from services.common.db import make_engine, migrate, session_factory
from services.common.jobs import IdempotencyConflict, JobStore, request_hash
from services.common.models import Asset, Tenant


@pytest.fixture
def store(db_url):
    migrate(db_url)
    engine = make_engine(db_url)
    sessions = session_factory(engine)
    with sessions() as s:
        a, b = Tenant(name="a"), Tenant(name="b")
        s.add_all([a, b])
        s.flush()
        asset = Asset(tenant_id=a.id, kind="content", name="dog", word="dog", token="sks", base_model="micro")
        s.add(asset)
        s.commit()
        ids = (a.id, b.id, asset.id)
    yield JobStore(sessions), sessions, ids
    engine.dispose()


def _new_job(store, sessions, tenant, target, key=None, body=None, max_attempts=3):
    with sessions() as s:
        job = store.add(s, tenant, "train_content", target, "training", idempotency_key=key,
                        body_hash=request_hash(body) if body is not None else None, max_attempts=max_attempts)
        s.commit()
        return job.id


def test_idempotency_and_tenant_scope(store):
    jobs, sessions, (a, b, asset) = store
    jid = _new_job(jobs, sessions, a, asset, key="abc", body={"name": "dog"})
    assert jobs.find_idempotent(a, "abc", request_hash({"name": "dog"})).id == jid
    with pytest.raises(IdempotencyConflict):
        jobs.find_idempotent(a, "abc", request_hash({"name": "cat"}))
    assert jobs.find_idempotent(b, "abc", request_hash({"name": "dog"})) is None  # keys are per tenant
    assert jobs.get(b, jid) is None and jobs.get(a, jid).status == "queued"
    assert jobs.request_cancel(b, jid) is None and jobs.get(a, jid).status == "queued"
    rows, total = jobs.list(a, status="queued")
    assert total == 1 and rows[0].id == jid and jobs.list(b)[1] == 0


def test_lifecycle_progress_and_no_resurrection(store):
    jobs, sessions, (a, _, asset) = store
    jid = _new_job(jobs, sessions, a, asset)
    job = jobs.start(jid)
    assert job.status == "running" and job.attempts == 1
    jobs.progress(jid, 5, 10, 0.25)
    got = jobs.get(a, jid)
    assert (got.progress_step, got.progress_total, got.loss) == (5, 10, 0.25)
    assert jobs.succeed(jid, {"adapter_id": "x"})
    assert jobs.get(a, jid).outputs == {"adapter_id": "x"}
    assert jobs.start(jid) is None  # a redelivered message cannot run a finished job
    assert not jobs.succeed(jid, {}) and jobs.fail(jid, "late") == "succeeded"


def test_retries_until_attempts_run_out(store):
    jobs, sessions, (a, _, asset) = store
    jid = _new_job(jobs, sessions, a, asset, max_attempts=2)
    jobs.start(jid)
    assert jobs.fail(jid, "boom 1") == "queued"
    assert jobs.start(jid).attempts == 2
    assert jobs.fail(jid, "boom 2") == "failed"
    got = jobs.get(a, jid)
    assert got.status == "failed" and got.error == "boom 2" and got.attempts == 2


def test_cancel_queued_and_running(store):
    jobs, sessions, (a, _, asset) = store
    queued = _new_job(jobs, sessions, a, asset)
    assert jobs.request_cancel(a, queued).status == "canceled"
    assert jobs.start(queued) is None
    running = _new_job(jobs, sessions, a, asset)
    jobs.start(running)
    assert not jobs.cancel_requested(running)
    assert jobs.request_cancel(a, running).status == "running"
    assert jobs.cancel_requested(running)  # the training loop sees this between steps
    assert jobs.cancel(running) and jobs.get(a, running).status == "canceled"
