"""Job state transitions on real PostgreSQL and SQLite."""

import time

import pytest

from services.common.db import make_engine, migrate, session_factory
from services.common.jobs import ClaimLost, IdempotencyConflict, JobResult, JobStore, NewAdapter, request_hash
from services.common.models import Adapter, Asset, Job, Tenant
from services.common.reconciler import Reconciler
from services.common.settings import Settings


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
        job = store.add(
            s,
            tenant,
            "train_content",
            target,
            idempotency_key=key,
            body_hash=request_hash(body) if body is not None else None,
            max_attempts=max_attempts,
        )
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
    assert jobs.finish(jid, job.claim_token, JobResult(outputs={"x": 1})) == {"x": 1}
    assert jobs.get(a, jid).outputs == {"x": 1}
    assert jobs.start(jid) is None  # a redelivered message cannot run a finished job
    with pytest.raises(ClaimLost):
        jobs.finish(jid, job.claim_token, JobResult())
    assert jobs.fail(jid, "late") == "succeeded"


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


def test_a_live_lease_keeps_a_duplicate_message_from_running_the_job_twice(store):
    jobs, sessions, (a, _, asset) = store
    jid = _new_job(jobs, sessions, a, asset)
    first = jobs.start(jid, lease_s=30)
    assert jobs.start(jid, lease_s=30) is None  # the same message delivered twice
    assert jobs.heartbeat(jid, first.claim_token, 30)
    assert not jobs.heartbeat(jid, "someone-else", 30)


def test_an_expired_lease_hands_the_job_to_the_next_attempt_and_only_it_commits(store):
    jobs, sessions, (a, _, asset) = store
    jid = _new_job(jobs, sessions, a, asset)
    stale = jobs.start(jid, lease_s=0.2)
    time.sleep(0.3)
    fresh = jobs.start(jid, lease_s=30)  # the dead worker's message came back
    assert fresh is not None and fresh.attempts == 2 and fresh.claim_token != stale.claim_token
    assert not jobs.heartbeat(jid, stale.claim_token, 30)  # the stale attempt learns it lost the job

    def result(adapter_id: str) -> JobResult:
        return JobResult(
            adapter=NewAdapter(
                id=adapter_id, kind="content", method="b4m", storage_key="k", sha256="0" * 64, size=1, meta={}
            ),
            outputs={"ok": True},
        )

    with pytest.raises(ClaimLost):
        jobs.finish(jid, stale.claim_token, result("a" * 32))
    assert jobs.fail(jid, "stale attempt crashed", token=stale.claim_token) == "lost"
    assert jobs.finish(jid, fresh.claim_token, result("b" * 32)) == {"adapter_id": "b" * 32, "ok": True}
    with sessions() as s:  # exactly one result, the asset points at it: the stale attempt wrote nothing
        assert s.query(Adapter).count() == 1
        assert s.get(Asset, asset).adapter_id == "b" * 32


def test_reconciler_requeues_lost_workers_resends_lost_messages_and_ends_overdue_jobs(store):
    jobs, sessions, (a, _, asset) = store
    sent = []
    settings = Settings(requeue_grace_s=0, job_deadline_s=3600, max_worker_losses=2)
    waiting: set[str] = set()
    rec = Reconciler(sessions, settings, enqueue=lambda j, t: sent.append(j), waiting_ids=lambda: waiting)
    lost_msg = _new_job(jobs, sessions, a, asset)
    in_broker = _new_job(jobs, sessions, a, asset)
    waiting.add(in_broker)
    dead_worker = _new_job(jobs, sessions, a, asset)
    jobs.start(dead_worker, lease_s=0.01)
    out_of_attempts = _new_job(jobs, sessions, a, asset, max_attempts=1)
    jobs.start(out_of_attempts, lease_s=0.01)
    with sessions() as s, s.begin():  # its worker died once before: this is the second loss
        s.get(Job, out_of_attempts).worker_losses = 1
    alive = _new_job(jobs, sessions, a, asset)
    jobs.start(alive, lease_s=60)
    overdue = _new_job(jobs, sessions, a, asset)
    with sessions() as s, s.begin():
        s.get(Job, overdue).created_at = s.get(Job, overdue).created_at.replace(year=2020)
    time.sleep(0.05)
    report = rec.sweep()
    assert report["resent"] == [lost_msg]
    assert report["lease_expired"] == [dead_worker] and report["gave_up"] == [out_of_attempts]
    assert report["deadline"] == [overdue]
    assert sorted(sent) == sorted([lost_msg, dead_worker])
    got = {j: jobs.get(a, j) for j in (dead_worker, out_of_attempts, alive, overdue, in_broker)}
    assert got[dead_worker].status == "queued" and got[alive].status == "running"
    # a lost worker spends no attempt; it is counted apart
    assert (got[dead_worker].attempts, got[dead_worker].worker_losses) == (0, 1)
    assert got[out_of_attempts].status == "failed" and "lost 2 times" in got[out_of_attempts].error
    assert got[overdue].status == "failed" and "deadline" in got[overdue].error
    assert got[in_broker].status == "queued"
    # the next sweep finds nothing new to send while the messages are waiting
    waiting.update(sent)
    assert rec.sweep()["resent"] == []
