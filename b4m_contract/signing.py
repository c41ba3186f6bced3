"""Webhook signatures (the Standard Webhooks scheme): HMAC-SHA256 over "id.timestamp.body"
with the tenant's secret, sent as `webhook-signature: v1,<base64>`. Shared by the server,
which signs, and the client, which verifies; nothing here needs the database."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()
