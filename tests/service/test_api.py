"""The HTTP API over the embedded stack (in-process queue, local store), on SQLite and PostgreSQL."""

import hashlib
import io
import json
import time
from datetime import UTC

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from services.common.models import ApiKey, Asset, Job, Tenant
from services.common.settings import Settings
from services.embedded import create_embedded_app as create_app

from ..helpers.images import png, random_images
from ..helpers.processes import free_port, run, scaled, spawn, stop


@pytest.fixture
def api(db_url, tmp_path, tiny_sd_path):
    settings = Settings(data_dir=tmp_path, database_url=db_url, base_model=str(tiny_sd_path), device="cpu")
    app = create_app(settings)
    with TestClient(app) as client:
        client.base = str(tiny_sd_path)
        yield client, app


def wait_job(client, job_id, timeout=120, headers=None):
    t = time.time()
    while time.time() - t < scaled(timeout):
        job = client.get(f"/jobs/{job_id}", headers=headers).json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
        time.sleep(0.2)
    raise AssertionError(job)


def post_asset(client, kind, seed, **extra):
    word = {"content": "class_word", "style": "style_word"}[kind]
    files = [("images", (f"{i}.png", png(seed + i), "image/png")) for i in range(2)]
    data = {word: "dog" if kind == "content" else "ink", "name": f"my {kind}", "steps": "2", **extra}
    return client.post(f"/{kind}s", files=files, data=data)


def train_and_fuse(client) -> list[str]:
    """A content and a style trained (2 steps) and fused (1 step): their three adapter ids."""
    jobs = [post_asset(client, kind, seed).json() for kind, seed in (("content", 0), ("style", 5))]
    assert all(wait_job(client, j["job_id"])["status"] == "succeeded" for j in jobs)
    r = client.post("/fusions", json={"content_id": jobs[0]["id"], "style_id": jobs[1]["id"], "steps": 1})
    assert wait_job(client, r.json()["job_id"])["status"] == "succeeded"
    ids = [client.get(f"/{k}s/{j['id']}").json()["adapter_id"] for k, j in zip(("content", "style"), jobs)]
    return ids + [client.get(f"/fusions/{r.json()['id']}").json()["adapter_id"]]


def test_train_fuse_generate_over_http(api):
    client, app = api
    r = post_asset(client, "content", 0, captions=["a {content} on a lawn", ""])  # one captioned, one not
    assert r.status_code == 202, r.text
    content = r.json()
    assert client.get(f"/contents/{content['id']}").json()["captions"] == ["a {content} on a lawn", None]
    assert {"id", "job_id"} <= set(content)
    style = post_asset(client, "style", 5).json()
    for j in (content["job_id"], style["job_id"]):
        job = wait_job(client, j)
        assert job["status"] == "succeeded", job
        assert job["progress_step"] == job["progress_total"] == 2 and job["attempts"] == 1
    assert client.get(f"/contents/{content['id']}").json()["adapter_id"]
    assert client.get("/contents").json()["total"] == 1
    r = client.post("/fusions", json={"content_id": content["id"], "style_id": style["id"], "steps": 1})
    assert r.status_code == 202, r.text
    fusion = r.json()
    assert wait_job(client, fusion["job_id"])["status"] == "succeeded"
    adapter_id = client.get(f"/fusions/{fusion['id']}").json()["adapter_id"]
    for fmt, key in (("b4m", ".A"), ("diffusers", ".lora_A.weight"), ("kohya", ".alpha")):
        r = client.get(f"/adapters/{adapter_id}/download", params={"format": fmt})
        assert r.status_code == 200 and r.content[:8]
        from safetensors.torch import load

        assert any(k.endswith(key) for k in load(r.content))
    r = client.post(
        "/generate",
        json={
            "fusion_id": fusion["id"],
            "prompt": "a {content} in {style} style",
            "steps": 2,
            "num_images": 2,
            "wait": 60,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    img = client.get(body["images"][1])
    assert img.status_code == 200 and img.content.startswith(b"\x89PNG")
    # the fusion's content and style halves scaled apart: drawn, recorded, and not the same picture
    asked = {"fusion_id": fusion["id"], "prompt": "a {content} in {style} style", "steps": 2, "wait": 60}
    r = client.post("/generate", json=asked | {"content_scale": 0.0, "style_scale": 2.0})
    assert r.status_code == 200, r.text
    g = client.get(f"/generations/{r.json()['id']}").json()
    assert (g["content_scale"], g["style_scale"], g["strength"]) == (0.0, 2.0, 1.0)
    as_made = client.get(body["images"][0]).content  # same seed, halves at 1
    assert client.get(r.json()["images"][0]).content != as_made
    assert client.get(f"/generations/{body['id']}").json()["content_scale"] == 1.0
    assert client.get("/readyz").json()["status"] == "ok"


def test_bad_input_is_refused_and_writes_nothing(api, tmp_path):
    client, app = api

    def counts():
        with app.state.runtime.sessions() as s:
            return s.scalar(select(func.count(Asset.id))), s.scalar(select(func.count(Job.id)))

    objects = lambda: sorted(p for p in (tmp_path / "objects").rglob("*") if p.is_file())
    before, objs = counts(), objects()
    cases = [
        ([("images", ("a.png", b"not an image", "image/png"))], 422),
        ([("images", ("a.gif", _gif(), "image/gif"))], 422),
        ([], 422),
        ([("images", (f"{i}.png", png(i), "image/png")) for i in range(11)], 422),
        ([("images", ("bomb.png", _png_claiming(60000, 60000), "image/png"))], 413),  # decompression bomb
        ([("images", ("wide.png", _png_claiming(5000, 5000), "image/png"))], 413),  # over B4M_MAX_IMAGE_PIXELS
        ([("images", ("big.png", png(0) + b"\0" * (10 * 2**20), "image/png"))], 413),  # over the byte cap
        ([("images", ("cut.png", png(0)[:200], "image/png"))], 422),  # truncated
    ]
    for files, code in cases:
        r = client.post("/contents", files=files or None, data={"class_word": "dog", "name": "x"})
        assert r.status_code == code, (r.status_code, r.text)
    r = client.post(
        "/contents",
        files=[("images", ("a.png", png(1), "image/png"))],
        data={"class_word": "dog", "name": "x", "aux_asset_ids": "nope"},
    )
    assert r.status_code == 404
    for data in (
        {"class_word": "d" * 51, "name": "x"},
        {"class_word": "dog", "name": "x", "steps": "0"},
        {"class_word": "dog", "name": "x", "learning_rate": "2"},
        {"class_word": "dog", "name": "x", "captions": ["one", "two"]},  # 2 captions for 1 image
        {"class_word": "dog", "name": "x", "captions": ["c" * 501]},
        {"class_word": "dog", "name": "x", "captions": ["a\x00b"]},
    ):
        r = client.post("/contents", files=[("images", ("a.png", png(1), "image/png"))], data=data)
        assert r.status_code == 422, (data, r.text)
    assert client.post("/generate", json={"prompt": "x"}, headers={"Idempotency-Key": ""}).status_code == 422
    assert client.get("/contents", params={"offset": 2**63}).status_code == 422
    assert counts() == before and objects() == objs
    # fusing two contents, unknown ids, bad numbers
    c = post_asset(client, "content", 0).json()
    c2 = post_asset(client, "content", 3).json()
    assert client.post("/fusions", json={"content_id": c["id"], "style_id": c2["id"]}).status_code == 422
    assert client.post("/fusions", json={"content_id": c["id"], "style_id": "missing"}).status_code == 404
    assert client.post("/generate", json={"prompt": "x", "width": 33}).status_code == 422
    assert client.post("/generate", json={"prompt": "x", "steps": 0}).status_code == 422
    assert client.get("/jobs/unknown").status_code == 404
    app.state.runtime.queue.join()


def _png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims `width` x `height` pixels (a decompression bomb's shape)."""
    import struct
    import zlib

    data = bytearray(png(0))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def _gif() -> bytes:
    buf = io.BytesIO()
    random_images(0, 1)[0].save(buf, format="GIF")
    return buf.getvalue()


def test_idempotency_key(api):
    client, app = api
    body = {"prompt": "a dog", "steps": 1}
    a = client.post("/generate", json=body, headers={"Idempotency-Key": "k1"}).json()
    b = client.post("/generate", json=body, headers={"Idempotency-Key": "k1"}).json()
    assert a["id"] == b["id"] and a["job_id"] == b["job_id"]
    r = client.post("/generate", json={**body, "seed": 9}, headers={"Idempotency-Key": "k1"})
    assert r.status_code == 409
    with app.state.runtime.sessions() as s:
        assert s.scalar(select(func.count(Job.id))) == 1
    # uploads too: the same images and fields again are the same asset; other fields are a conflict
    files = [("images", ("0.png", png(0), "image/png"))]
    form = {"class_word": "dog", "name": "mine", "steps": "1"}
    a = client.post("/contents", files=files, data=form, headers={"Idempotency-Key": "up"}).json()
    b = client.post("/contents", files=files, data=form, headers={"Idempotency-Key": "up"}).json()
    assert a == {**b, "status": a["status"]}
    assert (
        client.post(
            "/contents", files=files, data={**form, "name": "other"}, headers={"Idempotency-Key": "up"}
        ).status_code
        == 409
    )
    assert client.get("/contents").json()["total"] == 1
    # racing requests with one key: one resource, one job, the same answer for all
    from concurrent.futures import ThreadPoolExecutor

    race = {"prompt": "a race", "steps": 1}
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda _: client.post("/generate", json=race, headers={"Idempotency-Key": "race"}), range(8))
        )
    assert {r.status_code for r in answers} == {202}
    assert len({r.json()["id"] for r in answers}) == 1
    with app.state.runtime.sessions() as s:
        assert s.scalar(select(func.count(Job.id)).where(Job.idempotency_key == "race")) == 1
    app.state.runtime.queue.join()


def test_delete_with_fusions_needs_force(api):
    client, app = api
    c, s_ = post_asset(client, "content", 0).json(), post_asset(client, "style", 5).json()
    app.state.runtime.queue.join()
    f = client.post("/fusions", json={"content_id": c["id"], "style_id": s_["id"], "steps": 0}).json()
    app.state.runtime.queue.join()
    assert client.delete(f"/contents/{c['id']}").status_code == 409
    assert client.delete(f"/contents/{c['id']}", params={"force": "true"}).status_code == 204
    assert client.get(f"/contents/{c['id']}").status_code == 404
    assert client.get(f"/fusions/{f['id']}").status_code == 404


def test_lists_filter_in_sql_and_fusion_delete_removes_its_adapter(api, tmp_path):
    client, app = api
    ok = [post_asset(client, "content", i).json() for i in (0, 2, 4)]
    style = post_asset(client, "style", 9).json()
    app.state.runtime.queue.join()
    bad = post_asset(client, "content", 6, steps="0")  # refused: steps >= 1
    assert bad.status_code == 422
    # a canceled one: queued behind a job that holds the in-process worker
    blocker = post_asset(client, "content", 8, steps="5000").json()
    canceled = post_asset(client, "content", 10).json()
    assert client.post(f"/jobs/{canceled['job_id']}/cancel").json()["status"] == "canceled"
    client.post(f"/jobs/{blocker['job_id']}/cancel")
    app.state.runtime.queue.join()
    # the status filter runs before paging: a page of 2 succeeded contents, 3 in all
    page = client.get("/contents", params={"status": "succeeded", "limit": 2}).json()
    assert page["total"] == 3 and len(page["items"]) == 2 and {i["status"] for i in page["items"]} == {"succeeded"}
    page2 = client.get("/contents", params={"status": "succeeded", "limit": 2, "offset": 2}).json()
    assert {i["id"] for i in page["items"] + page2["items"]} == {c["id"] for c in ok}
    assert client.get("/contents", params={"status": "canceled"}).json()["total"] == 2
    assert client.get("/contents", params={"status": "bogus"}).status_code == 422
    f = client.post("/fusions", json={"content_id": ok[0]["id"], "style_id": style["id"], "steps": 1}).json()
    app.state.runtime.queue.join()
    fusions = client.get("/fusions", params={"content_id": ok[0]["id"], "status": "succeeded"}).json()
    assert [x["id"] for x in fusions["items"]] == [f["id"]] and fusions["items"][0]["adapter_id"]
    assert client.get("/fusions", params={"content_id": ok[1]["id"]}).json()["total"] == 0
    g = client.post("/generate", json={"fusion_id": f["id"], "prompt": "a {content}", "steps": 1, "wait": 60}).json()
    gens = client.get("/generations", params={"fusion_id": f["id"]}).json()
    assert gens["total"] == 1 and gens["items"][0]["images"] == g["images"]
    assert client.get(f"/generations/{g['id']}").json()["status"] == "succeeded"
    adapter_id = fusions["items"][0]["adapter_id"]
    objects = lambda: [p for p in (tmp_path / "objects").rglob("*") if p.is_file()]
    assert client.get(f"/adapters/{adapter_id}/download").status_code == 200
    n = len(objects())
    assert client.delete(f"/fusions/{f['id']}").status_code == 204
    assert client.get(f"/fusions/{f['id']}").status_code == 404
    assert client.get(f"/adapters/{adapter_id}/download").status_code == 404
    assert len(objects()) == n - 2  # the fused adapter and its job's loss curve went with it
    assert client.delete(f"/fusions/{f['id']}").status_code == 404
    assert client.get(g["images"][0]).status_code == 200  # generations keep their images


def test_openapi_documents_every_route(api):
    client, _ = api
    spec = client.get("/openapi.json").json()
    for path, ops in spec["paths"].items():
        for verb, op in ops.items():
            codes = set(op["responses"])
            if path not in ("/healthz", "/readyz", "/metrics", "/webhooks/secret", "/base-models"):  # no input: no 4xx
                assert "404" in codes or "422" in codes, (verb, path, codes)
    schemas = spec["components"]["schemas"]
    for name in ("Accepted", "JobOut", "AssetOut", "FusionOut", "GenerationOut", "GenerateIn", "FusionIn", "ErrorOut"):
        assert name in schemas, name
    for name, schema in schemas.items():  # every field described (FastAPI's own error schemas aside)
        if name not in ("HTTPValidationError", "ValidationError"):
            bare = [k for k, v in schema.get("properties", {}).items() if not v.get("description")]
            assert not bare, (name, bare)
    for path, ops in spec["paths"].items():
        for verb, op in ops.items():
            bare = [p["name"] for p in op.get("parameters", []) if not p.get("description") and p["in"] != "header"]
            assert not bare, (verb, path, bare)
    post = spec["paths"]["/contents"]["post"]
    assert {"413", "409", "422", "404"} <= set(post["responses"])
    form = spec["components"]["schemas"][
        post["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].split("/")[-1]
    ]
    assert {"images", "class_word", "name", "base_model", "captions", "aux_sets"} <= set(form["properties"])
    assert schemas["GenerateIn"].get("examples")
    # what generated clients and the docs' Authorize button need
    ops = {op["operationId"]: (verb, path) for path, o in spec["paths"].items() for verb, op in o.items()}
    assert len(ops) == sum(len(o) for o in spec["paths"].values())  # unique
    assert ops["create_content"] == ("post", "/contents") and ops["get_job"] == ("get", "/jobs/{job_id}")
    assert ops["create_fusion"] == ("post", "/fusions") and ops["generate"] == ("post", "/generate")
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": spec["components"]["securitySchemes"]["bearer"]["description"],
    }
    assert {"bearer": []} in spec["paths"]["/jobs"]["get"]["security"]
    headers = {
        p["name"].lower(): p for o in spec["paths"].values() for op in o.values() for p in op.get("parameters", [])
    }
    assert "authorization" not in headers and "same body" in headers["idempotency-key"]["description"]
    hook = spec["webhooks"]["job-ended"]["post"]
    assert hook["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/WebhookEvent")


def test_tenants_see_only_their_own(db_url, tmp_path, tiny_sd_path):
    settings = Settings(data_dir=tmp_path, database_url=db_url, base_model=str(tiny_sd_path), device="cpu", auth=True)
    app = create_app(settings)
    keys = {}
    with app.state.runtime.sessions() as s:
        for name in ("a", "b"):
            t = Tenant(name=name)
            s.add(t)
            s.flush()
            keys[name] = f"key-{name}-secret"
            s.add(
                ApiKey(tenant_id=t.id, prefix=keys[name][:6], key_hash=hashlib.sha256(keys[name].encode()).hexdigest())
            )
        s.commit()
    with TestClient(app) as client:
        ha, hb = ({"Authorization": f"Bearer {keys[n]}"} for n in ("a", "b"))
        assert client.get("/contents").status_code == 401
        assert client.get("/contents", headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = client.post("/generate", json={"prompt": "a dog", "steps": 1}, headers=ha)
        assert r.status_code == 202
        job_id, gen_id = r.json()["job_id"], r.json()["id"]
        assert client.get(f"/jobs/{job_id}", headers=hb).status_code == 404
        assert client.post(f"/jobs/{job_id}/cancel", headers=hb).status_code == 404
        assert client.get(f"/jobs/{job_id}", headers=ha).status_code == 200
        assert client.get("/jobs", headers=hb).json()["total"] == 0
        wait_job(client, job_id, headers=ha)
        assert client.get(f"/generations/{gen_id}/images/0", headers=hb).status_code == 404
        assert client.get(f"/generations/{gen_id}/images/0", headers=ha).status_code == 200


def test_b4m_serve_answers_over_real_http(tmp_path, tiny_sd_path):
    import os
    import subprocess
    import sys
    import urllib.request

    port = free_port()
    env = dict(os.environ, B4M_DATA_DIR=str(tmp_path), B4M_BASE_MODEL=str(tiny_sd_path), HF_HUB_OFFLINE="1")
    env.pop("B4M_DATABASE_URL", None)
    env.pop("B4M_BROKER_URL", None)
    proc = spawn(
        [sys.executable, "-m", "services.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(int(scaled(150))):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    body = r.read()
                    break
            except Exception:
                time.sleep(0.2)
        else:
            raise AssertionError("b4m serve did not come up")
        assert b'"ok"' in body
        assert (tmp_path / "b4m.db").is_file()  # the embedded default: SQLite in the data folder
    finally:
        stop(proc)


@pytest.mark.slow
def test_main_job_over_http(tmp_path):
    """The README's main job, with tiny step counts: serve, upload, train, fuse, draw, grid, stop."""
    import sys

    from PIL import Image

    r = run(
        [
            sys.executable,
            "-m",
            "services.main_job",
            "--out",
            str(tmp_path),
            "--break-steps",
            "2",
            "--make-steps",
            "1",
            "--contents",
            "hexagon",
            "--styles",
            "plaid",
            "zigzag",
        ],
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert Image.open(tmp_path / "grid.png").size == (3 * 68, 2 * 68)
    assert (tmp_path / "hexagon_x_zigzag.png").is_file()


def test_tenant_and_key_commands_drive_auth(tmp_path, tiny_sd_path):
    """`b4m tenant create` / `b4m key create|revoke` against the embedded database; the API
    accepts the printed key, stores only its hash, and refuses it once revoked."""
    import json
    import os
    import sys

    env = dict(os.environ, B4M_DATA_DIR=str(tmp_path), HF_HUB_OFFLINE="1")
    env.pop("B4M_DATABASE_URL", None)
    cli = lambda *a: run([sys.executable, "-m", "services.cli", *a], env=env, timeout=120)
    first = cli("tenant", "bootstrap")  # a fresh database: a first tenant and key (docker-compose runs it)
    assert first.returncode == 0 and json.loads(first.stdout)["key"].startswith("b4m_"), first.stderr
    assert "nothing done" in cli("tenant", "bootstrap").stdout
    assert cli("tenant", "create", "acme").returncode == 0
    dup = cli("tenant", "create", "acme")
    assert dup.returncode == 2 and "exists" in dup.stderr
    made = cli("key", "create", "acme")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    assert cli("key", "create", "nobody").returncode == 2
    settings = Settings(data_dir=tmp_path, base_model=str(tiny_sd_path), device="cpu", auth=True)
    app = create_app(settings)
    with app.state.runtime.sessions() as s:
        stored = s.scalars(select(ApiKey).where(ApiKey.prefix == key["key"][:10])).one()
        assert stored.key_hash == hashlib.sha256(key["key"].encode()).hexdigest() and key["key"] not in stored.prefix
    with TestClient(app) as client:
        auth = {"Authorization": f"Bearer {key['key']}"}
        assert client.get("/jobs", headers=auth).status_code == 200
        assert client.get("/jobs", headers={"Authorization": f"Bearer {key['key']}x"}).status_code == 401
        assert cli("key", "revoke", key["id"]).returncode == 0
        assert client.get("/jobs", headers=auth).status_code == 401
    listed = json.loads(cli("tenant", "list").stdout)
    assert [t["name"] for t in listed] == ["default", "acme"] and listed[1]["keys"][0]["revoked"]


def test_cancel_mid_training_removes_partial_state(tmp_path, tiny_sd_path):
    settings = Settings(data_dir=tmp_path, base_model=str(tiny_sd_path), device="cpu", checkpoint_every=5)
    with TestClient(create_app(settings)) as client:
        r = post_asset(client, "content", 0, steps="400").json()
        checkpoints = lambda: list((tmp_path / "objects").rglob("checkpoints/*/*"))
        t = time.time()
        while not checkpoints() and time.time() - t < scaled(120):
            time.sleep(0.1)
        assert checkpoints(), "no checkpoint was written"
        assert client.post(f"/jobs/{r['job_id']}/cancel", headers={"Idempotency-Key": "c1"}).status_code == 200
        job = wait_job(client, r["job_id"])
        assert job["status"] == "canceled" and job["progress_step"] < 400
        assert checkpoints() == []  # the canceled job's partial state is gone
        assert not list((tmp_path / "objects").rglob("adapters/*/*"))
        assert client.get(f"/contents/{r['id']}").json()["adapter_id"] is None
        # canceling again changes nothing
        assert client.post(f"/jobs/{r['job_id']}/cancel").json()["status"] == "canceled"
        # a content whose training was canceled has no adapter to fuse: a clear 409, nothing recorded
        style = post_asset(client, "style", 5).json()
        r2 = client.post("/fusions", json={"content_id": r["id"], "style_id": style["id"]})
        assert r2.status_code == 409 and "canceled" in r2.json()["detail"]
        assert client.get("/fusions").json()["total"] == 0
        wait_job(client, style["job_id"])


def test_a_fusion_posted_while_its_inputs_train_waits_for_them(api):
    client, app = api
    content, style = post_asset(client, "content", 0).json(), post_asset(client, "style", 2).json()
    fusion = client.post("/fusions", json={"content_id": content["id"], "style_id": style["id"], "steps": 1}).json()
    job = wait_job(client, fusion["job_id"])
    assert job["status"] == "succeeded" and job["attempts"] == 1, job
    assert client.get(f"/fusions/{fusion['id']}").json()["adapter_id"]


def test_metrics_and_json_logs_with_job_ids(api):
    import json
    import logging

    from services.common.observability import JsonFormatter

    client, app = api
    lines = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(JsonFormatter())
    logging.getLogger("b4m").addHandler(handler)
    logging.getLogger("b4m").setLevel(logging.INFO)
    try:
        content = post_asset(client, "content", 0, steps="3").json()
        assert wait_job(client, content["job_id"])["status"] == "succeeded"
        client.post("/generate", json={"prompt": "x", "steps": 1, "width": 33})  # a 422
    finally:
        logging.getLogger("b4m").removeHandler(handler)
    text = client.get("/metrics").text
    assert 'b4m_jobs{state="succeeded",type="train_content"} 1.0' in text
    assert 'b4m_job_duration_seconds_count{type="train_content"} 1.0' in text
    assert 'b4m_queue_depth{queue="in-process"} 0.0' in text
    assert 'b4m_http_requests_total{method="POST",route="/contents",status="202"} 1.0' in text
    assert 'b4m_http_requests_total{method="POST",route="/generate",status="422"} 1.0' in text
    records = [json.loads(x) for x in lines]
    assert {"ts", "level", "logger", "message"} <= set(records[0])
    # something the worker logged while it ran the job carries that job's id
    assert any(r.get("job_id") == content["job_id"] for r in records), records


def test_job_events_stream_progress_then_end(api):
    import json

    client, _ = api
    r = post_asset(client, "content", 0, steps="6").json()
    events, ids, retries = [], [], set()
    with client.stream("GET", f"/jobs/{r['job_id']}/events", params={"interval": 0.1}) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.headers["cache-control"] == "no-cache" and stream.headers["x-accel-buffering"] == "no"
        kind = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
            elif line.startswith("id: "):
                ids.append(int(line[4:]))
            elif line.startswith("retry: "):
                retries.add(int(line[7:]))
    assert ids == list(range(1, len(events) + 1)) and retries == {2000}  # what a browser's EventSource uses
    assert events[-1][0] == "end" and events[-1][1]["status"] == "succeeded"
    assert all(k == "progress" for k, _ in events[:-1])
    steps = [e["progress_step"] for _, e in events]
    assert steps == sorted(steps) and events[-1][1]["progress_step"] == 6
    assert client.get("/jobs/nope/events").status_code == 404
    # the job's loss curve, drawn when it succeeded
    assert events[-1][1]["outputs"]["loss_curve"] == f"/jobs/{r['job_id']}/loss.png"
    png_ = client.get(f"/jobs/{r['job_id']}/loss.png")
    assert png_.status_code == 200 and png_.headers["content-type"] == "image/png"
    from PIL import Image

    im = Image.open(io.BytesIO(png_.content))
    assert im.size == (480, 240) and len(set(im.convert("RGB").getdata())) > 3  # a drawing, not a blank
    assert client.get("/jobs/nope/loss.png").status_code == 404


@pytest.mark.parametrize(
    "method,path,body",
    [
        ("post", "/generate", {"prompt": "a \x00 dog"}),
        ("post", "/generate", {"prompt": "a \ud800 dog"}),
        ("post", "/fusions", {"content_id": "a\x00", "style_id": "b"}),
        ("get", "/jobs/a%00b", None),
        ("get", "/contents/a%00b", None),
        ("get", "/jobs?status=%00", None),
    ],
)
def test_nul_bytes_and_lone_surrogates_are_422_not_500(api, method, path, body):
    client, _ = api
    kwargs = {"content": json.dumps(body).encode(), "headers": {"content-type": "application/json"}}
    r = client.request(method.upper(), path, **(kwargs if body is not None else {}))
    assert r.status_code == 422, r.text
    assert client.get("/jobs").json()["total"] == 0  # nothing written


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_422_with_a_readable_body(api, value):
    client, _ = api
    raw = f'{{"prompt": "x", "guidance": {value}}}'
    r = client.post("/generate", content=raw.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 422 and "guidance" in r.text, r.text
    r = client.post(
        "/contents", files=[("images", ("a.png", png(1), "image/png"))], data={"class_word": "do\x00g", "name": "n"}
    )
    assert r.status_code == 422 and "NUL" in r.json()["detail"]


def test_times_carry_their_offset_and_eta_holds_under_a_non_utc_timezone(api, monkeypatch):
    """SQLite returns times without an offset; read as local time they put eta_seconds hours off."""
    client, app = api
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        r = client.post("/generate", json={"prompt": "x"})
        job_id = r.json()["job_id"]
        app.state.runtime.queue.join()  # the embedded worker ran it: succeeded, times set
        job = client.get(f"/jobs/{job_id}").json()
        for field in ("created_at", "started_at", "finished_at"):
            assert job[field].endswith("+00:00"), job
        with app.state.runtime.sessions() as s:  # a running job halfway, started 10 s ago
            from datetime import datetime, timedelta

            row = s.get(Job, job_id)
            row.status, row.progress_step, row.progress_total = "running", 5, 10
            row.started_at = datetime.now(UTC) - timedelta(seconds=10)
            s.commit()
        eta = client.get(f"/jobs/{job_id}").json()["eta_seconds"]
        assert 5 < eta < 60, eta  # ~10 s; hours off (or negative) when read as local time
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_metrics_with_auth_on_need_the_operators_token(db_url, tmp_path, tiny_sd_path):
    """/metrics counts every tenant's jobs: with auth on, a tenant's key does not read them."""
    import urllib.request

    from ..helpers.processes import free_port

    port = free_port()
    settings = Settings(
        data_dir=tmp_path,
        database_url=db_url,
        base_model=str(tiny_sd_path),
        device="cpu",
        auth=True,
        metrics_token="ops-secret",
        metrics_port=port,
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = client.get("/metrics", headers={"Authorization": "Bearer ops-secret"})
        assert r.status_code == 200 and "b4m_jobs" in r.text
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as scraped:  # in-cluster port
            assert b"b4m_http_requests_total" in scraped.read()


def test_oversized_requests_are_refused_before_reading_and_auth_comes_first(db_url, tmp_path, tiny_sd_path):
    settings = Settings(
        data_dir=tmp_path, database_url=db_url, base_model=str(tiny_sd_path), device="cpu", max_request_bytes=20_000
    )
    with TestClient(create_app(settings)) as client:
        big = [("images", ("a.png", png(0) + b"\0" * 30_000, "image/png"))]
        r = client.post("/contents", files=big, data={"class_word": "dog", "name": "n"})
        assert r.status_code == 413 and "larger than 20000" in r.json()["detail"]

        def chunks():  # no Content-Length: the cap is counted as the body streams in
            for _ in range(10):
                yield b"x" * 5_000

        r = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert client.get("/jobs").json()["total"] == 0
    with TestClient(create_app(Settings(data_dir=tmp_path, database_url=db_url, auth=True))) as client:
        # a body that could not even be parsed: the missing key is what is answered
        r = client.post("/contents", content=b"--garbage", headers={"content-type": "multipart/form-data; boundary=x"})
        assert r.status_code == 401
        r = client.post("/generate", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["detail"] == "invalid API key"


def test_base_models_come_from_the_allowed_list_normalised(api, tmp_path):
    """A worker loads each distinct base model: requests may name only the configured ones,
    spelled one way, and an unknown one is a 422 at the API (not a worker error naming paths)."""
    client, app = api
    files = [("images", ("a.png", png(0), "image/png"))]
    r = client.post("/contents", files=files, data={"class_word": "d", "name": "n", "base_model": "/etc"})
    assert r.status_code == 422 and "must be one of" in r.json()["detail"]
    assert client.get("/jobs").json()["total"] == 0
    r = client.post(
        "/contents",
        files=files,
        data={"class_word": "d", "name": "n", "steps": "1", "base_model": client.base + "//./"},
    )
    assert r.status_code == 202, r.text
    assert client.get(f"/contents/{r.json()['id']}").json()["base_model"] == client.base
    app.state.runtime.queue.join()


def test_base_models_are_configured_by_name_and_listed_with_their_defaults(
    db_url, tmp_path, tiny_sd_path, tiny_sdxl_path
):
    """`B4M_BASE_MODELS=name=source,...`: GET /base-models lists each with its architecture and
    the defaults a run gets (read from its files); uploads name it (or its source) and are
    stored under the name; the worker loads it from the source; anything else is 422."""
    from services.common.models import Adapter as AdapterRow

    settings = Settings(
        data_dir=tmp_path,
        database_url=db_url,
        base_models=f"xl-test={tiny_sdxl_path}, {tiny_sd_path}",
        base_model="xl-test",
        device="cpu",
    )
    with TestClient(create_app(settings)) as client:
        listed = {m["name"]: m for m in client.get("/base-models").json()["items"]}
        assert set(listed) == {"xl-test", str(tiny_sd_path)}
        xl, sd = listed["xl-test"], listed[str(tiny_sd_path)]
        assert (xl["source"], xl["arch"], xl["default"]) == (str(tiny_sdxl_path), "sdxl", True)
        # SDXL's architecture defaults under the folder's own b4m_defaults.json
        assert xl["defaults"]["rank"] == 4 and xl["defaults"]["gradient_checkpointing"] is True
        assert xl["defaults"]["mixed_precision"] == "auto" and xl["defaults"]["learning_rate"] == 1e-3
        assert (sd["arch"], sd["default"], sd["defaults"]) == ("sd1", False, {"mixed_precision": "auto"})
        files = [("images", ("a.png", png(0), "image/png"))]
        for bad in ("micro", "/etc", "xl"):
            r = client.post("/contents", files=files, data={"class_word": "d", "name": "n", "base_model": bad})
            assert r.status_code == 422 and "xl-test" in r.json()["detail"], bad
        assert client.get("/jobs").json()["total"] == 0
        ids = []
        for named in (None, str(tiny_sdxl_path) + "/."):  # the default, and the source's spelling
            data = {"class_word": "d", "name": "n", "steps": "1"} | ({"base_model": named} if named else {})
            r = client.post("/contents", files=files, data=data)
            assert r.status_code == 202, r.text
            assert client.get(f"/contents/{r.json()['id']}").json()["base_model"] == "xl-test"
            assert wait_job(client, r.json()["job_id"])["status"] == "succeeded"
            ids.append(client.get(f"/contents/{r.json()['id']}").json()["adapter_id"])
        with client.app.state.runtime.sessions() as s:
            assert {s.get(AdapterRow, i).meta["base_model"] for i in ids} == {"xl-test"}


def test_the_worker_keeps_a_bounded_number_of_base_models(tmp_path, tiny_sd_path, tiny_sdxl_path):
    from services.worker.runner import WorkerContext

    ctx = WorkerContext(Settings(data_dir=tmp_path, device="cpu", max_loaded_bases=1))
    first = ctx.base(str(tiny_sd_path))
    assert ctx.base(str(tiny_sd_path)) is first  # loaded once
    ctx.base(str(tiny_sdxl_path))
    assert list(ctx.bases) == [str(tiny_sdxl_path)]  # the older one went


def test_first_requests_on_a_fresh_database_race_to_one_default_tenant(api):
    """Auth off: the default tenant is made by the first request; concurrent first requests
    (once one 500 in 20) all answer, and there is one tenant."""
    from concurrent.futures import ThreadPoolExecutor

    client, app = api
    with app.state.runtime.sessions() as s:
        assert s.scalar(select(func.count(Tenant.id))) == 0  # nothing has asked yet
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: client.get("/jobs"), range(40)))
    assert [r.status_code for r in answers] == [200] * 40
    with app.state.runtime.sessions() as s:
        assert s.scalar(select(func.count(Tenant.id))) == 1


def test_a_fusion_of_adapters_that_cannot_compose_is_422_and_makes_nothing(api):
    """A content trained before the base model's defaults changed (another basis mode) and a
    style trained after: refused up front with the reason, not a failed job."""
    from services.common.models import Adapter as AdapterRow
    from services.common.models import Asset

    client, app = api
    content, style = post_asset(client, "content", 0).json(), post_asset(client, "style", 5).json()
    app.state.runtime.queue.join()
    with app.state.runtime.sessions() as s:
        row = s.get(AdapterRow, s.get(Asset, content["id"]).adapter_id)
        row.meta = row.meta | {"plp": row.meta["plp"] | {"basis_mode": "random"}}
        s.commit()
    r = client.post("/fusions", json={"content_id": content["id"], "style_id": style["id"], "steps": 1})
    assert r.status_code == 422 and "basis mode" in r.json()["detail"], r.text
    assert client.get("/fusions").json()["total"] == 0 and client.get("/jobs").json()["total"] == 2


def test_generate_takes_a_strength_and_records_it(api):
    client, app = api
    assert client.post("/generate", json={"prompt": "x", "strength": 2.5}).status_code == 422
    r = client.post("/generate", json={"prompt": "x", "strength": 0.5, "guidance": 3, "wait": 60})
    assert r.status_code == 200, r.text
    g = client.get(f"/generations/{r.json()['id']}").json()
    assert (g["strength"], g["guidance"]) == (0.5, 3.0) and len(g["images"]) == 1
    # a sampler by name: drawn with it and recorded; a name not in the list is refused
    r = client.post("/generate", json={"prompt": "x", "scheduler": "euler_a", "steps": 2, "wait": 60})
    assert r.status_code == 200, r.text
    assert client.get(f"/generations/{r.json()['id']}").json()["scheduler"] == "euler_a"
    assert client.get("/generations").json()["total"] == 2
    for bad in ({"content_scale": 2.5}, {"style_scale": -1}, {"style_scale": 0.5}, {"scheduler": "k_lms_magic"}):
        assert client.post("/generate", json={"prompt": "x"} | bad).status_code == 422, bad
    assert client.get("/generations").json()["total"] == 2  # the refused requests made nothing


def test_the_worker_can_store_adapters_in_fp16(db_url, tmp_path, tiny_sd_path):
    """`B4M_ADAPTER_DTYPE=fp16`: the stored adapter files are fp16 (half the tensor bytes); a
    fusion trains from them, and downloads come in the dtype asked for."""
    from safetensors import safe_open

    settings = Settings(
        data_dir=tmp_path, database_url=db_url, base_model=str(tiny_sd_path), device="cpu", adapter_dtype="fp16"
    )
    with TestClient(create_app(settings)) as client:
        adapter_id = train_and_fuse(client)[-1]
        for dtype, want in (("fp16", "F16"), ("fp32", "F32")):
            data = client.get(f"/adapters/{adapter_id}/download", params={"format": "b4m", "dtype": dtype}).content
            path = tmp_path / f"{dtype}.safetensors"
            path.write_bytes(data)
            with safe_open(path, "pt") as f:
                assert {f.get_slice(k).get_dtype() for k in f.keys()} == {want}
        from b4m_core.formats import stored_dtype
        from services.common.models import Adapter as AdapterRow

        runtime = client.app.state.runtime
        with runtime.sessions() as s:
            row = s.get(AdapterRow, adapter_id)
            stored = runtime.store.get(row.storage_key)
        assert stored_dtype(stored) == "fp16" and row.size == len(stored)


@pytest.mark.parametrize("override", [None, False])
def test_the_worker_trains_sdxl_with_its_memory_defaults(db_url, tmp_path, tiny_sdxl_path, override):
    """An SDXL base trains with SDXL's defaults: mixed precision "auto" (bf16/fp16 autocast on
    CUDA, fp32 here on the CPU) and gradient checkpointing on, unless the worker's settings
    say otherwise; the adapter records how it trained."""
    from services.common.models import Adapter as AdapterRow

    settings = Settings(
        data_dir=tmp_path,
        database_url=db_url,
        base_model=str(tiny_sdxl_path),
        device="cpu",
        gradient_checkpointing=override,
    )
    with TestClient(create_app(settings)) as client:
        ids = train_and_fuse(client)
        with client.app.state.runtime.sessions() as s:
            facts = [s.get(AdapterRow, i).meta["extra"]["training"] for i in ids]
    expect = {"precision": "no", "gradient_checkpointing": override is None}
    assert facts == [expect] * 3
