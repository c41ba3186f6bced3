"""Queries the API and the worker share: rows a tenant owns, a target's latest job, pages,
whether an asset's training is done. Each takes an open session and filters on the tenant."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from b4m_contract.jobs import ACTIVE, AssetKind, JobStatus

from .models import Asset, Job

Row = TypeVar("Row")


def owned(s: Session, model: type[Row], tenant_id: str, row_id: str, **where) -> Row | None:
    """The row `row_id` of `model` if it belongs to the tenant (and matches `where`), else None."""
    q = select(model).where(model.id == row_id, model.tenant_id == tenant_id)
    for column, value in where.items():
        q = q.where(getattr(model, column) == value)
    return s.scalars(q).first()


def latest_job(s: Session, tenant_id: str, target_id: str) -> Job | None:
    """The newest job that works on `target_id` (an asset, fusion or generation)."""
    return s.scalars(
        select(Job).where(Job.tenant_id == tenant_id, Job.target_id == target_id).order_by(Job.created_at.desc())
    ).first()


@dataclass
class Page:
    items: list
    total: int
    limit: int
    offset: int

    def as_dict(self) -> dict:
        return {"items": self.items, "total": self.total, "limit": self.limit, "offset": self.offset}


def page(
    s: Session, tenant_id: str, model, q: Select, status: str | None, limit: int, offset: int, render: Callable
) -> Page:
    """One page of `q`, newest first, filtered in SQL by the status of each row's latest job;
    each row rendered as `render(row, latest_job)`."""
    if status:
        latest = (
            select(Job.status)
            .where(Job.tenant_id == tenant_id, Job.target_id == model.id)
            .order_by(Job.created_at.desc())
            .limit(1)
            .correlate(model)
            .scalar_subquery()
        )
        q = q.where(latest == status)
    total = s.scalar(select(func.count()).select_from(q.subquery()))
    rows = s.scalars(q.order_by(model.created_at.desc(), model.id).limit(limit).offset(offset)).all()
    return Page([render(r, latest_job(s, tenant_id, r.id)) for r in rows], int(total or 0), limit, offset)


class Training:
    """Where an asset's training stands, for a fusion that needs its adapter."""

    READY = "ready"  # it has an adapter
    PENDING = "pending"  # its latest training job is queued or running
    FAILED = "failed"  # no adapter, and no training on the way


def training_state(s: Session, asset: Asset) -> tuple[str, Job | None]:
    """(READY | PENDING | FAILED, the asset's latest training job)."""
    job = latest_job(s, asset.tenant_id, asset.id)
    if asset.adapter_id:
        return Training.READY, job
    if job is not None and job.status in ACTIVE:
        return Training.PENDING, job
    return Training.FAILED, job


def describe_unready(asset: Asset, job: Job | None) -> str:
    """Why an asset that is not READY has no adapter, in words."""
    kind = AssetKind(asset.kind)
    if job is not None and job.status in (JobStatus.FAILED, JobStatus.CANCELED):
        return f"{kind} {asset.id} has no adapter: its training job {job.id} ended {job.status}"
    if job is not None and job.status in ACTIVE:
        return f"{kind} {asset.id} is still training"
    return f"{kind} {asset.id} has no adapter: its training did not succeed"
