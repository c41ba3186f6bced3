"""Contents and styles: upload reference images and train (the break stage), list, show, delete.

Both kinds are one implementation, registered once per kind; only the word's form field
differs (`class_word` for a content, `style_word` for a style). No `from __future__ import
annotations` here: the route signatures are built per kind and must be evaluated at once."""

import hashlib
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Query, UploadFile
from fastapi.responses import JSONResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from b4m_contract.jobs import AssetKind, JobStatus
from b4m_contract.schemas import Accepted, AssetList, AssetOut, text_problem

from ...common import deletions
from ...common.models import Asset, Fusion, ReferenceImage
from ...common.queries import latest_job, owned, page
from ...common.storage import object_key
from ..deps import DbSession, RuntimeDep, TenantId
from ..openapi import errors
from ..responses import STORED_FILE, accepted, owned_or_404, stored_file
from ..submit import JobRequest, start_job
from ..uploads import check_image
from ..views import asset_out
from .common import MAX_OFFSET, IdempotencyKey, delete_adapters

router = APIRouter(tags=["assets"])
STEPS_DOC = "break-stage training steps (default: the base model's measured default, 250 on micro; else 300)"
LR_DOC = "learning rate (default: the base model's measured default, 5e-3 on micro; else 1e-3)"
WEBHOOK_EVENTS_DOC = (
    "optional, repeated: started, succeeded, failed, canceled (default: the three end events); "
    "`started` also POSTs job.started"
)
PREVIEW_PROMPTS_DOC = (
    "optional, repeated (at most 4): what the training previews draw, `{content}` / `{style}` for the "
    "concept (default: one prompt naming it)"
)
MAX_PREVIEW_PROMPTS = 4
CAPTIONS_DOC = (
    "optional, repeated: one caption per image, in order ('' for none). Write `{content}` or "
    "`{style}` where the new concept goes (else the token phrase is put first). Images without "
    "one are captioned by the base model's captioner where it has one (micro: yes), else by its template"
)
AUX_SETS_DOC = (
    "MCP: with no aux_asset_ids, this many auxiliary sets of the other kind come from the base model's "
    "bank (default: its measured default, 3 on micro; 0: no MCP; a base without a bank trains with none)"
)
WEBHOOK_DOC = "POSTed a signed JSON event when the training ends (retried with backoff); see GET /webhooks/secret"
DEFAULT_TOKENS = {AssetKind.CONTENT: "sks", AssetKind.STYLE: "zwx"}
WORD_FIELDS = {AssetKind.CONTENT: "class_word", AssetKind.STYLE: "style_word"}


def _register(kind: AssetKind) -> None:
    other = kind.other
    plural = f"/{kind}s"

    @router.post(
        plural,
        status_code=202,
        response_model=Accepted,
        name=f"create_{kind}",
        responses=errors(401, 404, 409, 413, 422),
    )
    def create(
        tenant: TenantId,
        rt: RuntimeDep,
        s: DbSession,
        images: Annotated[list[UploadFile], File(description="1 to 10 images")],
        word: Annotated[str, Form(alias=WORD_FIELDS[kind], min_length=1, max_length=50)],
        name: Annotated[str, Form(min_length=1, max_length=200)],
        base_model: Annotated[str, Form(max_length=500)] = "",
        steps: Annotated[int | None, Form(ge=1, le=5000, description=STEPS_DOC)] = None,
        learning_rate: Annotated[float | None, Form(gt=0, le=1, description=LR_DOC)] = None,
        token: Annotated[str | None, Form(max_length=50)] = None,
        aux_asset_ids: Annotated[list[str], Form()] = [],
        aux_sets: Annotated[int | None, Form(ge=0, le=8, description=AUX_SETS_DOC)] = None,
        captions: Annotated[list[str], Form(description=CAPTIONS_DOC)] = [],
        preview_prompts: Annotated[list[str], Form(description=PREVIEW_PROMPTS_DOC)] = [],
        webhook_url: Annotated[str | None, Form(min_length=1, max_length=2000, description=WEBHOOK_DOC)] = None,
        webhook_events: Annotated[list[str], Form(description=WEBHOOK_EVENTS_DOC)] = [],
        idempotency_key: IdempotencyKey = None,
    ) -> JSONResponse:
        # a sync route: FastAPI runs it on a worker thread, so reading and storing the
        # uploads never blocks the event loop
        if not 1 <= len(images) <= 10:
            raise HTTPException(422, "send 1 to 10 images")
        texts = {"word": word, "name": name, "base_model": base_model, "token": token, "webhook_url": webhook_url}
        texts.update({f"aux_asset_ids[{i}]": a for i, a in enumerate(aux_asset_ids)})
        texts.update({f"captions[{i}]": c for i, c in enumerate(captions) if c})
        texts.update({f"preview_prompts[{i}]": p for i, p in enumerate(preview_prompts)})
        if len(preview_prompts) > MAX_PREVIEW_PROMPTS or any(not 1 <= len(p) <= 500 for p in preview_prompts):
            raise HTTPException(422, f"preview_prompts: at most {MAX_PREVIEW_PROMPTS}, each 1 to 500 characters")
        if captions and len(captions) != len(images):
            raise HTTPException(422, f"captions: one per image in order ({len(images)}), or none; got {len(captions)}")
        if any(len(c) > 500 for c in captions):
            raise HTTPException(422, "captions: at most 500 characters each")
        for field_name, text in texts.items():
            if text is not None and (why := text_problem(text)):
                raise HTTPException(422, f"{field_name} {why}")
        datas = [im.file.read() for im in images]
        base = rt.settings.allowed_base_model(base_model or rt.settings.base_model)
        if base is None:
            raise HTTPException(422, f"base_model must be one of {rt.settings.allowed_base_models()}")
        if aux_sets and aux_asset_ids:
            raise HTTPException(422, "aux_sets draws auxiliary sets from the model's bank: give it or aux_asset_ids")
        train = {"steps": steps, "learning_rate": learning_rate, "aux_sets": aux_sets}
        train = {k: v for k, v in train.items() if v is not None}
        if preview_prompts:
            train["preview_prompts"] = list(preview_prompts)
        body = {
            "kind": kind,
            "word": word,
            "name": name,
            "base": base_model,
            **train,
            "token": token,
            "aux": aux_asset_ids,
            "images": [hashlib.sha256(d).hexdigest() for d in datas],
            "captions": captions,
            "webhook_url": webhook_url,
            "webhook_events": webhook_events,
        }

        def add_asset(s: Session, req: JobRequest) -> str:
            checked = [check_image(im.filename, d, rt.settings) for im, d in zip(images, datas)]
            for aid in aux_asset_ids:
                a = owned_or_404(s, Asset, tenant, aid, "auxiliary asset")
                if a.kind != other:
                    raise HTTPException(422, f"auxiliary asset {aid} is a {a.kind}; a {kind} needs {other}s")
            asset = Asset(
                tenant_id=tenant,
                kind=kind,
                name=name,
                word=word,
                token=token or DEFAULT_TOKENS[kind],
                base_model=base,
                settings=train,
                aux_asset_ids=aux_asset_ids,
            )
            s.add(asset)
            s.flush()
            for i, (data, (ctype, w, h)) in enumerate(zip(datas, checked)):
                obj = rt.store.put(object_key(tenant, "references", asset.id, f"{i}"), data, ctype)
                req.written.append(obj.key)
                asset.images.append(
                    ReferenceImage(
                        position=i,
                        storage_key=obj.key,
                        sha256=obj.sha256,
                        content_type=ctype,
                        width=w,
                        height=h,
                        caption=(captions[i].strip() or None) if captions else None,
                    )
                )
            return asset.id

        req = JobRequest(tenant, idempotency_key, body, webhook_url, webhook_events)
        done = start_job(rt, s, req, kind.training_job, add_asset)
        return accepted(done.target_id, done.job_id, done.status)

    create.__doc__ = (
        f"Upload a {kind}'s reference images (1 to 10: PNG, JPEG or WebP) and train its adapter (the "
        f"break stage). `aux_asset_ids` (repeated) names {other} assets whose images serve as MCP "
        "auxiliary sets."
    )

    @router.get(plural, name=f"list_{kind}s", response_model=AssetList, responses=errors(401, 422))
    def list_assets(
        tenant: TenantId,
        s: DbSession,
        limit: int = Query(50, ge=1, le=500),
        offset: int = Query(0, ge=0, le=MAX_OFFSET),
        status: JobStatus | None = Query(None, description="only those whose latest job has this status"),
    ):
        q = select(Asset).where(Asset.tenant_id == tenant, Asset.kind == kind)
        return page(s, tenant, Asset, q, status, limit, offset, asset_out).as_dict()

    @router.get(f"{plural}/{{asset_id}}", name=f"get_{kind}", response_model=AssetOut, responses=errors(401, 404))
    def get_asset(asset_id: str, tenant: TenantId, s: DbSession):
        a = owned_or_404(s, Asset, tenant, asset_id, kind, kind=kind)
        return asset_out(a, latest_job(s, tenant, a.id))

    @router.get(
        f"{plural}/{{asset_id}}/images/{{index}}",
        name=f"get_{kind}_image",
        responses={
            200: {"content": {"image/*": {}}, "description": "a reference image as uploaded"},
            **STORED_FILE,
            **errors(401, 404),
        },
    )
    def get_reference_image(asset_id: str, index: int, tenant: TenantId, s: DbSession, rt: RuntimeDep):
        a = owned(s, Asset, tenant, asset_id, kind=kind)
        if a is None or not 0 <= index < len(a.images):
            raise HTTPException(404, "image not found")
        ref = a.images[index]
        return stored_file(rt.store, ref.storage_key, ref.content_type, sha256=ref.sha256)

    @router.delete(f"{plural}/{{asset_id}}", name=f"delete_{kind}", status_code=204, responses=errors(401, 404, 409))
    def delete_asset(
        asset_id: str,
        tenant: TenantId,
        s: DbSession,
        rt: RuntimeDep,
        force: bool = Query(False, description="also delete the fusions that use it"),
    ):
        """Delete the asset, its reference images and adapter; refused (409) while fusions use it
        unless `force`, which deletes those fusions and their adapters too."""
        a = owned_or_404(s, Asset, tenant, asset_id, kind, kind=kind)
        col = Fusion.content_id if kind == AssetKind.CONTENT else Fusion.style_id
        fusions = s.scalars(select(Fusion).where(col == asset_id)).all()
        if fusions and not force:
            raise HTTPException(409, f"{kind} {asset_id} has {len(fusions)} fusion(s); pass force=true")
        keys = [im.storage_key for im in a.images]
        adapter_ids = [a.adapter_id] + [f.adapter_id for f in fusions]
        for f in fusions:
            s.delete(f)
        s.delete(a)
        s.flush()
        targets = [a.id] + [f.id for f in fusions]
        rt.jobs.forget_targets(s, tenant, targets)  # their jobs stop; their keys are free again
        keys += deletions.job_objects(s, tenant, targets)
        keys = deletions.record(s, keys + delete_adapters(s, adapter_ids))
        s.commit()  # the rows and the record of their objects, together
        deletions.remove(rt.sessions, rt.store, keys)  # a store outage leaves them to the sweep
        return Response(status_code=204)


for _kind in AssetKind:
    _register(_kind)
