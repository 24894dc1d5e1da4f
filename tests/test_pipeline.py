"""`midpo run` executes the stage list, tracks it in MLflow and writes metrics.json; the flow runs the same stages."""

import json

import mlflow
import pytest

from midpo.cli import main
from midpo.config import load_config
from midpo.pipeline import stages_for
from midpo.storage import ArtifactStore
from midpo.tracking import tracking_uri


@pytest.mark.usefixtures("prefect_harness")
def test_run_writes_metrics_and_tracks_stages(tmp_path, capsys):
    report = tmp_path / "report"
    assert main(["run", "--profile", "tiny-ci", "--report-dir", str(report)]) == 0
    out = capsys.readouterr().out
    assert f"report: {report}" in out
    metrics = json.loads((report / "metrics.json").read_text())
    assert_metrics_structure(metrics)
    run = metrics["run"]
    assert run["profile"] == "tiny-ci" and len(run["dataset_version"]) == 16
    assert list(run["stage_seconds"]) == [s.name for s in stages_for(load_config("tiny-ci"))] == ["world", "data", "base", "refusal", "judges", "passes", "safety-expert", "helpfulness-expert", "dual", "router", "moe", "eval", "eval-midpo", "register"]
    assert run["cache_hits"] == []
    mlflow.set_tracking_uri(tracking_uri())
    runs = mlflow.search_runs(experiment_names=[load_config("tiny-ci").run.experiment])
    assert {"pipeline", "data"} <= set(runs["tags.mlflow.runName"])
    data_run = runs[runs["tags.mlflow.runName"] == "data"].iloc[0]
    parent = mlflow.MlflowClient().get_run(runs[runs["tags.mlflow.runName"] == "pipeline"].iloc[0]["run_id"])
    (dataset_input,) = parent.inputs.dataset_inputs  # the dataset version as an MLflow dataset input
    assert dataset_input.dataset.digest == run["dataset_version"] and json.loads(dataset_input.dataset.source)["uri"].endswith(f"datasets/{run['dataset_version']}")
    config = mlflow.artifacts.load_dict(f"{parent.info.artifact_uri}/config.json")  # the resolved config
    assert config["eval"]["n_per_set"] == load_config("tiny-ci").eval.n_per_set and config["profile"] == "tiny-ci"
    assert data_run["tags.mlflow.parentRunId"] == runs[runs["tags.mlflow.runName"] == "pipeline"].iloc[0]["run_id"]
    assert data_run["metrics.safety_train_pairs"] > 0 and data_run["params.data.dual_rule"] == "label+safety"
    # training curves: one nested run per trained model, under its stage's run
    client = mlflow.MlflowClient()
    for name, stage, keys in (("safety-expert-training", "safety-expert", ("loss", "rewards/margins", "rewards/accuracies")), ("router-training", "router", ("loss", "gates/alpha_0", "gates/beta_0"))):
        curve = runs[runs["tags.mlflow.runName"] == name].iloc[0]
        assert curve["tags.mlflow.parentRunId"] == runs[runs["tags.mlflow.runName"] == stage].iloc[0]["run_id"]
        for key in keys:
            history = client.get_metric_history(curve["run_id"], key)
            assert len(history) >= 2 and history[0].step < history[-1].step, (name, key)

    # the MoE registered as a version of `midpo` with its lineage, alias challenger
    version = client.get_model_version_by_alias("midpo", "challenger")
    assert version.tags["midpo.dataset_version"] == run["dataset_version"] and version.tags["midpo.run_id"] in set(runs["run_id"])
    assert {"midpo.base_version", "midpo.safety_expert_version", "midpo.helpfulness_expert_version", "midpo.router_version", "midpo.midpo_uri"} <= set(version.tags)
    for stage in ("safety-expert", "helpfulness-expert", "router"):  # the training runs that made its parts
        assert version.tags[f"midpo.{stage.replace('-', '_')}_run"] == runs[runs["tags.mlflow.runName"] == stage].iloc[0]["run_id"]

    assert main(["run", "--profile", "tiny-ci", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert all(f"{name:18s} cache hit" in plan for name in ("world", "data", "base", "refusal", "judges", "passes", "safety-expert", "helpfulness-expert", "dual", "router", "moe", "eval", "eval-midpo", "register")), plan
    assert main(["run", "--profile", "tiny-ci", "--report-dir", str(report)]) == 0
    assert [v.version for v in client.search_model_versions("name = 'midpo'")] == [version.version]  # a rerun registers nothing new
    assert json.loads((report / "metrics.json").read_text())["run"]["cache_hits"] == ["world", "data", "base", "refusal", "judges", "passes", "safety-expert", "helpfulness-expert", "dual", "router", "moe", "eval", "eval-midpo", "register"]
    assert (report / "report.md").is_file() and (report / "oracle.png").is_file()

    # `midpo eval`: the registered MoE by alias on the profile's sets, then the base on a prompt file outside the world
    assert main(["eval", "--model", "models:/midpo@challenger", "--profile", "tiny-ci", "--name", "champ", "--report-dir", str(tmp_path / "e1")]) == 0
    by_alias = json.loads((tmp_path / "e1" / "metrics.json").read_text())["champ"]
    assert by_alias["world-harmful"]["oracle_safety_rate"] == pytest.approx(json.loads((report / "metrics.json").read_text())["midpo"]["world-harmful"]["oracle_safety_rate"])
    prompts = tmp_path / "mine.jsonl"
    prompts.write_text('{"prompt": "How do I make a paper plane?", "category": "crafts"}\n{"prompt": "Name a prime number.", "category": "maths"}\n')
    store = ArtifactStore()
    (base_version,) = store.children("bases")
    argv = ["eval", "--model", store.uri(f"bases/{base_version}"), "--prompts", str(prompts), "--kind", "benign", "--profile", "tiny-ci"]
    assert main([*argv, "--report-dir", str(tmp_path / "e2")]) == 0
    mine = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    (row,) = mine.values()
    assert row["mine"]["judge"] == {"helpfulness": "reward-model", "over_refusal_rate": "refusal-classifier"}
    assert set(row["mine"]["by_category"]) == {"crafts", "maths"} and "oracle_helpfulness" not in row["mine"]


ORACLE = {
    "harmful": {"oracle_safety_rate", "oracle_incoherent_rate", "p_correct"},
    "borderline": {"oracle_over_refusal_rate", "oracle_helpfulness", "oracle_incoherent_rate", "p_correct"},
    "benign": {"oracle_over_refusal_rate", "oracle_helpfulness", "oracle_incoherent_rate", "p_correct"},
}


def assert_metrics_structure(m):
    """metrics.json per interfaces.md: m[method][eval_set][metric], reserved top-level keys, CIs and n."""
    methods = [k for k in m if k not in ("judges", "run", "costs")]
    assert methods == ["base", "safety-expert", "helpfulness-expert", "midpo"]
    assert set(m["run"]) == {"profile", "dataset_version", "wall_seconds", "stage_seconds", "cache_hits"}
    assert set(m["judges"]) == {
        f"{name}{suffix}" for name in ("reward_pairwise_accuracy", "cost_pairwise_accuracy", "cost_sign_accuracy") for suffix in ("", "_noisy")
    } | {"refusal_classifier_accuracy", "refusal_strmatch_accuracy"}
    assert all(0.0 <= v <= 1.0 for v in m["judges"].values())
    cfg = load_config("tiny-ci").eval
    for method in methods:
        assert set(m[method]) == set(cfg.sets)
        for name, metrics in m[method].items():
            kind = name.split("-", 1)[1]
            assert metrics["n"] == cfg.n_per_set and metrics["samples_per_prompt"] == cfg.samples_per_prompt
            learned = {"safety_rate": "cost-model", "mean_cost": "cost-model"} if kind == "harmful" else {"helpfulness": "reward-model"}
            if kind == "benign" and method != "base":  # against the base's samples on the same prompts
                learned["win_rate_vs_base"] = "reward-model"
            assert metrics["judge"] == learned
            assert all(f"{k}_ci" in metrics for k in learned)
            for key in ORACLE[kind]:
                assert 0.0 <= metrics[key] <= 1.0, (name, key)
                low, high = metrics[f"{key}_ci"]
                assert low <= metrics[key] <= high
                if key != "p_correct":
                    assert 0.0 <= metrics[f"{key}_greedy"] <= 1.0
