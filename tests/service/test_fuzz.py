"""Fuzz every operation of the API from its own OpenAPI document (schemathesis): whatever
the body, parameters or headers, no answer is a 5xx.

The app runs on PostgreSQL with a real Redis queue that no worker reads, so POSTs that
pass validation record jobs without training anything.
"""

import json

import pytest
import redis
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from services.api.app import create_app
from services.common.settings import Settings

REDIS_DB = 9
EXAMPLES = 25  # per operation and mode (valid inputs, then inputs that break the schema)

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture(scope="module")
def fuzzed_app(tmp_path_factory, tiny_sd_path):
    from sqlalchemy import create_engine, text

    from ..conftest import PG_ADMIN

    name = "b4m_fuzz"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        c.execute(text(f'CREATE DATABASE "{name}"'))
    redis.Redis(db=REDIS_DB).flushdb()
    data = tmp_path_factory.mktemp("fuzz")
    app = create_app(
        Settings(
            data_dir=data,
            database_url=PG_ADMIN.rsplit("/", 1)[0] + f"/{name}",
            broker_url=f"redis://127.0.0.1:6379/{REDIS_DB}",
            base_model=str(tiny_sd_path),
            reconcile_every_s=0,
        )
    )
    yield app
    app.state.runtime.engine.dispose()
    redis.Redis(db=REDIS_DB).flushdb()
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_no_input_makes_a_server_error(fuzzed_app):
    # schemathesis' pytest plugin does not run on pytest 9 yet; its strategies drive hypothesis directly
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    tried = {}
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                database=None,
                derandomize=True,
            )
            def fuzz(case):
                if isinstance(case.body, dict) and isinstance(case.body.get("wait"), (int, float)):
                    case.body["wait"] = min(case.body["wait"], 0.2)  # no worker reads this queue: don't sit idle
                case.call_and_validate(checks=[not_a_server_error])
                tried[op.label] = tried.get(op.label, 0) + 1

            try:
                fuzz()
            except Unsatisfiable:  # nothing in the operation can be made invalid (no parameters)
                assert mode is GenerationMode.NEGATIVE
    assert len(tried) == len(operations)  # every operation was called


HOSTILE_TEXT = ("\x00", "a\x00b", "\ud800", "x\udfff")  # NUL bytes and lone surrogates
HOSTILE_NUMBERS = (float("nan"), float("inf"), float("-inf"))


def _poison(case, text: str, number: float) -> None:
    """Every string parameter and body field made unstorable; every float in the body non-finite.
    A lone surrogate cannot be sent as UTF-8 in a URL or a multipart form (a client would send
    invalid bytes there, which arrive replaced): those get NUL bytes, JSON bodies both."""
    json_body = "json" in (case.media_type or "")
    if not json_body and any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        text = "\x00"
    for params in (case.path_parameters, case.query):
        for name, value in list((params or {}).items()):
            if isinstance(value, str):
                params[name] = value + text
    if isinstance(case.body, dict):
        for name, value in list(case.body.items()):
            if isinstance(value, str):
                case.body[name] = value + text


def test_nul_bytes_lone_surrogates_and_nan_make_no_server_error(fuzzed_app):
    """The fuzzer's valid cases with text PostgreSQL cannot store and numbers JSON cannot hold:
    a 4xx every time, never a 5xx (issue 15, item 8)."""
    from hypothesis import strategies as st

    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    client = TestClient(fuzzed_app)
    poisoned = {}
    for op in operations:

        @given(
            case=op.as_strategy(generation_mode=GenerationMode.POSITIVE),
            text=st.sampled_from(HOSTILE_TEXT),
            number=st.sampled_from(HOSTILE_NUMBERS),
        )
        @settings(
            max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True
        )
        def fuzz(case, text, number):
            if isinstance(case.body, dict) and isinstance(case.body.get("wait"), (int, float)):
                case.body["wait"] = 0
            floats = isinstance(case.body, dict) and [k for k, v in case.body.items() if isinstance(v, float)]
            _poison(case, text, number)
            case.call_and_validate(checks=[not_a_server_error])
            if floats and "json" in (case.media_type or ""):  # clients refuse to write NaN: send the bytes
                raw = json.dumps({**case.body, **dict.fromkeys(floats, number)}, allow_nan=True)
                r = client.request(
                    case.method,
                    case.formatted_path,
                    params=case.query,
                    content=raw.encode(),
                    headers={"content-type": "application/json"},
                )
                assert r.status_code < 500, (case.method, case.formatted_path, raw, r.text)
            poisoned[op.label] = poisoned.get(op.label, 0) + 1

        fuzz()
    assert len(poisoned) == len(operations)
