"""The Celery app: Redis broker, job ids only, one job at a time per process.

Run one worker per GPU:
    celery -A services.worker.celery_app worker --pool=solo --concurrency=1 -Q training,generation
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery
from celery.signals import worker_init, worker_shutting_down

from b4m_contract.jobs import JOB_QUEUES, JobStatus, JobType

from ..common.broker import task_id
from ..common.settings import get_settings

settings = get_settings()
app = Celery("b4m", broker=settings.broker_url or "memory://")
app.conf.update(
    task_acks_late=True,  # a message is acknowledged only after the job ran: a killed worker's job is redelivered
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,  # never hold a second long job hostage behind the first
    task_default_queue="training",
    task_ignore_result=True,  # results live in the database
    broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@worker_init.connect
def _load_before_consuming(**_) -> None:
    """Import the model code and connect before the first message arrives, so a received
    job is claimed (`running`) at once: a message held for long by a worker whose job row
    still says `queued` would look lost to the reconciler."""
    from ..common.observability import GpuCollector, setup_logging

    if settings.log_json:
        setup_logging(json_logs=True)
    if settings.metrics_port:
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry()
        registry.register(GpuCollector())
        start_http_server(settings.metrics_port, registry=registry)
    context()


@worker_shutting_down.connect
def _hand_jobs_back(**_) -> None:
    """SIGTERM (warm shutdown): the running training checkpoints at its next step and goes back
    to the queue, so the worker stops in seconds instead of at the job's end."""
    from ..common.lifecycle import DRAINING

    DRAINING.set()


@lru_cache(maxsize=1)
def context():
    from .runner import WorkerContext

    return WorkerContext(get_settings())


@app.task(name="b4m.run_job")
def run_job_task(job_id: str) -> str:
    from .runner import run_job

    status = run_job(context(), job_id)
    if status == JobStatus.QUEUED:  # a retryable failure or an outage: try again after a pause
        delay = context().retry_in.pop(job_id, 5.0)
        run_job_task.apply_async(
            (job_id,), countdown=delay, queue=JOB_QUEUES[_job_type(job_id)], task_id=task_id(job_id)
        )
    return status


def _job_type(job_id: str) -> JobType:
    from ..common.models import Job

    with context().sessions() as s:
        job = s.get(Job, job_id)
        return JobType(job.type) if job else JobType.TRAIN_CONTENT
