"""Reading and writing run files on local disk or S3 behind one small set of URI functions."""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tasks.aws.clients import client, error_code
from tasks.files import atomic_path, write_bytes_atomic

DIGEST_KEY = "sha256"  # S3 user metadata that carries an object's content digest
# s3transfer's multipart threshold (TransferConfig's default): below it one PUT or GET does the
# same work without the thread pool a managed transfer starts per call (~15 % of a 2,000-shard
# run's CPU went to starting those pools for objects of a few kB).
MANAGED_TRANSFER_BYTES = 8 * 1024 * 1024
_PRECONDITION_FAILED = ("PreconditionFailed", "412", "ConditionalRequestConflict")

# What S3 answers for a missing object (HEAD gives only the status: "404" / NotFound).
_NOT_FOUND = ("404", "NoSuchKey", "NotFound")


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


def open_stream(uri: str) -> BinaryIO:
    """The object or file as a stream read from the start, for a pass over it line by line."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return client("s3").get_object(Bucket=bucket, Key=key)["Body"]
    return open(uri, "rb")  # noqa: SIM115 - the caller closes it


@dataclass(frozen=True)
class S3Object:
    """One listed object: its URI, size and ETag."""

    uri: str
    size: int
    etag: str


def glob_s3(pattern: str) -> list[S3Object]:
    """The objects ``s3://bucket/key`` names: that key, or every key a glob in it matches."""
    bucket, key = split_s3(pattern.split("?", 1)[0])
    literal = re.split(r"[*?\[]", key, maxsplit=1)[0]
    paginator = client("s3").get_paginator("list_objects_v2")
    found = [
        S3Object(f"s3://{bucket}/{obj['Key']}", obj["Size"], obj["ETag"])
        for page in paginator.paginate(Bucket=bucket, Prefix=literal)
        for obj in page.get("Contents", [])
        if obj["Key"] == key or literal != key and fnmatch.fnmatchcase(obj["Key"], key)
    ]
    return sorted(found, key=lambda o: o.uri)


def _encryption(kms_key_id: str | None) -> dict[str, str]:
    """S3 arguments that encrypt an object with a KMS key (none: the bucket's default)."""
    return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": kms_key_id} if kms_key_id else {}


def _metadata(digest: str | None) -> dict:
    return {"Metadata": {DIGEST_KEY: digest}} if digest else {}


def write_bytes(
    uri: str, data: bytes, kms_key_id: str | None = None, digest: str | None = None
) -> None:
    """Write atomically: an S3 PUT replaces whole; a local file is written aside and renamed.

    ``digest`` (the sha256 of ``data``) is kept as S3 metadata so a resume can check the object.
    """
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client("s3").put_object(
            Bucket=bucket, Key=key, Body=data, **_encryption(kms_key_id), **_metadata(digest)
        )
        return
    write_bytes_atomic(uri, data)


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a local file, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def digest_of(uri: str) -> str | None:
    """The sha256 the writer recorded for an S3 object (or of a local file); None if absent."""
    if not is_s3(uri):
        return sha256_file(uri) if Path(uri).is_file() else None
    bucket, key = split_s3(uri)
    try:
        head = client("s3").head_object(Bucket=bucket, Key=key)
    except Exception as exc:  # an AWS refusal has an error_code (botocore is imported lazily)
        if error_code(exc) in _NOT_FOUND:
            return None
        raise
    return head.get("Metadata", {}).get(DIGEST_KEY, "")


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


def upload_file(
    local: Path, uri: str, kms_key_id: str | None = None, digest: str | None = None
) -> None:
    """Copy a local file to a URI (multipart on S3 for large files), keeping ``digest``."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        extra = {**_encryption(kms_key_id), **_metadata(digest)}
        if Path(local).stat().st_size < MANAGED_TRANSFER_BYTES:
            with open(local, "rb") as body:
                client("s3").put_object(Bucket=bucket, Key=key, Body=body, **extra)
        else:
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
        s3 = client("s3")
        response = s3.get_object(Bucket=bucket, Key=key)
        if response["ContentLength"] < MANAGED_TRANSFER_BYTES:
            with open(path, "wb") as handle:
                shutil.copyfileobj(response["Body"], handle, 1 << 20)
        else:  # ranged GETs side by side are worth their threads only for large objects
            response["Body"].close()
            s3.download_file(bucket, key, str(path))
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


def move_tree(src: str, dest: str, keep: tuple[str, ...] = ()) -> int:
    """Move every file under ``src`` to the same place under ``dest``, but the names in ``keep``.

    ``keep`` names top-level entries of ``src`` (and, locally, their ``.lock`` files) that stay.
    On S3 each object is copied and then deleted; local entries are renamed. Returns the count.
    """
    kept = {*keep, *(f"{name}.lock" for name in keep)}
    if not is_s3(src):
        root = Path(src)
        if not root.is_dir():
            return 0
        Path(dest).mkdir(parents=True, exist_ok=True)
        moved = 0
        for entry in sorted(root.iterdir()):
            if entry.name not in kept:
                moved += sum(1 for p in entry.rglob("*") if p.is_file()) if entry.is_dir() else 1
                os.replace(entry, Path(dest) / entry.name)
        return moved
    s3 = client("s3")
    moved = 0
    base = src.rstrip("/")
    for uri in list_files(src):
        relative = uri[len(base) + 1 :]
        if relative in kept:
            continue
        bucket, key = split_s3(uri)
        dest_bucket, dest_key = split_s3(join(dest, relative))
        s3.copy({"Bucket": bucket, "Key": key}, dest_bucket, dest_key)
        s3.delete_object(Bucket=bucket, Key=key)
        moved += 1
    return moved


@dataclass(frozen=True)
class Tagged:
    """An object's bytes with its version tag (S3 ETag, or a digest locally) and age."""

    data: bytes
    tag: str
    modified: float  # seconds since the epoch, by the store's clock


@contextmanager
def _local_lock(path: Path) -> Iterator[None]:
    # Compare-and-swap on a local file: read, compare and write under an exclusive flock.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _precondition_failed(exc: BaseException) -> bool:
    code = error_code(exc)
    if code is None:
        return False  # not an AWS refusal
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in _PRECONDITION_FAILED or status in (409, 412)


def read_tagged(uri: str) -> Tagged | None:
    """The object with its tag, or None when there is none."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            got = client("s3").get_object(Bucket=bucket, Key=key)
        except Exception as exc:  # an AWS refusal has an error_code (botocore is imported lazily)
            if error_code(exc) in _NOT_FOUND:
                return None
            raise
        return Tagged(got["Body"].read(), got["ETag"], got["LastModified"].timestamp())
    path = Path(uri)
    with _local_lock(path):
        return _read_local(path)


def _read_local(path: Path) -> Tagged | None:
    try:
        data = path.read_bytes()
        modified = path.stat().st_mtime
    except FileNotFoundError:
        return None
    return Tagged(data, sha256_bytes(data), modified)


def put_if_absent(uri: str, data: bytes) -> str | None:
    """Create the object only if there is none (S3 ``If-None-Match: *``); its tag, or None."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            return client("s3").put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")[
                "ETag"
            ]
        except Exception as exc:  # an AWS refusal has an error_code (botocore is imported lazily)
            if _precondition_failed(exc):
                return None
            raise
    path = Path(uri)
    with _local_lock(path):
        if path.exists():
            return None
        write_bytes_atomic(path, data)
        return sha256_bytes(data)


def put_if_match(uri: str, data: bytes, tag: str) -> str | None:
    """Replace the object only if it still has ``tag`` (S3 ``If-Match``); new tag, or None."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            return client("s3").put_object(Bucket=bucket, Key=key, Body=data, IfMatch=tag)["ETag"]
        except Exception as exc:  # an AWS refusal has an error_code (botocore is imported lazily)
            if _precondition_failed(exc) or error_code(exc) in ("404", "NoSuchKey"):
                return None
            raise
    path = Path(uri)
    with _local_lock(path):
        current = _read_local(path)
        if current is None or current.tag != tag:
            return None
        write_bytes_atomic(path, data)
        return sha256_bytes(data)


def delete_if_match(uri: str, tag: str) -> bool:
    """Delete the object only if it still has ``tag``; whether it was deleted."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            client("s3").delete_object(Bucket=bucket, Key=key, IfMatch=tag)
        except Exception as exc:  # an AWS refusal has an error_code (botocore is imported lazily)
            if _precondition_failed(exc) or error_code(exc) in ("404", "NoSuchKey"):
                return False
            raise
        return True
    path = Path(uri)
    with _local_lock(path):
        current = _read_local(path)
        if current is None or current.tag != tag:
            return False
        path.unlink()
        return True
