"""Fuzz every operation of the API from its own OpenAPI document (schemathesis): whatever
the body, parameters or headers, no answer is a 5xx.

The app runs on PostgreSQL with a real Redis queue that no worker reads, so POSTs that
pass validation record jobs without training anything.
"""

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from services.api.app import create_app
from services.common.settings import Settings

REDIS_DB = 9


@pytest.fixture(scope="module")
def fuzzed_app(tmp_path_factory, tiny_sd_path):
    from sqlalchemy import create_engine, text

    from .conftest import PG_ADMIN

    name = "b4m_fuzz"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        c.execute(text(f'CREATE DATABASE "{name}"'))
    redis.Redis(db=REDIS_DB).flushdb()
    data = tmp_path_factory.mktemp("fuzz")
    app = create_app(Settings(data_dir=data, database_url=PG_ADMIN.rsplit("/", 1)[0] + f"/{name}",
                              broker_url=f"redis://127.0.0.1:6379/{REDIS_DB}", base_model=str(tiny_sd_path),
                              reconcile_every_s=0))
    yield app
    app.state.engine.dispose()
    redis.Redis(db=REDIS_DB).flushdb()
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="module")
def api_schema(fuzzed_app):
    return schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_a_server_error(case):
    case.call_and_validate(checks=[not_a_server_error])
