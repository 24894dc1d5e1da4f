"""The method registry on a real tiny-ci pipeline: each method's rows, per-method overrides, every baseline
trained through the experts stage, and merge-half's adapter equal to the halves of both experts."""

import dataclasses
import json

import pytest
import torch

from midpo.config import ConfigError, load_config
from midpo.pipeline import run_pipeline
from midpo.storage import ArtifactStore
from midpo.train.methods import BASELINES, EXPERTS, METHODS, method_key, method_rows

torch.set_num_threads(1)


pytestmark = pytest.mark.shared_home  # one MIDPO_HOME (module_home) for the module


@pytest.fixture(scope="module")
def run(module_home):
    """tiny-ci through the expert and baselines stages with three baselines (merge-half included), a few steps each."""
    overrides = ["training.max_steps=3", "training.save_strategy=\"no\"", "training.baselines=[dpo-mix,safedpo,merge-half]"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIDPO_HOME", str(module_home))
        mp.delenv("MIDPO_ARTIFACT_ROOT", raising=False)
        cfg = load_config("tiny-ci", overrides)
        return cfg, run_pipeline(cfg, until="baselines")


def _rows(run, name):
    _, summary = run
    out = summary.outputs
    return method_rows(name, out["dataset"], out["refs"], out["scores"], ArtifactStore())


def test_rows_join_every_shared_column_by_response(run):
    from midpo.data.prepare import load_subset

    _, summary = run
    safety = _rows(run, "safety-expert")
    helpful = _rows(run, "helpfulness-expert")
    mix = _rows(run, "dpo-mix")
    # the union, a preference that is in both subsets once
    keys = lambda rows: {(r["pair_id"], r["chosen_index"]) for r in rows}  # noqa: E731
    assert keys(mix) == keys(safety) | keys(helpful) and len(mix) == len(keys(mix))
    assert len(safety) == len(load_subset(summary.outputs["dataset"], "safety"))
    # SPE-DPO margins from the expert's own score model; the chosen response's score is its own
    assert all(r["margin"] == pytest.approx(r["rejected_cost"] - r["chosen_cost"]) for r in safety)
    assert all(r["margin"] == pytest.approx(r["chosen_reward"] - r["rejected_reward"]) for r in helpful)
    assert "margin" not in mix[0]
    # safety pairs: the chosen response is the safe one, by the labels joined per response
    assert all(r["chosen_unsafe"] == 0.0 and r["rejected_unsafe"] == 1.0 for r in safety)
    assert all(r["ref_chosen_logps"] != r["ref_rejected_logps"] for r in mix)


def test_every_method_trains_through_the_stage(run):
    cfg, summary = run
    store = ArtifactStore()
    for name in (*EXPERTS, "dpo-mix", "safedpo"):
        meta = json.loads((store.fetch(store.key_of(summary.outputs[name].uri)) / "midpo_adapter.json").read_text())
        assert meta["loss"] == METHODS[name].loss and meta["metrics"]["steps"] == 3, name
    assert summary.stage_metrics["baselines"]["dpo-mix.pairs"] == len(_rows(run, "dpo-mix"))
    safedpo = json.loads((store.fetch(store.key_of(summary.outputs["safedpo"].uri)) / "midpo_adapter.json").read_text())
    rule = safedpo["data_rule"]
    assert rule["kept"] + rule["dropped_both_unsafe"] + rule["dropped_unlabeled"] == len(_rows(run, "safedpo")) and rule["swapped"] > 0
    # the rerun is a cache hit, and the training curves are logged from each adapter's history
    again = run_pipeline(cfg, until="baselines", dry_run=True)
    assert {"safety-expert", "helpfulness-expert", "baselines"} <= set(again.cache_hits)


def test_merge_half_is_half_of_each_expert(run):
    """merge-half's weight delta in every down_proj equals 0.5 Δ_safety + 0.5 Δ_helpfulness."""
    from peft import PeftModel

    from midpo.models.load import load_model

    _, summary = run
    store = ArtifactStore()
    folder = lambda name: str(store.fetch(store.key_of(summary.outputs[name].uri)))  # noqa: E731

    def deltas(adapter):
        model, _, _ = load_model(folder("base"))
        peft_model = PeftModel.from_pretrained(model, adapter)
        return {n: m.get_delta_weight("default") for n, m in peft_model.named_modules() if n.endswith("down_proj") and hasattr(m, "get_delta_weight")}

    merged, safety, helpful = deltas(folder("merge-half")), deltas(folder("safety-expert")), deltas(folder("helpfulness-expert"))
    assert merged and merged.keys() == safety.keys()
    for name, delta in merged.items():
        assert delta.abs().max() > 0
        torch.testing.assert_close(delta, 0.5 * safety[name] + 0.5 * helpful[name], atol=1e-6, rtol=1e-5)


def test_overrides_change_only_their_method():
    cfg = load_config("tiny-ci", ["training.methods.helpfulness-expert.learning_rate=2e-4", "training.methods.safedpo.loss_params.delta=5"])
    assert cfg.training.for_method("helpfulness-expert").learning_rate == 2e-4
    assert cfg.training.for_method("safety-expert").learning_rate == cfg.training.learning_rate
    assert cfg.training.loss_params("safedpo") == {"delta": 5.0}
    refs = scores = type("Ref", (), {"version": "v"})()
    plain = load_config("tiny-ci").training
    assert method_key("safety-expert", refs, scores, cfg.training) == method_key("safety-expert", refs, scores, plain)
    assert method_key("helpfulness-expert", refs, scores, cfg.training) != method_key("helpfulness-expert", refs, scores, plain)
    # where and how many at once never changes what a method learns
    runtime = dataclasses.replace(plain, sync_checkpoints=True, parallel=1)
    assert method_key("dpo-mix", refs, scores, runtime) == method_key("dpo-mix", refs, scores, plain)


def test_unknown_methods_are_config_errors():
    with pytest.raises(ConfigError, match="training.*unknown method 'dpo-typo'"):
        load_config("tiny-ci", ["training.baselines=[dpo-typo]"])
    with pytest.raises(ConfigError, match="unknown method 'expert'"):
        load_config("tiny-ci", ["training.methods.expert.learning_rate=1e-4"])
    assert set(BASELINES) == {"dpo-helpful", "dpo-harmless", "dpo-mix", "safedpo", "bfpo", "modpo", "merge-half"}
