"""Tenants and their API keys. A key is shown once, when made; only its sha256 is stored."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select

from .models import ApiKey, Tenant, utcnow

KEY_PREFIX = "b4m_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_tenant(sessions, name: str) -> Tenant:
    with sessions() as s:
        if s.scalars(select(Tenant).where(Tenant.name == name)).first():
            raise ValueError(f"tenant {name!r} exists")
        t = Tenant(name=name)
        s.add(t)
        s.commit()
        s.refresh(t)
        return t


def find_tenant(s, name_or_id: str) -> Tenant:
    t = s.scalars(select(Tenant).where((Tenant.name == name_or_id) | (Tenant.id == name_or_id))).first()
    if t is None:
        raise ValueError(f"no tenant {name_or_id!r}")
    return t


def create_key(sessions, tenant: str) -> tuple[str, ApiKey]:
    """A new random key for `tenant` (name or id): returns the key itself (shown once) and its row."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with sessions() as s:
        t = find_tenant(s, tenant)
        row = ApiKey(tenant_id=t.id, prefix=key[: len(KEY_PREFIX) + 6], key_hash=hash_key(key))
        s.add(row)
        s.commit()
        s.refresh(row)
        return key, row


def revoke_key(sessions, key_id_or_prefix: str) -> ApiKey:
    with sessions() as s:
        rows = s.scalars(
            select(ApiKey).where((ApiKey.id == key_id_or_prefix) | (ApiKey.prefix == key_id_or_prefix))
        ).all()
        if len(rows) != 1:
            raise ValueError(f"{len(rows)} keys match {key_id_or_prefix!r}: give the key id")
        rows[0].revoked_at = utcnow()
        s.commit()
        s.refresh(rows[0])
        return rows[0]


def list_tenants(sessions) -> list[dict]:
    with sessions() as s:
        out = []
        for t in s.scalars(select(Tenant).order_by(Tenant.created_at)):
            keys = s.scalars(select(ApiKey).where(ApiKey.tenant_id == t.id)).all()
            out.append(
                {
                    "id": t.id,
                    "name": t.name,
                    "keys": [{"id": k.id, "prefix": k.prefix, "revoked": k.revoked_at is not None} for k in keys],
                }
            )
        return out


def bootstrap(sessions, name: str = "default") -> tuple[str, ApiKey] | None:
    """A first tenant and key when the database has no tenant at all (a fresh stack with
    auth on is usable at once); None when there is one already, so running it on every
    start changes nothing after the first."""
    with sessions() as s:
        if s.scalars(select(Tenant).limit(1)).first() is not None:
            return None
    try:
        create_tenant(sessions, name)
    except ValueError:  # another starter made it first
        return None
    return create_key(sessions, name)
