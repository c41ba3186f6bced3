"""Adapters: download in our format, or converted to a diffusers or kohya LoRA (without torch)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import PlainTextResponse, Response

from ...common.models import Adapter
from ..deps import DbSession, RuntimeDep, TenantId
from ..openapi import errors
from ..responses import owned_or_404

router = APIRouter(tags=["adapters"])


@router.get(
    "/adapters/{adapter_id}/download",
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "a safetensors file"},
        **errors(401, 404),
    },
)
def download_adapter(
    adapter_id: str,
    tenant: TenantId,
    s: DbSession,
    rt: RuntimeDep,
    format: Literal["b4m", "diffusers", "kohya"] = Query(
        "b4m",
        description="b4m: ours (PLP halves + metadata, reloadable); diffusers: "
        "load_lora_weights (PEFT lora_A/lora_B keys); kohya: lora_unet_* keys with alpha. diffusers and "
        "kohya files carry kohya's ss_* and the SAI modelspec.* metadata (trigger phrase, base model)",
    ),
    dtype: Literal["fp32", "fp16", "bf16"] = Query("fp32", description="tensor type of the file"),
):
    from b4m_core.formats import FormatError, convert  # numpy: loaded on the first download

    row = owned_or_404(s, Adapter, tenant, adapter_id, "adapter")
    data = rt.store.get(row.storage_key, expected_sha256=row.sha256)
    try:  # the stored file itself when it already is the format and dtype asked for
        data = convert(data, format, dtype)
    except FormatError as exc:  # a stored file this version cannot read
        raise HTTPException(500, f"adapter {adapter_id} cannot be converted: {exc}") from exc
    suffix = "" if dtype == "fp32" else f"_{dtype}"
    return Response(
        data,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{adapter_id}_{format}{suffix}.safetensors"'},
    )


@router.get(
    "/adapters/{adapter_id}/card",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/markdown": {}}, "description": "a model card"}, **errors(401, 404)},
)
def get_adapter_card(adapter_id: str, tenant: TenantId, s: DbSession, rt: RuntimeDep):
    """The adapter's model card (README.md of a diffusers export): trigger words, base model,
    method and settings, and how to load it."""
    from b4m_core.formats import FormatError, model_card

    row = owned_or_404(s, Adapter, tenant, adapter_id, "adapter")
    try:
        card = model_card(rt.store.get(row.storage_key, expected_sha256=row.sha256))
    except FormatError as exc:
        raise HTTPException(500, f"adapter {adapter_id} cannot be read: {exc}") from exc
    return PlainTextResponse(card, media_type="text/markdown; charset=utf-8")
