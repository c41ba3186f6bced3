"""Database models: the source of truth for every asset, adapter and job.

SQLAlchemy 2.0 declarative models, portable between PostgreSQL (production) and SQLite
(the embedded default). The schema is created by the Alembic migrations in
`migrations/`, never by `create_all`. Every row that belongs to a tenant carries
`tenant_id`, and every query in the service filters on it.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from b4m_contract.jobs import JobStatus


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(dt: datetime | None) -> datetime | None:
    """Every stored time is UTC; SQLite hands them back without their offset: put it back
    (a naive time read as local time is hours off under a non-UTC TZ)."""
    return dt if dt is None or dt.tzinfo is not None else dt.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict: JSON, list: JSON}


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # signs this tenant's webhooks (HMAC-SHA256); made on first use, so tenants can't forge each other's
    webhook_secret: Mapped[str | None] = mapped_column(String(100), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    """An API key, stored as its sha256 only; `prefix` lets an operator tell keys apart."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Asset(Base):
    """A content or a style: its reference images and the adapter its training made."""

    __tablename__ = "assets"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200))
    word: Mapped[str] = mapped_column(String(100))  # class word (content) or style word (style)
    token: Mapped[str] = mapped_column(String(50))
    base_model: Mapped[str] = mapped_column(String(500))
    settings: Mapped[dict] = mapped_column(JSON, default=dict)
    aux_asset_ids: Mapped[list] = mapped_column(JSON, default=list)
    adapter_id: Mapped[str | None] = mapped_column(ForeignKey("adapters.id", ondelete="SET NULL"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    images: Mapped[list[ReferenceImage]] = relationship(
        back_populates="asset", cascade="all, delete-orphan", order_by="ReferenceImage.position"
    )
    __table_args__ = (Index("ix_assets_tenant_kind", "tenant_id", "kind"),)


class ReferenceImage(Base):
    __tablename__ = "reference_images"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    asset_id: Mapped[str] = mapped_column(ForeignKey("assets.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    storage_key: Mapped[str] = mapped_column(String(500))
    sha256: Mapped[str] = mapped_column(String(64))
    content_type: Mapped[str] = mapped_column(String(50))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    caption: Mapped[str | None] = mapped_column(Text, nullable=True)
    asset: Mapped[Asset] = relationship(back_populates="images")


class Adapter(Base):
    """A trained adapter file in object storage (our safetensors format)."""

    __tablename__ = "adapters"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # content | style | fused
    method: Mapped[str] = mapped_column(String(16))
    storage_key: Mapped[str] = mapped_column(String(500))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Fusion(Base):
    __tablename__ = "fusions"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    content_id: Mapped[str] = mapped_column(ForeignKey("assets.id", ondelete="RESTRICT"), index=True)
    style_id: Mapped[str] = mapped_column(ForeignKey("assets.id", ondelete="RESTRICT"), index=True)
    method: Mapped[str] = mapped_column(String(16), default="b4m")
    steps: Mapped[int] = mapped_column(Integer, default=50)
    settings: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # learning_rate, seed when given
    adapter_id: Mapped[str | None] = mapped_column(ForeignKey("adapters.id", ondelete="SET NULL"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Generation(Base):
    __tablename__ = "generations"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    fusion_id: Mapped[str | None] = mapped_column(ForeignKey("fusions.id", ondelete="SET NULL"), nullable=True)
    content_id: Mapped[str | None] = mapped_column(ForeignKey("assets.id", ondelete="SET NULL"), nullable=True)
    style_id: Mapped[str | None] = mapped_column(ForeignKey("assets.id", ondelete="SET NULL"), nullable=True)
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str | None] = mapped_column(Text, nullable=True)
    seed: Mapped[int] = mapped_column(Integer, default=0)
    steps: Mapped[int] = mapped_column(Integer, default=20)
    guidance: Mapped[float] = mapped_column(Float, default=5.0)
    strength: Mapped[float] = mapped_column(Float, default=1.0, server_default="1.0")
    content_scale: Mapped[float] = mapped_column(Float, default=1.0, server_default="1.0")
    style_scale: Mapped[float] = mapped_column(Float, default=1.0, server_default="1.0")
    scheduler: Mapped[str] = mapped_column(String(32), default="default", server_default="default")
    width: Mapped[int | None] = mapped_column(Integer, nullable=True)
    height: Mapped[int | None] = mapped_column(Integer, nullable=True)
    num_images: Mapped[int] = mapped_column(Integer, default=1)
    images: Mapped[list] = mapped_column(JSON, default=list)  # [{"key": ..., "sha256": ...}]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ObjectDeletion(Base):
    """An object to remove from the store: written in the transaction that drops the rows
    pointing at it (or when a clean-up failed), removed once the object is gone. The
    reconciler retries what the store refused, so no object is orphaned by an outage."""

    __tablename__ = "object_deletions"
    key: Mapped[str] = mapped_column(String(500), primary_key=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WebhookDelivery(Base):
    """One event of a job to POST to its webhook URL: retried with backoff until delivered or
    out of attempts. Its id is the message's `webhook-id` (the same on every retry)."""

    __tablename__ = "webhook_deliveries"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(String(32))  # job.started | job.succeeded | job.failed | job.canceled
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending|delivered|failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    __table_args__ = (
        UniqueConstraint("job_id", "event", name="uq_webhook_deliveries_job_event"),
        Index("ix_webhook_deliveries_due", "status", "next_at"),
    )


class Job(Base):
    """One unit of queued work. The queue carries only `id`; this row is the truth."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[str] = mapped_column(String(32), index=True)  # asset, fusion or generation id
    queue: Mapped[str] = mapped_column(String(32), default="training")
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value, index=True)
    progress_step: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    checkpoint_key: Mapped[str | None] = mapped_column(String(500), nullable=True)
    checkpoint_step: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # set while the job waits out an unavailable store (retries that spend no attempt)
    outage_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # attempts whose worker died (lease ran out): counted apart, they spend no attempt
    worker_losses: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # the attempt that holds the job: a token and a lease its worker renews (heartbeat);
    # a job whose lease ran out lost its worker, and the reconciler queues it again
    claim_token: Mapped[str | None] = mapped_column(String(32), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    outputs: Mapped[dict] = mapped_column(JSON, default=dict)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # webhooks: the dispatcher derives each wanted event from the job's state (started_at,
    # a terminal status) into `webhook_deliveries`, so no transition can forget one.
    # `webhook_status` is pending while events remain, then the end event's outcome
    # (delivered|failed|skipped: its event not wanted); attempts and error mirror that delivery.
    webhook_url: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    webhook_events: Mapped[list | None] = mapped_column(JSON, nullable=True)  # None: the end events
    webhook_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    webhook_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency"),
        Index("ix_jobs_tenant_status", "tenant_id", "status"),
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
        Index("ix_jobs_webhook_status", "webhook_status"),
    )
