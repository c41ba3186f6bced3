"""Parameters and helpers more than one route module uses."""

from __future__ import annotations

from typing import Annotated

from fastapi import Header
from sqlalchemy import select
from sqlalchemy.orm import Session

from ...common.models import Adapter

IDEMPOTENCY_DOC = (
    "makes a retried POST safe: the same key with the same body answers the first request's result "
    "(and starts nothing new); the same key with another body is a 409. Printable ASCII, 1 to 200 characters"
)
IdempotencyKey = Annotated[
    str | None, Header(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$", description=IDEMPOTENCY_DOC)
]
MAX_OFFSET = 10**9  # beyond any table; a larger value would overflow the database integer


def delete_adapters(s: Session, ids) -> list[str]:
    """Delete adapter rows; returns their storage keys (the objects go after the commit)."""
    keys = []
    for row in s.scalars(select(Adapter).where(Adapter.id.in_([i for i in ids if i]))):
        keys.append(row.storage_key)
        s.delete(row)
    return keys
