"""How the API hands a job id to a worker.

`CeleryQueue` publishes to the Redis broker (production). `InProcessQueue` runs jobs on
a background thread of the API process itself (the embedded default: no Redis, one
machine); it uses the same `run_job` as a Celery worker.
"""

from __future__ import annotations

import logging
import queue
import threading

from ..common.broker import redis_job_ids, task_id
from ..common.jobs import JOB_QUEUES
from ..common.settings import Settings

log = logging.getLogger("b4m.queue")


class InProcessQueue:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._q: queue.Queue[str | None] = queue.Queue()
        self._ctx = None
        self._current: str | None = None
        self._thread = threading.Thread(target=self._loop, name="b4m-worker", daemon=True)
        self._thread.start()

    def enqueue(self, job_id: str, job_type: str) -> None:
        self._q.put(job_id)

    def depths(self) -> dict[str, int]:
        return {"in-process": self._q.qsize()}

    def waiting_ids(self) -> set[str]:
        with self._q.mutex:
            waiting = {j for j in self._q.queue if j}
        return waiting | ({self._current} if self._current else set())

    def _loop(self) -> None:
        from ..worker.runner import WorkerContext, run_job

        while True:
            job_id = self._q.get()
            if job_id is None:
                return
            self._current = job_id
            try:
                if self._ctx is None:
                    self._ctx = WorkerContext(self.settings)  # loads base models once, on first use
                if run_job(self._ctx, job_id) == "queued":  # retryable, or waiting on another job: again, later
                    threading.Timer(1.0, self._q.put, args=(job_id,)).start()
            except Exception:  # keep the thread alive; the job row holds the error
                log.exception("job %s crashed the in-process worker", job_id)
            finally:
                self._current = None
                self._q.task_done()

    def join(self) -> None:
        self._q.join()

    def close(self) -> None:
        self._q.put(None)

    def check(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("in-process worker thread is not running")


class CeleryQueue:
    def __init__(self, settings: Settings):
        from celery import Celery

        self.settings = settings
        self.app = Celery("b4m-api", broker=settings.broker_url)
        self.app.conf.broker_connection_retry_on_startup = True
        # a publish while Redis is down fails fast; the reconciler sends the job later
        self.app.conf.broker_transport_options = {"socket_timeout": 5, "socket_connect_timeout": 5}
        self.app.conf.task_publish_retry_policy = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5}

    def enqueue(self, job_id: str, job_type: str) -> None:
        self.app.send_task("b4m.run_job", args=[job_id], queue=JOB_QUEUES[job_type], task_id=task_id(job_id))

    def depths(self) -> dict[str, int]:
        import redis

        r = redis.Redis.from_url(self.settings.broker_url, socket_timeout=2, socket_connect_timeout=2)
        try:
            return {q: int(r.llen(q)) for q in sorted(set(JOB_QUEUES.values()))}
        finally:
            r.close()

    def waiting_ids(self) -> set[str]:
        return redis_job_ids(self.settings.broker_url, sorted(set(JOB_QUEUES.values())),
                             fresh_unacked_s=self.settings.requeue_grace_s)

    def check(self) -> None:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)

    def close(self) -> None:
        pass


def make_queue(settings: Settings):
    return CeleryQueue(settings) if settings.broker_url else InProcessQueue(settings)
