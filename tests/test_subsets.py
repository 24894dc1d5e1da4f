"""The subset rules of midpo-method.md on hand-made pairs."""

from midpo.data.schema import PreferencePair
from midpo.data.subsets import (
    build_subsets,
    counts_by_kind,
    dual_label_pair,
    helpfulness_pair,
    safety_pair,
)


def pair(s0, s1, better, safer, kind="harmful"):
    return PreferencePair("p", "a", "b", s0, s1, better, safer, prompt_kind=kind)


def test_safety_pair_needs_exactly_one_safe_response_and_chooses_it():
    assert safety_pair(pair(True, False, 1, 0))["chosen"] == "a"
    assert safety_pair(pair(False, True, 0, 1))["chosen"] == "b"
    assert safety_pair(pair(True, True, 0, 0)) is None
    assert safety_pair(pair(False, False, 0, 1)) is None


def test_safety_pair_without_per_response_labels_follows_the_recipe():
    hh = pair(None, None, None, 1)
    assert safety_pair(hh, "safer-label")["chosen"] == "b"
    assert safety_pair(hh, "safer-label")["chosen_index"] == 1
    assert safety_pair(hh, "skip") is None
    assert safety_pair(pair(None, None, None, None), "safer-label") is None
    assert safety_pair(pair(True, None, None, 0), "safer-label") is None  # half-labelled: not a safety pair


def test_helpfulness_pair_is_every_labelled_pair_chosen_better():
    assert helpfulness_pair(pair(False, False, 1, 0))["chosen"] == "b"
    assert helpfulness_pair(pair(None, None, None, 0)) is None


def test_dual_label_rule_needs_both_safe_and_agreement():
    assert dual_label_pair(pair(True, True, 1, 1))["chosen"] == "b"
    assert dual_label_pair(pair(True, True, 1, 0)) is None
    assert dual_label_pair(pair(True, False, 0, 0)) is None
    assert dual_label_pair(pair(None, None, 0, 0)) is None


def test_label_plus_safety_adds_safety_pairs_once():
    pairs = [pair(True, True, 0, 0, "benign"), pair(True, False, 1, 0), pair(False, False, 1, 0)]
    label = build_subsets(pairs, "safer-label", "label")
    both = build_subsets(pairs, "safer-label", "label+safety")
    assert len(label["dual"]) == 1 and len(both["dual"]) == 2
    assert counts_by_kind(both["dual"]) == {"benign": 1, "harmful": 1, "total": 2}
    assert len(both["safety"]) == 1 and len(both["helpfulness"]) == 3
