"""Run files on disk and on S3 behind one set of URI functions; atomic writes; JSONL lines."""

from __future__ import annotations

import uuid

import pytest

from tasks.aws import storage
from tasks.files import atomic_path, scan_lines, write_bytes_atomic
from tasks.run.state import JobAttempt, RunStateStore


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "runs")
    stack = request.getfixturevalue("stack")
    return f"s3://{stack.bucket}/storage-test-{uuid.uuid4().hex[:8]}"


def test_storage_write_read_exists_and_list(base):
    uri = storage.join(base, "a", "b.jsonl.out")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"one\n")
    storage.write_bytes(storage.join(base, "a", "c", "d.jsonl.out"), b"two\n")
    storage.write_bytes(storage.join(base, "a", "e.parquet"), b"x")
    assert storage.exists(uri) and storage.read_bytes(uri) == b"one\n"
    found = storage.list_files(storage.join(base, "a"), ".jsonl.out")
    assert [f.rsplit("/", 1)[-1] for f in found] == ["b.jsonl.out", "d.jsonl.out"]
    assert storage.list_files(storage.join(base, "missing"), ".out") == []


def test_storage_exists_does_not_match_a_longer_key(base):
    storage.write_bytes(storage.join(base, "plan.json.bak"), b"{}")
    assert not storage.exists(storage.join(base, "plan.json"))


@pytest.mark.parametrize(
    "size", [7, storage.MANAGED_TRANSFER_BYTES - 1, storage.MANAGED_TRANSFER_BYTES + 1]
)
def test_storage_upload_and_local_copy_round_trip(base, tmp_path, size):
    # Small objects go in one PUT / GET, large ones through s3transfer: both carry the digest.
    payload = (uuid.uuid4().bytes * (size // 16 + 1))[:size]
    local = tmp_path / "src.bin"
    local.write_bytes(payload)
    uri = storage.join(base, "up", "src.bin")
    storage.upload_file(local, uri, digest=storage.sha256_bytes(payload))
    with storage.local_copy(uri) as path:
        assert path.read_bytes() == payload
    assert storage.digest_of(uri) == storage.sha256_bytes(payload)


def test_storage_join_uses_single_slashes():
    assert storage.join("s3://b/p/", "/x/", "y") == "s3://b/p/x/y"
    assert storage.split_s3("s3://bucket/key/k2") == ("bucket", "key/k2")


def test_atomic_path_leaves_the_old_file_when_the_write_fails(tmp_path):
    dest = tmp_path / "state.json"
    dest.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert dest.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_write_bytes_atomic_replaces_whole(tmp_path):
    dest = tmp_path / "sub" / "f.bin"
    write_bytes_atomic(dest, b"first")
    write_bytes_atomic(dest, b"second")
    assert dest.read_bytes() == b"second"


def test_scan_lines_skips_blank_lines_and_keeps_escapes(tmp_path):
    data = b'{"recordId":"R1","t":"a\\tb,\\"c\\""}\n\n  \n{"recordId":"R2"}\n'
    lines = scan_lines(data).collect().to_series().to_list()
    assert lines == ['{"recordId":"R1","t":"a\\tb,\\"c\\""}', '{"recordId":"R2"}']
    path = tmp_path / "x.jsonl"
    path.write_bytes(data)
    assert scan_lines(path).collect().height == 2


def test_run_state_store_round_trips_attempts(base):
    store = RunStateStore(base, "run-1")
    shard = store.shard("shard-00000")
    shard.attempts.append(
        JobAttempt(
            attempt=1,
            job_name="run-1-shard-00000-a1",
            client_token="t",
            job_arn="arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/abcdef123456",
            status="InProgress",
            counters={"processedRecordCount": 5},
        )
    )
    store.save("shard-00000")
    assert store.writes == 1 and 0 < store.bytes_written < 1000  # one small object, not the run
    again = RunStateStore(base, "run-1").shard("shard-00000")
    assert again.current.job_id == "abcdef123456"
    assert again.current.counters == {"processedRecordCount": 5}
    assert not again.current.is_final
