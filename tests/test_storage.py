"""Artifact versions are published atomically and never overwritten, on file:// and on s3 (moto over HTTP)."""

import shutil
from pathlib import Path

import boto3
import pytest

from midpo.storage import MANIFEST, ArtifactStore, NotFound, local_copy


def make_dir(tmp_path: Path, content: str) -> Path:
    d = tmp_path / f"src-{content}"
    (d / "sub").mkdir(parents=True, exist_ok=True)
    (d / "a.txt").write_text(content)
    (d / "sub" / "b.txt").write_text(content * 2)
    return d


def test_local_publish_is_complete_and_write_once(tmp_path):
    store = ArtifactStore((tmp_path / "root").as_uri())
    ref = store.publish(make_dir(tmp_path, "one"), "things/v1", metadata={"n": 1})
    assert ref.version == "v1" and store.is_complete("things/v1")
    assert set(store.manifest("things/v1")["files"]) == {"a.txt", "sub/b.txt"}
    store.publish(make_dir(tmp_path, "two"), "things/v1")
    assert (store.fetch("things/v1") / "a.txt").read_text() == "one"


def test_interrupted_local_publish_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    store = ArtifactStore((tmp_path / "root").as_uri())
    calls = []
    real_copy = shutil.copy2

    def failing_copy(src, dst, *a, **k):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_copy(src, dst, *a, **k)

    monkeypatch.setattr(shutil, "copy2", failing_copy)
    with pytest.raises(OSError):
        store.publish(make_dir(tmp_path, "x"), "things/v1")
    assert not store.is_complete("things/v1")
    assert not (tmp_path / "root" / "things" / "v1").exists()
    assert list((tmp_path / "root" / "things").iterdir()) == []  # staging cleaned up
    with pytest.raises(NotFound):
        store.fetch("things/v1")
    monkeypatch.setattr(shutil, "copy2", real_copy)
    store.publish(make_dir(tmp_path, "x"), "things/v1")
    assert store.is_complete("things/v1")


def test_s3_publish_fetch_and_write_once(s3_endpoint, bucket, tmp_path):
    store = ArtifactStore(f"s3://{bucket}/runs")
    store.publish(make_dir(tmp_path, "one"), "things/v1")
    assert store.is_complete("things/v1")
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {"runs/things/v1/a.txt", "runs/things/v1/sub/b.txt", f"runs/things/v1/{MANIFEST}"}
    store.publish(make_dir(tmp_path, "two"), "things/v1")
    assert (store.fetch("things/v1") / "a.txt").read_text() == "one"


def test_interrupted_s3_publish_is_not_complete(s3_endpoint, bucket, tmp_path, monkeypatch):
    import midpo.storage as storage

    real_client = storage.s3_client

    class Flaky:
        def __init__(self):
            self.client, self.uploads = real_client(), 0

        def upload_file(self, *args, **kw):
            self.uploads += 1
            if self.uploads == 2:
                raise ConnectionResetError("connection reset by peer")
            return self.client.upload_file(*args, **kw)

        def __getattr__(self, name):
            return getattr(self.client, name)

    monkeypatch.setattr(storage, "s3_client", Flaky)
    store = ArtifactStore(f"s3://{bucket}/runs")
    with pytest.raises(ConnectionResetError):
        store.publish(make_dir(tmp_path, "x"), "things/v1")
    assert not store.is_complete("things/v1")
    monkeypatch.setattr(storage, "s3_client", real_client)
    store.publish(make_dir(tmp_path, "x"), "things/v1")
    assert store.is_complete("things/v1")


def test_local_copy_of_s3_object_and_errors(s3_endpoint, bucket, tmp_path):
    boto3.client("s3").put_object(Bucket=bucket, Key="in/data.jsonl", Body=b'{"a": 1}\n')
    path = local_copy(f"s3://{bucket}/in/data.jsonl")
    assert path.read_bytes() == b'{"a": 1}\n' and path.name == "data.jsonl"
    assert local_copy(f"s3://{bucket}/in/data.jsonl") == path  # cached by ETag
    with pytest.raises(NotFound, match="no such object"):
        local_copy(f"s3://{bucket}/in/absent.jsonl")
    with pytest.raises(NotFound, match="no such file"):
        local_copy(str(tmp_path / "absent.jsonl"))
    assert local_copy("builtin:pku_saferlhf_sample.jsonl").is_file()
