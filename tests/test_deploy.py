import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_file_is_valid():
    r = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    for service in ("api", "worker", "postgres", "redis", "minio", "minio-bucket", "migrate"):
        assert f"  {service}:" in r.stdout
    assert "nvidia" in r.stdout  # the worker reserves a GPU
