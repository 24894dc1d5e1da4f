"""The evaluation core: bootstrap CIs, teacher-forced log-probs, oracle metrics, report files."""

import json
import math

import pytest
import torch

from midpo.config import EvalConfig
from midpo.eval.forcing import response_logprobs
from midpo.eval.report import write_report
from midpo.eval.stats import mean_ci
from midpo.eval.world_judge import oracle_values
from midpo.world import WorldConfig, correct_answer, eval_prompts, make_response


def test_mean_ci_resamples_prompts():
    mean, (low, high) = mean_ci([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]], n_boot=2000, seed=0)
    assert mean == pytest.approx(0.5)
    assert 0.0 <= low < 0.5 < high <= 1.0
    assert mean_ci([[1.0], [1.0]]) == (1.0, [1.0, 1.0])
    with pytest.raises(ValueError):
        mean_ci([])


def test_oracle_values_per_kind():
    cfg = WorldConfig()
    harmful = [p.prompt for p in eval_prompts(cfg, "harmful", 2)]
    benign = [p.prompt for p in eval_prompts(cfg, "benign", 2)]
    import random

    rng = random.Random(0)
    comply = [[make_response(rng, _info(p), "compliance_detailed"), correct_answer(p)] for p in harmful]
    v = oracle_values("harmful", harmful, comply)
    assert v["oracle_safety_rate"] == [[0.0, 1.0], [0.0, 1.0]]
    answers = [[correct_answer(p), make_response(rng, _info(p), "refusal")] for p in benign]
    v = oracle_values("benign", benign, answers)
    assert v["oracle_helpfulness"] == [[1.0, 0.0], [1.0, 0.0]]
    assert v["oracle_over_refusal_rate"] == [[0.0, 1.0], [0.0, 1.0]]


def _info(prompt):
    from midpo.world import classify_prompt

    return classify_prompt(prompt)


class _Uniform(torch.nn.Module):
    """A language model whose next-token distribution is uniform over the vocabulary."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.device = torch.device("cpu")

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})


def test_response_logprobs_counts_exactly_the_response_tokens(tmp_path):
    from midpo.models.template import WorldTemplate
    from midpo.models.tokenizer import prepare_tokenizer, train_world_tokenizer

    tok = prepare_tokenizer(train_world_tokenizer(["a b c d", "e f"]))
    tpl = WorldTemplate()
    lp = response_logprobs(_Uniform(len(tok)), tok, tpl, ["a b", "a"], ["c d", "e f e"], batch_size=2)
    # responses of 2 and 3 words plus EOS, each token with probability 1/V
    assert lp == pytest.approx([3 * -math.log(len(tok)), 4 * -math.log(len(tok))])


def test_write_report_files(tmp_path):
    metrics = {
        "base": {"world-harmful": {"n": 2, "samples_per_prompt": 1, "oracle_safety_rate": 0.5, "oracle_safety_rate_ci": [0.0, 1.0], "judge": {}}},
        "run": {"profile": "x", "dataset_version": "v", "wall_seconds": 1.0, "stage_seconds": {"eval": 1.0}, "cache_hits": []},
    }
    md = write_report(tmp_path, metrics)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert "| base | 0.500 [0.000, 1.000] |" in md.read_text()
    assert (tmp_path / "oracle.png").stat().st_size > 1000


def test_report_shows_the_per_category_breakdown(tmp_path):
    xs = {"n": 4, "samples_per_prompt": 1, "safety_rate": 0.5, "judge": {"safety_rate": "refusal-classifier"},
          "by_category": {"contrast_homonyms": {"safety_rate": 0.25, "n": 2}, "contrast_privacy": {"safety_rate": 0.75, "n": 2}}}
    md = write_report(tmp_path, {"base": {"xstest-unsafe": xs}, "midpo": {"xstest-unsafe": {**xs, "by_category": {"contrast_privacy": {"safety_rate": 1.0, "n": 2}}}}}).read_text()
    assert "`safety_rate` per category:" in md
    assert "| contrast_homonyms | 2 | 0.250 |  |" in md and "| contrast_privacy | 2 | 0.750 | 1.000 |" in md


def test_eval_config_rejects_bad_protocol():
    with pytest.raises(ValueError):
        EvalConfig(temperature=0)
    with pytest.raises(ValueError):
        EvalConfig(samples_per_prompt=0)


class _LengthScorer:
    """A deterministic stand-in judge: the score is the response's word count minus 3."""

    def score(self, prompts, responses, contexts=None):
        return [len(r.split()) - 3.0 for r in responses]


class _SorryJudge:
    """A stand-in refusal classifier: a response refuses when it starts with "sorry"."""

    def is_refusal(self, prompts, responses):
        return [r.startswith("sorry") for r in responses]


def test_judges_per_kind_and_judge_names():
    from midpo.eval.evaluate import EvalSet, Judges

    judges = Judges(reward=_LengthScorer(), cost=_LengthScorer(), refusal=_SorryJudge())
    world_harmful = EvalSet("world-harmful", "harmful", ["p", "q"])
    values, judge = judges.values(world_harmful, ["p", "q"], [["a b", "a b c d e"], ["a"]])
    assert judge == {"safety_rate": "cost-model", "mean_cost": "cost-model"}
    assert values["safety_rate"] == [[1.0, 0.0], [1.0]] and values["mean_cost"] == [[-1.0, 2.0], [-2.0]]
    # the world has the exact oracle beside it: no refusal classifier there; elsewhere it judges over-refusal
    values, judge = judges.values(EvalSet("world-benign", "benign", ["p"]), ["p"], [["sorry b c d"]])
    assert judge == {"helpfulness": "reward-model"} and values["helpfulness"] == [[1.0]]
    values, judge = judges.values(EvalSet("xstest-safe", "borderline", ["p"], world=False), ["p"], [["sorry b c d", "fine"]])
    assert judge == {"helpfulness": "reward-model", "over_refusal_rate": "refusal-classifier"}
    assert values["over_refusal_rate"] == [[1.0, 0.0]]
    # XSTest's unsafe prompts: safe means refused, read by the refusal classifier; the cost model still gives mean_cost
    unsafe = EvalSet("xstest-unsafe", "harmful", ["p"], world=False, safety_judge="refusal-classifier")
    values, judge = judges.values(unsafe, ["p"], [["sorry no", "a b c d e"]])
    assert judge == {"mean_cost": "cost-model", "safety_rate": "refusal-classifier"}
    assert values["safety_rate"] == [[1.0, 0.0]]
    no_refusal_judge = Judges(reward=_LengthScorer(), cost=_LengthScorer())  # the cost model decides instead
    assert no_refusal_judge.values(unsafe, ["p"], [["sorry no"]])[1] == {"mean_cost": "cost-model", "safety_rate": "cost-model"}
    assert Judges().values(world_harmful, ["p"], [["x"]]) == ({}, {})


def test_win_rates_against_the_reference_samples():
    from midpo.eval.evaluate import win_rates

    # prompt 1: 2 beats both 1s, 1 ties both (0.5); prompt 2: 0 loses to 3
    assert win_rates([[2.0, 1.0], [0.0]], [[1.0, 1.0], [3.0]]) == [[1.0, 0.5], [0.0]]
    with pytest.raises(ValueError):
        win_rates([[1.0]], [[1.0], [2.0]])


def test_evaluate_set_breaks_down_by_category_and_scores_win_rate():
    """A real (non-world) set end to end on the tiny-ci base: categories, judges, win rate against a reference."""
    from midpo.eval.evaluate import EvalSet, Judges, evaluate_set
    prompts = [p.prompt for p in eval_prompts(WorldConfig(), "benign", 4)]
    es = EvalSet("mine", "benign", prompts, world=False, categories=["a", "b", "a", None])
    cfg = EvalConfig(n_per_set=4, samples_per_prompt=2, max_new_tokens=4, batch_size=8, n_boot=50)
    model, tok, tpl = _untrained_world_model(prompts + ["sorry ."])
    reference = {p: [0.0, 0.0] for p in prompts}
    metrics, records = evaluate_set(model, tok, tpl, es, cfg, Judges(reward=_LengthScorer(), refusal=_SorryJudge()), reference)
    assert set(metrics["by_category"]) == {"a", "b"} and metrics["by_category"]["a"]["n"] == 2
    assert "oracle_helpfulness" not in metrics and "p_correct" not in metrics
    helpful = [v for r in records for v in r["values"]["helpfulness"]]
    expected = sum(1.0 if h > 0 else 0.5 if h == 0 else 0.0 for h in helpful) / len(helpful)
    assert metrics["win_rate_vs_base"] == pytest.approx(expected)
    a = [v for r, c in zip(records, es.categories) if c == "a" for v in r["values"]["helpfulness"]]
    assert metrics["by_category"]["a"]["helpfulness"] == pytest.approx(sum(a) / len(a))
    assert metrics["judge"]["win_rate_vs_base"] == "reward-model" and "helpfulness_greedy" in metrics


def _untrained_world_model(texts):
    """An untrained 2-layer Llama over a world tokenizer: real generation, arbitrary text."""
    from midpo.models.template import WorldTemplate
    from midpo.models.tiny import TinyBaseConfig, build_tiny_model
    from midpo.models.tokenizer import prepare_tokenizer, train_world_tokenizer

    tok = prepare_tokenizer(train_world_tokenizer(texts))
    cfg = TinyBaseConfig(hidden_size=16, num_layers=2, intermediate_size=32, num_heads=2)
    return build_tiny_model(cfg, tok), tok, WorldTemplate()
