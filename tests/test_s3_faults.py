"""S3 that throttles and drops connections (tests/s3_faults.py between boto3 and moto): every call still
gets through, the artifact store's versions are complete or absent, never half-written, and a whole
pipeline run on such an endpoint finishes with nothing lost."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time
from collections import Counter
from pathlib import Path

import boto3
import botocore.retries.standard
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from midpo.storage import MANIFEST, ArtifactStore, NotFound
from s3_faults import FaultyProxy


@pytest.fixture
def faulty(s3_endpoint, monkeypatch):
    """A fault-injecting proxy to the moto endpoint (disarmed); AWS_ENDPOINT_URL points every new boto3
    client at it."""
    p = FaultyProxy(s3_endpoint, every=3)
    with p as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        yield p


@pytest.fixture
def fast_retries(monkeypatch):
    """boto3's standard-mode backoff (up to 1, 2, 4 ... s per retry) cut to 10 ms: same retries, less waiting."""
    monkeypatch.setattr(botocore.retries.standard.ExponentialBackoff, "delay_amount", lambda self, context: 0.01)


def _client(url: str):
    return boto3.client("s3", endpoint_url=url, config=Config(retries={"mode": "standard", "max_attempts": 8}))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _objects(s3, bucket: str, prefix: str) -> dict[str, int]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def test_every_call_gets_through_byte_exact(faulty, bucket, fast_retries):
    s3 = _client(faulty.url)
    payloads = {f"many/{i:03d}.bin": os.urandom(i * 997) for i in range(40)}  # 0 bytes to ~39 KB
    payloads["many/big.bin"] = os.urandom(300_000)  # several reads of the proxy's 64 KiB relay
    faulty.arm()
    for key, data in payloads.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    for key, data in payloads.items():
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == data
        assert s3.head_object(Bucket=bucket, Key=key)["ContentLength"] == len(data)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="many/", PaginationConfig={"PageSize": 7})
    assert sorted(o["Key"] for page in pages for o in page.get("Contents", [])) == sorted(payloads)
    for key in payloads:
        s3.delete_object(Bucket=bucket, Key=key)
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="many/")
    with pytest.raises(ClientError) as missing:  # an error response (no body: HEAD) passes through as is
        s3.head_object(Bucket=bucket, Key="many/000.bin")
    assert missing.value.response["Error"]["Code"] == "404"
    assert faulty.requests > 4 * len(payloads) and faulty.slowdowns > 10 and faulty.resets > 10, vars(faulty)


def test_faults_only_while_armed(faulty, bucket):
    s3 = _client(faulty.url)
    faulty.arm(seconds=0.3)
    assert faulty.armed
    time.sleep(0.4)
    assert not faulty.armed
    faulty.arm()
    faulty.disarm()
    for _ in range(9):
        s3.head_bucket(Bucket=bucket)
    assert (faulty.requests, faulty.slowdowns, faulty.resets) == (9, 0, 0) and not any(fault for *_, fault in faulty.log)


def test_chunked_request_bodies_are_forwarded(faulty, bucket):
    conn = http.client.HTTPConnection(faulty.url.removeprefix("http://"))
    data = [os.urandom(n) for n in (1, 70_000, 3)]
    for key in ("chunked-1", "chunked-2"):  # two on one keep-alive connection
        conn.request("PUT", f"/{bucket}/{key}", body=iter(data), encode_chunked=True)  # Transfer-Encoding: chunked
        response = conn.getresponse()
        assert response.status == 200, response.read()
        response.read()
    for key in ("chunked-1", "chunked-2"):
        assert _client(faulty.url).get_object(Bucket=bucket, Key=key)["Body"].read() == b"".join(data)


def _folder(root: Path) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "model.bin").write_bytes(os.urandom(9 * 1024 * 1024))  # over boto3's 8 MiB: a multipart upload
    (root / "config.json").write_text(json.dumps({"hidden": 32}))
    (root / "empty").write_bytes(b"")
    for i in range(6):
        (root / "sub" / f"part-{i}.txt").write_text(f"part {i}\n" * (i * 100))
    (root / "sub" / "deeper" / "x.npy").write_bytes(os.urandom(50_000))
    return root


def _assert_fetched_equal(store: ArtifactStore, key: str, source: Path, dest: Path) -> None:
    manifest = store.manifest(key)
    got = store.fetch(key, dest)
    files = {str(p.relative_to(source)) for p in source.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == files
    for rel, entry in manifest["files"].items():
        data = (got / rel).read_bytes()
        assert data == (source / rel).read_bytes() and _sha(data) == entry["sha256"] and len(data) == entry["size"], rel


def test_publish_and_fetch_through_faults(faulty, bucket, fast_retries, tmp_path):
    store = ArtifactStore(f"s3://{bucket}/arts")
    source = _folder(tmp_path / "src")
    faulty.arm()
    store.publish(source, "things/v1", metadata={"why": "faults"})
    assert store.is_complete("things/v1")
    _assert_fetched_equal(store, "things/v1", source, tmp_path / "fetched")
    assert faulty.slowdowns > 0 and faulty.resets > 0, vars(faulty)


def test_a_publish_that_dies_leaves_no_complete_version_and_a_retry_completes_it(faulty, bucket, fast_retries, tmp_path):
    store = ArtifactStore(f"s3://{bucket}/arts")
    source = _folder(tmp_path / "src")
    faulty.arm()
    faulty.fail_if = lambda method, path, attempt: method == "PUT" and path.endswith(f"/{MANIFEST}")  # every attempt fails
    with pytest.raises((ClientError, BotoCoreError)):
        store.publish(source, "things/v1")
    assert not store.is_complete("things/v1")
    with pytest.raises(NotFound):
        store.fetch("things/v1", tmp_path / "nothing")
    s3 = _client(faulty.url)
    leftovers = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="arts/things/v1/")["Contents"]]
    assert "arts/things/v1/model.bin" in leftovers and f"arts/things/v1/{MANIFEST}" not in leftovers  # the files, no manifest

    faulty.fail_if = None  # the retry (another process, later)
    store.publish(source, "things/v1")
    assert store.is_complete("things/v1")
    _assert_fetched_equal(store, "things/v1", source, tmp_path / "fetched")


def test_a_manifest_put_whose_reply_is_lost_still_publishes(s3_endpoint, bucket, fast_retries, monkeypatch, tmp_path):
    """The manifest PUT takes effect, its reply is lost and boto3 retries: the retry's ``If-None-Match: *``
    then finds the manifest of the first attempt (412 PreconditionFailed), which is this very version."""
    seen = []

    def first_manifest_put(method: str, path: str, attempt: int) -> bool:
        hit = method == "PUT" and path.endswith(f"/{MANIFEST}")
        seen.append(hit)
        return hit and seen.count(True) == 1

    store = ArtifactStore(f"s3://{bucket}/arts")
    source = _folder(tmp_path / "src")
    faulty = FaultyProxy(s3_endpoint, modes=("lost-reply",))
    faulty.fail_if = first_manifest_put
    with faulty as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        store.publish(source, "things/v1")
    assert faulty.lost_replies == 1
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    assert store.is_complete("things/v1")
    _assert_fetched_equal(store, "things/v1", source, tmp_path / "fetched")


def run_profile(profile: str, overrides: tuple[str, ...] = (), report_dir: Path | None = None) -> dict:
    """The whole pipeline of ``profile`` through the `midpo` flow (on the session's Prefect API), as
    ``midpo run`` does it; returns the flow's summary."""
    from midpo_flows.pipeline import midpo
    from midpo_tasks.stages import ensure_gpu_limit

    ensure_gpu_limit(1)
    return midpo(profile=profile, overrides=list(overrides), report_dir=str(report_dir) if report_dir else None)


# Checkpoints mirrored to the artifact root, one every 5 steps (kept: the newest 2), so the mirror's
# publish, list and prune go through the faults too.
MIRRORED = ("training.sync_checkpoints=true", "training.save_steps=5", "router.training.sync_checkpoints=true", "router.training.save_steps=5")


@pytest.mark.usefixtures("prefect_harness")
def test_tiny_ci_survives_a_faulty_s3_with_nothing_lost_or_half_written(faulty, bucket, s3_endpoint, monkeypatch, tmp_path):
    from mlflow.store.artifact.s3_artifact_repo import _cached_get_s3_client

    monkeypatch.setenv("MIDPO_ARTIFACT_ROOT", f"s3://{bucket}/midpo")
    # MLflow caches its S3 client, not keyed by AWS_ENDPOINT_URL: a fresh one, through the proxy. Its retry
    # config is boto3's default (legacy mode, 5 attempts); no AWS_RETRY_MODE here, so that is what is tested.
    _cached_get_s3_client.cache_clear()
    # One request in 30 fails, throughout, with boto3's real backoff between attempts. On top of that, the
    # first attempt of every second upload of MLflow's client (its artifact location is under the root)
    # fails, and every second manifest PUT's first reply is lost (its retry's If-None-Match then finds the
    # manifest: ArtifactStore._publish_s3 must keep the version, not fail).
    faulty.modes = ("slowdown", "reset", "lost-reply")
    faulty.every = 30
    mlflow_prefix = f"/{bucket}/midpo/mlflow/"
    nth: Counter[str] = Counter()

    def first_attempts(method: str, path: str, attempt: int) -> bool | str | None:
        kind = "mlflow" if path.startswith(mlflow_prefix) else "manifest" if path.endswith(f"/{MANIFEST}") else None
        if method != "PUT" or attempt > 1 or kind is None:
            return None
        nth[kind] += 1
        if nth[kind] % 2:
            return None
        return True if kind == "mlflow" else "lost-reply"  # True: the next fault of the cycle

    faulty.fail_if = first_attempts
    faulty.arm()
    t0 = time.perf_counter()
    try:
        summary = run_profile("tiny-ci", MIRRORED, report_dir=tmp_path / "report")
        wall = time.perf_counter() - t0
        rerun = run_profile("tiny-ci", MIRRORED)  # through the faults too: Prefect's cache, checked against the store
    finally:
        _cached_get_s3_client.cache_clear()  # no later test may get a client of this proxy (closed by then)
    faulty.disarm()
    mlflow_faults = [fault for _, path, fault in faulty.log if fault and path.startswith(mlflow_prefix)]
    lost_manifests = sum(fault == "lost-reply" and path.endswith(MANIFEST) and not path.startswith(mlflow_prefix) for _, path, fault in faulty.log)
    print(f"tiny-ci through the faulty proxy: {wall:.1f} s; {faulty.requests} requests, {faulty.slowdowns} 503s, {faulty.resets} resets"
          f" ({faulty.lost_replies} after forwarding); MLflow's uploads: {Counter(mlflow_faults)};"
          f" manifest PUTs with lost replies: {lost_manifests}")
    assert (tmp_path / "report" / "metrics.json").is_file() and (tmp_path / "report" / "report.md").is_file()
    assert faulty.slowdowns > 0 and faulty.resets > 0 and faulty.lost_replies > 0, vars(faulty)
    assert mlflow_faults and lost_manifests  # MLflow's client got through its faults too
    assert rerun["run"]["cache_hits"] == list(summary["run"]["stage_seconds"])  # every stage: everything it published is there
    store = ArtifactStore()
    assert all(store.is_complete(store.key_of(uri)) for uri in summary["outputs"].values())

    s3 = _client(s3_endpoint)  # straight to moto: what is stored, not what the proxy lets through
    objects = _objects(s3, bucket, "midpo/")
    versions = sorted((k[: -len(MANIFEST) - 1] for k in objects if k.endswith(f"/{MANIFEST}")), key=len, reverse=True)
    owner = {k: next((v for v in versions if k.startswith(v + "/")), None) for k in objects}  # the innermost version
    for version in versions:
        manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"{version}/{MANIFEST}")["Body"].read())
        stored = {k[len(version) + 1 :] for k, v in owner.items() if v == version} - {MANIFEST}
        assert stored == set(manifest["files"]), f"{version}: files {sorted(stored ^ set(manifest['files']))} differ from its manifest"
        for rel, entry in manifest["files"].items():
            data = s3.get_object(Bucket=bucket, Key=f"{version}/{rel}")["Body"].read()
            assert (len(data), _sha(data)) == (entry["size"], entry["sha256"]), f"{version}/{rel}"
    # Outside the store's versions there is MLflow's own artifact store only (run artifacts: config.json,
    # the report; the logged model: MLmodel, code, environment files), which keeps no manifests: each of
    # its objects is one PUT, complete or absent. No folder without a manifest is left anywhere else:
    # the mirrored checkpoints pruned during training were deleted manifest first, then every file, and
    # no publish was interrupted (every call got through).
    unversioned = sorted(k for k, v in owner.items() if v is None)
    assert unversioned and all(k.startswith("midpo/mlflow/") for k in unversioned), [k for k in unversioned if not k.startswith("midpo/mlflow/")]
    assert any("/checkpoint-" in v for v in versions)  # the mirror ran (the MLflow model's copy of the MoE folder, its manifest included, is checked above too)
