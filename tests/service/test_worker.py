"""A real Celery worker process on the real Redis, PostgreSQL and an S3 endpoint (moto).

The test process writes rows and reference images, sends only job ids, and watches the
job rows: train a content and a style, fuse them, generate, and load the fused adapter
into a diffusers pipeline.
"""

import os
import time

import pytest
import torch
from celery import Celery
from diffusers import DiffusionPipeline

from b4m_core.adapter import Adapter
from services.common.db import make_engine, migrate, session_factory
from services.common.jobs import JobStore
from services.common.models import Adapter as AdapterRow
from services.common.models import Asset, Fusion, Generation, Tenant
from services.common.storage import S3Store

from ..helpers.faults import start_worker
from ..helpers.processes import scaled, stop
from ..helpers.rows import add_asset

REDIS_DB = 7

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
def stack(pg_url, s3_endpoint, tiny_sd_path, tmp_path):
    import redis

    redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()
    migrate(pg_url)
    bucket = f"b4m-worker-{int(time.time() * 1000) % 10**9}"
    env = dict(
        os.environ,
        B4M_DATABASE_URL=pg_url,
        B4M_BROKER_URL=f"redis://127.0.0.1:6379/{REDIS_DB}",
        B4M_STORAGE="s3",
        B4M_S3_ENDPOINT_URL=s3_endpoint,
        B4M_S3_BUCKET=bucket,
        B4M_S3_ACCESS_KEY="test",
        B4M_S3_SECRET_KEY="test",
        B4M_DEVICE="cpu",
        B4M_CHECKPOINT_EVERY="2",
        HF_HUB_OFFLINE="1",
        B4M_BASE_MODEL=str(tiny_sd_path),
    )
    store = S3Store(bucket, endpoint_url=s3_endpoint, access_key="test", secret_key="test", create_bucket=True)
    worker = start_worker(env, tmp_path / "worker.log")
    engine = make_engine(pg_url)
    client = Celery(broker=env["B4M_BROKER_URL"])
    yield {
        "sessions": session_factory(engine),
        "store": store,
        "client": client,
        "base": str(tiny_sd_path),
        "log": tmp_path / "worker.log",
    }
    stop(worker)
    engine.dispose()


def _wait(jobs: JobStore, tenant: str, job_id: str, log, timeout: float = 180) -> str:
    t = time.time()
    while time.time() - t < scaled(timeout):
        job = jobs.get(tenant, job_id)
        if job.status in ("succeeded", "failed", "canceled"):
            assert job.status == "succeeded", (job.error, log.read_text()[-3000:])
            return job.status
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {jobs.get(tenant, job_id).status}: {log.read_text()[-3000:]}")


def test_worker_trains_fuses_and_generates(stack):
    sessions, store, client = stack["sessions"], stack["store"], stack["client"]
    jobs = JobStore(sessions)

    def run(session_work, job_type, queue="training"):
        with sessions() as s:
            target = session_work(s)
            s.flush()
            job = jobs.add(s, tenant, job_type, target.id)
            s.commit()
            jid, tid = job.id, target.id
        client.send_task("b4m.run_job", args=[jid], queue=queue)
        _wait(jobs, tenant, jid, stack["log"])
        return jid, tid

    with sessions() as s:
        t = Tenant(name="acme")
        s.add(t)
        s.commit()
        tenant = t.id
    _, content_id = run(
        lambda s: add_asset(s, store, tenant, "content", "dog", "sks", stack["base"], 0), "train_content"
    )
    _, style_id = run(lambda s: add_asset(s, store, tenant, "style", "ink", "zwx", stack["base"], 1), "train_style")
    job_id, fusion_id = run(
        lambda s: _add(s, Fusion(tenant_id=tenant, content_id=content_id, style_id=style_id, steps=2)), "fuse"
    )
    with sessions() as s:
        fusion = s.get(Fusion, fusion_id)
        row = s.get(AdapterRow, fusion.adapter_id)
        outputs = jobs.get(tenant, job_id).outputs
        assert outputs["adapter_id"] == row.id
        assert store.get(outputs["loss_curve"]).startswith(b"\x89PNG")  # the fusion's loss curve, in S3
        assert jobs.get(tenant, job_id).checkpoint_key is None  # partial state cleaned up
    fused = Adapter.from_bytes(store.get(row.storage_key, expected_sha256=row.sha256))
    assert fused.kind == "fused" and fused.tokens == {"content": "sks", "style": "zwx"}

    _, gen_id = run(
        lambda s: _add(
            s, Generation(tenant_id=tenant, fusion_id=fusion_id, prompt="a {content} in {style}", steps=2, num_images=2)
        ),
        "generate",
        queue="generation",
    )
    with sessions() as s:
        images = s.get(Generation, gen_id).images
    assert len(images) == 2
    assert store.get(images[0]["key"], expected_sha256=images[0]["sha256"]).startswith(b"\x89PNG")

    # the generation left its adapter merged into the worker's base: a training after it still
    # starts from the base's own weights (the same concept and seed give the same adapter)
    _, again_id = run(lambda s: add_asset(s, store, tenant, "content", "dog", "sks", stack["base"], 0), "train_content")

    def content_adapter(asset_id):
        with sessions() as s:
            row = s.get(AdapterRow, s.get(Asset, asset_id).adapter_id)
            return Adapter.from_bytes(store.get(row.storage_key, expected_sha256=row.sha256))

    first, again = content_adapter(content_id), content_adapter(again_id)
    assert first.tensors.keys() == again.tensors.keys()
    assert all(torch.equal(first.tensors[k], again.tensors[k]) for k in first.tensors)

    # the fused adapter, exported, loads into an ordinary diffusers pipeline
    pipe = DiffusionPipeline.from_pretrained(stack["base"])
    pipe.load_lora_weights({k: v for k, v in fused.to_diffusers().items()})
    out = pipe(
        "a sks dog in zwx ink style",
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 32, 32, 3)


def _add(s, row):
    s.add(row)
    return row
