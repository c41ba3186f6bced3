"""The schema on the real PostgreSQL of this machine and on SQLite, built by migrations."""

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select
from sqlalchemy.exc import IntegrityError

from services.common.db import downgrade, make_engine, migrate, session_factory
from services.common.models import Asset, Base, Fusion, Job, ReferenceImage, Tenant


def test_migrations_build_exactly_the_models_and_downgrade(db_url):
    migrate(db_url)
    engine = make_engine(db_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], diff  # a model change without a migration fails here
    tables = set(inspect(engine).get_table_names())
    assert {"tenants", "api_keys", "assets", "reference_images", "adapters", "fusions", "generations", "jobs"} <= tables
    engine.dispose()
    downgrade(db_url)
    engine = make_engine(db_url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()


def test_rows_constraints_and_cascades(db_url):
    migrate(db_url)
    engine = make_engine(db_url)
    Session = session_factory(engine)
    with Session() as s:
        t = Tenant(name="acme")
        s.add(t)
        s.flush()
        content = Asset(tenant_id=t.id, kind="content", name="my dog", word="dog", token="sks", base_model="micro")
        content.images = [
            ReferenceImage(
                position=i, storage_key=f"k{i}", sha256="0" * 64, content_type="image/png", width=64, height=64
            )
            for i in range(3)
        ]
        style = Asset(tenant_id=t.id, kind="style", name="ink", word="ink", token="zwx", base_model="micro")
        s.add_all([content, style])
        s.flush()
        s.add(Fusion(tenant_id=t.id, content_id=content.id, style_id=style.id))
        s.add(Job(tenant_id=t.id, type="train_content", target_id=content.id, idempotency_key="k1"))
        s.commit()
        got = s.scalars(select(Asset).where(Asset.tenant_id == t.id, Asset.kind == "content")).one()
        assert [im.position for im in got.images] == [0, 1, 2]
        job = s.scalars(select(Job)).one()
        assert job.status == "queued" and job.attempts == 0 and job.outputs == {}
        tid, cid = t.id, content.id
    with Session() as s:  # one idempotency key per tenant
        s.add(Job(tenant_id=tid, type="train_content", target_id=cid, idempotency_key="k1"))
        with pytest.raises(IntegrityError):
            s.commit()
    with Session() as s:  # a content with a fusion cannot vanish underneath it
        s.delete(s.get(Asset, cid))
        with pytest.raises(IntegrityError):
            s.commit()
    engine.dispose()
