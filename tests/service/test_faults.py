"""Fault tests on the real stack, loopback only, each bounded in time.

A Celery worker process, PostgreSQL, a Redis server of the test's own (so it can be
killed and started again empty) and moto's S3 behind a proxy (so the endpoint can go
down and come back). The reconciler runs as the API runs it, on a thread.
"""

from __future__ import annotations

import os
import time

import pytest
from sqlalchemy import func, select

from services.common.broker import CeleryQueue
from services.common.db import make_engine, migrate, session_factory
from services.common.jobs import JobStore
from services.common.models import Adapter as AdapterRow
from services.common.models import Asset, Job, Tenant
from services.common.reconciler import Reconciler
from services.common.settings import Settings
from services.common.storage import S3Store

from ..helpers.faults import RedisServer, TcpProxy, start_worker
from ..helpers.images import png
from ..helpers.processes import free_port, scaled, sigkill, spawn, stop, wait_until
from ..helpers.rows import add_asset

pytestmark = [pytest.mark.timeout(scaled(300)), pytest.mark.slow]
LEASE_S = 2.0


@pytest.fixture
def stack(pg_url, s3_endpoint, tiny_sd_path, tmp_path):
    migrate(pg_url)
    redis = RedisServer(tmp_path / "redis").start()
    proxy = TcpProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    bucket = f"b4m-faults-{int(time.time() * 1000) % 10**9}"
    env = dict(
        os.environ,
        B4M_DATABASE_URL=pg_url,
        B4M_BROKER_URL=redis.url,
        B4M_STORAGE="s3",
        B4M_S3_ENDPOINT_URL=proxy.url,
        B4M_S3_BUCKET=bucket,
        B4M_S3_ACCESS_KEY="test",
        B4M_S3_SECRET_KEY="test",
        B4M_DEVICE="cpu",
        B4M_CHECKPOINT_EVERY="5",
        HF_HUB_OFFLINE="1",
        B4M_BASE_MODEL=str(tiny_sd_path),
        B4M_JOB_LEASE_S=str(LEASE_S),
        B4M_OUTAGE_RETRY_S="4",
        B4M_OUTAGE_BACKOFF_S="0.5",
        B4M_OUTAGE_BACKOFF_MAX_S="1",
        B4M_VISIBILITY_TIMEOUT_S="3600",
    )
    settings = Settings(
        database_url=pg_url, broker_url=redis.url, requeue_grace_s=1.0, job_lease_s=LEASE_S, reconcile_every_s=0.5
    )
    store = S3Store(bucket, endpoint_url=s3_endpoint, access_key="test", secret_key="test", create_bucket=True)
    engine = make_engine(pg_url)
    sessions = session_factory(engine)
    queue = CeleryQueue(settings)
    reconciler_stop = Reconciler(sessions, settings, queue.enqueue, queue.waiting_ids, store=store).start_thread()
    with sessions() as s:
        t = Tenant(name="acme")
        s.add(t)
        s.commit()
        tenant = t.id
    workers = []

    def worker():
        w = start_worker(env, tmp_path / "worker.log")
        workers.append(w)
        return w

    def submit(kind: str, steps: int, seed: int) -> tuple[str, str]:
        with sessions() as s:
            a = add_asset(
                s,
                store,
                tenant,
                kind,
                "dog" if kind == "content" else "ink",
                "sks" if kind == "content" else "zwx",
                str(tiny_sd_path),
                seed,
            )
            a.settings = {"steps": steps, "rank": 4, "alpha": 4.0}
            s.flush()
            job = JobStore(sessions).add(s, tenant, f"train_{kind}", a.id, max_attempts=3)
            s.commit()
            ids = (job.id, a.id)
        queue.enqueue(ids[0], f"train_{kind}")
        return ids

    yield {
        "sessions": sessions,
        "jobs": JobStore(sessions),
        "store": store,
        "tenant": tenant,
        "redis": redis,
        "proxy": proxy,
        "worker": worker,
        "submit": submit,
        "log": tmp_path / "worker.log",
    }
    reconciler_stop.set()
    for w in workers:
        stop(w)
    proxy.down()
    redis.kill()
    engine.dispose()


def _job(stack, job_id) -> Job:
    return stack["jobs"].get(stack["tenant"], job_id)


def _finished(stack, job_id, timeout=150) -> Job:
    job = wait_until(
        lambda: (j := _job(stack, job_id)).status in ("succeeded", "failed", "canceled") and j,
        timeout,
        f"job {job_id} to finish (worker log: {stack['log']})",
    )
    return job


def _adapter_rows(stack, asset_id: str) -> int:
    """The asset points at an adapter whose object exists; returns the tenant's adapter row count."""
    with stack["sessions"]() as s:
        asset = s.get(Asset, asset_id)
        assert asset.adapter_id
        rows = s.scalar(select(func.count(AdapterRow.id)).where(AdapterRow.tenant_id == stack["tenant"]))
        key = s.get(AdapterRow, asset.adapter_id).storage_key
    store = stack["store"]
    assert store.exists(key)
    return rows


def _objects(stack, part: str) -> list[str]:
    c = stack["store"]
    res = c.client.list_objects_v2(Bucket=c.bucket, Prefix=f"tenants/{stack['tenant']}/{part}/")
    return [o["Key"] for o in res.get("Contents", [])]


@pytest.mark.postgres
@pytest.mark.redis
def test_sigkilled_worker_resumes_from_its_checkpoint_with_exactly_adapter_rows(stack):
    job_id, asset_id = stack["submit"]("content", steps=200, seed=0)
    first = stack["worker"]()
    wait_until(lambda: _job(stack, job_id).checkpoint_step >= 10, 120, "a checkpoint at step >= 10")
    sigkill(first)  # mid-training: no chance to clean up or acknowledge
    killed_at = _job(stack, job_id)
    assert killed_at.status == "running" and killed_at.progress_step < 200
    stack["worker"]()  # a new worker; the reconciler sees the lease run out and queues the job again
    job = _finished(stack, job_id)
    assert job.status == "succeeded", job.error
    assert (job.attempts, job.worker_losses) == (1, 1)  # the lost worker is counted apart
    assert job.outputs["resumed_from_step"] >= killed_at.checkpoint_step >= 10
    assert _adapter_rows(stack, asset_id) == 1
    assert len(_objects(stack, "adapters")) == 1
    assert job.checkpoint_key is None  # cleared with the success, in one transaction
    # the object goes right after that commit (recorded for the sweep if the store refused)
    wait_until(lambda: _objects(stack, "checkpoints") == [], 30, "the checkpoint object removed")


@pytest.mark.postgres
@pytest.mark.redis
def test_redis_restarted_empty_while_jobs_wait_every_job_finishes(stack):
    stack["worker"]()
    jobs = [stack["submit"]("content", steps=40, seed=i) for i in range(3)]
    wait_until(lambda: _job(stack, jobs[0][0]).status == "running", 120, "the first job to start")
    stack["redis"].kill()  # the waiting messages are gone with it
    stack["redis"].start()
    assert stack["redis"].proc.poll() is None
    for job_id, _asset_id in jobs:
        job = _finished(stack, job_id)
        assert job.status == "succeeded", job.error
    assert _adapter_rows(stack, jobs[0][1]) == 3
    assert len(_objects(stack, "adapters")) == 3


@pytest.mark.postgres
@pytest.mark.redis
def test_s3_down_during_training_then_at_the_start_the_job_waits_and_finishes(stack):
    stack["worker"]()
    job_id, asset_id = stack["submit"]("content", steps=120, seed=0)
    wait_until(lambda: _job(stack, job_id).progress_step >= 8, 120, "training to be under way")
    stack["proxy"].down()  # checkpoint uploads fail while it is down; training goes on
    # down until a checkpoint has failed (however slow the steps are on a busy machine)
    wait_until(lambda: "not saved" in stack["log"].read_text(), 120, "a checkpoint to fail on storage")
    stack["proxy"].up()
    job = _finished(stack, job_id)
    assert job.status == "succeeded", job.error

    stack["proxy"].down()  # down before the next job can read its references
    job_id2, asset_id2 = stack["submit"]("style", steps=10, seed=1)
    wait_until(
        lambda: (_job(stack, job_id2).error or "").startswith("waiting for the object store"),
        60,
        "the job to wait for the store",
    )
    stack["proxy"].up()
    job2 = _finished(stack, job_id2)
    # an outage spends no attempt: the job waited (with backoff) and ran once it could
    assert job2.status == "succeeded" and job2.attempts == 1 and job2.error is None, (job2.status, job2.error)
    assert _adapter_rows(stack, asset_id2) == 2
    assert len(_objects(stack, "adapters")) == 2


@pytest.mark.postgres
@pytest.mark.redis
def test_s3_down_for_good_fails_the_job_cleanly(stack):
    stack["worker"]()
    stack["proxy"].down()
    job_id, asset_id = stack["submit"]("content", steps=10, seed=0)
    job = _finished(stack, job_id, timeout=120)
    # waited out the outage window (B4M_OUTAGE_RETRY_S, 4 s here) without spending attempts, then failed
    assert job.status == "failed" and job.attempts == 1
    assert job.error.startswith("the object store was unavailable for")  # for the user to read
    with stack["sessions"]() as s:
        assert s.get(Asset, asset_id).adapter_id is None
        assert s.scalar(select(func.count(AdapterRow.id))) == 0
    stack["proxy"].up()
    assert _objects(stack, "adapters") == [] and _objects(stack, "checkpoints") == []


@pytest.mark.postgres
@pytest.mark.redis
def test_sigterm_hands_the_job_back_at_the_next_step_and_spends_no_attempt(stack):
    """A rolling deploy: the worker, told to stop, checkpoints at its next step and hands the
    job back instead of finishing it (or being SIGKILLed after the grace period); the next
    worker resumes from exactly there."""
    import signal

    worker = stack["worker"]()
    job_id, asset_id = stack["submit"]("content", steps=120, seed=0)
    wait_until(lambda: _job(stack, job_id).progress_step >= 7, 120, "training to be under way")
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=scaled(60))
    job = _job(stack, job_id)
    assert job.status == "queued" and job.attempts == 0, (job.status, job.attempts, job.error)
    paused = job.checkpoint_step
    assert 7 <= paused < 120 and job.checkpoint_key
    stack["worker"]()
    job = _finished(stack, job_id)
    assert job.status == "succeeded" and job.attempts == 1, (job.status, job.error)
    assert job.outputs["resumed_from_step"] == paused
    assert _adapter_rows(stack, asset_id) == 1


def test_api_restarted_while_jobs_run_loses_nothing(tmp_path, tiny_sd_path):
    """The embedded stack (API process = worker, SQLite, local store) SIGKILLed mid-training and
    started again: the running job resumes from its checkpoint, the one waiting behind it runs."""
    import httpx

    port = free_port()
    env = dict(
        os.environ,
        B4M_DATA_DIR=str(tmp_path),
        B4M_BASE_MODEL=str(tiny_sd_path),
        HF_HUB_OFFLINE="1",
        B4M_DEVICE="cpu",
        B4M_CHECKPOINT_EVERY="5",
        B4M_JOB_LEASE_S=str(LEASE_S),
        B4M_RECONCILE_EVERY_S="0.5",
        B4M_REQUEUE_GRACE_S="1",
    )
    for k in ("B4M_DATABASE_URL", "B4M_BROKER_URL", "B4M_STORAGE"):
        env.pop(k, None)
    url = f"http://127.0.0.1:{port}"

    def serve():
        import subprocess
        import sys

        proc = spawn(
            [sys.executable, "-m", "services.cli", "serve", "--port", str(port)],
            env=env,
            stdout=open(tmp_path / "api.log", "a"),
            stderr=subprocess.STDOUT,
        )
        wait_until(lambda: _get(f"{url}/healthz"), 60, "the API to come up")
        return proc

    def _get(u):
        try:
            return httpx.get(u, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    api = serve()
    try:
        posted = []
        for i, steps in enumerate((200, 20)):
            files = [("images", (f"{j}.png", png(10 * i + j), "image/png")) for j in range(2)]
            r = httpx.post(
                f"{url}/contents",
                files=files,
                timeout=30,
                data={"class_word": "dog", "name": f"c{i}", "steps": str(steps)},
            )
            assert r.status_code == 202, r.text
            posted.append(r.json())
        job = lambda i: httpx.get(f"{url}/jobs/{posted[i]['job_id']}", timeout=10).json()
        wait_until(lambda: job(0)["progress_step"] >= 10, 120, "the first job to pass a checkpoint")
        sigkill(api)
        api = serve()
        for i in range(2):
            done = wait_until(
                lambda: job(i)["status"] in ("succeeded", "failed", "canceled") and job(i),
                180,
                f"job {i} after the restart",
            )
            assert done["status"] == "succeeded", done
        first = job(0)
        assert (first["attempts"], first["worker_losses"]) == (1, 1) and first["outputs"]["resumed_from_step"] >= 5
        assert job(1)["attempts"] == 1  # it was only waiting: it ran once, after the restart
        for p in posted:  # one adapter each, on the asset and on disk
            assert httpx.get(f"{url}/contents/{p['id']}", timeout=10).json()["adapter_id"]
        adapters = list((tmp_path / "objects").rglob("adapters/*/adapter.safetensors"))
        assert len(adapters) == 2
        # removed right after each success commits
        wait_until(lambda: not list((tmp_path / "objects").rglob("checkpoints/*/*")), 30, "checkpoints removed")
    finally:
        stop(api)
