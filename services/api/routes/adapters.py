"""Adapters: download in our format, or converted to a diffusers or kohya LoRA (without torch)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import Response

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
        "load_lora_weights; kohya: lora_unet_* keys with alpha",
    ),
):
    from b4m_core.formats import FormatError, convert  # numpy: loaded on the first download

    row = owned_or_404(s, Adapter, tenant, adapter_id, "adapter")
    data = rt.store.get(row.storage_key, expected_sha256=row.sha256)
    if format != "b4m":
        try:
            data = convert(data, format)
        except FormatError as exc:  # a stored file this version cannot read
            raise HTTPException(500, f"adapter {adapter_id} cannot be converted: {exc}") from exc
    return Response(
        data,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{adapter_id}_{format}.safetensors"'},
    )
