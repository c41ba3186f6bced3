"""The process is going away: jobs hand themselves back instead of being cut off.

Set by the Celery worker's warm shutdown (SIGTERM) and by `b4m serve`'s signal handling; a
training in progress checkpoints at its next step and goes back to `queued` without using an
attempt, so a rolling deploy neither fails long jobs nor waits for them to end.
"""

from __future__ import annotations

import threading

DRAINING = threading.Event()
