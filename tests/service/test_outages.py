"""A store outage during requests: uploads answer 503 with Retry-After and write nothing;
deletes succeed and leave no orphan once the store is back (issue 15, item 6)."""

import contextlib
import time
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from services.common import deletions
from services.common.models import Asset, Job, ObjectDeletion
from services.common.settings import Settings
from services.common.storage import S3Store
from services.embedded import create_embedded_app

from ..helpers.faults import TcpProxy
from ..helpers.images import png
from ..helpers.processes import wait_until


@contextlib.contextmanager
def s3_app(tmp_path, tiny_sd_path, s3_endpoint, **settings):
    """The embedded server on an S3 bucket reached through a proxy that can go down; yields
    (client, app, proxy, a direct store to look at the bucket)."""
    proxy = TcpProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    bucket = f"b4m-outage-{uuid.uuid4().hex[:10]}"
    direct = S3Store(bucket, endpoint_url=s3_endpoint, access_key="t", secret_key="t", create_bucket=True)
    base = dict(
        data_dir=tmp_path,
        base_model=str(tiny_sd_path),
        device="cpu",
        storage="s3",
        s3_endpoint_url=proxy.url,
        s3_bucket=bucket,
        s3_access_key="t",
        s3_secret_key="t",
        reconcile_every_s=0,
        preview_every=0,
    )
    app = create_embedded_app(Settings(**{**base, **settings}))
    try:
        with TestClient(app) as client:
            yield client, app, proxy, direct
    finally:
        proxy.down()


@pytest.fixture
def outage(db_url, tmp_path, tiny_sd_path, s3_endpoint):
    with s3_app(tmp_path, tiny_sd_path, s3_endpoint, database_url=db_url) as parts:
        yield parts


def _objects(direct: S3Store) -> list[str]:
    listed = direct.client.list_objects_v2(Bucket=direct.bucket)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def _upload(client, seed: int):
    files = [("images", (f"{i}.png", png(seed + i), "image/png")) for i in range(2)]
    return client.post("/contents", files=files, data={"class_word": "dog", "name": "d", "steps": "2"})


def test_uploads_answer_503_during_an_outage_and_deletes_leave_no_orphan(outage):
    client, app, proxy, direct = outage
    rt = app.state.runtime
    r = _upload(client, 0)
    assert r.status_code == 202, r.text
    wait_until(lambda: client.get(f"/jobs/{r.json()['job_id']}").json()["status"] == "succeeded", 120, "training")
    kept = _objects(direct)
    assert len(kept) >= 3  # two references and the adapter (and its loss curve)

    proxy.down()
    with rt.sessions() as s:
        before = s.scalar(select(func.count(Asset.id))), s.scalar(select(func.count(Job.id)))
    refused = _upload(client, 10)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5", refused.text
    with rt.sessions() as s:  # the request failed whole
        assert (s.scalar(select(func.count(Asset.id))), s.scalar(select(func.count(Job.id)))) == before
    gone = client.delete(f"/contents/{r.json()['id']}")
    assert gone.status_code == 204  # the rows go now; their objects are recorded for removal
    assert client.get(f"/contents/{r.json()['id']}").status_code == 404
    with rt.sessions() as s:
        recorded = set(s.scalars(select(ObjectDeletion.key)))
    assert {k for k in kept if "/references/" in k or "/adapters/" in k} <= recorded
    assert set(kept) <= set(_objects(direct))  # the store was down: nothing removed yet
    # whatever the refused upload got written before the store went away is recorded too
    assert set(_objects(direct)) - set(kept) <= recorded

    proxy.up()
    removed = deletions.sweep(rt.sessions, rt.store)
    assert set(removed) == recorded
    with rt.sessions() as s:
        assert s.scalar(select(func.count()).select_from(ObjectDeletion)) == 0
    assert not [k for k in _objects(direct) if "/references/" in k or "/adapters/" in k]


@pytest.fixture
def slow_outage(tmp_path, tiny_sd_path, s3_endpoint):
    settings = dict(checkpoint_every=2, outage_retry_s=30, outage_backoff_s=0.2, outage_backoff_max_s=0.5)
    with s3_app(tmp_path, tiny_sd_path, s3_endpoint, **settings) as (client, app, proxy, _):
        yield client, app, proxy


def test_a_job_waits_out_a_short_outage_without_spending_attempts(slow_outage):
    """The store goes away right after the upload, for 2 s: whether the job was reading its
    references or uploading its adapter then, it waits and succeeds in its one attempt."""
    client, _, proxy = slow_outage
    r = _upload(client, 20)
    assert r.status_code == 202
    proxy.down()
    time.sleep(2)
    proxy.up()
    job = wait_until(
        lambda: (j := client.get(f"/jobs/{r.json()['job_id']}").json())["status"] in ("succeeded", "failed") and j,
        120,
        "the job",
    )
    assert job["status"] == "succeeded" and job["attempts"] == 1, job
    assert job["error"] is None  # the outage's note is cleared once it is over


def test_an_outage_past_the_window_fails_the_job_and_retry_runs_it_again(slow_outage):
    client, app, proxy = slow_outage
    app.state.runtime.settings.outage_retry_s = 1.0  # the worker shares these settings
    proxy.down()  # a generation needs the store only for its images, at the end
    r = client.post("/generate", json={"prompt": "x", "steps": 1})
    job_id = r.json()["job_id"]
    job = wait_until(
        lambda: (j := client.get(f"/jobs/{job_id}").json())["status"] in ("succeeded", "failed") and j,
        120,
        "the job to give up",
    )
    assert job["status"] == "failed" and "unavailable for" in job["error"] and job["attempts"] == 1, job
    assert client.post(f"/jobs/{job_id}/retry").status_code == 200
    proxy.up()
    app.state.runtime.settings.outage_retry_s = 30
    job = wait_until(
        lambda: (j := client.get(f"/jobs/{job_id}").json())["status"] in ("succeeded", "failed") and j,
        120,
        "the retried job",
    )
    assert job["status"] == "succeeded", job
    assert client.get(f"/generations/{job['target_id']}").json()["images"]
    r = client.post(f"/jobs/{job_id}/retry")
    assert r.status_code == 409 and "only a failed job" in r.json()["detail"]
    assert client.post("/jobs/nope/retry").status_code == 404


def test_the_sweep_removes_objects_no_row_points_at_once_they_are_old(api_with_local_store):
    """A process killed between an upload and its commit leaves an object nothing points at;
    the reconciler removes it after the grace period (a fresh one may be an upload in flight)."""
    import os

    from services.common.reconciler import Reconciler

    client, app, root = api_with_local_store
    rt = app.state.runtime
    r = _upload(client, 30)
    wait_until(lambda: client.get(f"/jobs/{r.json()['job_id']}").json()["status"] == "succeeded", 120, "training")
    kept = sorted(k for k, _ in rt.store.list("tenants/"))
    old = rt.store.put("tenants/t1/adapters/lost/adapter.safetensors", b"half an upload").key
    fresh = rt.store.put("tenants/t1/references/inflight/0", b"an upload in flight").key
    hours_ago = time.time() - 2 * 3600
    os.utime(root / old, (hours_ago, hours_ago))
    removed = []
    rec = Reconciler(
        rt.sessions, rt.settings, lambda *a: None, lambda: set(), store=rt.store, on_orphans=removed.append
    )
    report = rec.sweep(orphans=True)
    assert report["orphans_removed"] == [old] and removed == [1]
    assert sorted(k for k, _ in rt.store.list("tenants/")) == sorted(kept + [fresh])
    assert "b4m_orphaned_objects_removed_total" in client.get("/metrics").text


def test_deleting_an_asset_in_training_cancels_it_and_frees_its_key(api_with_local_store):
    client, app, root = api_with_local_store
    files = [("images", ("0.png", png(40), "image/png"))]
    data = {"class_word": "dog", "name": "d", "steps": "3000"}
    r = client.post("/contents", files=files, data=data, headers={"Idempotency-Key": "k1"})
    job_id, asset_id = r.json()["job_id"], r.json()["id"]
    wait_until(lambda: client.get(f"/jobs/{job_id}").json()["progress_step"] >= 3, 120, "training under way")
    assert client.delete(f"/contents/{asset_id}").status_code == 204
    job = wait_until(lambda: (j := client.get(f"/jobs/{job_id}").json())["status"] != "running" and j, 60, "a stop")
    assert job["status"] == "canceled", job  # not 3 attempts ending "NoResultFound"
    app.state.runtime.queue.join()
    left = [p for p in root.rglob("*") if p.is_file()]
    assert not [p for p in left if asset_id in str(p) or "/adapters/" in str(p)], left
    again = client.post(
        "/contents",
        files=[("images", ("0.png", png(40), "image/png"))],
        data={**data, "steps": "1"},
        headers={"Idempotency-Key": "k1"},
    )
    assert again.status_code == 202 and again.json()["id"] != asset_id, again.text  # the key made a new content


@pytest.fixture
def api_with_local_store(tmp_path, tiny_sd_path):
    settings = Settings(
        data_dir=tmp_path,
        base_model=str(tiny_sd_path),
        device="cpu",
        reconcile_every_s=0,
        preview_every=0,
        checkpoint_every=0,
    )
    app = create_embedded_app(settings)
    with TestClient(app) as client:
        yield client, app, tmp_path / "objects"
