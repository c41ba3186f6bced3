"""How a job id travels to a worker: the `JobQueue` interface, the Celery publisher on the
Redis broker, and what the broker holds, read directly (which job ids have a message waiting).

The queue carries only job ids, named in each message's task id (`<job id>.<nonce>`),
so the reconciler can tell a queued job whose message is waiting from one whose
message was lost (Redis restarted empty, a publish that failed after the row committed).
The embedded server's in-process queue (`services/embedded.py`) has the same interface.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Protocol

from b4m_contract.jobs import JOB_QUEUES, JobType

from .settings import Settings

UNACKED, UNACKED_INDEX = "unacked", "unacked_index"  # kombu's Redis transport keys
PRIORITY_SEP = "\x06\x16"  # kombu names priority sub-queues "<queue>\x06\x16<n>"


def task_id(job_id: str) -> str:
    return f"{job_id}.{uuid.uuid4().hex[:8]}"


def job_id_of(task_id_: str | None) -> str | None:
    return task_id_.split(".", 1)[0] if task_id_ else None


def _message_job_id(raw: bytes) -> str | None:
    try:
        return job_id_of(json.loads(raw).get("headers", {}).get("id"))
    except (ValueError, AttributeError):
        return None


def redis_job_ids(broker_url: str, queues: list[str], fresh_unacked_s: float) -> set[str]:
    """Job ids with a message waiting in `queues`, or delivered to a worker within the last
    `fresh_unacked_s` seconds and not yet acknowledged (a running or just-reserved job).

    An older unacknowledged message belongs to a worker that died or holds it for hours;
    it comes back only after the visibility timeout, so it does not count as waiting."""
    import redis

    r = redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        ids: set[str] = set()
        for q in queues:
            keys = [q] + [k.decode() for k in r.scan_iter(match=f"{q}{PRIORITY_SEP}*")]
            for key in keys:
                ids.update(filter(None, (_message_job_id(m) for m in r.lrange(key, 0, -1))))
        cutoff = time.time() - fresh_unacked_s
        for tag, _delivered in r.zrangebyscore(UNACKED_INDEX, cutoff, "+inf", withscores=True):
            raw = r.hget(UNACKED, tag)
            if raw:
                try:
                    ids.add(_message_job_id(json.dumps(json.loads(raw)[0]).encode()) or "")
                except (ValueError, IndexError, TypeError):
                    pass
        ids.discard("")
        return ids
    finally:
        r.close()


class JobQueue(Protocol):
    """Hands job ids to workers. The database row is the job's truth; a lost message is
    re-sent by the reconciler, a duplicated one is harmless (a job is claimed once)."""

    def enqueue(self, job_id: str, job_type: JobType) -> None: ...
    def depths(self) -> dict[str, int]: ...  # messages waiting per queue (metrics)
    def waiting_ids(self) -> set[str]: ...  # job ids with a message waiting or just delivered
    def check(self) -> None: ...  # raises when the queue cannot take jobs (readiness)
    def close(self) -> None: ...


class CeleryQueue:
    """Publishes job ids to the Redis broker, one Celery queue per kind of work."""

    def __init__(self, settings: Settings):
        from celery import Celery

        self.settings = settings
        self.app = Celery("b4m-api", broker=settings.broker_url)
        self.app.conf.broker_connection_retry_on_startup = True
        # a publish while Redis is down fails fast; the reconciler sends the job later
        self.app.conf.broker_transport_options = {"socket_timeout": 5, "socket_connect_timeout": 5}
        self.app.conf.task_publish_retry_policy = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5}

    @property
    def queues(self) -> list[str]:
        return sorted(set(JOB_QUEUES.values()))

    def enqueue(self, job_id: str, job_type: JobType) -> None:
        self.app.send_task("b4m.run_job", args=[job_id], queue=JOB_QUEUES[job_type], task_id=task_id(job_id))

    def depths(self) -> dict[str, int]:
        import redis

        r = redis.Redis.from_url(self.settings.broker_url, socket_timeout=2, socket_connect_timeout=2)
        try:
            return {q: int(r.llen(q)) for q in self.queues}
        finally:
            r.close()

    def waiting_ids(self) -> set[str]:
        return redis_job_ids(self.settings.broker_url, self.queues, fresh_unacked_s=self.settings.requeue_grace_s)

    def check(self) -> None:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)

    def close(self) -> None:
        pass
