"""Service settings, read from `B4M_*` environment variables (pydantic-settings).

With no variables at all, everything runs embedded on one machine: SQLite, a local
folder as object store, an in-process queue and the shipped micro model. Setting the
database URL, broker URL and S3 variables turns the same code into the production stack.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from .storage import ObjectStore


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="B4M_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("b4m-data"), description="embedded mode: SQLite file and local object store")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite in data_dir")
    broker_url: str | None = Field(None, description="Celery broker (redis://...); default: in-process queue")
    storage: Literal["local", "s3"] = Field("local", description="object store backend")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto); None: AWS")
    s3_bucket: str = Field("b4m", description="bucket for adapters and images")
    s3_public_endpoint_url: str | None = Field(
        None, description="where clients reach the store, for presigned URLs (default: s3_endpoint_url)"
    )
    s3_region: str = "us-east-1"
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    base_model: str = Field("micro", description="default base model for new assets")
    base_models: str | None = Field(
        None,
        description="comma-separated base models a request may name, each NAME=SOURCE (a local diffusers "
        "folder or a hub id in the local cache) or a SOURCE alone (named by itself); default: base_model and micro",
    )
    mixed_precision: Literal["no", "auto", "fp16", "bf16"] | None = Field(
        None, description="worker: training autocast on CUDA (default: the base model's: auto for SD and SDXL)"
    )
    gradient_checkpointing: bool | None = Field(
        None, description="worker: gradient checkpointing (default: the base model's: on for SDXL)"
    )
    adapter_dtype: Literal["fp32", "fp16"] = Field(
        "fp32", description="worker: tensor type of stored adapter files (fp16: half the size and transfer)"
    )
    max_loaded_bases: int = Field(2, ge=1, description="worker: base models kept loaded (least recently used go)")
    device: str | None = Field(None, description="cpu, cuda, cuda:1; default: cuda if available")
    auth: bool = Field(False, description="require API keys (production); embedded mode has one default tenant")
    max_upload_bytes: int = Field(10 * 2**20, description="per reference image")
    max_image_pixels: int = Field(4096 * 4096, description="decompression-bomb guard")
    max_request_bytes: int | None = Field(
        None, description="a request body's cap (413 before it is read); default: 10 images and 1 MiB"
    )
    job_max_attempts: int = Field(3, description="crashes of a job itself before it fails (outages do not count)")
    max_worker_losses: int = Field(
        5, ge=1, description="a job whose worker dies this many times (OOM, node loss) ends failed"
    )
    outage_retry_s: float = Field(
        900.0, gt=0, description="how long a job waits out an unavailable store (retrying with backoff) before it fails"
    )
    outage_backoff_s: float = Field(5.0, gt=0, description="first wait after an outage error; grows, with jitter")
    outage_backoff_max_s: float = Field(120.0, gt=0, description="longest wait between outage retries")
    checkpoint_every: int = Field(50, description="training steps between checkpoints to storage")
    visibility_timeout_s: int = Field(6 * 3600, description="Redis redelivery timeout: above the longest job")
    job_lease_s: float = Field(60.0, gt=0, description="a running job's lease; its worker renews it every third")
    job_deadline_s: int = Field(6 * 3600, description="a job running or queued longer than this ends failed")
    reconcile_every_s: float = Field(15.0, description="how often the reconciler sweeps (0: never, in this process)")
    log_json: bool = Field(False, description="JSON log lines carrying job ids (production)")
    metrics_port: int | None = Field(
        None, description="serve Prometheus metrics on this port too (worker: GPU memory; API: everything), no key"
    )
    metrics_token: str | None = Field(
        None, description="with auth on, GET /metrics on the API's port needs `Authorization: Bearer <this>`"
    )
    webhook_allow_private: bool = Field(
        False,
        description="let webhook URLs reach private/loopback addresses "
        "(off: a tenant cannot aim the service at its own network)",
    )
    webhook_max_attempts: int = Field(8, ge=1, description="deliveries tried before a webhook is marked failed")
    webhook_backoff_s: float = Field(5.0, gt=0, description="wait after the first failed delivery; doubles each time")
    webhook_timeout_s: float = Field(10.0, gt=0, description="seconds a receiver has to answer")
    webhook_poll_s: float = Field(1.0, gt=0, description="how often the API looks for webhooks to send")
    preview_every: int = Field(50, ge=0, description="training: a preview image every N steps (0: none)")
    ready_timeout_s: float = Field(2.0, gt=0, description="/readyz: how long each dependency has to answer")
    orphan_grace_s: float = Field(
        3600.0, gt=0, description="an object no row points at is removed once it is this old (the reconciler)"
    )
    orphan_sweep_every_s: float = Field(3600.0, gt=0, description="how often the reconciler looks for orphans")
    requeue_grace_s: float = Field(30.0, description="a queued job missing from the broker this long is re-sent")

    def base_model_table(self) -> dict[str, str]:
        """name -> source (a local folder, normalised, or a hub id) of every base model requests
        may name: `base_models`' entries, else `base_model` and micro."""
        table: dict[str, str] = {}
        for entry in (self.base_models or "").split(","):
            if not entry.strip():
                continue
            name, sep, source = entry.partition("=")
            source = normalize_base_model(source if sep else name)
            table[name.strip() if sep else source] = source
        if not table:
            default = normalize_base_model(self.base_model)
            table = {default: default, "micro": "micro"}
        return table

    def allowed_base_model(self, name: str) -> str | None:
        """`name` as stored if requests may name it (a configured name, or the source of one:
        paths normalised, `/m//` and `/m/./` are `/m`), else None. A worker loads each distinct
        model: an open list would let any tenant fill its memory, and its errors would tell
        which paths exist on it."""
        table = self.base_model_table()
        normal = normalize_base_model(name)
        if normal in table:
            return normal
        return next((n for n, source in table.items() if source == normal), None)

    def allowed_base_models(self) -> list[str]:
        return sorted(self.base_model_table())

    def base_model_source(self, name: str) -> str:
        """Where the worker loads the base model stored as `name` from."""
        return self.base_model_table().get(name, name)

    @property
    def request_byte_cap(self) -> int:
        return self.max_request_bytes or 10 * self.max_upload_bytes + 2**20

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{(self.data_dir / 'b4m.db').resolve()}"

    def object_store(self) -> ObjectStore:
        from .storage import LocalStore, S3Store

        if self.storage == "s3":
            return S3Store(
                self.s3_bucket,
                endpoint_url=self.s3_endpoint_url,
                region=self.s3_region,
                access_key=self.s3_access_key,
                secret_key=self.s3_secret_key,
                public_endpoint_url=self.s3_public_endpoint_url,
            )
        return LocalStore(self.data_dir / "objects")


def normalize_base_model(name: str) -> str:
    """One spelling per model: local paths normalised, hub ids and names as given."""
    name = name.strip()
    if name.startswith(("/", ".", "~")) or os.path.exists(name):
        return os.path.normpath(os.path.expanduser(name))
    return name


@lru_cache
def get_settings() -> Settings:
    return Settings()
