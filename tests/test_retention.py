"""``midpo prune`` (midpo.retention): a real MLflow registry (SQLite) and real artifact roots (file:// and s3 on
the moto endpoint), with a small fake history: folders published with ArtifactStore, their manifests'
``created`` moved into the past, and model versions registered with the lineage tags of
``midpo.stages.register_stage`` (their creation time moved back in the registry's database)."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from midpo import retention
from midpo.retention import RetentionError, apply, make_plan
from midpo.stages import LINEAGE
from midpo.storage import MANIFEST, ArtifactRef, ArtifactStore, s3_client, split_s3

DAY = 86400.0


@pytest.fixture(scope="module")
def registry_db(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("registry") / "mlflow.db"


@pytest.fixture
def client(registry_db, monkeypatch):
    """An MLflow client on the module's SQLite registry (the registry store resolves logged models through
    the global tracking URI, hence the variable)."""
    from mlflow import MlflowClient

    import mlflow

    uri = f"sqlite:///{registry_db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # an earlier test's mlflow.set_tracking_uri would win over the variable
    return MlflowClient(tracking_uri=uri)


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path, monkeypatch) -> ArtifactStore:
    if request.param == "file":
        root = (tmp_path / "artifacts").as_uri()
    else:
        root = f"s3://{request.getfixturevalue('bucket')}/artifacts"
    monkeypatch.setenv("MIDPO_ARTIFACT_ROOT", root)
    return ArtifactStore(root)


def _hex() -> str:
    return uuid.uuid4().hex[:16]


def _set_created(store: ArtifactStore, key: str, days_ago: float) -> None:
    """Move a version's manifest ``created`` into the past (what the policy reads its age from)."""
    manifest = store.manifest(key)
    manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - days_ago * DAY))
    body = json.dumps(manifest, indent=2)
    if store.is_s3:
        bucket, prefix = split_s3(store.uri(key))
        s3_client().put_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}", Body=body.encode())
    else:
        (Path(store.uri(key)[len("file://") :]) / MANIFEST).write_text(body)


def _publish(store: ArtifactStore, tmp: Path, key: str, days_ago: float, metadata: dict | None = None, size: int = 64) -> ArtifactRef:
    folder = tmp / uuid.uuid4().hex
    folder.mkdir(parents=True)
    (folder / "data.bin").write_bytes(uuid.uuid4().bytes * (size // 16))
    ref = store.publish(folder, key, metadata=metadata)
    _set_created(store, key, days_ago)
    return ref


@dataclass
class Run:
    """One fake pipeline run: its artifacts (name -> ref) and the version it registered."""

    refs: dict[str, ArtifactRef] = field(default_factory=dict)
    version: int = 0
    exclusive: list[str] = field(default_factory=list)  # keys only this run produced


class History:
    def __init__(self, store: ArtifactStore, client, db: Path, tmp: Path, model: str) -> None:
        self.store, self.client, self.db, self.tmp, self.model = store, client, db, tmp, model
        client.create_registered_model(model)
        self.experiment = client.create_experiment(f"exp-{model}", artifact_location=(tmp / "mlruns").as_uri())
        self.shared = {
            "base": _publish(store, tmp, f"bases/{_hex()}", 200),
            "reward": _publish(store, tmp, f"judges/reward/{_hex()}", 200),
            "cost": _publish(store, tmp, f"judges/cost/{_hex()}", 200),
        }

    def run(self, days_ago: float, *, logged_model: bool = False) -> Run:
        """The artifacts of one pipeline run (metadata naming their inputs as the stages do) and a
        registered version with register_stage's lineage tags, all ``days_ago`` old."""
        s, t, b = self.store, self.tmp, self.shared["base"]
        r = Run()
        r.refs["dataset"] = _publish(s, t, f"datasets/{_hex()}", days_ago)
        d = r.refs["dataset"]
        r.refs["refs"] = _publish(s, t, f"refs/{_hex()}", days_ago, {"base": b.version, "dataset": d.version, "max_length": 64})
        r.refs["scores"] = _publish(s, t, f"scores/{_hex()}", days_ago, {"reward": self.shared["reward"].version, "cost": self.shared["cost"].version, "dataset": d.version})
        for expert in ("safety-expert", "helpfulness-expert"):
            r.refs[expert] = _publish(s, t, f"adapters/{expert}/{_hex()}", days_ago, {"method": expert, "base": {"uri": b.uri, "version": b.version}, "dataset": d.version})
        r.refs["dual"] = _publish(s, t, f"dual/{_hex()}", days_ago, {"rule": "label+safety"})
        versions = {n: r.refs[n].version for n in ("dual", "refs", "safety-expert", "helpfulness-expert")}
        r.refs["router"] = _publish(s, t, f"routers/{_hex()}", days_ago, {**versions, "base": b.version, "metrics": {"loss": 0.5}})
        r.refs["midpo"] = _publish(s, t, f"models/midpo/{_hex()}", days_ago, {n: r.refs[n].version for n in ("safety-expert", "helpfulness-expert", "router")} | {"base": b.version})
        r.refs["eval"] = _publish(s, t, f"evals/midpo/{_hex()}", days_ago, {"method": "midpo"})  # referenced by nothing
        r.refs["checkpoint"] = _publish(s, t, f"checkpoints/{s.key_of(r.refs['safety-expert'].uri)}/checkpoint-2", days_ago, {"global_step": 2})
        r.exclusive = [s.key_of(ref.uri) for ref in r.refs.values()]
        r.refs["base"] = b
        source = "/nowhere/model"
        if logged_model:
            source = f"models:/{self.client.create_logged_model(self.experiment).model_id}"
        r.version = self.register(days_ago, source)
        tags = {f"midpo.{n.replace('-', '_')}_version": r.refs[n].version for n in LINEAGE}
        tags.update({f"midpo.{n.replace('-', '_')}_uri": r.refs[n].uri for n in LINEAGE})
        tags["midpo.model_version"] = r.refs["midpo"].version
        for key, value in tags.items():
            self.client.set_model_version_tag(self.model, str(r.version), key, value)
        return r

    def register(self, days_ago: float, source: str = "/nowhere/model") -> int:
        """A registered version, ``days_ago`` old; its number."""
        version = int(self.client.create_model_version(self.model, source=source).version)
        with sqlite3.connect(self.db) as con:  # the registry's own clock cannot be set: move the row back
            con.execute("UPDATE model_versions SET creation_time = ? WHERE name = ? AND version = ?", (int((time.time() - days_ago * DAY) * 1000), self.model, version))
        return version

    def keys(self, run: Run, names=None) -> list[str]:
        return [self.store.key_of(ref.uri) for n, ref in run.refs.items() if names is None or n in names]


def _complete(store: ArtifactStore, keys) -> dict[str, bool]:
    return {k: store.is_complete(k) for k in keys}


def _versions(client, model) -> set[int]:
    return {int(mv.version) for mv in client.search_model_versions(f"name = '{model}'")}


def _all_objects(store: ArtifactStore) -> list[tuple[str, int]]:
    return sorted((o.key, o.size) for o in retention._list_objects(store))


@pytest.fixture
def history(store, client, registry_db, tmp_path) -> History:
    return History(store, client, registry_db, tmp_path / "src", f"midpo-{uuid.uuid4().hex[:8]}")


def test_policy_keeps_aliases_history_newest_young_and_their_lineage(history, store, client, capsys):
    """Six runs: v1 champion (90 days), v2 (80), v3 in the champion history (60), v4 (50), v5 (10), v6
    challenger (5). --keep-versions 1 --older-than 30: v2 and v4 go with what only they used; v1's whole
    upstream graph stays although it is 90 days old."""
    t0 = time.monotonic()
    h = history
    runs = {i: h.run(days) for i, days in zip(range(1, 7), (90, 80, 60, 50, 10, 5), strict=True)}
    client.set_registered_model_alias(h.model, "champion", str(runs[1].version))
    client.set_registered_model_alias(h.model, "challenger", str(runs[6].version))
    client.set_registered_model_tag(h.model, retention.HISTORY_TAG, json.dumps([str(runs[3].version), str(runs[1].version)]))
    # a world family with two old versions that nothing references: the newest stays
    w_old, w_new = (_publish(store, h.tmp, f"worlds/{_hex()}", d) for d in (120, 100))
    # a retraining ledger: its current pool stays, the previous pool (named only by the current's metadata) goes
    p_old = _publish(store, h.tmp, f"pools/{_hex()}", 70, {"version": "x"})
    p_cur = _publish(store, h.tmp, f"pools/{_hex()}", 65, {"previous": p_old.version})
    p_newer_unused = _publish(store, h.tmp, f"pools/{_hex()}", 64, {})  # newest of the family: kept by keep_artifacts
    quarantine = _publish(store, h.tmp, f"quarantine/{uuid.uuid4().hex}{uuid.uuid4().hex}", 70, {"why": "truncated"})
    ledger = {"pool": {"version": p_cur.version, "uri": f"{p_cur.uri}/pool.jsonl"}, "files": {"x": {"status": "quarantined", "quarantine": quarantine.uri}}, "trained": {}}
    _write_raw(store, "retrain/abc123/ledger.json", json.dumps(ledger).encode())
    _write_raw(store, "mlflow/1/run/artifacts/model.bin", b"x" * 100)  # MLflow's own: never touched
    # an abandoned training's checkpoint (its artifact never completed), and a fresh one (still training)
    stale = _publish(store, h.tmp, f"checkpoints/adapters/dpo-mix/{_hex()}/checkpoint-4", 45)
    fresh = _publish(store, h.tmp, f"checkpoints/adapters/dpo-mix/{_hex()}/checkpoint-1", 1)
    print(f"history built in {time.monotonic() - t0:.1f} s")

    plan = make_plan(store, client, models=[h.model], keep_versions=1, older_than_days=30)
    decided = {i.name: i for i in plan.items}
    name = lambda i: f"{h.model}/{runs[i].version}"
    assert {i.name for i in plan.deletions("model-version")} == {name(2), name(4)}
    assert "alias @champion" in decided[name(1)].reasons
    assert any("champion history" in r for r in decided[name(3)].reasons)
    assert any("younger than 30" in r for r in decided[name(5)].reasons)
    assert "alias @challenger" in decided[name(6)].reasons
    champion_lineage = h.keys(runs[1], ("dataset", "base", "safety-expert", "helpfulness-expert", "router", "midpo", "refs", "dual"))
    for key in champion_lineage:
        assert decided[key].action == "keep", (key, decided[key].reasons)
    assert any("lineage of" in r and "@champion" in r for r in decided[h.keys(runs[1], ("router",))[0]].reasons)
    assert any(r.startswith("input of ") for r in decided[h.keys(runs[1], ("dual",))[0]].reasons)  # via the router's metadata
    for judge in ("reward", "cost"):  # newest of its family, and named by the scores of the young runs (kept: their inputs too)
        reasons = decided[store.key_of(h.shared[judge].uri)].reasons
        assert "among the newest 1 of judges/" + judge in reasons and any(r.startswith("input of scores/") for r in reasons), reasons
    doomed = [k for i in (2, 4) for k in runs[i].exclusive if "/checkpoint-" not in k]
    assert all(decided[k].action == "delete" for k in doomed), [(k, decided[k].reasons) for k in doomed if decided[k].action != "delete"]
    assert all(decided[k].action == "delete" for i in runs for k in runs[i].exclusive if "/checkpoint-" in k)  # artifact complete
    assert decided[store.key_of(runs[1].refs["eval"].uri)].action == "delete"  # old, unreferenced, not the newest
    assert decided[store.key_of(runs[6].refs["eval"].uri)].action == "keep"
    assert decided[store.key_of(w_old.uri)].action == "delete" and decided[store.key_of(w_new.uri)].action == "keep"
    assert decided[store.key_of(p_cur.uri)].action == "keep" and decided[store.key_of(p_old.uri)].action == "delete"
    assert decided[store.key_of(p_newer_unused.uri)].action == "keep"
    assert decided[store.key_of(quarantine.uri)].action == "keep"
    assert decided[store.key_of(stale.uri)].action == "delete" and decided[store.key_of(fresh.uri)].action == "keep"
    assert not any(n.startswith(("mlflow/", "retrain/")) for n in decided)
    assert plan.bytes_freed == sum(i.bytes for i in plan.deletions()) > 0

    # --dry-run through the CLI: the plan on stdout, nothing deleted
    from midpo.cli import main

    before = _all_objects(store)
    assert main(["prune", "--model", h.model, "--keep-versions", "1", "--older-than", "30", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"delete {name(2)}" in out and "dry run: nothing deleted" in out and f"frees {retention.human_bytes(plan.bytes_freed)}" in out
    assert _all_objects(store) == before and _versions(client, h.model) == {r.version for r in runs.values()}

    # without --yes and without a terminal: refused, nothing deleted
    assert main(["prune", "--model", h.model, "--keep-versions", "1", "--older-than", "30"]) == 1
    assert _all_objects(store) == before

    t1 = time.monotonic()
    assert main(["prune", "--model", h.model, "--keep-versions", "1", "--older-than", "30", "--yes", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    print(f"prune took {time.monotonic() - t1:.1f} s")
    assert {d["name"] for d in doc["deleted"]} == {i.name for i in plan.deletions()} and not doc["failed"]
    assert _versions(client, h.model) == {runs[i].version for i in (1, 3, 5, 6)}
    assert all(_complete(store, champion_lineage).values())
    assert not any(_complete(store, doomed).values())
    assert store.is_complete(store.key_of(h.shared["base"].uri))  # v2 used it too, the champion still does
    for obj in ("retrain/abc123/ledger.json", "mlflow/1/run/artifacts/model.bin"):
        assert obj in {k for k, _ in _all_objects(store)}
    # Every file left belongs to a kept version (no half-deleted version: deletion removes the manifest first)
    left = {k for k, _ in _all_objects(store)}
    for k in doomed:
        assert not any(o.startswith(k + "/") for o in left), k

    # The flow's check of a cached stage result (tasks/stages.py `_complete`): the deleted router's cached
    # result no longer counts, so the stage runs again; the champion's still does.
    from midpo_tasks.stages import _complete as cached_result_usable

    from midpo.pipeline import StageOutput

    assert not cached_result_usable(StageOutput({"router": runs[2].refs["router"]}, {}, True))
    assert cached_result_usable(StageOutput({"router": runs[1].refs["router"]}, {}, True))

    # A second prune with the same policy finds nothing more to delete
    again = make_plan(store, client, models=[h.model], keep_versions=1, older_than_days=30)
    assert not again.deletions()


def test_champion_and_challenger_survive_the_harshest_policy(history, store, client):
    """--keep-versions 0 --older-than 0 --keep-artifacts 0: everything unaliased goes; the champion and the
    challenger, however old, keep every artifact they reference."""
    h = history
    runs = [h.run(days) for days in (365, 300, 200, 100)]
    client.set_registered_model_alias(h.model, "champion", str(runs[0].version))  # the oldest
    client.set_registered_model_alias(h.model, "challenger", str(runs[1].version))
    plan = make_plan(store, client, models=[h.model], keep_versions=0, older_than_days=0, keep_artifacts=0)
    out = apply(plan, store, client)
    assert not out.failed
    assert _versions(client, h.model) == {runs[0].version, runs[1].version}
    for run in runs[:2]:
        kept = h.keys(run, ("dataset", "base", "safety-expert", "helpfulness-expert", "router", "midpo", "refs", "dual"))
        assert all(_complete(store, kept).values()), _complete(store, kept)
        for name in LINEAGE:  # every lineage tag of the aliased versions still resolves to a complete artifact
            uri = client.get_model_version(h.model, str(run.version)).tags[f"midpo.{name.replace('-', '_')}_uri"]
            assert store.is_complete(store.key_of(uri))
    for run in runs[2:]:
        assert not any(_complete(store, [k for k in run.exclusive]).values())
    assert not any(store.is_complete(store.key_of(r.refs[n].uri)) for r in runs for n in ("eval", "checkpoint"))


def test_apply_rechecks_the_registry_and_deletes_logged_models(history, store, client):
    """A version aliased between plan and apply survives with its artifacts; a deleted version's logged model
    is marked deleted (for `mlflow gc`)."""
    from mlflow.exceptions import MlflowException

    h = history
    runs = [h.run(days, logged_model=True) for days in (90, 80, 70)]
    client.set_registered_model_alias(h.model, "champion", str(runs[2].version))
    plan = make_plan(store, client, models=[h.model], keep_versions=0, older_than_days=30)
    assert {i.name for i in plan.deletions("model-version")} == {f"{h.model}/{runs[0].version}", f"{h.model}/{runs[1].version}"}
    client.set_registered_model_alias(h.model, "challenger", str(runs[1].version))  # meanwhile, a promotion flow
    logged = {r.version: client.get_model_version(h.model, str(r.version)).source.split("/")[-1] for r in runs}
    out = apply(plan, store, client)
    assert [i.name for i, why in out.skipped if i.kind == "model-version"] == [f"{h.model}/{runs[1].version}"]
    assert _versions(client, h.model) == {runs[1].version, runs[2].version}
    assert all(_complete(store, h.keys(runs[1], ("dataset", "router", "midpo", "dual"))).values())  # skipped: now referenced
    assert not any(_complete(store, [k for k in runs[0].exclusive]).values())
    with pytest.raises(MlflowException):
        client.get_logged_model(logged[runs[0].version])
    assert client.get_logged_model(logged[runs[1].version]).model_id == logged[runs[1].version]


def test_apply_rechecks_each_version_right_before_deleting_it(history, store, client):
    """A promotion that lands while apply deletes (MLflow's delete_model_version drops a version's aliases):
    each version is re-read right before its deletion, so one that got an alias or entered the champion
    history after apply began is skipped."""
    h = history
    versions = [h.register(days) for days in (90, 80, 70)]
    plan = make_plan(store, client, models=[h.model], keep_versions=0, older_than_days=30)
    assert {i.name for i in plan.deletions("model-version")} == {f"{h.model}/{v}" for v in versions}

    class PromotedMeanwhile:
        """The registry, where a promotion lands right after the first deletion."""

        def __getattr__(self, name):
            return getattr(client, name)

        def delete_model_version(self, name, version):
            client.delete_model_version(name, version)
            client.set_registered_model_alias(h.model, "champion", str(versions[1]))
            client.set_registered_model_tag(h.model, retention.HISTORY_TAG, json.dumps([str(versions[0]), str(versions[1])]))

    out = apply(plan, store, PromotedMeanwhile())
    assert [i.name for i in out.deleted] == [f"{h.model}/{versions[2]}"]  # the newest goes first
    assert {i.name: why for i, why in out.skipped} == {f"{h.model}/{versions[1]}": "alias @champion", f"{h.model}/{versions[0]}": "in the champion history"}
    assert _versions(client, h.model) == set(versions[:2])
    assert client.get_model_version(h.model, str(versions[1])).aliases == ["champion"]


def test_kept_artifacts_keep_their_inputs(history, store, client):
    """An artifact kept for its own sake keeps every input it names: a young router's expert, and the newest
    (old) MoE's expert, stay although they are old, not the newest of their family and referenced by no
    registered version."""
    h, key = history, store.key_of
    old, stale = (_publish(store, h.tmp, f"adapters/safety-expert/{_hex()}", d) for d in (90, 95))
    old_helpful = _publish(store, h.tmp, f"adapters/helpfulness-expert/{_hex()}", 90)
    for family in ("safety-expert", "helpfulness-expert"):  # the newest of each family: neither is
        _publish(store, h.tmp, f"adapters/{family}/{_hex()}", 60)
    router = _publish(store, h.tmp, f"routers/{_hex()}", 5, {"safety-expert": old.version})
    moe = _publish(store, h.tmp, f"models/midpo/{_hex()}", 40, {"helpfulness-expert": old_helpful.version})
    plan = make_plan(store, client, models=[h.model], keep_versions=0, older_than_days=30)
    decided = {i.name: i for i in plan.items}
    assert decided[key(router.uri)].reasons == ["among the newest 1 of routers", "younger than 30 days"]
    assert decided[key(moe.uri)].reasons == ["among the newest 1 of models/midpo"]
    assert decided[key(old.uri)].reasons == [f"input of {key(router.uri)}"]
    assert decided[key(old_helpful.uri)].reasons == [f"input of {key(moe.uri)}"]
    assert decided[key(stale.uri)].action == "delete"
    out = apply(plan, store, client)
    assert [i.name for i in out.deleted] == [key(stale.uri)]
    assert store.is_complete(key(old.uri)) and store.is_complete(key(old_helpful.uri))


def test_an_unreadable_manifest_fails_the_plan(history, store, client, monkeypatch):
    """Only a manifest gone since the listing means no version; any other read failure (an S3 5xx, a file
    that cannot be read) fails the plan, nothing deleted: else the champion's router would name no inputs
    and its dual data and reference log-probs could go."""
    from botocore.exceptions import ClientError

    from midpo.cli import main

    h = history
    champion, other = h.run(90), h.run(80)
    client.set_registered_model_alias(h.model, "champion", str(champion.version))
    router, gone = store.key_of(champion.refs["router"].uri), store.key_of(other.refs["eval"].uri)
    read, failing = ArtifactStore.manifest, True

    def s3_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    def flaky(self, key):
        if key == gone:
            raise s3_error("NoSuchKey", 404) if self.is_s3 else FileNotFoundError(key)
        if key == router and failing:
            raise s3_error("InternalError", 500) if self.is_s3 else PermissionError(13, "Permission denied")
        return read(self, key)

    monkeypatch.setattr(ArtifactStore, "manifest", flaky)
    before = _all_objects(store)
    with pytest.raises(RetentionError, match=f"cannot read the manifest of {store.uri(router)}"):
        make_plan(store, client, models=[h.model], keep_versions=0, older_than_days=30)
    assert main(["prune", "--model", h.model, "--keep-versions", "0", "--older-than", "30", "--yes"]) == 1
    assert _all_objects(store) == before and _versions(client, h.model) == {champion.version, other.version}
    failing = False  # a manifest gone meanwhile is no version: neither kept nor deleted
    plan = make_plan(store, client, models=[h.model], keep_versions=0, older_than_days=30)
    assert gone not in {i.name for i in plan.items} and {i.name for i in plan.deletions("model-version")} == {f"{h.model}/{other.version}"}
    assert any(r.startswith("input of ") for r in {i.name: i for i in plan.items}[store.key_of(champion.refs["dual"].uri)].reasons)


def test_refuses_a_registry_of_another_root_and_a_missing_model(history, store, client, tmp_path):
    h = history
    h.run(90)
    other = ArtifactStore((tmp_path / "elsewhere").as_uri())
    with pytest.raises(RetentionError, match="references the artifact root"):
        make_plan(other, client, models=[h.model])
    with pytest.raises(RetentionError, match="no registered model"):
        make_plan(store, client, models=["no-such-model"])


def test_incomplete_folders_go_only_when_old(store, client, registry_db, tmp_path):
    """A folder without a manifest beside complete versions (a crashed upload) is deleted once untouched for
    the age, never sooner (an upload may be under way)."""
    import os

    h = History(store, client, registry_db, tmp_path / "src", f"midpo-{uuid.uuid4().hex[:8]}")
    h.run(90)
    _write_raw(store, "adapters/safety-expert/0123456789abcdef/adapter_model.safetensors", b"y" * 32)  # young
    plan = make_plan(store, client, models=[h.model], keep_versions=1, older_than_days=30)
    [leftover] = [i for i in plan.items if i.kind == "incomplete"]
    assert leftover.name == "adapters/safety-expert/0123456789abcdef" and leftover.action == "keep"
    if not store.is_s3:  # moto's LastModified cannot be moved back; a file's mtime can
        path = Path(store.uri(leftover.name)[len("file://") :]) / "adapter_model.safetensors"
        old = time.time() - 40 * DAY
        os.utime(path, (old, old))
        plan = make_plan(store, client, models=[h.model], keep_versions=1, older_than_days=30)
        [leftover] = [i for i in plan.items if i.kind == "incomplete"]
        assert leftover.action == "delete"
        apply(plan, store, client)
        assert not path.exists()


def _write_raw(store: ArtifactStore, key: str, body: bytes) -> None:
    if store.is_s3:
        bucket, k = split_s3(store.uri(key))
        s3_client().put_object(Bucket=bucket, Key=k, Body=body)
    else:
        path = Path(store.uri(key)[len("file://") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
