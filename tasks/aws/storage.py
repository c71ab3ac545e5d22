"""Reading and writing run files on local disk or S3 behind one small set of URI functions."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.aws.clients import client
from tasks.files import atomic_path, write_bytes_atomic


def is_s3(uri: str) -> bool:
    """True for an ``s3://`` URI."""
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` → ``(bucket, key)``."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Join URI parts with single slashes, for S3 and local paths alike."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def read_bytes(uri: str) -> bytes:
    """The whole object or file."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    return Path(uri).read_bytes()


def _encryption(kms_key_id: str | None) -> dict[str, str]:
    """S3 arguments that encrypt an object with a KMS key (none: the bucket's default)."""
    return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": kms_key_id} if kms_key_id else {}


def write_bytes(uri: str, data: bytes, kms_key_id: str | None = None) -> None:
    """Write atomically: an S3 PUT replaces whole; a local file is written aside and renamed."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client("s3").put_object(Bucket=bucket, Key=key, Body=data, **_encryption(kms_key_id))
        return
    write_bytes_atomic(uri, data)


def exists(uri: str) -> bool:
    """Whether the object or file is there."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        response = client("s3").list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
        return any(obj["Key"] == key for obj in response.get("Contents", []))
    return Path(uri).exists()


def list_files(prefix: str, suffix: str = "") -> list[str]:
    """Every file under a prefix (any depth) whose name ends with ``suffix``, sorted."""
    if is_s3(prefix):
        bucket, key = split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""
        paginator = client("s3").get_paginator("list_objects_v2")
        found = [
            f"s3://{bucket}/{obj['Key']}"
            for page in paginator.paginate(Bucket=bucket, Prefix=key)
            for obj in page.get("Contents", [])
            if obj["Key"].endswith(suffix)
        ]
        return sorted(found)
    root = Path(prefix)
    if not root.exists():
        return []
    return sorted(str(p) for p in root.rglob(f"*{suffix}") if p.is_file())


def upload_file(local: Path, uri: str, kms_key_id: str | None = None) -> None:
    """Copy a local file to a URI (multipart on S3 for large files)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        extra = _encryption(kms_key_id)
        client("s3").upload_file(str(local), bucket, key, ExtraArgs=extra or None)
        return
    dest = Path(uri)
    if dest.resolve() != Path(local).resolve():
        with atomic_path(dest) as tmp:
            shutil.copyfile(local, tmp)


@contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """A local path for a URI: the file itself, or a temporary download of an S3 object."""
    if not is_s3(uri):
        yield Path(uri)
        return
    bucket, key = split_s3(uri)
    with tempfile.TemporaryDirectory(prefix="bedrock-batch-") as tmp:
        path = Path(tmp) / Path(key).name
        client("s3").download_file(bucket, key, str(path))
        yield path


@contextmanager
def local_dir_for(uri: str) -> Iterator[Path]:
    """A local folder to write into: the folder itself, or a temporary one for an S3 prefix."""
    if not is_s3(uri):
        path = Path(uri)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="bedrock-batch-") as tmp:
        yield Path(tmp)
