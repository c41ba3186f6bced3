import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import create_engine, text

from b4m_core.data import Concept
from b4m_core.models import load_base
from b4m_core.tiny import build_tiny_sd, build_tiny_sdxl

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "model")


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl") / "model")


@pytest.fixture(scope="session")
def sd(tiny_sd_path):
    return load_base(str(tiny_sd_path), device="cpu")


@pytest.fixture(scope="session")
def sdxl(tiny_sdxl_path):
    return load_base(str(tiny_sdxl_path), device="cpu")


@pytest.fixture(params=["sd", "sdxl"])
def any_base(request):
    return request.getfixturevalue(request.param)


def random_images(seed: int, n: int, size=(40, 48)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def write_images(folder, seed: int, n: int):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(random_images(seed, n)):
        im.save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture
def concepts():
    content = Concept("content", random_images(0, 3), "dog")
    style = Concept("style", random_images(1, 2), "watercolor")
    aux_styles = [Concept("style", random_images(10 + i, 2), f"style{i}", token=f"as{i}") for i in range(3)]
    aux_contents = [Concept("content", random_images(20 + i, 2), f"thing{i}", token=f"ac{i}") for i in range(3)]
    return content, style, aux_styles, aux_contents


# ---------------------------------------------------------------- databases
PG_ADMIN = os.environ.get("B4M_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def pg_url():
    """A fresh database on the machine's PostgreSQL, dropped afterwards."""
    name = f"b4m_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'b4m.db'}"
    return request.getfixturevalue("pg_url")


# ---------------------------------------------------------------- S3 (moto_server over HTTP)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    port = _free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=0.5)
            break
        except Exception:
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


