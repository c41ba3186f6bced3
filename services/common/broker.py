"""What the Redis broker holds, read directly: which job ids have a message waiting.

The queue carries only job ids, named in each message's task id (`<job id>.<nonce>`),
so the reconciler can tell a queued job whose message is waiting from one whose
message was lost (Redis restarted empty, a publish that failed after the row committed).
"""

from __future__ import annotations

import json
import time
import uuid

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
        for tag, delivered in r.zrangebyscore(UNACKED_INDEX, cutoff, "+inf", withscores=True):
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
