"""Fixtures every test folder shares: tiny models, databases, an S3 endpoint, and the rules
for markers (a test that needs a service the machine lacks is skipped with the reason)
and for processes (whatever a test started is stopped when it ends, fails or times out)."""

import os
import shutil
import socket
import sys
import urllib.request
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One torch thread in this process and every process a test starts (servers, workers): two
# torch processes with 2 spinning OpenMP threads each on 2 cores slow each other down many
# times over, one thread each costs about 10% (docs/reliability.md, "A busy machine").
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
from sqlalchemy import create_engine, text

from .helpers.images import random_images
from .helpers.processes import free_port, scaled, spawn, stop, stop_started, wait_until

PG_ADMIN = os.environ.get("B4M_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("B4M_TEST_REDIS_URL", "redis://127.0.0.1:6379")
TEST_TIMEOUT_S = 600


# ---------------------------------------------------------------- markers: skip what cannot run here
def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _postgres_missing() -> str | None:
    try:
        engine = create_engine(PG_ADMIN, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
        engine.dispose()
        return None
    except Exception as exc:
        return f"PostgreSQL not reachable at {PG_ADMIN}: {type(exc).__name__}"


def _redis_missing() -> str | None:
    host_port = REDIS_URL.split("//", 1)[1].split("/", 1)[0]
    host, port = host_port.split(":")
    if not _reachable(host, int(port)):
        return f"Redis not reachable at {REDIS_URL}"
    if shutil.which("redis-server") is None:
        return "redis-server not installed (fault tests start their own)"
    return None


def _browser_missing() -> str | None:
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        return "chromium not installed"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright not installed"
    return None


def _gpu_missing() -> str | None:
    import torch

    return None if torch.cuda.is_available() else "no CUDA device"


MISSING = {"postgres": _postgres_missing, "redis": _redis_missing, "browser": _browser_missing, "gpu": _gpu_missing}
_missing_cache: dict[str, str | None] = {}


def missing(marker: str) -> str | None:
    if marker not in _missing_cache:
        _missing_cache[marker] = MISSING[marker]()
    return _missing_cache[marker]


# Seconds a file's tests took on idle 2 cores (a run's --durations, 2026-11-28, third session). `make test`
# runs two processes that take whole files in collection order (--dist loadfile
# --no-loadscope-reorder): the longest go first, so the short ones fill in at the end instead
# of one long file running alone.
FILE_SECONDS = {
    "service/test_faults.py": 150,
    "e2e/test_readme.py": 95,
    "core/test_micro.py": 93,
    "service/test_api.py": 76,
    "e2e/test_ui.py": 64,
    "e2e/test_client_cli.py": 45,
    "service/test_fuzz.py": 42,
    "core/test_make_stage.py": 37,
    "service/test_availability.py": 23,
    "core/test_cli.py": 18,
}


def _file_seconds(item) -> int:
    path = item.nodeid.split("::", 1)[0].removeprefix("tests/")
    return FILE_SECONDS.get(path, 0)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -_file_seconds(item))  # stable: a file's own order is kept
    for item in items:
        for marker, _ in MISSING.items():
            if item.get_closest_marker(marker) and (why := missing(marker)):
                item.add_marker(pytest.mark.skip(reason=why))
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(scaled(TEST_TIMEOUT_S)))


@pytest.fixture(autouse=True)
def _stop_test_processes():
    """Whatever process the test started (helpers.processes.spawn) is stopped with its group."""
    yield
    stop_started("test")


@pytest.fixture(scope="session", autouse=True)
def _stop_fixture_processes():
    yield
    stop_started()


# ---------------------------------------------------------------- tiny models
@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    from b4m_core.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "model")


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory):
    from b4m_core.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl") / "model")


@pytest.fixture(scope="session")
def sd(tiny_sd_path):
    import torch

    from b4m_core.models import load_base

    if "PYTEST_XDIST_WORKER" not in os.environ:
        # alone on the machine (TEST_WORKERS=0): both cores. Under xdist a second spinning
        # OpenMP thread beside the other test process made in-process tests 10-70x slower.
        torch.set_num_threads(2)
    return load_base(str(tiny_sd_path), device="cpu")


@pytest.fixture(scope="session")
def sdxl(tiny_sdxl_path):
    from b4m_core.models import load_base

    return load_base(str(tiny_sdxl_path), device="cpu")


@pytest.fixture(params=["sd", "sdxl"])
def any_base(request):
    return request.getfixturevalue(request.param)


@pytest.fixture
def concepts():
    from b4m_core.data import Concept

    content = Concept("content", random_images(0, 3), "dog")
    style = Concept("style", random_images(1, 2), "watercolor")
    aux_styles = [Concept("style", random_images(10 + i, 2), f"style{i}", token=f"as{i}") for i in range(3)]
    aux_contents = [Concept("content", random_images(20 + i, 2), f"thing{i}", token=f"ac{i}") for i in range(3)]
    return content, style, aux_styles, aux_contents


# ---------------------------------------------------------------- databases
@pytest.fixture
def pg_url():
    """A fresh database on the machine's PostgreSQL, dropped afterwards."""
    if why := missing("postgres"):
        pytest.skip(why)
    name = f"b4m_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'b4m.db'}"
    return request.getfixturevalue("pg_url")


# ---------------------------------------------------------------- S3 (moto_server over HTTP)
@pytest.fixture(scope="session")
def s3_endpoint():
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = spawn(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        owner="fixture",
        stdout=open(os.devnull, "w"),
        stderr=open(os.devnull, "w"),
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            urllib.request.urlopen(url, timeout=0.5)
            return True
        except Exception:
            return False

    wait_until(up, 30, "moto_server to start", interval=0.1)
    yield url
    stop(proc, grace=10)
