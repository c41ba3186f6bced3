"""Object stores against a real S3 endpoint (moto_server over HTTP) and a local folder."""

import time
import urllib.request

import pytest

from services.common.storage import IntegrityError, LocalStore, S3Store, StorageError, object_key, sha256

from ..helpers.processes import free_port as _free_port


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "objects")
    url = request.getfixturevalue("s3_endpoint")
    return S3Store(
        f"b4m-test-{int(time.time() * 1000) % 10**9}",
        endpoint_url=url,
        access_key="test",
        secret_key="test",
        create_bucket=True,
    )


def test_put_get_checks_sha256(store):
    key = object_key("acme", "adapters", "a1", "adapter.safetensors")
    obj = store.put(key, b"hello adapter")
    assert obj.sha256 == sha256(b"hello adapter") and obj.size == 13
    assert store.exists(key)
    assert store.get(key, expected_sha256=obj.sha256) == b"hello adapter"
    with pytest.raises(IntegrityError):
        store.get(key, expected_sha256=sha256(b"something else"))
    store.put(key, b"overwritten")  # replaced in place: the old digest no longer matches
    with pytest.raises(IntegrityError):
        store.get(key, expected_sha256=obj.sha256)
    store.delete(key)
    assert not store.exists(key)
    with pytest.raises(StorageError):
        store.get(key)
    store.check()


def test_keys_stay_inside_their_tenant():
    assert object_key("t1", "images", "g9", "0.png") == "tenants/t1/images/g9/0.png"
    for bad in (
        ("..", "images", "x", "y"),
        ("t1", "images", "../t2", "y"),
        ("t1", "images", "x", "a/b"),
        ("t1", "images", "x", ""),
        ("t/2", "images", "x", "y"),
    ):
        with pytest.raises(ValueError):
            object_key(*bad)


def test_local_store_refuses_escaping_keys(tmp_path):
    store = LocalStore(tmp_path / "objects")
    with pytest.raises(ValueError):
        store.put("../outside", b"x")
    assert not (tmp_path / "outside").exists()


def test_presigned_url_downloads_from_s3(s3_endpoint):
    store = S3Store("b4m-presign", endpoint_url=s3_endpoint, access_key="test", secret_key="test", create_bucket=True)
    key = object_key("acme", "images", "g1", "0.png")
    store.put(key, b"\x89PNG fake", content_type="image/png")
    with urllib.request.urlopen(store.url(key, expires=60), timeout=5) as r:
        assert r.read() == b"\x89PNG fake"


def test_presigned_urls_name_the_public_endpoint(s3_endpoint):
    """In a cluster the store is at http://minio:9000; clients reach it elsewhere."""
    public = s3_endpoint.replace("127.0.0.1", "localhost")
    store = S3Store(
        "b4m-public",
        endpoint_url=s3_endpoint,
        access_key="test",
        secret_key="test",
        create_bucket=True,
        public_endpoint_url=public,
    )
    key = object_key("acme", "images", "g1", "0.png")
    store.put(key, b"\x89PNG fake", content_type="image/png")
    url = store.url(key, expires=60)
    assert url.startswith(public + "/b4m-public/")
    with urllib.request.urlopen(url, timeout=5) as r:  # signed for that host, and it verifies
        assert r.read() == b"\x89PNG fake"


def test_unreachable_endpoint_fails_cleanly():
    store = S3Store(
        "nowhere",
        endpoint_url=f"http://127.0.0.1:{_free_port()}",
        access_key="x",
        secret_key="x",
        connect_timeout=0.5,
        retries=1,
    )
    with pytest.raises(StorageError):
        store.check()
    with pytest.raises(StorageError):
        store.put("tenants/a/b/c/d", b"x")
