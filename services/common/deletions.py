"""Removing objects from the store reliably: record first, delete after, retry what failed.

A DELETE drops its rows and records their objects' keys in one transaction (`record`), then
tries to remove the objects (`remove`); a key whose removal failed (the store is down) stays
recorded and `sweep` (run by the reconciler) retries it. Clean-ups of objects an attempt or
a refused request wrote go through `remove` too, so an outage leaves no orphan behind.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from .models import Adapter, Generation, Job, ObjectDeletion, ReferenceImage
from .storage import ObjectStore

log = logging.getLogger("b4m.deletions")


def record(s: Session, keys) -> list[str]:
    """Add the keys to the session (committed with the caller's transaction)."""
    keys = [k for k in dict.fromkeys(keys) if k]
    for key in keys:
        if s.get(ObjectDeletion, key) is None:
            s.add(ObjectDeletion(key=key))
    return keys


def job_objects(s: Session, tenant_id: str, target_ids) -> list[str]:
    """What the jobs working on these targets left in the store: checkpoints (a failed job keeps
    its own for a retry), loss curves, previews. They go with the asset or fusion."""
    keys: list[str] = []
    for job in s.scalars(select(Job).where(Job.tenant_id == tenant_id, Job.target_id.in_(list(target_ids)))):
        outputs = job.outputs or {}
        keys += [job.checkpoint_key, outputs.get("loss_curve"), *outputs.get("previews", [])]
        job.checkpoint_key = None
    return [k for k in keys if k]


def remove(sessions: sessionmaker[Session], store: ObjectStore, keys, recorded: bool = True) -> int:
    """Delete the objects now; a key the store refuses stays recorded for the sweep (recorded
    here when it was not yet). Returns how many are gone."""
    gone = 0
    for key in [k for k in dict.fromkeys(keys) if k]:
        try:
            store.delete(key)
        except Exception as exc:
            log.warning("object %s not removed yet (%s): the sweep retries it", key, exc)
            try:
                with sessions() as s, s.begin():
                    row = s.get(ObjectDeletion, key) or ObjectDeletion(key=key)
                    row.attempts, row.error = (row.attempts or 0) + 1, str(exc)[:2000]
                    s.add(row)
            except Exception as db_exc:  # the database is down too: nothing more to do here
                log.warning("could not record %s for the sweep: %s", key, db_exc)
            continue
        gone += 1
        if recorded:
            with sessions() as s, s.begin():
                row = s.get(ObjectDeletion, key)
                if row is not None:
                    s.delete(row)
    return gone


def referenced(s: Session) -> set[str]:
    """Every object key a row points at (or that is already recorded for removal)."""
    keys = set(s.scalars(select(ReferenceImage.storage_key)))
    keys |= set(s.scalars(select(Adapter.storage_key)))
    keys |= set(s.scalars(select(ObjectDeletion.key)))
    for images in s.scalars(select(Generation.images)):
        keys |= {im["key"] for im in images or []}
    for ckpt, outputs in s.execute(select(Job.checkpoint_key, Job.outputs)):
        outputs = outputs or {}
        keys |= {ckpt, outputs.get("loss_curve"), *outputs.get("previews", [])}
    keys.discard(None)
    return keys


def sweep_orphans(sessions: sessionmaker[Session], store: ObjectStore, grace_s: float) -> list[str]:
    """Remove objects under `tenants/` that no row points at and that are older than `grace_s`
    (an upload is referenced within moments of being written: the grace covers that window).
    They are what a process killed between upload and commit leaves behind."""
    cutoff = time.time() - grace_s
    candidates = [key for key, modified in store.list("tenants/") if modified < cutoff]
    if not candidates:
        return []
    with sessions() as s:
        known = referenced(s)
    orphans = [k for k in candidates if k not in known]
    removed = []
    for key in orphans:
        try:
            store.delete(key)
            removed.append(key)
        except Exception as exc:
            log.warning("orphan %s not removed: %s", key, exc)
    if removed:
        log.info("removed %d orphaned object(s)", len(removed))
    return removed


def sweep(sessions: sessionmaker[Session], store: ObjectStore, limit: int = 500) -> list[str]:
    """Retry the recorded deletions; returns the keys removed."""
    with sessions() as s:
        keys = list(s.scalars(select(ObjectDeletion.key).order_by(ObjectDeletion.created_at).limit(limit)))
    done = []
    for key in keys:
        if remove(sessions, store, [key]):
            done.append(key)
    return done
