"""What a worker does with a job id: a thin layer between the job row, storage and b4m_core.

One `WorkerContext` per process keeps each base model loaded once; adapters are
swapped, never base models reloaded. Progress, cancellation and checkpoints go through
the job row and the object store, so a redelivered job resumes where it stopped.
"""

from __future__ import annotations

import gc
import io
import logging
import random
import threading
import time
from dataclasses import dataclass, field

import torch
from sqlalchemy import select

from b4m_contract.jobs import AssetKind, JobStatus, JobType
from b4m_core.adapter import Adapter
from b4m_core.config import ConfigError
from b4m_core.data import Concept, open_image
from b4m_core.generation import GenerationRequest, Generator
from b4m_core.models import BaseModel, load_base
from b4m_core.training import Hooks, TrainingCanceled, TrainingPaused, fuse, train_concept

from ..common import deletions
from ..common.charts import loss_curve_png
from ..common.db import make_engine, session_factory
from ..common.jobs import ClaimLost, JobCanceled, JobResult, JobStore, NewAdapter, NotReady
from ..common.lifecycle import DRAINING
from ..common.models import Adapter as AdapterRow
from ..common.models import Asset, Fusion, Generation, Job, as_utc, new_id, utcnow
from ..common.observability import current_job
from ..common.queries import Training, describe_unready, owned, training_state
from ..common.settings import Settings
from ..common.storage import StorageUnavailable, object_key

log = logging.getLogger("b4m.worker")


@dataclass
class WorkerContext:
    settings: Settings
    bases: dict[str, BaseModel] = field(default_factory=dict)

    def __post_init__(self):
        self.engine = make_engine(self.settings.resolved_database_url)
        self.sessions = session_factory(self.engine)
        self.jobs = JobStore(self.sessions)
        self.store = self.settings.object_store()
        self.generators: dict[str, Generator] = {}
        self.retry_in: dict[str, float] = {}  # job id -> seconds to wait before its next try
        self.draining = threading.Event()  # this context is closing: hand the running job back

    def base(self, name: str) -> BaseModel:
        """Each base model loaded once; past `max_loaded_bases`, the least recently used goes."""
        if name in self.bases:
            self.bases[name] = self.bases.pop(name)  # now the most recently used
            return self.bases[name]
        while len(self.bases) >= self.settings.max_loaded_bases:
            old = next(iter(self.bases))
            del self.bases[old]
            self.generators.pop(old, None)
            gc.collect()  # the pipeline's tensors go now, and CUDA's cache gives the memory back
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.info("base model %s unloaded (max_loaded_bases=%d)", old, self.settings.max_loaded_bases)
        base = load_base(self.settings.base_model_source(name), device=self.settings.device)
        base.model_id = name  # adapters record the configured name, not where this worker found it
        self.bases[name] = base
        return base

    def training_base(self, name: str) -> BaseModel:
        """The base model as loaded, for a training job: the adapter a generation left merged
        into its weights (and its identifier hooks) comes off first, so a concept never trains
        on another adapter's weights (principal bases are read from these weights too)."""
        gen = self.generators.get(name)
        if gen is not None and gen.adapter is not None:
            gen.set_adapter(None)
        return self.base(name)

    def generator(self, name: str) -> Generator:
        if name not in self.generators:
            self.generators[name] = Generator(self.base(name))
        return self.generators[name]


def _concept(ctx: WorkerContext, asset: Asset) -> Concept:
    images, captions = [], []
    for ref in asset.images:
        images.append(open_image(io.BytesIO(ctx.store.get(ref.storage_key, expected_sha256=ref.sha256))))
        captions.append(ref.caption)
    return Concept(kind=asset.kind, images=images, captions=captions, word=asset.word, token=asset.token)


def _load_adapter(ctx: WorkerContext, session, adapter_id: str) -> Adapter:
    row = session.get(AdapterRow, adapter_id)
    if row is None:
        raise ConfigError(f"adapter {adapter_id} not found")
    return Adapter.from_bytes(ctx.store.get(row.storage_key, expected_sha256=row.sha256))


def _adapter_result(ctx: WorkerContext, attempt: Attempt, adapter: Adapter) -> JobResult:
    """Upload the adapter now; its row, and the asset or fusion pointing at it, are written
    by `JobStore.finish` in the transaction that marks the job succeeded."""
    job = attempt.job
    adapter_id = new_id()
    obj = _put_result(
        ctx,
        attempt,
        object_key(job.tenant_id, "adapters", adapter_id, "adapter.safetensors"),
        adapter.to_bytes(ctx.settings.adapter_dtype),
    )
    return JobResult(
        adapter=NewAdapter(
            id=adapter_id,
            kind=adapter.kind,
            method=adapter.method,
            storage_key=obj.key,
            sha256=obj.sha256,
            size=obj.size,
            meta=adapter.metadata(),
        )
    )


@dataclass
class Attempt:
    """One run of a job: its claim, the objects it uploaded (removed if it does not succeed)."""

    job: Job
    uploaded: list[str] = field(default_factory=list)
    lost: threading.Event = field(default_factory=threading.Event)
    resumed_from_step: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) of this attempt

    @property
    def token(self) -> str:
        return self.job.claim_token


def _hooks(ctx: WorkerContext, attempt: Attempt, preview_prompts: list[str] | None = None) -> Hooks:
    job = attempt.job
    ckpt_key = _checkpoint_key(job)

    def checkpoint(step: int, state: bytes) -> None:
        try:
            ctx.store.put(ckpt_key, state)
            ctx.jobs.set_checkpoint(job.id, ckpt_key, step)
        except Exception as exc:  # storage down: keep training; the next checkpoint or the end may succeed
            log.warning("job %s: checkpoint at step %d not saved: %s", job.id, step, exc)

    def should_stop() -> bool:
        if attempt.lost.is_set():  # another attempt holds the job: stop without touching it
            raise ClaimLost(f"job {job.id}: lease lost")
        return ctx.jobs.cancel_requested(job.id)

    resume = None
    if job.checkpoint_key and ctx.store.exists(job.checkpoint_key):
        resume = ctx.store.get(job.checkpoint_key)
        attempt.resumed_from_step = job.checkpoint_step
        log.info("job %s resumes from step %d (%s)", job.id, job.checkpoint_step, job.checkpoint_key)

    def progress(step: int, total: int, loss: float) -> None:
        attempt.losses.append((step, loss))
        ctx.jobs.progress(job.id, step, total, loss)

    drawn_at: dict[int, int] = {}  # previews made at each step (one per preview prompt)

    def preview(step: int, image) -> None:
        # keyed by step and prompt, not attempt: a resumed attempt keeps the earlier previews valid
        n = drawn_at[step] = drawn_at.get(step, -1) + 1
        try:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            obj = ctx.store.put(
                object_key(job.tenant_id, "jobs", job.id, f"preview-{step:06d}-{n}.png"),
                buf.getvalue(),
                content_type="image/png",
            )
            ctx.jobs.add_preview(job.id, attempt.token, obj.key)
        except Exception as exc:  # a preview is a nicety: never fail the training for one
            log.warning("job %s: preview at step %d not saved: %s", job.id, step, exc)

    def should_pause() -> bool:
        return DRAINING.is_set() or ctx.draining.is_set()

    return Hooks(
        progress=progress,
        should_cancel=should_stop,
        checkpoint=checkpoint,
        resume=resume,
        preview=preview,
        preview_every=ctx.settings.preview_every,
        preview_prompts=list(preview_prompts or []),
        should_pause=should_pause,
    )


def _train(ctx: WorkerContext, attempt: Attempt) -> JobResult:
    job = attempt.job
    with ctx.sessions() as s:
        asset = owned(s, Asset, job.tenant_id, job.target_id)
        concept = _concept(ctx, asset)
        aux = [
            _concept(ctx, a)
            for a in s.scalars(
                select(Asset).where(Asset.tenant_id == job.tenant_id, Asset.id.in_(asset.aux_asset_ids or []))
            ).all()
        ]
        settings = dict(asset.settings or {})
        base_name = asset.base_model
        base = ctx.training_base(base_name)  # its measured defaults fill what the request left out
        if not aux:  # MCP by default (aux_sets 0 turns it off)
            k = int(settings["aux_sets"]) if settings.get("aux_sets") is not None else base.default("aux_sets", 0)
            aux = [_concept(ctx, a) for a in _tenant_aux(s, asset, k)] or base.auxiliary_sets(
                asset.kind, k, seed=int(settings.get("seed", 0))
            )
    plp = base.plp_config(
        **{
            k: settings[k]
            for k in ("rank", "alpha", "rho", "basis_mode", "basis_scale", "basis_seed", "content_half", "targets")
            if k in settings
        }
    )
    cfg = base.train_config(  # what the request gave, else the base model's measured defaults
        "break",
        **{k: settings.get(k) for k in ("learning_rate", "aux_lr_factor", "routing", "batch_size")},
        steps=settings.get("steps"),
        train_token_embedding=settings.get("train_token_embedding"),
        token_learning_rate=settings.get("token_learning_rate"),
        seed=int(settings.get("seed", 0)),
        checkpoint_every=ctx.settings.checkpoint_every,
        **_memory_settings(ctx),
    )
    hooks = _hooks(ctx, attempt, settings.get("preview_prompts"))
    adapter = train_concept(base, concept, method="b4m", aux=aux, plp=plp, cfg=cfg, hooks=hooks)
    return _adapter_result(ctx, attempt, adapter)


def _memory_settings(ctx: WorkerContext) -> dict:
    """The worker's precision and checkpointing settings; None: the base model's defaults."""
    return {
        "mixed_precision": ctx.settings.mixed_precision,
        "gradient_checkpointing": ctx.settings.gradient_checkpointing,
    }


def _tenant_aux(s, asset: Asset, k: int) -> list[Asset]:
    """k of the tenant's trained assets of the other kind on the same base, newest first: new,
    token-bound concepts, as the paper's auxiliary sets are. [] when it has fewer than k
    (the base model's bank serves then)."""
    if k <= 0:
        return []
    other = AssetKind(asset.kind).other
    rows = s.scalars(
        select(Asset)
        .where(
            Asset.tenant_id == asset.tenant_id,
            Asset.kind == other,
            Asset.base_model == asset.base_model,
            Asset.adapter_id.is_not(None),
            Asset.id != asset.id,
        )
        .order_by(Asset.created_at.desc())
        .limit(k)
    ).all()
    return list(rows) if len(rows) == k else []


def _fuse(ctx: WorkerContext, attempt: Attempt) -> JobResult:
    job = attempt.job
    with ctx.sessions() as s:
        fusion = owned(s, Fusion, job.tenant_id, job.target_id)
        content, style = s.get(Asset, fusion.content_id), s.get(Asset, fusion.style_id)
        for asset in (content, style):
            state, training = training_state(s, asset)
            if state == Training.PENDING:
                raise NotReady(describe_unready(asset, training))
            if state == Training.FAILED:
                raise ConfigError(describe_unready(asset, training))
        ca, sa = _load_adapter(ctx, s, content.adapter_id), _load_adapter(ctx, s, style.adapter_id)
        cset, sset = _concept(ctx, content), _concept(ctx, style)
        steps, method, base_name = fusion.steps, fusion.method, content.base_model
        given = dict(fusion.settings or {})
    base = ctx.training_base(base_name)
    lr = given.get("learning_rate") or (1e-4 if method == "ziplora" else None)
    cfg = base.train_config(
        "break" if method == "joint" else "make",  # joint: one LoRA from scratch, a break stage's budget
        steps=steps,
        learning_rate=lr,
        seed=int(given.get("seed", 0)),
        checkpoint_every=ctx.settings.checkpoint_every,
        train_token_embedding=False,
        **_memory_settings(ctx),
    )
    fused = fuse(
        base,
        ca,
        sa,
        cset,
        sset,
        method=method,
        cfg=cfg,
        hooks=_hooks(ctx, attempt, given.get("preview_prompts")),
    )
    return _adapter_result(ctx, attempt, fused)


def _generate(ctx: WorkerContext, attempt: Attempt) -> JobResult:
    job = attempt.job
    with ctx.sessions() as s:
        g = owned(s, Generation, job.tenant_id, job.target_id)
        adapter_id, base_name = None, ctx.settings.base_model
        if g.fusion_id:
            f = s.get(Fusion, g.fusion_id)
            adapter_id, base_name = f.adapter_id, s.get(Asset, f.content_id).base_model
        elif g.content_id or g.style_id:
            a = s.get(Asset, g.content_id or g.style_id)
            adapter_id, base_name = a.adapter_id, a.base_model
        adapter = _load_adapter(ctx, s, adapter_id) if adapter_id else None
        req = GenerationRequest(
            prompt=g.prompt,
            negative_prompt=g.negative_prompt,
            seed=g.seed,
            steps=g.steps,
            guidance=g.guidance,
            width=g.width,
            height=g.height,
            num_images=g.num_images,
            scheduler=g.scheduler,
        )
        strength, halves = g.strength, {"content_scale": g.content_scale, "style_scale": g.style_scale}
    gen = ctx.generator(base_name)
    gen.set_adapter(adapter, fuse=True, strength=strength, **halves)
    images = gen.generate(req)
    out = []
    for i, im in enumerate(images):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        # keys unique to the attempt: a stale attempt's clean-up never removes another's images
        obj = _put_result(
            ctx,
            attempt,
            object_key(job.tenant_id, "images", job.target_id, f"{attempt.token[:8]}-{i}.png"),
            buf.getvalue(),
            content_type="image/png",
        )
        attempt.uploaded.append(obj.key)
        out.append({"key": obj.key, "sha256": obj.sha256})
    return JobResult(images=out)


HANDLERS = {
    JobType.TRAIN_CONTENT: _train,
    JobType.TRAIN_STYLE: _train,
    JobType.FUSE: _fuse,
    JobType.GENERATE: _generate,
}


def run_job(ctx: WorkerContext, job_id: str) -> str:
    """Run one attempt of a job; returns the job's status afterwards ("skipped": not ours to run).

    While it runs, a heartbeat thread renews the attempt's lease; if the lease is lost
    (this worker looked dead and another attempt took over), the attempt stops and
    leaves the job to the other one. Objects an attempt uploaded are removed unless its
    results commit."""
    lease = ctx.settings.job_lease_s
    job = ctx.jobs.start(job_id, lease_s=lease)
    if job is None:
        return "skipped"
    attempt = Attempt(job)
    done = threading.Event()
    job_context = current_job.set(job.id)  # JSON log lines of this attempt carry its job id

    def heartbeat() -> None:
        while not done.wait(lease / 3):
            try:
                if not ctx.jobs.heartbeat(job.id, attempt.token, lease):
                    attempt.lost.set()
                    return
            except Exception as exc:  # database hiccup: try again next beat
                log.warning("job %s: heartbeat failed: %s", job.id, exc)

    beat = threading.Thread(target=heartbeat, name=f"heartbeat-{job.id}", daemon=True)
    beat.start()
    started = time.perf_counter()
    log.info("%s attempt %d of %d started", job.type, job.attempts, job.max_attempts)
    try:
        result = HANDLERS[job.type](ctx, attempt)
        extra = {"resumed_from_step": attempt.resumed_from_step} if attempt.resumed_from_step else {}
        if attempt.losses:  # a picture of the training, served at GET /jobs/{id}/loss.png
            steps, losses = zip(*attempt.losses)
            png = loss_curve_png(list(steps), list(losses), f"{job.type} {job.id[:8]}")
            obj = _put_result(
                ctx,
                attempt,
                object_key(job.tenant_id, "jobs", job.id, f"loss-{attempt.token[:8]}.png"),
                png,
                content_type="image/png",
            )
            extra["loss_curve"] = obj.key
        result.outputs.update(extra)
        ctx.jobs.finish(job.id, attempt.token, result)  # also records the checkpoint for removal
        attempt.uploaded.clear()  # committed: they are the job's results now
        deletions.remove(ctx.sessions, ctx.store, [_checkpoint_key(job)])
        log.info("%s succeeded in %.1f s", job.type, time.perf_counter() - started)
        return JobStatus.SUCCEEDED
    except StorageUnavailable as exc:  # an outage is not the job's fault: no attempt spent, for a while
        waited = (utcnow() - as_utc(job.outage_since)).total_seconds() if job.outage_since else 0.0
        if waited > ctx.settings.outage_retry_s:
            return ctx.jobs.fail(
                job.id, f"the object store was unavailable for {waited:.0f} s: {exc}", retry=False, token=attempt.token
            )
        ctx.retry_in[job.id] = _backoff(ctx.settings, waited)
        log.warning("job %s: store unavailable, retrying in %.1f s: %s", job.id, ctx.retry_in[job.id], exc)
        return ctx.jobs.defer(job.id, attempt.token, outage=f"waiting for the object store: {exc}")
    except TrainingPaused as exc:  # the process is shutting down: back to the queue, no attempt spent
        log.info("job %s handed back at step %d (shutting down)", job.id, exc.step)
        ctx.retry_in[job.id] = 0.0
        return ctx.jobs.defer(job.id, attempt.token)
    except NotReady as exc:  # run it again later, without using an attempt
        log.info("job %s waits: %s", job.id, exc)
        return ctx.jobs.defer(job.id, attempt.token)
    except ClaimLost:
        log.warning("job %s: another attempt holds it; this one stops", job.id)
        return "lost"
    except (TrainingCanceled, JobCanceled):
        _drop_checkpoint(ctx, job)
        ctx.jobs.cancel(job.id, attempt.token)
        return JobStatus.CANCELED
    except ConfigError as exc:  # bad input: retrying cannot help
        _drop_checkpoint(ctx, job)
        return ctx.jobs.fail(job.id, str(exc), retry=False, token=attempt.token)
    except Exception as exc:  # infrastructure: retry while attempts remain (resuming from the checkpoint)
        log.exception("job %s failed", job.id)
        # a job that failed keeps its checkpoint: POST /jobs/{id}/retry resumes from it
        return ctx.jobs.fail(job.id, f"{type(exc).__name__}: {exc}", retry=True, token=attempt.token)
    finally:
        current_job.reset(job_context)
        done.set()
        # no orphan objects from an attempt that did not commit (the sweep retries a refused one)
        deletions.remove(ctx.sessions, ctx.store, attempt.uploaded, recorded=False)


def _backoff(settings: Settings, waited: float) -> float:
    """The next wait of an outage: grows with how long it has lasted (about doubling each
    time), between the first and the longest wait, with +-50% jitter so workers spread out."""
    base = min(max(settings.outage_backoff_s, waited), settings.outage_backoff_max_s)
    return base * random.uniform(0.5, 1.5)


def _put_result(ctx: WorkerContext, attempt: Attempt, key: str, data: bytes, content_type: str | None = None):
    """Upload what the attempt made, waiting out an unavailable store (with backoff, for up to
    `outage_retry_s`) instead of throwing the finished work away; the lease stays renewed."""
    started = time.monotonic()
    while True:
        try:
            obj = ctx.store.put(key, data, **({"content_type": content_type} if content_type else {}))
            attempt.uploaded.append(obj.key)
            return obj
        except StorageUnavailable as exc:
            waited = time.monotonic() - started
            if waited > ctx.settings.outage_retry_s or attempt.lost.is_set():
                raise
            delay = _backoff(ctx.settings, waited)
            log.warning("job %s: result not uploaded yet, retrying in %.1f s: %s", attempt.job.id, delay, exc)
            time.sleep(delay)


def _checkpoint_key(job: Job) -> str:
    return object_key(job.tenant_id, "checkpoints", job.id, "state.safetensors")


def _drop_checkpoint(ctx: WorkerContext, job: Job) -> None:
    deletions.remove(ctx.sessions, ctx.store, [_checkpoint_key(job)], recorded=False)
    ctx.jobs.set_checkpoint(job.id, None)
