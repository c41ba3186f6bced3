"""The walls between the parts hold: the API process holds no model code, the client and
the contract import nothing of the server, the method imports nothing of the service."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "diffusers", "transformers", "b4m_core.adapter", "b4m_core.training", "services.worker")


def _loaded_after(code: str) -> list[str]:
    probe = code + f"\nimport json, sys; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "B4M_BROKER_URL": "redis://127.0.0.1:1/0"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_api_process_imports_no_model_code(tmp_path):
    """Import the API, build the app (Celery queue: a production replica) and serve a request
    that converts an adapter: neither torch nor diffusers is loaded."""
    code = f"""
from fastapi.testclient import TestClient
from services.api.app import create_app
from services.common.settings import Settings
app = create_app(Settings(data_dir={str(tmp_path)!r}, reconcile_every_s=0))
with TestClient(app) as c:
    assert c.get("/healthz").status_code == 200
    assert c.get("/openapi.json").status_code == 200
    assert c.get("/adapters/nope/download?format=kohya").status_code == 404
"""
    assert _loaded_after(code) == []


def test_the_embedded_server_loads_the_worker_only_when_a_job_runs(tmp_path):
    code = f"""
from services.embedded import create_embedded_app
from services.common.settings import Settings
app = create_embedded_app(Settings(data_dir={str(tmp_path)!r}, broker_url=None, reconcile_every_s=0))
"""
    assert _loaded_after(code) == []


def test_the_client_installs_without_the_server():
    assert _loaded_after("import b4m_client, b4m_contract.schemas") == []
    for package in ("b4m_client", "b4m_contract"):
        for imported in _imports(ROOT / package):
            assert not imported.startswith(("services", "b4m_core")), (package, imported)


@pytest.mark.parametrize(
    "package,forbidden",
    [
        ("b4m_core", ("services", "fastapi", "sqlalchemy", "celery", "redis", "boto3", "b4m_client")),
        ("services/api", ("services.worker", "torch", "diffusers", "transformers")),
        ("services/common", ("services.api", "services.worker", "torch", "diffusers")),
    ],
)
def test_import_walls(package, forbidden):
    for imported in _imports(ROOT / package):
        assert not imported.startswith(forbidden), (package, imported)


def _imports(folder: Path) -> set[str]:
    """Absolute module names imported anywhere under `folder` (relative imports resolved)."""
    names = set()
    for path in folder.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = parts[: len(parts) - node.level]
                    names.add(".".join(base + ([node.module] if node.module else [])))
                else:
                    names.add(node.module)
    return names
