"""Rows written straight to the database, as the API would, for tests that drive workers."""

from __future__ import annotations

import io

from services.common.models import Asset, ReferenceImage
from services.common.storage import object_key

from .images import random_images


def add_asset(s, store, tenant, kind, word, token, base, seed):
    a = Asset(
        tenant_id=tenant,
        kind=kind,
        name=word,
        word=word,
        token=token,
        base_model=base,
        settings={"steps": 4, "rank": 4, "alpha": 4.0},
    )
    s.add(a)
    s.flush()
    for i, im in enumerate(random_images(seed, 2)):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        obj = store.put(object_key(tenant, "references", a.id, f"{i}.png"), buf.getvalue())
        a.images.append(
            ReferenceImage(
                position=i,
                storage_key=obj.key,
                sha256=obj.sha256,
                content_type="image/png",
                width=im.width,
                height=im.height,
            )
        )
    return a
