import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_file_is_valid():
    r = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr
    for service in ("api", "worker", "postgres", "redis", "minio", "minio-bucket", "migrate"):
        assert f"  {service}:" in r.stdout
    assert "nvidia" in r.stdout  # the worker reserves a GPU


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_builds_manifests_that_validate_against_kubernetes_schemas():
    import kubernetes_validate
    import yaml

    r = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "deploy" / "overlays" / "example")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
        if d["apiVersion"].startswith("keda.sh"):
            continue  # a CRD: checked by hand below
        kubernetes_validate.validate(d, kubernetes_validate.latest_version(), strict=True)  # raises when invalid
        assert d["metadata"].get("namespace", "b4m") == "b4m"
    assert {"Namespace", "ConfigMap", "Secret", "Service", "Deployment", "Job", "ScaledObject"} <= set(by_kind)
    deployments = {d["metadata"]["name"]: d for d in by_kind["Deployment"]}
    worker = deployments["b4m-worker"]["spec"]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1 and worker["command"] == ["b4m", "worker"]
    api = deployments["b4m-api"]["spec"]["template"]["spec"]["containers"][0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # every container runs the one image, and reads the generated config and secret by their hashed names
    config = by_kind["ConfigMap"][0]["metadata"]["name"]
    secret = by_kind["Secret"][0]["metadata"]["name"]
    pods = [d["spec"]["template"]["spec"] for d in by_kind["Deployment"] + by_kind["Job"]]
    for pod in pods:
        for c in pod["containers"]:
            assert c["image"] == "ghcr.io/example/b4m:0.1.0"
            assert {"configMapRef": {"name": config}} in c["envFrom"] and {"secretRef": {"name": secret}} in c[
                "envFrom"
            ]
    assert by_kind["Job"][0]["spec"]["template"]["spec"]["containers"][0]["command"] == ["alembic", "upgrade", "head"]
    keys = set(by_kind["ConfigMap"][0]["data"]) | set(by_kind["Secret"][0]["data"])
    assert {"B4M_DATABASE_URL", "B4M_BROKER_URL", "B4M_S3_ENDPOINT_URL", "B4M_S3_SECRET_KEY"} <= keys
    assert "B4M_KEDA_PG_CONNECTION" in keys
    scaled = by_kind["ScaledObject"][0]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["spec"]["scaleTargetRef"]["name"] in deployments
    assert scaled["spec"]["maxReplicaCount"] == 4  # the overlay's patch
    assert {t["metadata"]["listName"] for t in scaled["spec"]["triggers"] if t["type"] == "redis"} == {
        "training",
        "generation",
    }  # the Celery queues (services/common/jobs.py JOB_QUEUES)


def test_the_image_copies_every_package_the_project_installs():
    """No engine here: read the Dockerfile. A package pyproject.toml installs but the image
    lacks makes every command that imports it crash in the container."""
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    copied = set(re.findall(r"^COPY\s+(\S+)\s+\./", (ROOT / "Dockerfile").read_text(), re.M))
    assert packages and all(p in copied for p in packages), (packages, copied)
    assert "models/" in (ROOT / ".dockerignore").read_text().split()  # weights stay out of the build context


def test_compose_services_restart_report_health_and_start_usable():
    import yaml

    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "version" not in spec  # obsolete in the Compose spec
    services = spec["services"]
    for name in ("api", "worker"):
        assert services[name]["restart"] == "unless-stopped" and services[name]["healthcheck"]["test"]
        assert any(v.endswith(":/models") or ":/models:" in v for v in services[name]["volumes"])
    assert "b4m tenant bootstrap" in " ".join(services["migrate"]["command"])  # a first key, printed once
    assert "B4M_BASE_MODELS" in spec["x-b4m-env"]


def test_keda_counts_queued_and_running_jobs_with_a_query_the_schema_answers(tmp_path):
    """A running job has left the Redis list; the postgresql trigger keeps its worker. Its
    query runs against the real migrated schema."""
    import yaml
    from sqlalchemy import create_engine, text

    from services.common.db import migrate

    scaled = yaml.safe_load((ROOT / "deploy/base/worker-scaledobject.yaml").read_text())
    (pg,) = [t for t in scaled["spec"]["triggers"] if t["type"] == "postgresql"]
    query = pg["metadata"]["query"]
    assert "running" in query and pg["metadata"]["connectionFromEnv"] == "B4M_KEDA_PG_CONNECTION"
    url = f"sqlite:///{tmp_path / 'b4m.db'}"
    migrate(url)
    with create_engine(url).connect() as c:
        assert c.execute(text(query)).scalar() == 0
