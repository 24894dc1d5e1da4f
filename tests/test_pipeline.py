"""`midpo run` executes the stage list, tracks it in MLflow and writes metrics.json; the flow runs the same stages."""

import json

import mlflow
import pytest

from midpo.cli import main
from midpo.config import load_config
from midpo.pipeline import stages_for
from midpo.tracking import tracking_uri


def test_run_writes_metrics_and_tracks_stages(tmp_path, capsys):
    report = tmp_path / "report"
    assert main(["run", "--profile", "tiny-ci", "--report-dir", str(report)]) == 0
    out = capsys.readouterr().out
    assert f"report: {report}" in out and "not implemented yet" in out
    run = json.loads((report / "metrics.json").read_text())["run"]
    assert run["profile"] == "tiny-ci" and len(run["dataset_version"]) == 16
    assert list(run["stage_seconds"]) == [s.name for s in stages_for(load_config("tiny-ci"))] == ["world", "data"]
    assert run["cache_hits"] == []
    mlflow.set_tracking_uri(tracking_uri())
    runs = mlflow.search_runs(experiment_names=[load_config("tiny-ci").run.experiment])
    assert {"pipeline", "data"} <= set(runs["tags.mlflow.runName"])
    data_run = runs[runs["tags.mlflow.runName"] == "data"].iloc[0]
    assert data_run["tags.mlflow.parentRunId"] == runs[runs["tags.mlflow.runName"] == "pipeline"].iloc[0]["run_id"]
    assert data_run["metrics.safety_train_pairs"] > 0 and data_run["params.data.dual_rule"] == "label+safety"

    assert main(["run", "--profile", "tiny-ci", "--dry-run"]) == 0
    assert "data       cache hit" in capsys.readouterr().out
    assert main(["run", "--profile", "tiny-ci", "--report-dir", str(report)]) == 0
    assert json.loads((report / "metrics.json").read_text())["run"]["cache_hits"] == ["world", "data"]


@pytest.mark.usefixtures("prefect_harness")
def test_flow_runs_the_same_stages():
    from midpo_flows.pipeline import midpo

    outputs = midpo(profile="tiny-ci")
    assert set(outputs) == {"world", "dataset"} and outputs["dataset"].startswith("file://")
