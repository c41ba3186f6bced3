"""Object storage for adapters, reference images and generated images.

Two stores with one interface: `LocalStore` (a folder; the embedded default) and
`S3Store` (any S3-compatible endpoint through boto3: AWS, MinIO, moto). Keys are laid
out per tenant (`tenants/<tenant>/<kind>/<id>/<name>`); every object's sha256 is
returned on `put` (for the database row) and checked on `get`, so a corrupted or
swapped object is refused instead of loaded.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StorageError(Exception):
    """The store failed or an object is missing."""


class IntegrityError(StorageError):
    """An object's bytes do not match the sha256 recorded for it."""


class ObjectMissing(StorageError):
    """No object under that key."""


class StorageUnavailable(StorageError):
    """The store did not answer or refused the call (down, hung, throttling): try again later."""


def object_key(tenant: str, kind: str, object_id: str, name: str) -> str:
    """`tenants/<tenant>/<kind>/<id>/<name>`; every part is checked so no key escapes its tenant."""
    for label, part in (("tenant", tenant), ("kind", kind), ("id", object_id), ("name", name)):
        if not _SAFE.match(part) or part in (".", ".."):
            raise ValueError(f"invalid {label} for a storage key: {part!r}")
    return f"tenants/{tenant}/{kind}/{object_id}/{name}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class StoredObject:
    key: str
    sha256: str
    size: int


class ObjectStore(Protocol):
    """What the API and the worker need of a store; `LocalStore` and `S3Store` provide it."""

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> StoredObject: ...
    def get(self, key: str, expected_sha256: str | None = None) -> bytes: ...
    def delete(self, key: str) -> None: ...
    def exists(self, key: str) -> bool: ...
    def url(self, key: str, expires: int = 3600) -> str | None: ...
    def check(self) -> None: ...
    def list(self, prefix: str = "") -> Iterator[tuple[str, float]]: ...  # (key, modified, unix seconds)


def _verify(key: str, data: bytes, expected: str | None) -> bytes:
    if expected is not None and sha256(data) != expected:
        raise IntegrityError(f"object {key} does not match its recorded sha256")
    return data


class LocalStore:
    """A folder as object store. Writes go to a temporary file and are renamed into
    place, so a reader never sees half an object."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ValueError(f"key escapes the store: {key!r}")
        return path

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> StoredObject:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return StoredObject(key, sha256(data), len(data))

    def get(self, key: str, expected_sha256: str | None = None) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise ObjectMissing(f"object not found: {key}")
        return _verify(key, path.read_bytes(), expected_sha256)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def url(self, key: str, expires: int = 3600) -> str | None:
        return None  # served by streaming through the API

    def list(self, prefix: str = "") -> Iterator[tuple[str, float]]:
        for path in self.root.rglob("*"):
            if path.is_file() and path.name != ".ready":
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield key, path.stat().st_mtime

    def check(self) -> None:
        probe = self.root / ".ready"
        probe.write_bytes(b"ok")
        probe.unlink()


class S3Store:
    """An S3-compatible bucket through boto3."""

    def __init__(
        self,
        bucket: str,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key: str | None = None,
        secret_key: str | None = None,
        create_bucket: bool = False,
        connect_timeout: float = 5.0,
        retries: int = 3,
        public_endpoint_url: str | None = None,
    ):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=60,
            retries={"max_attempts": retries, "mode": "standard"},
            s3={"addressing_style": "path"},
        )

        def client(endpoint):
            return boto3.client(
                "s3",
                endpoint_url=endpoint,
                region_name=region,
                aws_access_key_id=access_key,
                aws_secret_access_key=secret_key,
                config=config,
            )

        self.client = client(endpoint_url)
        # presigned URLs are opened by clients outside the cluster: sign them for the address
        # they can reach (the in-cluster endpoint, e.g. http://minio:9000, is not one)
        self.presigner = client(public_endpoint_url) if public_endpoint_url else self.client
        if create_bucket:
            self.ensure_bucket()

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> StoredObject:
        digest = sha256(data)
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=key, Body=data, ContentType=content_type, Metadata={"sha256": digest}
            )
        except Exception as exc:
            raise StorageUnavailable(f"upload of {key} failed: {exc}") from exc
        return StoredObject(key, digest, len(data))

    def get(self, key: str, expected_sha256: str | None = None) -> bytes:
        from botocore.exceptions import ClientError

        try:
            data = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ObjectMissing(f"object not found: {key}") from exc
            raise StorageUnavailable(f"download of {key} failed: {exc}") from exc
        except Exception as exc:
            raise StorageUnavailable(f"download of {key} failed: {exc}") from exc
        return _verify(key, data, expected_sha256)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            raise StorageUnavailable(f"delete of {key} failed: {exc}") from exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError:
            return False

    def url(self, key: str, expires: int = 3600) -> str | None:
        return self.presigner.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires
        )

    def list(self, prefix: str = "") -> Iterator[tuple[str, float]]:
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    yield obj["Key"], obj["LastModified"].timestamp()
        except Exception as exc:
            raise StorageUnavailable(f"listing {self.bucket}/{prefix} failed: {exc}") from exc

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise StorageUnavailable(f"bucket {self.bucket} unreachable: {exc}") from exc
