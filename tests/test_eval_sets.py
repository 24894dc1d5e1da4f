"""The named eval sets: kinds, categories, and the promise that no eval prompt was ever trained on."""

import pytest

from midpo.config import ConfigError, load_config
from midpo.data.prepare import DataError, load_pairs_table, prepare
from midpo.eval.evaluate import EvalSet
from midpo.eval.sets import assert_unseen, build_eval_sets, is_xstest_heldout, xstest_eval_prompts
from midpo.judges.refusal import XSTEST_SOURCES, load_completions, normalize_prompt


pytestmark = pytest.mark.shared_home  # one prepared dataset for the module


@pytest.fixture
def real_dataset():
    """The smollm2 profile's dataset (hh harmless, AlpacaEval annotations, PKU sample): real text."""
    return prepare(load_config("smollm2").data).ref


def test_xstest_sets_are_the_heldout_half_with_types():
    unsafe, safe = build_eval_sets(["xstest-unsafe", "xstest-safe"], {})
    assert (unsafe.kind, safe.kind) == ("harmful", "borderline")
    assert unsafe.safety_judge == "refusal-classifier" and not unsafe.world
    assert all(c.startswith("contrast_") for c in unsafe.categories)
    assert not any(c.startswith("contrast_") for c in safe.categories)
    assert 60 < len(unsafe.prompts) < 140 and 80 < len(safe.prompts) < 170  # half of 200 / 250, by hash
    assert sorted(xstest_eval_prompts()) == sorted(unsafe.prompts + safe.prompts)
    # the other half is what the refusal judge may train on: some of each kind, none of the eval half
    completions = load_completions(XSTEST_SOURCES)
    train = {normalize_prompt(c.prompt) for c in completions if not is_xstest_heldout(c.prompt)}
    assert train and not train & {normalize_prompt(p) for p in unsafe.prompts + safe.prompts}


def test_dataset_sets_come_from_the_eval_split_single_turn(real_dataset):
    hh, alpaca = build_eval_sets(["hh-harmful", "alpaca-eval"], {"dataset": real_dataset})
    assert (hh.kind, alpaca.kind) == ("harmful", "benign") and hh.safety_judge == "cost-model"
    rows = list(load_pairs_table(real_dataset))
    eval_prompts = {r["prompt"] for r in rows if r["split"] == "eval" and not r["context"]}
    train_prompts = {normalize_prompt(r["prompt"]) for r in rows if r["split"] == "train"}
    for es in (hh, alpaca):
        assert len(es.prompts) >= 20 and set(es.prompts) <= eval_prompts
        assert not {normalize_prompt(p) for p in es.prompts} & train_prompts
    hh_sources = {r["source"] for r in rows if "hh_harmless" in r["source"]}
    assert {r["source"] for r in rows if r["prompt"] in set(hh.prompts)} <= hh_sources


def test_unknown_or_unavailable_sets_are_config_errors(real_dataset):
    with pytest.raises(ConfigError, match="unknown set nope"):
        build_eval_sets(["nope"], {"dataset": real_dataset})
    with pytest.raises(ConfigError, match="needs the synthetic world"):
        build_eval_sets(["world-harmful"], {"dataset": real_dataset})


def test_a_trained_prompt_in_an_eval_set_is_refused(real_dataset):
    trained = next(r["prompt"] for r in load_pairs_table(real_dataset) if r["split"] == "train")
    leaky = EvalSet("leaky", "harmful", ["an unseen prompt", "  " + trained.upper()], world=False)
    with pytest.raises(DataError, match="leaky: 1 prompts"):
        assert_unseen([leaky], real_dataset)
