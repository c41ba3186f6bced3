"""What is checked before a request's body is read: its size, and (with auth on) its key.

A body over the cap is refused by its `Content-Length` at once, and a body that streams
past it (no length given) is cut off with 413 as soon as it does, so an oversized upload
never sits in memory; a request with a body and no valid key gets its 401 before the
body is parsed. The tenant found here is handed to the route's dependency.
"""

from __future__ import annotations

import json

import anyio
from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .deps import Runtime, key_tenant

BODY_METHODS = {"POST", "PUT", "PATCH"}


class RequestGuard:
    def __init__(self, app: ASGIApp, runtime: Runtime):
        self.app, self.rt = app, runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        cap = self.rt.settings.request_byte_cap
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > cap:
            return await _answer(send, 413, f"the request is larger than {cap} bytes")
        if self.rt.settings.auth:
            try:
                tenant = await anyio.to_thread.run_sync(key_tenant, self.rt, headers.get("authorization"))
            except HTTPException as exc:
                return await _answer(send, exc.status_code, exc.detail)
            scope.setdefault("state", {})["tenant_id"] = tenant
        seen, refused = 0, False

        async def capped() -> Message:
            nonlocal seen, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > cap and not refused:
                # answer 413 now and tell the app the client is gone: it stops reading, and
                # whatever it answers to that is dropped
                refused = True
                await _answer(send, 413, f"the request is larger than {cap} bytes")
                return {"type": "http.disconnect"}
            return message

        async def send_unless_refused(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, capped, send_unless_refused)


async def _answer(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
