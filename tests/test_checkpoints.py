"""Checkpoints mirrored to an s3 artifact store (moto over HTTP): published atomically, pruned to the newest
two, and restored on "another machine" (an empty checkpoint_dir), where training resumes from the mirror."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from midpo.models.load import load_model
from midpo.storage import MANIFEST, ArtifactStore
from midpo.train.checkpoints import (
    MirrorCheckpoints,
    mirrored_checkpoints,
    restore_checkpoint,
)
from midpo.train.refs import attach_reference, reference_table
from midpo.train.trainer import RUN_FILE, train_adapter
from tests.test_trainer import base, make_rows, tcfg  # noqa: F401  (base: the tiny-model fixture)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(base):  # noqa: F811
    rows = make_rows(24, seed=2)
    return attach_reference(rows, reference_table(*load_model(base), rows, max_length=64, batch_size=16))


def s3_keys(bucket: str, prefix: str) -> set[str]:
    return {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])}


class StopAt(TrainerCallback):
    """Ends training after ``step`` (the "killed" first machine); records every step run."""

    def __init__(self, step: int | None = None):
        self.step, self.steps = step, []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)
        if state.global_step == self.step:
            control.should_training_stop = True


def test_checkpoints_are_mirrored_and_pruned_to_the_newest_two(base, data, s3_endpoint, bucket, tmp_path):  # noqa: F811
    store = ArtifactStore(f"s3://{bucket}/art")
    cfg = tcfg(save_strategy="steps", save_steps=1, max_steps=4)
    metrics = train_adapter(base, data[:16], "spe_dpo", cfg, tmp_path / "out", checkpoint_dir=tmp_path / "ckpt", checkpoint_mirror=(store, "checkpoints/run1"))
    assert metrics["steps"] == 4.0
    assert mirrored_checkpoints(store, "checkpoints/run1") == [(3, "checkpoints/run1/checkpoint-3"), (4, "checkpoints/run1/checkpoint-4")]
    assert store.children("checkpoints/run1") == ["checkpoint-3", "checkpoint-4", "run"]
    keys = s3_keys(bucket, "art/checkpoints/run1/")
    assert not any("checkpoint-1/" in k or "checkpoint-2/" in k for k in keys)  # pruned entirely, files too
    manifest = store.manifest("checkpoints/run1/checkpoint-4")
    assert manifest["metadata"] == {"global_step": 4}
    assert {"trainer_state.json", "optimizer.pt", "adapter_model.safetensors", "rng_state.pth"} <= set(manifest["files"])
    local = tmp_path / "ckpt" / "checkpoint-4"
    assert all(manifest["files"][p.name]["size"] == p.stat().st_size for p in local.iterdir())
    claim = store.fetch("checkpoints/run1/run") / RUN_FILE
    assert json.loads(claim.read_text()) == json.loads((tmp_path / "ckpt" / RUN_FILE).read_text())

    # Only the main process uploads.
    quiet = MirrorCheckpoints(store, "checkpoints/other")
    quiet.on_save(SimpleNamespace(output_dir=str(tmp_path / "ckpt")), SimpleNamespace(is_world_process_zero=False, global_step=4), None)
    assert store.children("checkpoints/other") == []


def test_a_fresh_machine_resumes_from_the_mirror(base, data, s3_endpoint, bucket, tmp_path):  # noqa: F811
    """6 steps (24 pairs, batch 4), checkpoints every 2. The first machine stops after step 4; its local
    checkpoint dir is gone. The second starts empty, restores checkpoint-4 from s3, runs steps 5-6 only and
    ends with the same adapter as an uninterrupted run."""
    store = ArtifactStore(f"s3://{bucket}/art")
    mirror = (store, "checkpoints/run2")
    cfg = tcfg(save_strategy="steps", save_steps=2)
    first = StopAt(4)
    m1 = train_adapter(base, data, "spe_dpo", cfg, tmp_path / "out1", checkpoint_dir=tmp_path / "machine1", checkpoint_mirror=mirror, callbacks=[first])
    assert first.steps == [1, 2, 3, 4] and m1["steps"] == 4.0
    assert [s for s, _ in mirrored_checkpoints(store, "checkpoints/run2")] == [2, 4]
    shutil.rmtree(tmp_path / "machine1")

    second = StopAt()
    m2 = train_adapter(base, data, "spe_dpo", cfg, tmp_path / "out2", checkpoint_dir=tmp_path / "machine2", checkpoint_mirror=mirror, callbacks=[second])
    assert (m2["resumed_from_step"], m2["steps"]) == (4.0, 6.0) and second.steps == [5, 6]
    assert (tmp_path / "machine2" / RUN_FILE).is_file() and not (tmp_path / "machine2" / "checkpoint-4" / MANIFEST).exists()
    assert [s for s, _ in mirrored_checkpoints(store, "checkpoints/run2")] == [4, 6]

    straight = train_adapter(base, data, "spe_dpo", cfg, tmp_path / "out3", checkpoint_dir=tmp_path / "machine3")
    assert (straight["resumed_from_step"], straight["steps"]) == (0.0, 6.0)
    a, b = load_file(tmp_path / "out2" / "adapter_model.safetensors"), load_file(tmp_path / "out3" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Another run pointed at the same mirror is refused, not mixed in (before any model is loaded).
    with pytest.raises(ValueError, match="another run .*loss"):
        train_adapter(base, data, "dpo", cfg, tmp_path / "out4", checkpoint_dir=tmp_path / "machine4", checkpoint_mirror=mirror)
    (tmp_path / "machine5").mkdir()
    (tmp_path / "machine5" / RUN_FILE).write_text(json.dumps({"loss": "dpo"}))
    with pytest.raises(ValueError, match="mirrors checkpoints of another run"):
        restore_checkpoint(store, "checkpoints/run2", tmp_path / "machine5")


def fake_checkpoint(folder: Path, step: int) -> Path:
    d = folder / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(b"w" * step)
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return d


def test_restore_ignores_partial_uploads_and_prefers_newer_local(s3_endpoint, bucket, tmp_path):
    store = ArtifactStore(f"s3://{bucket}/art")
    store.publish(fake_checkpoint(tmp_path / "src", 2), "ck/checkpoint-2")
    client = boto3.client("s3")
    for name in ("adapter_model.safetensors", "trainer_state.json"):  # an upload cut before its manifest
        client.put_object(Bucket=bucket, Key=f"art/ck/checkpoint-6/{name}", Body=b"{}")
    assert [s for s, _ in mirrored_checkpoints(store, "ck", complete_only=False)] == [2, 6]

    restored = restore_checkpoint(store, "ck", tmp_path / "empty")
    assert restored == str(tmp_path / "empty" / "checkpoint-2")
    assert (Path(restored) / "adapter_model.safetensors").read_bytes() == b"ww" and not (Path(restored) / MANIFEST).exists()
    assert not (tmp_path / "empty" / RUN_FILE).exists()  # nothing mirrored it
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["checkpoint-2"]  # no staging left

    local = tmp_path / "local"
    fake_checkpoint(local, 2)
    (local / "checkpoint-2" / "marker").write_text("local")
    assert restore_checkpoint(store, "ck", local) == str(local / "checkpoint-2")  # equal step: local kept
    assert (local / "checkpoint-2" / "marker").is_file()
    fake_checkpoint(local, 4)
    assert restore_checkpoint(store, "ck", local) == str(local / "checkpoint-4")  # higher step: local
    assert restore_checkpoint(store, "nothing", tmp_path / "none") is None

    older = tmp_path / "older"
    fake_checkpoint(older, 1)
    (older / "checkpoint-2").mkdir()  # a save killed half-way: replaced by the mirrored one
    assert restore_checkpoint(store, "ck", older) == str(older / "checkpoint-2")
    assert (older / "checkpoint-2" / "trainer_state.json").is_file()

    # The pruner removes the partial leftover once it is older than the kept ones.
    for step in (7, 8):
        store.publish(fake_checkpoint(tmp_path / "src", step), f"ck/checkpoint-{step}")
    assert MirrorCheckpoints(store, "ck").prune() == ["ck/checkpoint-2", "ck/checkpoint-6"]
    assert store.children("ck") == ["checkpoint-7", "checkpoint-8"]


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_delete_removes_the_manifest_first(kind, request, tmp_path, monkeypatch):
    import midpo.storage as storage

    if kind == "s3":
        bucket = request.getfixturevalue("bucket")
        store = ArtifactStore(f"s3://{bucket}/art")
    else:
        store = ArtifactStore((tmp_path / "root").as_uri())
    for step in (1, 10):
        store.publish(fake_checkpoint(tmp_path / "src", step), f"ck/checkpoint-{step}")
    store.delete("ck/checkpoint-1")
    assert not store.is_complete("ck/checkpoint-1") and store.children("ck") == ["checkpoint-10"]
    assert store.is_complete("ck/checkpoint-10")  # a key prefix, not a string prefix
    store.delete("ck/absent")  # nothing there: no error

    if kind == "s3":  # a delete cut after the manifest leaves files, but no complete version
        real = storage.s3_client

        class Flaky:
            def __init__(self):
                self.client = real()

            def delete_objects(self, **kw):
                raise ConnectionResetError("connection reset by peer")

            def __getattr__(self, name):
                return getattr(self.client, name)

        monkeypatch.setattr(storage, "s3_client", Flaky)
        with pytest.raises(ConnectionResetError):
            store.delete("ck/checkpoint-10")
        monkeypatch.setattr(storage, "s3_client", real)
        assert not store.is_complete("ck/checkpoint-10")
        assert s3_keys(bucket, "art/ck/checkpoint-10/") == {f"art/ck/checkpoint-10/{n}" for n in ("adapter_model.safetensors", "trainer_state.json")}
        assert mirrored_checkpoints(store, "ck") == []
        store.delete("ck/checkpoint-10")
        assert s3_keys(bucket, "art/ck/") == set()
