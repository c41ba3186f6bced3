"""Error handling every route shares: bad input is a 422 that can always be written as JSON; a
store that is down is a 503 with Retry-After, never a 500."""

from __future__ import annotations

import math

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from b4m_contract.schemas import text_problem

from ..common.storage import StorageUnavailable

RETRY_AFTER_S = 5


def install_error_handlers(app: FastAPI) -> None:
    """Bad input is a 422 that can always be written as JSON: NUL bytes and lone surrogates in
    a path or query (PostgreSQL cannot store them) are refused before any route runs, and a
    validation error whose input holds NaN or such text is answered with that input made safe."""

    @app.middleware("http")
    async def refuse_unstorable_text(request: Request, call_next):
        why = text_problem(request.scope.get("path", ""))
        if why is None and b"%00" in request.scope.get("query_string", b""):
            why = "contains a NUL byte"
        if why:
            return JSONResponse({"detail": f"the URL {why}"}, 422)
        return await call_next(request)

    @app.exception_handler(StorageUnavailable)
    async def store_down(request: Request, exc: StorageUnavailable):
        # nothing was written: the request failed whole and can be sent again
        return JSONResponse(
            {"detail": f"the object store is unavailable, try again: {exc}"},
            503,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": _safe(jsonable_encoder(exc.errors(), custom_encoder={float: _finite}))}, 422)


def _finite(x: float):
    return x if math.isfinite(x) else str(x)


def _safe(value):
    """JSON-writable: non-finite floats as strings, unencodable text with replacement characters."""
    if isinstance(value, dict):
        return {k: _safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_safe(v) for v in value]
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, str) and text_problem(value):
        return value.replace("\x00", "\\x00").encode("utf-8", "replace").decode("utf-8")
    return value
