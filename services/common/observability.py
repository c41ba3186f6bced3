"""Prometheus metrics and structured JSON logs, shared by the API and the worker.

Metrics are read at scrape time from the database (jobs by state, durations of recent
jobs) and from the broker (queue depth), so every API replica reports the same numbers
and nothing is lost when a process restarts. GPU memory comes from the process that
holds the GPU (a worker with `B4M_METRICS_PORT`, or the embedded API).
JSON logs carry the id of the job being run (a context variable the runner sets).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Callable
from datetime import timedelta

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import func, select

from .models import Job, ObjectDeletion, utcnow

current_job: contextvars.ContextVar[str | None] = contextvars.ContextVar("b4m_job_id", default=None)
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)


class JobCollector:
    """b4m_jobs{state,type}, b4m_job_duration_seconds{type} (jobs finished in the last hour),
    b4m_queue_depth{queue}."""

    def __init__(self, sessions, queue_depths: Callable[[], dict[str, int]]):
        self.sessions, self.queue_depths = sessions, queue_depths

    def collect(self):
        jobs = GaugeMetricFamily("b4m_jobs", "jobs by state and type", labels=["state", "type"])
        since = utcnow() - timedelta(hours=1)
        with self.sessions() as s:
            for state, type_, n in s.execute(select(Job.status, Job.type, func.count()).group_by(Job.status, Job.type)):
                jobs.add_metric([state, type_], n)
            finished = s.execute(
                select(Job.type, Job.started_at, Job.finished_at).where(
                    Job.finished_at >= since, Job.started_at.is_not(None)
                )
            ).all()
        yield jobs
        hist = HistogramMetricFamily(
            "b4m_job_duration_seconds", "start to end of the jobs that ended in the last hour", labels=["type"]
        )
        by_type: dict[str, list[float]] = {}
        for type_, started, ended in finished:
            by_type.setdefault(type_, []).append((ended - started).total_seconds())
        for type_, values in sorted(by_type.items()):
            buckets = [(str(b), sum(v <= b for v in values)) for b in DURATION_BUCKETS] + [("+Inf", len(values))]
            hist.add_metric([type_], buckets, sum_value=sum(values))
        yield hist
        with self.sessions() as s:
            pending = s.scalar(select(func.count()).select_from(ObjectDeletion))
        yield GaugeMetricFamily(
            "b4m_object_deletions_pending", "objects recorded for removal, not yet removed", value=pending or 0
        )
        depth = GaugeMetricFamily("b4m_queue_depth", "messages waiting in each queue", labels=["queue"])
        try:
            for name, n in sorted(self.queue_depths().items()):
                depth.add_metric([name], n)
        except Exception:  # broker down: no sample rather than a failed scrape
            pass
        yield depth


class GpuCollector:
    """b4m_gpu_memory_bytes{device,kind}: allocated and reserved by this process, where torch
    is loaded and a CUDA device exists."""

    def collect(self):
        g = GaugeMetricFamily("b4m_gpu_memory_bytes", "CUDA memory of this process", labels=["device", "kind"])
        torch = sys.modules.get("torch")  # never import torch just to say there is no GPU
        if torch is not None and torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                g.add_metric([str(i), "allocated"], torch.cuda.memory_allocated(i))
                g.add_metric([str(i), "reserved"], torch.cuda.memory_reserved(i))
                g.add_metric([str(i), "total"], torch.cuda.get_device_properties(i).total_memory)
        yield g


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter(
            "b4m_http_requests", "HTTP requests by route and status", ["method", "route", "status"], registry=registry
        )
        self.latency = Histogram(
            "b4m_http_request_seconds",
            "HTTP request latency by route",
            ["method", "route"],
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 30),
        )

    def observe(self, method: str, route: str, status: int, started: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(time.perf_counter() - started)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, job_id (when a job is running)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        job_id = getattr(record, "job_id", None) or current_job.get()
        if job_id:
            out["job_id"] = job_id
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(json_logs: bool, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if json_logs else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
