"""Retraining on new data (docs/lifecycle.md): ingest from a watched prefix (ledger, validation, quarantine,
dedup, pool versions), the `midpo-retrain` flow on a real Prefect API and moto S3 running the real tiny-ci
pipeline only when the dataset version changed, and the `retrain` deployment of prefect.yaml."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import yaml

from midpo import retrain
from midpo.config import load_config
from midpo.data.readers import read_source
from midpo.storage import ArtifactStore
from midpo.world import generate_pairs

ROOT = Path(__file__).resolve().parent.parent
WORLD = generate_pairs(load_config("tiny-ci").world)  # the tiny world's own pairs: valid for the tiny base's vocabulary
DATA = load_config("tiny-ci").data  # the data rules validation counts with


def swapped(i: int) -> dict:
    """World pair ``i`` with its responses in the other order and the labels following them: the same
    preference, a new record (another pair_id), every word known to the tiny base."""
    p = WORLD[i]
    flip = {None: None, 0: 1, 1: 0}
    row = {k: v for k, v in dataclasses.asdict(p).items() if k != "source"}
    row.update(
        response_0=p.response_1, response_1=p.response_0, is_response_0_safe=p.is_response_1_safe, is_response_1_safe=p.is_response_0_safe,
        better_response_id=flip[p.better_response_id], safer_response_id=flip[p.safer_response_id],
        extras={"helpfulness_rule": p.extras.get("helpfulness_rule", "detail")},
    )  # fmt: skip
    return row


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def pair_ids(rows: list[dict]) -> set[str]:
    from midpo.data.schema import PreferencePair

    return {PreferencePair(**r).pair_id for r in rows}


def pool_ids(result: retrain.IngestResult) -> set[str]:
    return {p.pair_id for p in read_source(result.pool, "pku").records}


NEW = [swapped(i) for i in range(0, 180, 30)]  # 6 records: harmful, borderline and benign prompts
BROKEN = jsonl([swapped(1), swapped(2)]) + json.dumps({**swapped(3), "better_response_id": 2}).encode() + b"\n" + json.dumps(swapped(4)).encode()[:50]


# --------------------------------------------------------------------------------------------------
# ingest (library)


def test_ingest_merges_each_new_file_once_dedups_records_and_versions_the_pool(tmp_path, monkeypatch):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    store = ArtifactStore()
    empty = retrain.ingest(str(inbox), DATA)
    assert (empty.files, empty.pool, empty.changed) == ([], None, False)

    (inbox / "a.jsonl").write_bytes(jsonl(NEW))
    (inbox / ".a.jsonl.part").write_bytes(b"{half an upload")  # temporary uploads and markers are not data
    (inbox / "_SUCCESS").write_bytes(b"")
    first = retrain.ingest(inbox.as_uri(), DATA)  # a folder as a path or a file:// URI: the same watch
    assert [f["status"] for f in first.files] == ["merged"] and first.records_added == 6 and first.changed
    assert pool_ids(first) == pair_ids(NEW) and first.pool_records == 6
    assert store.children("pools") == [first.pool_version]

    with monkeypatch.context() as m:  # the ledger holds a.jsonl with its size and mtime: not hashed again
        m.setattr(retrain, "sha256_file", lambda path: pytest.fail(f"{path} hashed again"))
        again = retrain.ingest(str(inbox), DATA)
    assert (again.files, again.skipped, again.changed, again.pool_version) == ([], 1, False, first.pool_version)
    os.utime(inbox / "a.jsonl")  # touched, the same bytes: hashed, and still the ledger's
    assert retrain.ingest(str(inbox), DATA).skipped == 1

    (inbox / "later").mkdir()
    (inbox / "later" / "copy.jsonl").write_bytes(jsonl(list(reversed(NEW))))  # the same records, another key and order
    copy = retrain.ingest(str(inbox), DATA)
    assert [f["status"] for f in copy.files] == ["duplicate"] and copy.duplicates_dropped == 6
    assert not copy.changed and copy.pool_version == first.pool_version and store.children("pools") == [first.pool_version]

    # two known, two new, one excluded by a warning (identical responses): the new ones join
    more = [NEW[0], NEW[1], swapped(5), swapped(95), {**swapped(6), "response_1": swapped(6)["response_0"]}]
    (inbox / "b.jsonl").write_bytes(jsonl(more))
    grown = retrain.ingest(str(inbox), DATA)
    (entry,) = grown.files
    assert entry["status"] == "merged" and (entry["added"], entry["duplicates"]) == (2, 2) and entry["exclusions"] == {"identical_responses": 1}
    assert grown.changed and grown.pool_records == 8 and pool_ids(grown) == pair_ids(NEW) | pair_ids(more[2:4])
    assert sorted(store.children("pools")) == sorted([first.pool_version, grown.pool_version])

    ledger = json.loads(Path(grown.ledger[len("file://") :]).read_text())
    assert len(ledger["files"]) == 3 and ledger["pool"]["version"] == grown.pool_version
    assert all(key.endswith("#" + f["sha256"]) for key, f in ledger["files"].items())  # keyed by URI + content hash


def test_a_broken_file_is_quarantined_with_its_report_and_never_half_merged(bucket, monkeypatch):
    monkeypatch.setenv("MIDPO_ARTIFACT_ROOT", f"s3://{bucket}/midpo")
    s3 = boto3.client("s3")
    prefix = f"s3://{bucket}/incoming/"
    s3.put_object(Bucket=bucket, Key="incoming/good.jsonl", Body=jsonl(NEW[:4]))
    good = retrain.ingest(prefix, DATA)
    assert good.merged == [f"s3://{bucket}/incoming/good.jsonl"] and good.pool_records == 4

    # two valid records, a bad label on line 3, a truncated line 4: nothing of it may reach the pool
    s3.put_object(Bucket=bucket, Key="incoming/broken.jsonl", Body=BROKEN)
    s3.put_object(Bucket=bucket, Key="incoming/empty.jsonl", Body=b"")
    s3.put_object(Bucket=bucket, Key="incoming/prompts.jsonl", Body=jsonl([{"prompt": "hello"}]))
    out = retrain.ingest(prefix, DATA)
    assert [f["status"] for f in out.files] == ["quarantined"] * 3 and out.merged == []
    assert not out.changed and out.pool_version == good.pool_version and out.records_added == 0
    assert not pair_ids([swapped(1), swapped(2)]) & pool_ids(out)

    store = ArtifactStore()
    by_name = {f["uri"].rsplit("/", 1)[-1]: f for f in out.files}
    broken = by_name["broken.jsonl"]
    key = store.key_of(broken["quarantine"])
    assert key == f"quarantine/{broken['sha256']}" and store.is_complete(key)
    folder = store.fetch(key)
    assert (folder / "broken.jsonl").read_bytes() == BROKEN
    report = json.loads((folder / "report.json").read_text())
    assert report["exit_code"] == 1 and report["uri"] == f"s3://{bucket}/incoming/broken.jsonl"
    problems = {(p["place"], p["reason"]) for p in report["problems"] if p["severity"] == "error"}
    assert problems == {("line 3", "bad_label"), ("line 3", "truncated")}  # the truncation: at the last good line
    assert "bad_label" in broken["why"] and "truncated" in broken["why"]
    empty = json.loads((store.fetch(store.key_of(by_name["empty.jsonl"]["quarantine"])) / "report.json").read_text())
    assert empty["exit_code"] == 2 and "empty" in empty["error"]  # nothing readable: validate --json's shape
    assert "no preference pairs" in by_name["prompts.jsonl"]["why"]

    # the same broken bytes under another key: quarantined again, into the same folder
    s3.put_object(Bucket=bucket, Key="incoming/retry/broken-again.jsonl", Body=BROKEN)
    (again,) = retrain.ingest(prefix, DATA).files
    assert again["status"] == "quarantined" and again["quarantine"] == broken["quarantine"]


def test_a_file_changed_after_the_listing_is_left_to_the_next_poll(bucket, tmp_path, monkeypatch):
    """The ledger records the content that was merged: a file rewritten between listing and reading is not
    recorded under its listed ETag or sha256 with other records merged; the next poll reads its new version."""
    monkeypatch.setenv("MIDPO_ARTIFACT_ROOT", f"s3://{bucket}/midpo")
    s3 = boto3.client("s3")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for prefix, write in (
        (f"s3://{bucket}/incoming/", lambda rows: s3.put_object(Bucket=bucket, Key="incoming/a.jsonl", Body=jsonl(rows))),
        (inbox.as_uri() + "/", lambda rows: (inbox / "a.jsonl").write_bytes(jsonl(rows))),
    ):
        write(NEW[:2])
        listed = retrain.list_files(prefix)
        write(NEW[2:5])  # rewritten before ingest reads it
        with monkeypatch.context() as m:
            m.setattr(retrain, "list_files", lambda *_a, listed=listed, **_k: listed)
            stale = retrain.ingest(prefix, DATA)
        assert (stale.files, stale.records_added, stale.pool) == ([], 0, None)
        (entry,) = retrain.ingest(prefix, DATA).files
        assert entry["status"] == "merged" and entry["added"] == 3 and entry["etag"] != listed[0].etag


def test_a_concurrent_ledger_update_is_detected_not_overwritten(bucket, monkeypatch):
    monkeypatch.setenv("MIDPO_ARTIFACT_ROOT", f"s3://{bucket}/midpo")
    ledger = retrain.Ledger(f"s3://{bucket}/incoming")
    state, token = ledger.load()
    assert token is None and state["files"] == {}
    ledger.save({**state, "files": {"a#1": {}}}, None)
    with pytest.raises(retrain.LedgerConflict):
        ledger.save(state, None)  # a second first writer
    mine, token = ledger.load()
    ledger.save({**mine, "files": {"a#1": {}, "b#2": {}}}, token)
    with pytest.raises(retrain.LedgerConflict):
        ledger.save({**mine, "files": {"c#3": {}}}, token)  # read before the write above
    assert set(ledger.load()[0]["files"]) == {"a#1", "b#2"}


@pytest.mark.usefixtures("prefect_harness")
def test_retrain_flow_runs_the_pipeline_only_when_the_dataset_version_changes(tmp_path, monkeypatch):
    """The flow's decision, with a stand-in for the ``midpo`` subflow (the test below runs the real one)."""
    from midpo_flows import retrain as flow_module

    from midpo.pipeline import run_pipeline

    run_pipeline(load_config("tiny-ci"), until="world")  # what the data stage reads besides the pool
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    runs: list[list[str]] = []

    def pipeline(profile: str, overrides: list[str], report_dir: str | None) -> dict:
        runs.append(overrides)
        version = retrain.dry_run_dataset_version(profile, overrides)
        return {"run": {"dataset_version": version, "cache_hits": ["world"]}, "outputs": {}, "report_dir": report_dir}

    monkeypatch.setattr(flow_module, "midpo", pipeline)

    def poll(overrides: list[str] | None = None, force: bool = False) -> dict:
        return flow_module.midpo_retrain(prefix=str(inbox), profile="tiny-ci", overrides=overrides, force=force)

    assert not poll()["ran"] and runs == []
    (inbox / "world-again.jsonl").write_bytes(jsonl([{k: v for k, v in dataclasses.asdict(p).items() if k != "source"} for p in WORLD[:5]]))
    same = poll()  # only the profile's own pairs: its dataset as it was
    assert same["pool_changed"] and not same["ran"] and "adds nothing" in same["reason"] and runs == []

    (inbox / "new.jsonl").write_bytes(jsonl(NEW))
    first = poll()
    assert first["ran"] and first["previous_dataset_version"] is None and len(runs) == 1
    (source,) = [o for o in runs[0] if o.startswith("data.sources=")]
    sources = json.loads(source.partition("=")[2])
    assert [s["uri"] for s in sources] == ["artifact:world/pairs.jsonl", ArtifactStore().uri(f"pools/{first['pool_version']}/pool.jsonl")]  # the profile's + the pool
    assert sources[1]["format"] == "pku"

    idle = poll()
    assert not idle["ran"] and idle["dataset_version"] == idle["previous_dataset_version"] == first["dataset_version"] and len(runs) == 1
    forced = poll(force=True)
    assert forced["ran"] and "(forced)" in forced["reason"] and len(runs) == 2
    # another config of the profile keeps its own record: a first retraining of its own
    other = poll(["data.split_seed=1"])
    assert other["ran"] and other["previous_dataset_version"] is None and other["dataset_version"] != first["dataset_version"]


# --------------------------------------------------------------------------------------------------
# the midpo-retrain flow (real Prefect API, moto S3, the tiny-ci pipeline)


def registered_versions() -> list[int]:
    import mlflow

    from midpo.tracking import tracking_uri

    return sorted(int(v.version) for v in mlflow.MlflowClient(tracking_uri()).search_model_versions("name = 'midpo'"))


def pipeline_flow_runs() -> int:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        return len(client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["midpo"])), limit=200))


@pytest.mark.usefixtures("prefect_harness")
def test_retrain_flow_new_file_one_version_same_content_none_broken_file_none(bucket, monkeypatch, tmp_path):
    from midpo_flows.retrain import midpo_retrain
    from midpo_tasks.stages import ensure_gpu_limit

    from midpo.pipeline import run_pipeline

    ensure_gpu_limit(1)
    monkeypatch.setenv("MIDPO_ARTIFACT_ROOT", f"s3://{bucket}/midpo")
    s3 = boto3.client("s3")
    prefix = f"s3://{bucket}/incoming/"
    nothing = midpo_retrain(prefix=prefix, profile="tiny-ci")
    assert not nothing["ran"] and nothing["reason"] == "no incoming data yet"

    run_pipeline(load_config("tiny-ci"), until="base")  # built before the new data: its stages stay cache hits
    s3.put_object(Bucket=bucket, Key="incoming/2024-06-01/new.jsonl", Body=jsonl(NEW))
    out = midpo_retrain(prefix=prefix, profile="tiny-ci", report_dir=str(tmp_path / "report"))
    assert out["ran"] and out["merged"] == [f"{prefix}2024-06-01/new.jsonl"] and out["records_added"] == 6
    assert registered_versions() == [1] and out["registered_version"] == 1
    assert {"world", "base"} <= set(out["cache_hits"]) and "data" not in out["cache_hits"]
    import mlflow

    from midpo.tracking import tracking_uri

    version = mlflow.MlflowClient(tracking_uri()).get_model_version("midpo", "1")
    assert version.tags["midpo.dataset_version"] == out["dataset_version"] != out["previous_dataset_version"]
    meta = json.loads((tmp_path / "report" / "metrics.json").read_text())["run"]
    assert meta["dataset_version"] == out["dataset_version"]

    runs = pipeline_flow_runs()
    s3.put_object(Bucket=bucket, Key="incoming/2024-06-02/same-again.jsonl", Body=jsonl(NEW[::-1]))  # the same content, another key
    same = midpo_retrain(prefix=prefix, profile="tiny-ci")
    assert not same["ran"] and same["new_files"] == 1 and same["duplicates_dropped"] == 6 and not same["pool_changed"]
    assert same["dataset_version"] == same["previous_dataset_version"] == out["dataset_version"] and "unchanged" in same["reason"]

    s3.put_object(Bucket=bucket, Key="incoming/2024-06-03/broken.jsonl", Body=BROKEN)
    broken = midpo_retrain(prefix=prefix, profile="tiny-ci")
    print("\n\n".join(retrain.format_summary(s) for s in (nothing, out, same, broken)))
    assert not broken["ran"] and broken["merged"] == [] and len(broken["quarantined"]) == 1
    store = ArtifactStore()
    report = json.loads((store.fetch(store.key_of(broken["quarantined"][0])) / "report.json").read_text())
    assert {p["reason"] for p in report["problems"]} == {"bad_label", "truncated"}
    assert registered_versions() == [1] and pipeline_flow_runs() == runs  # no pipeline run, no new version


@pytest.mark.usefixtures("prefect_harness")
def test_cli_retrain_on_an_empty_folder_runs_nothing(tmp_path, capsys, monkeypatch):
    from midpo.cli import main

    for name in ("PREFECT_HOME", "PREFECT_SERVER_EPHEMERAL_ENABLED", "PREFECT_SERVER_ANALYTICS_ENABLED", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"):
        monkeypatch.delenv(name, raising=False)  # restored afterwards: the CLI sets them for its own Prefect API
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    assert main(["retrain", "--prefix", str(inbox), "--profile", "tiny-ci", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ran"] is False and out["new_files"] == 0 and out["reason"] == "no incoming data yet"


# --------------------------------------------------------------------------------------------------
# the deployment


def test_prefect_yaml_deploys_retrain_with_a_cron_schedule(prefect_harness):
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.flows import load_flow_from_entrypoint
    from prefect.settings import PREFECT_API_URL

    (spec,) = [d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"] if d["name"] == "retrain"]
    flow = load_flow_from_entrypoint(str(ROOT / spec["entrypoint"]))  # the entrypoint imports
    assert flow.name == "midpo-retrain" and set(spec["parameters"]) <= set(flow.parameters.properties)
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=spec["work_pool"]["name"], type="process"))
        except ObjectAlreadyExists:
            pass
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    prefect = Path(sys.executable).parent / "prefect"
    done = subprocess.run([str(prefect), "--no-prompt", "deploy", "--name", "retrain"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("midpo-retrain/retrain")
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "*/15 * * * *" and schedule.active
    assert deployment.parameters == spec["parameters"] and deployment.work_pool_name == "midpo-local"
    assert deployment.global_concurrency_limit is not None and deployment.global_concurrency_limit.limit == 1
