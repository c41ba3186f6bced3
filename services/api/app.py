"""The REST API: records assets, adapters and jobs, stores files, hands job ids to workers.

A thin layer: validation and bookkeeping here, the method in `b4m_core` (run by the
worker), state in the database, files in the object store.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import logging
import time
from pathlib import Path
from contextlib import asynccontextmanager
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Query, Request, UploadFile
from fastapi.staticfiles import StaticFiles
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from b4m_core.adapter import Adapter as CoreAdapter

from ..common.db import make_engine, migrate, session_factory
from ..common.jobs import JOB_QUEUES, TERMINAL, IdempotencyConflict, JobStore, request_hash
from ..common.observability import GpuCollector, HttpMetrics, JobCollector
from ..common.reconciler import Reconciler
from ..common.models import Adapter, ApiKey, Asset, Fusion, Generation, Job, ReferenceImage, Tenant
from ..common.settings import Settings, get_settings
from ..common.storage import object_key
from ..common.tenants import hash_key
from .queue import make_queue
from .schemas import (Accepted, AssetList, AssetOut, FusionIn, FusionList, FusionOut, GenerateDone, GenerateIn,
                      GenerationList, GenerationOut, JobList, JobOut, JobStatus, ReadyOut, WebhookOut,
                      WebhookSecretOut, describe_openapi, errors)
from .webhooks import UnsafeWebhook, WebhookDispatcher, check_url, tenant_secret

log = logging.getLogger("b4m.api")
UI_DIR = Path(__file__).parent / "ui"
DEFAULT_TENANT = "default"
IdempotencyKey = Annotated[str | None, Header(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")]
MAX_OFFSET = 10**9  # beyond any table; a larger value would overflow the database integer
STEPS_DOC = "break-stage training steps (default: the base model's measured default, 250 on micro; else 300)"
LR_DOC = "learning rate (default: the base model's measured default, 5e-3 on micro; else 1e-3)"
WEBHOOK_DOC = "POSTed a signed JSON event when the training ends (retried with backoff); see GET /webhooks/secret"
ALLOWED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def _iso(dt) -> str | None:
    return dt.isoformat() if dt else None


def job_out(job: Job) -> JobOut:
    eta = None
    if job.status == "running" and job.started_at and 0 < job.progress_step < job.progress_total:
        elapsed = time.time() - job.started_at.timestamp()
        eta = elapsed / job.progress_step * (job.progress_total - job.progress_step)
    outputs = dict(job.outputs or {})
    if "loss_curve" in outputs:  # a storage key inside; the client gets the route that serves it
        outputs["loss_curve"] = f"/jobs/{job.id}/loss.png"
    previews = outputs.pop("previews", [])  # storage keys too
    webhook = None
    if job.webhook_url:
        webhook = WebhookOut(url=job.webhook_url, status=job.webhook_status or "pending",
                             attempts=job.webhook_attempts or 0, error=job.webhook_error)
    return JobOut(id=job.id, type=job.type, target_id=job.target_id, status=job.status,
                  progress_step=job.progress_step, progress_total=job.progress_total, loss=job.loss,
                  eta_seconds=eta, attempts=job.attempts, error=job.error, outputs=outputs,
                  previews=[f"/jobs/{job.id}/previews/{i}" for i in range(len(previews))], webhook=webhook,
                  created_at=_iso(job.created_at), started_at=_iso(job.started_at), finished_at=_iso(job.finished_at))


# ------------------------------------------------------------------ app
def create_app(settings: Settings | None = None, run_migrations: bool = True) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        stop = None
        if settings.reconcile_every_s > 0:  # crash recovery: lost messages, dead workers, deadlines
            stop = Reconciler(app.state.sessions, settings, app.state.queue.enqueue, app.state.queue.waiting_ids,
                              store=app.state.store).start_thread()
        hooks = WebhookDispatcher(app.state.sessions, settings,
                                  lambda job: job_out(job).model_dump(mode="json")).start_thread()
        yield
        hooks.set()
        if stop:
            stop.set()
        app.state.queue.close()
        app.state.engine.dispose()

    app = FastAPI(title="B4M: Break-for-Make customization service", version="0.1.0", lifespan=lifespan,
                  description="Train content and style adapters, fuse any pair, draw images. Every POST takes an "
                              "`Idempotency-Key` header.")
    url = settings.resolved_database_url
    if run_migrations:
        migrate(url)
    app.state.settings = settings
    app.state.engine = make_engine(url)
    app.state.sessions = session_factory(app.state.engine)
    app.state.jobs = JobStore(app.state.sessions)
    app.state.store = settings.object_store()
    app.state.queue = make_queue(settings)
    _observe(app)
    _routes(app)
    # the web UI: static files over the same public API (its JavaScript sends the key header)
    app.mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui")

    @app.get("/", include_in_schema=False)
    def root():
        return RedirectResponse("/ui/")

    def openapi() -> dict:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            app.openapi_schema = describe_openapi(get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi
    return app


def _observe(app: FastAPI) -> None:
    """Prometheus `/metrics`: jobs, durations and queue depth from the database and broker,
    HTTP requests by route, GPU memory where this process holds a GPU."""
    registry = CollectorRegistry()
    registry.register(JobCollector(app.state.sessions, app.state.queue.depths))
    registry.register(GpuCollector())
    http = HttpMetrics(registry)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        http.observe(request.method, getattr(route, "path", "unmatched"), response.status_code, started)
        return response

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}},
                              "description": "Prometheus text format"}})
    def metrics():
        """Jobs by state and type, job durations (last hour), queue depth, HTTP requests, GPU memory."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _tenant(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    """The caller's tenant: from `Authorization: Bearer <key>`, or the default tenant when auth is off."""
    st = request.app.state
    with st.sessions() as s:
        if not st.settings.auth:
            t = s.scalars(select(Tenant).where(Tenant.name == DEFAULT_TENANT)).first()
            if t is None:
                t = Tenant(name=DEFAULT_TENANT)
                s.add(t)
                s.commit()
            return t.id
        if not authorization or not authorization.startswith("Bearer "):
            raise HTTPException(401, "missing API key (Authorization: Bearer <key>)")
        digest = hash_key(authorization[7:])
        for key in s.scalars(select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))):
            if hmac.compare_digest(key.key_hash, digest):
                return key.tenant_id
    raise HTTPException(401, "invalid API key")


TenantId = Annotated[str, Depends(_tenant)]


def _read_image(upload: UploadFile, data: bytes, settings: Settings) -> tuple[str, int, int]:
    """Decide the type by content (Pillow), refuse oversized files and decompression bombs."""
    if len(data) > settings.max_upload_bytes:
        raise HTTPException(413, f"{upload.filename}: larger than {settings.max_upload_bytes} bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            w, h = im.size
            if w * h > settings.max_image_pixels:
                raise HTTPException(413, f"{upload.filename}: {w}x{h} pixels is over the limit")
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # a truncated file fails here, not later in a worker
    except HTTPException:
        raise
    except Image.DecompressionBombError:  # Pillow's own guard, for sizes far past ours
        raise HTTPException(413, f"{upload.filename}: too many pixels (decompression bomb)")
    except Exception:
        raise HTTPException(422, f"{upload.filename}: not a readable image")
    if fmt not in ALLOWED_FORMATS:
        raise HTTPException(422, f"{upload.filename}: {fmt} images are not accepted (PNG, JPEG or WebP)")
    return ALLOWED_FORMATS[fmt], w, h


def _routes(app: FastAPI) -> None:
    def st():
        return app.state

    def send(job_id: str, job_type: str) -> None:
        """Hand the job to the queue; if that fails the job stays queued in the database and
        the reconciler sends it once the broker is back: the request still succeeded."""
        try:
            st().queue.enqueue(job_id, job_type)
        except Exception as exc:
            log.warning("job %s recorded but not sent (the reconciler will): %s", job_id, exc)

    def raced(tenant: str, key: str | None, h: str, response: bool = True):
        """A concurrent request with the same key committed first: answer with its job (or 409)."""
        if not key:
            return None
        job = idempotent_lookup(tenant, key, h)
        if job is None or not response:
            return job
        return JSONResponse({"id": job.target_id, "job_id": job.id, "status": job.status}, 202)

    def idempotent_lookup(tenant: str, key: str | None, h: str) -> Job | None:
        try:
            return st().jobs.find_idempotent(tenant, key, h)
        except IdempotencyConflict as exc:
            raise HTTPException(409, str(exc))

    def idempotent(tenant: str, key: str | None, body: dict) -> tuple[str, Job | None]:
        h = request_hash(body)
        return h, idempotent_lookup(tenant, key, h)

    def webhook_ok(url: str | None) -> None:
        if url is not None:
            try:
                check_url(url, st().settings.webhook_allow_private)
            except UnsafeWebhook as exc:
                raise HTTPException(422, str(exc))

    async def create_asset(kind: str, tenant: str, images: list[UploadFile], word: str, name: str, base_model: str,
                           train: dict, token: str | None, aux_asset_ids: list[str], idem_key: str | None,
                           webhook_url: str | None = None):
        if not 1 <= len(images) <= 10:
            raise HTTPException(422, "send 1 to 10 images")
        await asyncio.to_thread(webhook_ok, webhook_url)  # may resolve a host name: off the event loop
        datas = [await im.read() for im in images]
        train = {k: v for k, v in train.items() if v is not None}
        body = {"kind": kind, "word": word, "name": name, "base": base_model, **train, "token": token,
                "aux": aux_asset_ids, "images": [hashlib.sha256(d).hexdigest() for d in datas],
                "webhook_url": webhook_url}
        h, existing = idempotent(tenant, idem_key, body)
        if existing:
            return JSONResponse({"id": existing.target_id, "job_id": existing.id, "status": existing.status}, 202)
        checked = [_read_image(im, d, st().settings) for im, d in zip(images, datas)]
        other = "style" if kind == "content" else "content"
        with st().sessions() as s:
            for aid in aux_asset_ids:
                a = s.scalars(select(Asset).where(Asset.id == aid, Asset.tenant_id == tenant)).first()
                if a is None:
                    raise HTTPException(404, f"auxiliary asset {aid} not found")
                if a.kind != other:
                    raise HTTPException(422, f"auxiliary asset {aid} is a {a.kind}; a {kind} needs {other}s")
            asset = Asset(tenant_id=tenant, kind=kind, name=name, word=word,
                          token=token or ("sks" if kind == "content" else "zwx"),
                          base_model=base_model or st().settings.base_model, settings=train,
                          aux_asset_ids=aux_asset_ids)
            s.add(asset)
            s.flush()
            written = []
            try:
                for i, (data, (ctype, w, hgt)) in enumerate(zip(datas, checked)):
                    obj = st().store.put(object_key(tenant, "references", asset.id, f"{i}"), data, ctype)
                    written.append(obj.key)
                    asset.images.append(ReferenceImage(position=i, storage_key=obj.key, sha256=obj.sha256,
                                                       content_type=ctype, width=w, height=hgt))
                job = st().jobs.add(s, tenant, f"train_{kind}", asset.id, JOB_QUEUES[f"train_{kind}"],
                                    idempotency_key=idem_key, body_hash=h,
                                    max_attempts=st().settings.job_max_attempts, webhook_url=webhook_url)
                s.commit()
            except Exception as exc:
                s.rollback()
                for key in written:  # no orphan objects
                    st().store.delete(key)
                if isinstance(exc, IntegrityError) and (won := raced(tenant, idem_key, h)):
                    return won
                raise
            send(job.id, job.type)
            return JSONResponse({"id": asset.id, "job_id": job.id, "status": job.status}, 202)

    asset_errors = errors(401, 404, 409, 413, 422)

    @app.post("/contents", status_code=202, response_model=Accepted, tags=["assets"], responses=asset_errors)
    async def post_content(tenant: TenantId, images: Annotated[list[UploadFile], File(description="1 to 10 images")],
                           class_word: Annotated[str, Form(min_length=1, max_length=50)],
                           name: Annotated[str, Form(min_length=1, max_length=200)],
                           base_model: Annotated[str, Form(max_length=500)] = "",
                           steps: Annotated[int | None, Form(ge=1, le=5000, description=STEPS_DOC)] = None,
                           learning_rate: Annotated[float | None, Form(gt=0, le=1, description=LR_DOC)] = None,
                           token: Annotated[str | None, Form(max_length=50)] = None,
                           aux_asset_ids: Annotated[list[str], Form()] = [],
                           webhook_url: Annotated[str | None, Form(min_length=1, max_length=2000, description=WEBHOOK_DOC)] = None,
                           idempotency_key: IdempotencyKey = None):
        """Upload a content's reference images (1 to 10: PNG, JPEG or WebP) and train its adapter (the break
        stage). `aux_asset_ids` (repeated) names style assets whose images serve as MCP auxiliary sets."""
        return await create_asset("content", tenant, images, class_word, name, base_model,
                                  {"steps": steps, "learning_rate": learning_rate}, token, aux_asset_ids,
                                  idempotency_key, webhook_url)

    @app.post("/styles", status_code=202, response_model=Accepted, tags=["assets"], responses=asset_errors)
    async def post_style(tenant: TenantId, images: Annotated[list[UploadFile], File(description="1 to 10 images")],
                         style_word: Annotated[str, Form(min_length=1, max_length=50)],
                         name: Annotated[str, Form(min_length=1, max_length=200)],
                         base_model: Annotated[str, Form(max_length=500)] = "",
                         steps: Annotated[int | None, Form(ge=1, le=5000, description=STEPS_DOC)] = None,
                         learning_rate: Annotated[float | None, Form(gt=0, le=1, description=LR_DOC)] = None,
                         token: Annotated[str | None, Form(max_length=50)] = None,
                         aux_asset_ids: Annotated[list[str], Form()] = [],
                         webhook_url: Annotated[str | None, Form(min_length=1, max_length=2000, description=WEBHOOK_DOC)] = None,
                         idempotency_key: IdempotencyKey = None):
        """Upload a style's reference images (1 to 10: PNG, JPEG or WebP) and train its adapter (the break
        stage). `aux_asset_ids` (repeated) names content assets whose images serve as MCP auxiliary sets."""
        return await create_asset("style", tenant, images, style_word, name, base_model,
                                  {"steps": steps, "learning_rate": learning_rate}, token, aux_asset_ids,
                                  idempotency_key, webhook_url)

    def asset_out(a: Asset, job: Job | None) -> AssetOut:
        return AssetOut(id=a.id, kind=a.kind, name=a.name, word=a.word, token=a.token, base_model=a.base_model,
                        adapter_id=a.adapter_id, images=len(a.images), status=job.status if job else None,
                        job_id=job.id if job else None, created_at=_iso(a.created_at))

    def fusion_out(f: Fusion, job: Job | None) -> FusionOut:
        return FusionOut(id=f.id, content_id=f.content_id, style_id=f.style_id, steps=f.steps, method=f.method,
                         adapter_id=f.adapter_id, status=job.status if job else None, job_id=job.id if job else None,
                         created_at=_iso(f.created_at))

    def generation_out(g: Generation, job: Job | None) -> GenerationOut:
        return GenerationOut(id=g.id, fusion_id=g.fusion_id, content_id=g.content_id, style_id=g.style_id,
                             prompt=g.prompt, negative_prompt=g.negative_prompt, seed=g.seed, steps=g.steps,
                             guidance=g.guidance, width=g.width, height=g.height, num_images=g.num_images,
                             images=[f"/generations/{g.id}/images/{i}" for i in range(len(g.images or []))],
                             status=job.status if job else None, job_id=job.id if job else None,
                             created_at=_iso(g.created_at))

    def latest_job(s, tenant: str, target: str) -> Job | None:
        return s.scalars(select(Job).where(Job.tenant_id == tenant, Job.target_id == target)
                         .order_by(Job.created_at.desc())).first()

    def page(s, tenant: str, model, q, status: str | None, limit: int, offset: int, out) -> dict:
        """One page of `q`, newest first, filtered in SQL by the status of each row's latest job."""
        if status:
            latest = (select(Job.status).where(Job.tenant_id == tenant, Job.target_id == model.id)
                      .order_by(Job.created_at.desc()).limit(1).correlate(model).scalar_subquery())
            q = q.where(latest == status)
        total = s.scalar(select(func.count()).select_from(q.subquery()))
        rows = s.scalars(q.order_by(model.created_at.desc(), model.id).limit(limit).offset(offset)).all()
        return {"items": [out(r, latest_job(s, tenant, r.id)) for r in rows], "total": total, "limit": limit,
                "offset": offset}

    def delete_adapters(s, ids) -> list[str]:
        """Delete adapter rows; returns their storage keys (the objects go after the commit)."""
        keys = []
        for row in s.scalars(select(Adapter).where(Adapter.id.in_([i for i in ids if i]))):
            keys.append(row.storage_key)
            s.delete(row)
        return keys

    for kind in ("content", "style"):
        def make_routes(kind=kind):
            @app.get(f"/{kind}s", tags=["assets"], name=f"list_{kind}s", response_model=AssetList,
                     responses=errors(401, 422))
            def list_assets(tenant: TenantId, limit: int = Query(50, ge=1, le=500), 
                            offset: int = Query(0, ge=0, le=MAX_OFFSET),
                            status: JobStatus | None = Query(None, description="only those whose latest job has "
                                                                               "this status")):
                with st().sessions() as s:
                    q = select(Asset).where(Asset.tenant_id == tenant, Asset.kind == kind)
                    return page(s, tenant, Asset, q, status, limit, offset, asset_out)

            @app.get(f"/{kind}s/{{asset_id}}", tags=["assets"], name=f"get_{kind}", response_model=AssetOut,
                     responses=errors(401, 404))
            def get_asset(asset_id: str, tenant: TenantId):
                with st().sessions() as s:
                    a = s.scalars(select(Asset).where(Asset.id == asset_id, Asset.tenant_id == tenant,
                                                      Asset.kind == kind)).first()
                    if a is None:
                        raise HTTPException(404, f"{kind} {asset_id} not found")
                    return asset_out(a, latest_job(s, tenant, a.id))

            @app.get(f"/{kind}s/{{asset_id}}/images/{{index}}", tags=["assets"], name=f"get_{kind}_image",
                     responses={200: {"content": {"image/*": {}}, "description": "a reference image as uploaded"},
                                307: {"description": "redirect to a presigned URL (S3 store)"},
                                **errors(401, 404)})
            def get_reference_image(asset_id: str, index: int, tenant: TenantId):
                with st().sessions() as s:
                    a = s.scalars(select(Asset).where(Asset.id == asset_id, Asset.tenant_id == tenant,
                                                      Asset.kind == kind)).first()
                    if a is None or not 0 <= index < len(a.images):
                        raise HTTPException(404, "image not found")
                    ref = a.images[index]
                    key, sha, ctype = ref.storage_key, ref.sha256, ref.content_type
                url = st().store.url(key)
                if url:
                    return RedirectResponse(url, status_code=307)
                return Response(st().store.get(key, expected_sha256=sha), media_type=ctype)

            @app.delete(f"/{kind}s/{{asset_id}}", tags=["assets"], name=f"delete_{kind}", status_code=204,
                        responses=errors(401, 404, 409))
            def delete_asset(asset_id: str, tenant: TenantId,
                             force: bool = Query(False, description="also delete the fusions that use it")):
                """Delete the asset, its reference images and adapter; refused (409) while fusions use it
                unless `force`, which deletes those fusions and their adapters too."""
                with st().sessions() as s:
                    a = s.scalars(select(Asset).where(Asset.id == asset_id, Asset.tenant_id == tenant,
                                                      Asset.kind == kind)).first()
                    if a is None:
                        raise HTTPException(404, f"{kind} {asset_id} not found")
                    col = Fusion.content_id if kind == "content" else Fusion.style_id
                    fusions = s.scalars(select(Fusion).where(col == asset_id)).all()
                    if fusions and not force:
                        raise HTTPException(409, f"{kind} {asset_id} has {len(fusions)} fusion(s); pass force=true")
                    keys = [im.storage_key for im in a.images]
                    adapter_ids = [a.adapter_id] + [f.adapter_id for f in fusions]
                    for f in fusions:
                        s.delete(f)
                    s.delete(a)
                    s.flush()
                    keys += delete_adapters(s, adapter_ids)
                    s.commit()
                for k in keys:
                    st().store.delete(k)
                return Response(status_code=204)
        make_routes()

    @app.post("/fusions", status_code=202, response_model=Accepted, tags=["fusions"],
              responses=errors(401, 404, 409, 422))
    def post_fusion(body: FusionIn, tenant: TenantId,
                    idempotency_key: IdempotencyKey = None):
        """Combine a trained content with a trained style and fine-tune them into one adapter."""
        webhook_ok(body.webhook_url)
        h, existing = idempotent(tenant, idempotency_key, body.model_dump())
        if existing:
            return JSONResponse({"id": existing.target_id, "job_id": existing.id, "status": existing.status}, 202)
        with st().sessions() as s:
            for aid, kind in ((body.content_id, "content"), (body.style_id, "style")):
                a = s.scalars(select(Asset).where(Asset.id == aid, Asset.tenant_id == tenant)).first()
                if a is None:
                    raise HTTPException(404, f"{kind} {aid} not found")
                if a.kind != kind:
                    raise HTTPException(422, f"{aid} is a {a.kind}, not a {kind}")
                trained = latest_job(s, tenant, a.id)
                if a.adapter_id is None and trained is not None and trained.status in ("failed", "canceled"):
                    raise HTTPException(409, f"{kind} {aid} has no adapter: its training job {trained.id} "
                                             f"ended {trained.status}")
            f = Fusion(tenant_id=tenant, content_id=body.content_id, style_id=body.style_id, steps=body.steps,
                       method=body.method)
            s.add(f)
            s.flush()
            job = st().jobs.add(s, tenant, "fuse", f.id, JOB_QUEUES["fuse"], idempotency_key=idempotency_key,
                                body_hash=h, max_attempts=st().settings.job_max_attempts,
                                webhook_url=body.webhook_url)
            try:
                s.commit()
            except IntegrityError:
                s.rollback()
                if won := raced(tenant, idempotency_key, h):
                    return won
                raise
        send(job.id, job.type)
        return JSONResponse({"id": f.id, "job_id": job.id, "status": job.status}, 202)

    @app.get("/fusions", tags=["fusions"], response_model=FusionList, responses=errors(401, 422))
    def list_fusions(tenant: TenantId, limit: int = Query(50, ge=1, le=500), 
                            offset: int = Query(0, ge=0, le=MAX_OFFSET),
                     status: JobStatus | None = Query(None, description="only those whose latest job has this status"),
                     content_id: str | None = None, style_id: str | None = None):
        with st().sessions() as s:
            q = select(Fusion).where(Fusion.tenant_id == tenant)
            if content_id:
                q = q.where(Fusion.content_id == content_id)
            if style_id:
                q = q.where(Fusion.style_id == style_id)
            return page(s, tenant, Fusion, q, status, limit, offset, fusion_out)

    def tenant_fusion(s, tenant: str, fusion_id: str) -> Fusion:
        f = s.scalars(select(Fusion).where(Fusion.id == fusion_id, Fusion.tenant_id == tenant)).first()
        if f is None:
            raise HTTPException(404, f"fusion {fusion_id} not found")
        return f

    @app.get("/fusions/{fusion_id}", tags=["fusions"], response_model=FusionOut, responses=errors(401, 404))
    def get_fusion(fusion_id: str, tenant: TenantId):
        with st().sessions() as s:
            f = tenant_fusion(s, tenant, fusion_id)
            return fusion_out(f, latest_job(s, tenant, f.id))

    @app.delete("/fusions/{fusion_id}", tags=["fusions"], status_code=204, responses=errors(401, 404))
    def delete_fusion(fusion_id: str, tenant: TenantId):
        """Delete the fusion and its fused adapter (generations made with it keep their images)."""
        with st().sessions() as s:
            f = tenant_fusion(s, tenant, fusion_id)
            adapter_id = f.adapter_id
            s.delete(f)
            s.flush()
            keys = delete_adapters(s, [adapter_id])
            s.commit()
        for k in keys:
            st().store.delete(k)
        return Response(status_code=204)

    @app.post("/generate", status_code=202, tags=["generate"], response_model=Accepted,
              responses={200: {"model": GenerateDone, "description": "the images, when `wait` was long enough"},
                         **errors(401, 404, 409, 422)})
    def post_generate(body: GenerateIn, tenant: TenantId,
                      idempotency_key: IdempotencyKey = None):
        """Draw images with a fusion, a content, a style, or the bare base model."""
        if sum(x is not None for x in (body.fusion_id, body.content_id, body.style_id)) > 1:
            raise HTTPException(422, "give at most one of fusion_id, content_id, style_id")
        webhook_ok(body.webhook_url)
        h, existing = idempotent(tenant, idempotency_key, body.model_dump(exclude={"wait"}))
        if existing is None:
            with st().sessions() as s:
                if body.fusion_id is not None and not s.scalars(select(Fusion).where(Fusion.id == body.fusion_id,
                                                                         Fusion.tenant_id == tenant)).first():
                    raise HTTPException(404, f"fusion {body.fusion_id} not found")
                for aid, kind in ((body.content_id, "content"), (body.style_id, "style")):
                    if aid is not None:
                        a = s.scalars(select(Asset).where(Asset.id == aid, Asset.tenant_id == tenant)).first()
                        if a is None:
                            raise HTTPException(404, f"{kind} {aid} not found")
                        if a.kind != kind:
                            raise HTTPException(422, f"{aid} is a {a.kind}, not a {kind}")
                g = Generation(tenant_id=tenant, **body.model_dump(exclude={"wait", "webhook_url"}))
                s.add(g)
                s.flush()
                job = st().jobs.add(s, tenant, "generate", g.id, JOB_QUEUES["generate"],
                                    idempotency_key=idempotency_key, body_hash=h, webhook_url=body.webhook_url)
                try:
                    s.commit()
                    gid, jid = g.id, job.id
                except IntegrityError:
                    s.rollback()
                    if not (existing := raced(tenant, idempotency_key, h, response=False)):
                        raise
            if existing is None:
                send(jid, "generate")
        if existing is not None:
            gid, jid = existing.target_id, existing.id
        deadline = time.time() + body.wait
        job = st().jobs.get(tenant, jid)
        while body.wait and job.status in ("queued", "running") and time.time() < deadline:
            time.sleep(0.05)
            job = st().jobs.get(tenant, jid)
        if job.status == "succeeded":
            return JSONResponse({"id": gid, "job_id": jid, "status": job.status,
                                 "images": [f"/generations/{gid}/images/{i}" for i in range(body.num_images)]}, 200)
        return JSONResponse({"id": gid, "job_id": jid, "status": job.status}, 202)

    @app.get("/generations", tags=["generate"], response_model=GenerationList, responses=errors(401, 422))
    def list_generations(tenant: TenantId, limit: int = Query(50, ge=1, le=500), 
                            offset: int = Query(0, ge=0, le=MAX_OFFSET),
                         status: JobStatus | None = Query(None, description="only those whose job has this status"),
                         fusion_id: str | None = None):
        with st().sessions() as s:
            q = select(Generation).where(Generation.tenant_id == tenant)
            if fusion_id:
                q = q.where(Generation.fusion_id == fusion_id)
            return page(s, tenant, Generation, q, status, limit, offset, generation_out)

    @app.get("/generations/{generation_id}", tags=["generate"], response_model=GenerationOut,
             responses=errors(401, 404))
    def get_generation(generation_id: str, tenant: TenantId):
        with st().sessions() as s:
            g = s.scalars(select(Generation).where(Generation.id == generation_id,
                                                   Generation.tenant_id == tenant)).first()
            if g is None:
                raise HTTPException(404, f"generation {generation_id} not found")
            return generation_out(g, latest_job(s, tenant, g.id))

    @app.get("/generations/{generation_id}/images/{index}", tags=["generate"], responses={
        200: {"content": {"image/png": {}}, "description": "the PNG (local store)"},
        307: {"description": "redirect to a presigned URL (S3 store)"}, **errors(401, 404)})
    def get_image(generation_id: str, index: int, tenant: TenantId):
        with st().sessions() as s:
            g = s.scalars(select(Generation).where(Generation.id == generation_id,
                                                   Generation.tenant_id == tenant)).first()
            if g is None or not 0 <= index < len(g.images or []):
                raise HTTPException(404, "image not found")
            ref = g.images[index]
        url = st().store.url(ref["key"])
        if url:
            return RedirectResponse(url, status_code=307)
        return Response(st().store.get(ref["key"], expected_sha256=ref["sha256"]), media_type="image/png")

    @app.get("/adapters/{adapter_id}/download", tags=["adapters"], responses={
        200: {"content": {"application/octet-stream": {}}, "description": "a safetensors file"}, **errors(401, 404)})
    def download_adapter(adapter_id: str, tenant: TenantId,
                         format: Literal["b4m", "diffusers", "kohya"] = Query(
                             "b4m", description="b4m: ours (PLP halves + metadata, reloadable); diffusers: "
                                                "load_lora_weights; kohya: lora_unet_* keys with alpha")):
        with st().sessions() as s:
            row = s.scalars(select(Adapter).where(Adapter.id == adapter_id, Adapter.tenant_id == tenant)).first()
            if row is None:
                raise HTTPException(404, f"adapter {adapter_id} not found")
        data = st().store.get(row.storage_key, expected_sha256=row.sha256)
        if format != "b4m":
            data = CoreAdapter.from_bytes(data).export(format)
        return Response(data, media_type="application/octet-stream", headers={
            "Content-Disposition": f'attachment; filename="{adapter_id}_{format}.safetensors"'})

    @app.get("/jobs", tags=["jobs"], response_model=JobList, responses=errors(401, 422))
    def list_jobs(tenant: TenantId, status: JobStatus | None = None, limit: int = Query(50, ge=1, le=500),
                  
                            offset: int = Query(0, ge=0, le=MAX_OFFSET)):
        try:
            rows, total = st().jobs.list(tenant, status, limit, offset)
        except ValueError as exc:
            raise HTTPException(422, str(exc))
        return {"items": [job_out(j) for j in rows], "total": total, "limit": limit, "offset": offset}

    @app.get("/jobs/{job_id}", response_model=JobOut, tags=["jobs"], responses=errors(401, 404))
    def get_job(job_id: str, tenant: TenantId):
        job = st().jobs.get(tenant, job_id)
        if job is None:
            raise HTTPException(404, f"job {job_id} not found")
        return job_out(job)

    @app.get("/jobs/{job_id}/loss.png", tags=["jobs"], responses={
        200: {"content": {"image/png": {}}, "description": "the loss curve (local store)"},
        307: {"description": "redirect to a presigned URL (S3 store)"}, **errors(401, 404)})
    def get_loss_curve(job_id: str, tenant: TenantId):
        """The loss curve of a training or fusion job that succeeded (raw loss and a moving average)."""
        job = st().jobs.get(tenant, job_id)
        key = (job.outputs or {}).get("loss_curve") if job else None
        if not key:
            raise HTTPException(404, f"job {job_id} has no loss curve")
        url = st().store.url(key)
        if url:
            return RedirectResponse(url, status_code=307)
        return Response(st().store.get(key), media_type="image/png")

    @app.get("/jobs/{job_id}/events", tags=["jobs"], response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "`progress` events while the job changes, one `end` event"},
                        **errors(401, 404)})
    async def job_events(job_id: str, tenant: TenantId,
                         interval: float = Query(0.5, ge=0.1, le=10, description="seconds between polls")):
        """Server-Sent Events: a `progress` event (the job as in GET /jobs/{id}) each time its status,
        step or attempt changes, then an `end` event when it succeeded, failed or was canceled."""
        job = await asyncio.to_thread(st().jobs.get, tenant, job_id)
        if job is None:
            raise HTTPException(404, f"job {job_id} not found")

        async def stream():
            last = None
            current = job
            while True:
                body = job_out(current)
                seen = (body.status, body.progress_step, body.attempts, len(body.previews))
                if seen != last:
                    last = seen
                    event = "end" if body.status in TERMINAL else "progress"
                    yield f"event: {event}\ndata: {body.model_dump_json()}\n\n"
                    if event == "end":
                        return
                await asyncio.sleep(interval)
                current = await asyncio.to_thread(st().jobs.get, tenant, job_id) or current

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/jobs/{job_id}/previews/{index}", tags=["jobs"], responses={
        200: {"content": {"image/png": {}}, "description": "the preview (local store)"},
        307: {"description": "redirect to a presigned URL (S3 store)"}, **errors(401, 404)})
    def get_preview(job_id: str, index: int, tenant: TenantId):
        """A preview drawn with the adapter part-way through training (listed in the job's `previews`)."""
        job = st().jobs.get(tenant, job_id)
        keys = (job.outputs or {}).get("previews", []) if job else []
        if not 0 <= index < len(keys):
            raise HTTPException(404, "preview not found")
        url = st().store.url(keys[index])
        if url:
            return RedirectResponse(url, status_code=307)
        return Response(st().store.get(keys[index]), media_type="image/png")

    @app.get("/webhooks/secret", tags=["webhooks"], response_model=WebhookSecretOut, responses=errors(401))
    def get_webhook_secret(tenant: TenantId):
        """The key that signs this tenant's webhooks. Each event is a POST of `{"type": "job.succeeded" |
        "job.failed" | "job.canceled", "job_id", "data": <the job>}` with headers `webhook-id` (the job id:
        the same on every retry, so dedupe on it), `webhook-timestamp` and `webhook-signature`.
        A receiver that does not answer 2xx is retried with exponential backoff."""
        return {"secret": tenant_secret(st().sessions, tenant)}

    @app.post("/jobs/{job_id}/cancel", response_model=JobOut, tags=["jobs"], responses=errors(401, 404))
    def cancel_job(job_id: str, tenant: TenantId,
                   idempotency_key: IdempotencyKey = None):
        """A queued job ends canceled at once; a running one at its next step (the worker checks a flag)
        and its partial state (checkpoint, uploaded files) is removed. Canceling twice is harmless, so
        an `Idempotency-Key` is accepted and needs no bookkeeping."""
        job = st().jobs.request_cancel(tenant, job_id)
        if job is None:
            raise HTTPException(404, f"job {job_id} not found")
        return job_out(job)

    @app.get("/healthz", tags=["ops"])
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], response_model=ReadyOut, responses={503: {"model": ReadyOut}})
    def readyz():
        checks = {}
        for name, fn in (("database", lambda: st().engine.connect().close()), ("storage", st().store.check),
                         ("broker", st().queue.check)):
            try:
                fn()
                checks[name] = "ok"
            except Exception as exc:
                checks[name] = f"error: {exc}"
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks}, 200 if ok else 503)
