"""The one-process server: the API with an in-process worker, for one machine and no Redis.

`b4m serve` with no `B4M_BROKER_URL` runs this: SQLite (or any database), a local folder
(or S3) as object store, and a worker thread in the API process running the same
`run_job` as a Celery worker. The API package knows nothing of it; this module composes
the API factory with the worker, and imports the worker (and so torch) only when the
first job runs.
"""

from __future__ import annotations

import logging
import queue
import threading

from fastapi import FastAPI

from b4m_contract.jobs import JobStatus, JobType

from .api.app import create_app
from .common.settings import Settings, get_settings

log = logging.getLogger("b4m.embedded")
RETRY_AFTER_S = 1.0  # a job that asked to run again later (retryable, or waiting on another job)


class InProcessQueue:
    """Runs jobs one at a time on a thread of this process; the `JobQueue` interface."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._q: queue.Queue[str | None] = queue.Queue()
        self._ctx = None
        self._current: str | None = None
        self._thread = threading.Thread(target=self._loop, name="b4m-worker", daemon=True)
        self._thread.start()

    def enqueue(self, job_id: str, job_type: JobType) -> None:
        self._q.put(job_id)

    def depths(self) -> dict[str, int]:
        return {"in-process": self._q.qsize()}

    def waiting_ids(self) -> set[str]:
        with self._q.mutex:
            waiting = {j for j in self._q.queue if j}
        return waiting | ({self._current} if self._current else set())

    def _loop(self) -> None:
        while True:
            job_id = self._q.get()
            if job_id is None:
                return
            self._current = job_id
            try:
                from .worker.runner import WorkerContext, run_job  # the model code, on the first job

                if self._ctx is None:
                    self._ctx = WorkerContext(self.settings)  # loads base models once, on first use
                if run_job(self._ctx, job_id) == JobStatus.QUEUED:
                    delay = self._ctx.retry_in.pop(job_id, RETRY_AFTER_S)
                    threading.Timer(delay, self._q.put, args=(job_id,)).start()
            except Exception:  # keep the thread alive; the job row holds the error
                log.exception("job %s crashed the in-process worker", job_id)
            finally:
                self._current = None
                self._q.task_done()

    def join(self) -> None:
        """Until every job handed over so far has run (tests)."""
        self._q.join()

    def close(self, timeout: float = 60.0) -> None:
        """Stop the worker thread: a training in progress checkpoints and hands its job back at
        its next step (it resumes when the server runs again), so no job is cut off mid-write."""
        if self._ctx is not None:
            self._ctx.draining.set()
        self._q.put(None)
        self._thread.join(timeout=timeout)

    def check(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("in-process worker thread is not running")


def create_embedded_app(settings: Settings | None = None, run_migrations: bool = True) -> FastAPI:
    """The API with its jobs run on a thread of this process."""
    settings = settings or get_settings()
    return create_app(settings, queue=InProcessQueue(settings), run_migrations=run_migrations)


def create_server_app() -> FastAPI:
    """What `b4m serve` runs: the API alone when a broker is configured (workers run the
    jobs), else the embedded server."""
    settings = get_settings()
    return create_app(settings) if settings.broker_url else create_embedded_app(settings)
