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
    """Build the app as a production replica does (Celery queue) and serve requests, one of
    them converting a stored b4m adapter to kohya and diffusers files: neither torch nor
    diffusers is loaded."""
    code = f"""
import json
import numpy as np
from fastapi.testclient import TestClient
from safetensors.numpy import load, save
from services.api.app import create_app
from services.common.models import Adapter, Tenant
from services.common.settings import Settings

app = create_app(Settings(data_dir={str(tmp_path)!r}, reconcile_every_s=0))
rt = app.state.runtime
with TestClient(app) as c:
    assert c.get("/healthz").status_code == 200 and c.get("/openapi.json").status_code == 200
    assert c.get("/jobs").status_code == 200  # auth off: this makes the default tenant
    tenant = rt.sessions().query(Tenant).one().id
    rng = np.random.default_rng(0)
    parts = {{"l.A": (2, 4), "l.B": (2, 4), "l.C": (4, 3), "l.D": (4, 3)}}
    tensors = {{k: rng.standard_normal(v).astype(np.float32) for k, v in parts.items()}}
    meta = {{"kind": "fused", "method": "b4m", "rank": 4, "alpha": 2.0, "base_model": "micro"}}
    obj = rt.store.put(f"tenants/{{tenant}}/adapters/a1/adapter.safetensors",
                       save(tensors, metadata={{"b4m": json.dumps(meta)}}))
    with rt.sessions() as s:
        s.add(Adapter(id="a1", tenant_id=tenant, kind="fused", method="b4m", storage_key=obj.key,
                      sha256=obj.sha256, size=obj.size, meta=meta))
        s.commit()
    kohya = load(c.get("/adapters/a1/download?format=kohya").content)
    diffusers = load(c.get("/adapters/a1/download?format=diffusers").content)
    up = np.concatenate([tensors["l.A"], tensors["l.B"]])
    down = np.concatenate([tensors["l.C"], tensors["l.D"]], axis=1)
    assert np.array_equal(kohya["lora_unet_l.lora_up.weight"], up) and float(kohya["lora_unet_l.alpha"]) == 2.0
    assert np.allclose(diffusers["unet.l.lora_B.weight"] @ diffusers["unet.l.lora_A.weight"], 0.5 * up @ down)
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
