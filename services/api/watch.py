"""Waiting on jobs without holding a thread: one poller for every waiter in the process.

`POST /generate` with `wait` and `GET /jobs/{id}/events` used to poll the database from a
worker thread each, so a few dozen waiters took the whole thread pool and froze every
sync route. Now each waiter awaits an `asyncio.Event`; one loop reads all watched jobs in
a single query per tick (on one thread, briefly) and wakes the waiters whose job changed.
`close()` ends every wait and stream at once (server shutdown).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from b4m_contract.jobs import TERMINAL

from ..common.models import Job

log = logging.getLogger("b4m.api")
_watchers: weakref.WeakSet[JobWatcher] = weakref.WeakSet()
SHUTTING_DOWN = threading.Event()  # set by the server on SIGTERM/SIGINT: every watcher closes


def shut_down_all() -> None:
    """Called from the server's signal handling: end every wait and event stream within a tick,
    so a rolling deploy is not held up by open streams."""
    SHUTTING_DOWN.set()


@dataclass(frozen=True)
class _Seen:
    """What makes a job 'changed' for a waiter or a stream."""

    status: str
    step: int
    attempts: int
    previews: int

    @classmethod
    def of(cls, job: Job) -> _Seen:
        return cls(job.status, job.progress_step, job.attempts, len((job.outputs or {}).get("previews", [])))


class JobWatcher:
    def __init__(self, sessions: sessionmaker[Session], interval: float = 0.2):
        self.sessions, self.interval = sessions, interval
        self._jobs: dict[str, Job] = {}
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._closed = asyncio.Event()
        self._task: asyncio.Task | None = None
        _watchers.add(self)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the poller on the running loop (the app's lifespan does; the first waiter
        does too where there was none, e.g. a test client without lifespan)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="b4m-job-watcher")

    async def close(self) -> None:
        """End every wait and stream now."""
        self._closed.set()
        for events in self._waiters.values():
            for event in events:
                event.set()
        if self._task:
            self._task.cancel()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    # ------------------------------------------------------------------ waiting
    async def wait(self, job: Job, timeout: float) -> Job:
        """The job once it ended, or as it is after `timeout` seconds (or at shutdown)."""
        changes = self.follow(job)

        async def until_it_ends() -> Job:
            last = job
            async for current in changes:
                last = current
            return last

        try:
            return await asyncio.wait_for(until_it_ends(), timeout)
        except TimeoutError:
            return self._jobs.get(job.id, job)
        finally:
            await changes.aclose()

    async def follow(self, job: Job) -> AsyncIterator[Job]:
        """The job now, then again each time its status, step, attempt or previews change;
        ends after it ended (or at shutdown)."""
        self.start()
        event = asyncio.Event()
        self._waiters[job.id].add(event)
        self._jobs.setdefault(job.id, job)
        try:
            current, last = job, None
            while True:
                seen = _Seen.of(current)
                if seen != last:
                    last = seen
                    yield current
                if current.status in TERMINAL or self.closed:
                    return
                await event.wait()
                event.clear()
                current = self._jobs.get(job.id, current)
        finally:
            events = self._waiters.get(job.id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiters[job.id]
                    self._jobs.pop(job.id, None)

    # ------------------------------------------------------------------ the poller
    async def _run(self) -> None:
        while not self.closed:
            try:
                await asyncio.wait_for(self._closed.wait(), self.interval)
                return
            except TimeoutError:
                pass
            if SHUTTING_DOWN.is_set():
                await self.close()
                return
            ids = list(self._waiters)
            if not ids:
                continue
            try:
                rows = await asyncio.to_thread(self._read, ids)
            except Exception as exc:  # database hiccup: the next tick tries again
                log.warning("job watcher: %s", exc)
                continue
            for row in rows:
                before = self._jobs.get(row.id)
                self._jobs[row.id] = row
                if before is None or _Seen.of(before) != _Seen.of(row):
                    for event in self._waiters.get(row.id, ()):
                        event.set()

    def _read(self, ids: list[str]) -> list[Job]:
        with self.sessions() as s:
            rows = s.scalars(select(Job).where(Job.id.in_(ids))).all()
            for row in rows:
                s.expunge(row)
            return list(rows)
