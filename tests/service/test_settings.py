from services.common.settings import Settings
from services.common.storage import LocalStore, S3Store


def test_embedded_defaults_need_no_servers(tmp_path, monkeypatch):
    for k in ("B4M_DATABASE_URL", "B4M_BROKER_URL", "B4M_STORAGE"):
        monkeypatch.delenv(k, raising=False)
    s = Settings(data_dir=tmp_path)
    assert s.resolved_database_url == f"sqlite:///{tmp_path / 'b4m.db'}"
    assert s.broker_url is None and s.base_model == "micro"
    assert isinstance(s.object_store(), LocalStore)


def test_environment_selects_the_production_stack(monkeypatch):
    monkeypatch.setenv("B4M_DATABASE_URL", "postgresql+psycopg://u@db/b4m")
    monkeypatch.setenv("B4M_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("B4M_STORAGE", "s3")
    monkeypatch.setenv("B4M_S3_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("B4M_S3_BUCKET", "adapters")
    s = Settings()
    assert s.resolved_database_url.startswith("postgresql") and s.broker_url.startswith("redis")
    store = s.object_store()
    assert isinstance(store, S3Store) and store.bucket == "adapters"
