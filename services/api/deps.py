"""Typed dependencies of the routes: the runtime's parts, a database session, the caller's tenant.

`Runtime` is what `create_app` builds once per process (settings, database, job store,
object store, queue); routes ask for the parts they use by type, e.g.
`def get_job(job_id: str, tenant: TenantId, jobs: Jobs)`."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ..common.broker import JobQueue
from ..common.jobs import JobStore
from ..common.models import ApiKey, Tenant
from ..common.settings import Settings
from ..common.storage import ObjectStore
from ..common.tenants import hash_key
from .watch import JobWatcher

DEFAULT_TENANT = "default"


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    jobs: JobStore
    store: ObjectStore
    queue: JobQueue
    watcher: JobWatcher  # waits on jobs without holding a thread


def runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def _session(rt: Annotated[Runtime, Depends(runtime)]) -> Iterator[Session]:
    with rt.sessions() as s:
        yield s


# the OpenAPI document's bearer scheme (the docs' Authorize button); the key is checked below,
# so a missing or malformed header reaches key_tenant and gets its own 401 message
BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="an API key: `Authorization: Bearer b4m_...` (when B4M_AUTH is on)",
)


def _tenant(
    request: Request,
    rt: Annotated[Runtime, Depends(runtime)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)] = None,
) -> str:
    """The caller's tenant: from `Authorization: Bearer <key>`, or the default tenant when auth is off.
    Its own short session: a request that then waits (a job, an event stream) holds no connection."""
    if (found := getattr(request.state, "tenant_id", None)) is not None:
        return found  # checked before the body was read (guards.RequestGuard)
    return key_tenant(rt, f"Bearer {credentials.credentials}" if credentials else None)


def key_tenant(rt: Runtime, authorization: str | None) -> str:
    """The tenant of an `Authorization` header (401 unless it holds a live key), or the default
    tenant when auth is off."""
    with rt.sessions() as s:
        if not rt.settings.auth:
            return default_tenant(s)
        if not authorization or not authorization.startswith("Bearer "):
            raise HTTPException(401, "missing API key (Authorization: Bearer <key>)")
        digest = hash_key(authorization[7:])
        for key in s.scalars(select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))):
            if hmac.compare_digest(key.key_hash, digest):
                return key.tenant_id
    raise HTTPException(401, "invalid API key")


def default_tenant(s: Session) -> str:
    """The one tenant of a server with auth off, made on first use (concurrent first
    requests may race to make it: the loser reads the winner's)."""
    query = select(Tenant.id).where(Tenant.name == DEFAULT_TENANT)
    if (found := s.scalar(query)) is not None:
        return found
    try:
        s.add(Tenant(name=DEFAULT_TENANT))
        s.commit()
    except IntegrityError:
        s.rollback()
    return s.scalar(query)


def _settings(request: Request) -> Settings:
    return runtime(request).settings


def _jobs(request: Request) -> JobStore:
    return runtime(request).jobs


def _store(request: Request) -> ObjectStore:
    return runtime(request).store


def _queue(request: Request) -> JobQueue:
    return runtime(request).queue


def _watcher(request: Request) -> JobWatcher:
    return runtime(request).watcher


RuntimeDep = Annotated[Runtime, Depends(runtime)]
AppSettings = Annotated[Settings, Depends(_settings)]
DbSession = Annotated[Session, Depends(_session)]
TenantId = Annotated[str, Depends(_tenant)]
Jobs = Annotated[JobStore, Depends(_jobs)]
Store = Annotated[ObjectStore, Depends(_store)]
Queue = Annotated[JobQueue, Depends(_queue)]
Watcher = Annotated[JobWatcher, Depends(_watcher)]
