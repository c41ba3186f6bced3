"""Answers more than one route gives: 202 Accepted for work started, a stored file (a
redirect to a presigned URL, or the bytes), 404 for what the tenant does not own."""

from __future__ import annotations

from fastapi import HTTPException
from fastapi.responses import JSONResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from ..common.queries import owned
from ..common.storage import ObjectStore

STORED_FILE = {307: {"description": "redirect to a presigned URL (S3 store)"}}


def accepted(target_id: str, job_id: str, status: str) -> JSONResponse:
    """The 202 body of every POST that starts a job (`Accepted`)."""
    return JSONResponse({"id": target_id, "job_id": job_id, "status": status}, 202)


def stored_file(store: ObjectStore, key: str, media_type: str, sha256: str | None = None) -> Response:
    """A 307 to the object's presigned URL where the store has one (S3), else its bytes."""
    url = store.url(key)
    if url:
        return RedirectResponse(url, status_code=307)
    return Response(store.get(key, expected_sha256=sha256), media_type=media_type)


def owned_or_404(s: Session, model, tenant_id: str, row_id: str, label: str, **where):
    """The tenant's row, or 404 (another tenant's row is not found either)."""
    row = owned(s, model, tenant_id, row_id, **where)
    if row is None:
        raise HTTPException(404, f"{label} {row_id} not found")
    return row
