"""Request and response bodies of the REST API: every field described, with examples,
so the OpenAPI document is the reference scripts and the UI are written against. The
server answers with these models and the client parses them."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from .jobs import AssetKind, JobStatus, JobType

ID_EXAMPLE = "3f2a9c0d4b1e4f6a8c7d5e2b1a0f9e8d"


def text_problem(value: str) -> str | None:
    """Why a text cannot be stored (PostgreSQL refuses NUL bytes and lone surrogates), or None."""
    if "\x00" in value:
        return "contains a NUL byte"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (a lone surrogate)"
    return None


WebhookEventName = Literal["started", "succeeded", "failed", "canceled"]
# samplers by their A1111/ComfyUI names (b4m_core.config.SCHEDULERS maps each to its diffusers scheduler)
Scheduler = Literal[
    "default",
    "ddim",
    "ddpm",
    "pndm",
    "euler",
    "euler_a",
    "heun",
    "dpm2",
    "dpm2_a",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "dpmpp_2m_sde",
    "unipc",
    "deis",
]


class RequestBody(BaseModel):
    """A request body: finite numbers and storable text only (422 otherwise)."""

    model_config = ConfigDict(allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _storable_text(cls, data):
        if isinstance(data, dict):
            for name, value in data.items():
                texts = value if isinstance(value, list) else [value]
                for text in texts:
                    if isinstance(text, str) and (why := text_problem(text)):
                        raise ValueError(f"{name} {why}")
        return data


class ErrorOut(BaseModel):
    """Every 4xx and 5xx answer has this body."""

    detail: str | list = Field(
        description="what was wrong, in words (a list of field errors for 422 validation failures)",
        examples=["content 3f2a... not found"],
    )


class Accepted(BaseModel):
    """The answer to every POST that starts work (202)."""

    id: str = Field(description="the created resource (asset, fusion or generation)", examples=[ID_EXAMPLE])
    job_id: str = Field(description="the job doing the work: poll GET /jobs/{job_id}", examples=[ID_EXAMPLE])
    status: JobStatus = Field(description="the job's status when answering", examples=["queued"])


class WebhookOut(BaseModel):
    url: str = Field(description="where the event is POSTed")
    status: Literal["pending", "delivered", "failed"] = Field(
        description="pending until the job ends and a delivery succeeds; failed after the last retry"
    )
    attempts: int = Field(description="deliveries tried")
    error: str | None = Field(None, description="why the last delivery failed")


class JobOut(BaseModel):
    id: str = Field(examples=[ID_EXAMPLE])
    type: JobType = Field(description="what the job does")
    target_id: str = Field(description="the asset, fusion or generation the job works on")
    status: JobStatus = Field(description="queued -> running -> succeeded | failed | canceled")
    progress_step: int = Field(description="steps done", examples=[120])
    progress_total: int = Field(description="steps in all (0 until the worker starts)", examples=[300])
    loss: float | None = Field(None, description="last training loss (training jobs)")
    eta_seconds: float | None = Field(None, description="estimated seconds left, from the speed so far")
    attempts: int = Field(
        description="attempts spent: runs that crashed or are running (outages, hand-backs "
        "and lost workers do not count)"
    )
    worker_losses: int = Field(0, description="times the worker running this job died (counted apart)")
    error: str | None = Field(None, description="why the job failed")
    outputs: dict = Field(description="what the job made, e.g. {'adapter_id': ...} or {'images': n}")
    previews: list[str] = Field(
        [],
        description="URLs of preview images drawn with the adapter as it trains "
        "(every B4M_PREVIEW_EVERY steps), oldest first",
    )
    webhook: WebhookOut | None = Field(None, description="delivery of the job's webhook, when it has one")
    created_at: str = Field(description="ISO 8601, UTC")
    started_at: str | None = None
    finished_at: str | None = None


class JobList(BaseModel):
    items: list[JobOut]
    total: int = Field(description="matching rows before paging")
    limit: int
    offset: int


class AssetOut(BaseModel):
    id: str = Field(examples=[ID_EXAMPLE])
    kind: AssetKind
    name: str = Field(examples=["hexagon"])
    word: str = Field(description="class word (content) or style word (style)", examples=["shape"])
    token: str = Field(description="identifier token the prompt's {content} / {style} expands to", examples=["hkx"])
    base_model: str = Field(description="base model the adapter is trained on", examples=["micro"])
    adapter_id: str | None = Field(None, description="the trained adapter, once the job succeeded")
    images: int = Field(description="number of reference images")
    captions: list[str | None] = Field(
        default_factory=list, description="each image's caption as uploaded (null: captioned automatically)"
    )
    status: JobStatus | None = Field(None, description="status of its latest training job")
    job_id: str | None = Field(None, description="its latest training job")
    created_at: str


class AssetList(BaseModel):
    items: list[AssetOut]
    total: int = Field(description="matching rows before paging")
    limit: int
    offset: int


class FusionIn(RequestBody):
    content_id: str = Field(min_length=1, max_length=64, description="a trained content asset", examples=[ID_EXAMPLE])
    style_id: str = Field(min_length=1, max_length=64, description="a trained style asset", examples=[ID_EXAMPLE])
    steps: int = Field(50, ge=0, le=5000, description="make-stage fine-tuning steps (0: the bare composition)")
    learning_rate: float | None = Field(
        None,
        gt=0,
        le=1,
        description="make-stage learning rate (default: the base model's, 5e-3 on micro; ZipLoRA 1e-4)",
    )
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="training seed (default 0)")
    preview_prompts: list[Annotated[str, StringConstraints(min_length=1, max_length=500)]] = Field(
        [],
        max_length=4,
        description="what the training previews draw, `{content}` / `{style}` for the pair (default: one prompt)",
    )
    method: Literal["b4m", "joint", "merge", "ziplora"] = Field(
        "b4m", description="b4m (compose the two PLP halves, fine-tune); the paper's baselines for comparison"
    )
    webhook_url: str | None = Field(
        None,
        min_length=1,
        max_length=2000,
        description="POSTed a signed JSON event when the job ends (retried with backoff)",
    )
    webhook_events: list[WebhookEventName] | None = Field(
        None, description="which events to POST (default: succeeded, failed, canceled); `started` adds job.started"
    )


class FusionOut(BaseModel):
    id: str = Field(examples=[ID_EXAMPLE])
    content_id: str
    style_id: str
    steps: int
    method: str
    adapter_id: str | None = Field(None, description="the fused adapter, once the job succeeded")
    status: JobStatus | None = Field(None, description="status of its latest job")
    job_id: str | None = None
    created_at: str


class FusionList(BaseModel):
    items: list[FusionOut]
    total: int
    limit: int
    offset: int


class GenerateIn(RequestBody):
    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "fusion_id": ID_EXAMPLE,
                    "prompt": "a large {content} in {style} style on a blue background",
                    "seed": 1,
                    "steps": 20,
                    "guidance": 5.0,
                    "num_images": 2,
                    "wait": 30,
                }
            ]
        }
    }

    fusion_id: str | None = Field(None, min_length=1, max_length=64, description="draw with this fusion's adapter")
    content_id: str | None = Field(None, min_length=1, max_length=64, description="or with a content's adapter alone")
    style_id: str | None = Field(
        None, min_length=1, max_length=64, description="or with a style's adapter alone (none of the three: base model)"
    )
    prompt: str = Field(
        min_length=1,
        max_length=1000,
        examples=["a {content} in {style} style"],
        description="{content} and {style} expand to the adapter's token and word",
    )
    negative_prompt: str | None = Field(None, max_length=1000)
    seed: int = Field(0, ge=0, le=2**31 - 1, description="image i uses seed + i")
    steps: int = Field(20, ge=1, le=200, description="sampling steps")
    guidance: float = Field(5.0, ge=0.0, le=30.0, description="classifier-free guidance scale")
    strength: float = Field(
        1.0, ge=0.0, le=2.0, description="scale of the adapter's update (a LoRA weight): 0 = the base model alone"
    )
    content_scale: float = Field(
        1.0,
        ge=0.0,
        le=2.0,
        description="a B4M adapter's content half scaled alone (0 = no content), on top of `strength`",
    )
    style_scale: float = Field(
        1.0,
        ge=0.0,
        le=2.0,
        description="a B4M adapter's style half scaled alone (0 = no style), on top of `strength`",
    )
    scheduler: Scheduler = Field(
        "default",
        description="the sampler, by its A1111/ComfyUI name (a diffusers scheduler); default: the model's own",
    )
    width: int | None = Field(None, ge=8, le=2048, multiple_of=8, description="pixels (default: the model's)")
    height: int | None = Field(None, ge=8, le=2048, multiple_of=8, description="pixels (default: the model's)")
    num_images: int = Field(1, ge=1, le=8)
    wait: float = Field(
        0.0,
        ge=0.0,
        le=300.0,
        description="seconds to wait for the images: 200 with them if the job ends in time, else 202",
    )
    webhook_url: str | None = Field(
        None,
        min_length=1,
        max_length=2000,
        description="POSTed a signed JSON event when the job ends (retried with backoff)",
    )
    webhook_events: list[WebhookEventName] | None = Field(
        None, description="which events to POST (default: succeeded, failed, canceled); `started` adds job.started"
    )


class GenerateDone(Accepted):
    """200 answer of POST /generate when `wait` was long enough."""

    images: list[str] = Field(description="image URLs", examples=[["/generations/3f2a.../images/0"]])


class GenerationOut(BaseModel):
    id: str = Field(examples=[ID_EXAMPLE])
    fusion_id: str | None
    content_id: str | None
    style_id: str | None
    prompt: str
    negative_prompt: str | None
    seed: int
    steps: int
    guidance: float
    strength: float = Field(1.0, description="scale of the adapter's update it was drawn with")
    content_scale: float = Field(1.0, description="scale of the content half it was drawn with")
    style_scale: float = Field(1.0, description="scale of the style half it was drawn with")
    scheduler: str = Field("default", description="the sampler it was drawn with")
    width: int | None
    height: int | None
    num_images: int
    images: list[str] = Field(description="image URLs, once the job succeeded")
    status: JobStatus | None = None
    job_id: str | None = None
    created_at: str


class GenerationList(BaseModel):
    items: list[GenerationOut]
    total: int
    limit: int
    offset: int


class BaseModelOut(BaseModel):
    name: str = Field(description="what `base_model` in an upload names")
    source: str = Field(description="where workers load it from: a local diffusers folder or a hub id")
    default: bool = Field(description="used by uploads that name none")
    arch: str | None = Field(description="sd1, sd2, sdxl or micro; null when its files are not on the API's machine")
    defaults: dict = Field(
        description="training settings a run gets where the request names none: the architecture's, "
        "under the model's own b4m_defaults.json"
    )


class BaseModelList(BaseModel):
    items: list[BaseModelOut]


class WebhookSecretOut(BaseModel):
    secret: str = Field(
        description="this tenant's signing key: verify `webhook-signature` = v1,base64(HMAC-SHA256("
        "key, webhook-id + '.' + webhook-timestamp + '.' + body)); key = base64 after "
        "'whsec_'",
        examples=["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
    )


class ReadyOut(BaseModel):
    status: Literal["ok", "unavailable"] = Field(description="ok when every dependency answers")
    checks: dict[str, str] = Field(
        description="database, storage, broker: 'ok' or the error",
        examples=[{"database": "ok", "storage": "ok", "broker": "ok"}],
    )


class WebhookEvent(BaseModel):
    """The body POSTed to a job's `webhook_url`."""

    type: str = Field(
        description="job.started, job.succeeded, job.failed or job.canceled (see `webhook_events`)",
        examples=["job.succeeded"],
    )
    job_id: str = Field(examples=[ID_EXAMPLE])
    data: JobOut = Field(description="the job as GET /jobs/{id} shows it")
