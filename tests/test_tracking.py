"""Training curves of a stage (``StageOutput.curves``) become step-wise MLflow metric histories of a nested run."""

import json
import math
from pathlib import Path

import boto3
import mlflow
import pytest
from mlflow import MlflowClient

from midpo import tracking
from midpo.config import load_config
from midpo.pipeline import Stage, execute_stage
from midpo.stages import StageOutput
from midpo.tracking import curve_metrics, tracking_uri

# A DPO trainer's log_history: train entries, an eval entry sharing a step, the final summary entry.
HISTORY = [
    {"loss": 0.6931, "grad_norm": 1.25, "learning_rate": 5e-4, "rewards/chosen": 0.01, "rewards/rejected": -0.02,
     "rewards/accuracies": 0.5, "rewards/margins": 0.03, "logps/chosen": -41.2, "epoch": 0.5, "step": 2},
    {"loss": 0.5102, "grad_norm": 2.5, "learning_rate": 2.5e-4, "rewards/chosen": 0.4, "rewards/rejected": -0.6,
     "rewards/accuracies": 0.875, "rewards/margins": 1.0, "logps/chosen": -39.9, "epoch": 1.0, "step": 4},
    {"eval_loss": 0.55, "eval_rewards/margins": 0.8, "eval_runtime": 0.2, "epoch": 1.0, "step": 4},
    {"loss": 0.3, "grad_norm": float("nan"), "learning_rate": 0.0, "rewards/accuracies": 1.0, "rewards/margins": 2.25,
     "epoch": 1.5, "step": 6, "note": "text", "is_best": True},
    {"train_runtime": 3.5, "train_samples_per_second": 9.1, "total_flos": 0.0, "train_loss": 0.5, "epoch": 1.5, "step": 6},
]
MARGINS = {2: 0.03, 4: 1.0, 6: 2.25}
# The tiny-ci profile by its file: the same config as load_config("tiny-ci"), without needing the installed package.
TINY_CI = str(Path(__file__).resolve().parents[1] / "configs" / "tiny-ci.yaml")


def write_history(folder):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "log_history.json"
    path.write_text(json.dumps(HISTORY, indent=2))
    return path


def run_with_curves(curves, cache_hit=False):
    """execute_stage on a fake stage whose output names ``curves``, under a 'pipeline' parent run."""
    cfg = load_config(TINY_CI)
    stage = Stage("fake", "data", lambda section, inputs, dry: StageOutput({}, {"n": 1.0}, cache_hit, curves=dict(curves)))
    with tracking.stage_run(cfg.run.experiment, "pipeline"):
        execute_stage(stage, cfg, {})
    mlflow.set_tracking_uri(tracking_uri())
    return cfg.run.experiment, MlflowClient()


def runs_named(client, experiment, name):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'")


def history_of(client, run_id, key):
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_stage_curves_become_nested_metric_histories(tmp_path):
    uri = write_history(tmp_path / "adapter").as_uri()
    experiment, client = run_with_curves({"experts/safety": uri})
    [stage_run] = runs_named(client, experiment, "fake")
    [curves] = runs_named(client, experiment, "experts/safety")
    assert curves.data.tags["mlflow.parentRunId"] == stage_run.info.run_id
    assert curves.data.tags["midpo.curves_of"] == "experts/safety"
    assert curves.info.status == "FINISHED" and curves.info.experiment_id == stage_run.info.experiment_id
    run_id = curves.info.run_id
    assert history_of(client, run_id, "rewards/margins") == MARGINS
    assert history_of(client, run_id, "rewards/accuracies") == {2: 0.5, 4: 0.875, 6: 1.0}
    assert history_of(client, run_id, "learning_rate") == {2: 5e-4, 4: 2.5e-4, 6: 0.0}
    assert history_of(client, run_id, "eval_rewards/margins") == {4: 0.8}
    assert history_of(client, run_id, "train_loss") == {6: 0.5}
    assert [m.step for m in client.get_metric_history(run_id, "epoch")] == [2, 4, 6]  # once per step
    assert math.isnan(history_of(client, run_id, "grad_norm")[6])
    assert not {"step", "note", "is_best"} & set(curves.data.metrics)
    assert stage_run.data.metrics["n"] == 1.0 and "rewards/margins" not in stage_run.data.metrics


def test_cache_hit_logs_curves_again_in_the_new_run(tmp_path):
    uri = str(write_history(tmp_path / "adapter"))  # a plain path works as well
    run_with_curves({"experts/helpfulness": uri})
    experiment, client = run_with_curves({"experts/helpfulness": uri}, cache_hit=True)
    stage_ids = {r.info.run_id for r in runs_named(client, experiment, "fake")}
    curves = runs_named(client, experiment, "experts/helpfulness")
    assert len(stage_ids) == 2 and {r.data.tags["mlflow.parentRunId"] for r in curves} == stage_ids
    assert all(history_of(client, r.info.run_id, "rewards/margins") == MARGINS for r in curves)


def test_curves_from_s3(s3_endpoint, bucket, tmp_path):
    boto3.client("s3").put_object(Bucket=bucket, Key="experts/abc/log_history.json", Body=json.dumps(HISTORY).encode())
    experiment, client = run_with_curves({"experts/safety": f"s3://{bucket}/experts/abc/log_history.json"})
    [curves] = runs_named(client, experiment, "experts/safety")
    assert history_of(client, curves.info.run_id, "rewards/margins") == MARGINS


def test_missing_history_fails_the_stage_run(tmp_path):
    with pytest.raises(FileNotFoundError):
        run_with_curves({"experts/safety": (tmp_path / "absent.json").as_uri()})


def test_long_histories_are_logged_in_batches(tmp_path, monkeypatch):
    history = [{"loss": 1.0 / (i + 1), "learning_rate": 1e-3, "rewards/margins": i * 0.1, "step": i} for i in range(1, 801)]
    path = tmp_path / "log_history.json"
    path.write_text(json.dumps(history))
    calls = []
    real = MlflowClient.log_batch
    monkeypatch.setattr(MlflowClient, "log_batch", lambda self, run_id, **kw: calls.append(len(kw["metrics"])) or real(self, run_id, **kw))
    mlflow.set_tracking_uri(tracking_uri())
    with tracking.stage_run("curves-test", "experts"):
        run_id = tracking.log_curves("curves-test", "experts/safety", path.as_uri())
    assert calls == [1000, 1000, 400]
    margins = MlflowClient().get_metric_history(run_id, "rewards/margins")
    assert len(margins) == 800 and sorted(m.step for m in margins) == list(range(1, 801))


def test_curve_metrics_skips_what_is_not_a_numeric_point():
    metrics = curve_metrics([{"loss": 1, "step": 3}, {"loss": 2.0}, {"flag": False, "name": "x", "step": 4}, {"step": 5.0, "loss": 3.0}], 7)
    assert [(m.key, m.value, m.step, m.timestamp) for m in metrics] == [("loss", 1.0, 3, 7)]


def test_default_store_follows_midpo_home_after_mlflow_exported_it(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: the embedded default must still follow MIDPO_HOME,
    keep experiments' artifacts under the artifact root, and a user's own URI must still win."""
    from midpo.storage import artifact_root

    with tracking.stage_run("first", "s"):
        pass
    other = tmp_path / "other-home"
    monkeypatch.setenv("MIDPO_HOME", str(other))
    assert tracking_uri() == f"sqlite:///{other.resolve() / 'mlflow.db'}"
    with tracking.stage_run("second", "s") as ml:
        location = ml.get_experiment_by_name("second").artifact_location
    assert location == f"{artifact_root()}/mlflow" and location.startswith(other.resolve().as_uri())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'server.db'}")
    assert tracking_uri() == f"sqlite:///{tmp_path / 'server.db'}"
