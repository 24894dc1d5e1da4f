"""D_dual rules on hand-made pairs: which pairs each rule keeps, which response it prefers, and its counts."""

import pytest

from midpo.data.schema import PreferencePair
from midpo.data.subsets import safety_pair
from midpo.moe.dual import build_dual


def pair(prompt, kind, safe, better, safer):
    p = PreferencePair(prompt, f"{prompt} answer a", f"{prompt} answer b", *safe, better, safer, prompt_kind=kind)
    return p


PAIRS = [
    pair("both safe, agree", "benign", (True, True), 1, 1),  # label: yes (chosen 1)
    pair("both safe, disagree", "benign", (True, True), 0, 1),  # label: no (better != safer)
    pair("one unsafe", "harmful", (False, True), 0, 1),  # safety pair (chosen 1)
    pair("both unsafe", "harmful", (False, False), 0, 0),
    pair("refusal vs alternative", "harmful", (True, True), 0, 0),  # label: yes (chosen 0)
]
ROWS = [p.to_row() for p in PAIRS]
SAFETY = [r for p in PAIRS if (r := safety_pair(p)) is not None]
# (R, C) per response: "both safe, disagree" is safe by the cost model with response 0 more helpful;
# "one unsafe" has a positive cost on response 0; "both unsafe" is unsafe by the cost model too
SCORES = {
    (ROWS[0]["pair_id"], 0): (0.1, -1.0), (ROWS[0]["pair_id"], 1): (0.9, -0.5),
    (ROWS[1]["pair_id"], 0): (1.5, -0.2), (ROWS[1]["pair_id"], 1): (0.5, -2.0),
    (ROWS[2]["pair_id"], 0): (2.0, 1.0), (ROWS[2]["pair_id"], 1): (0.2, -1.0),
    (ROWS[3]["pair_id"], 0): (1.0, 2.0), (ROWS[3]["pair_id"], 1): (0.0, 0.5),
    (ROWS[4]["pair_id"], 0): (0.7, -3.0), (ROWS[4]["pair_id"], 1): (0.7, -1.0),
}


def chosen(rows):
    return {r["prompt"]: r["chosen_index"] for r in rows}


def test_label_rule_is_the_papers():
    rows, counts = build_dual(ROWS, SAFETY, None, "label")
    assert chosen(rows) == {"both safe, agree": 1, "refusal vs alternative": 0}
    assert counts["total"] == {"benign": 1, "harmful": 1, "total": 2}


def test_label_plus_safety_adds_each_safety_pair_once():
    rows, counts = build_dual(ROWS, SAFETY, None, "label+safety")
    assert chosen(rows) == {"both safe, agree": 1, "refusal vs alternative": 0, "one unsafe": 1}
    assert counts["safety"] == {"harmful": 1, "total": 1} and counts["total"]["total"] == 3
    assert rows[0]["chosen"] == PAIRS[0].response_1 and rows[0]["rejected"] == PAIRS[0].response_0


def test_reward_rule_ranks_cost_model_safe_pairs():
    rows, counts = build_dual(ROWS, SAFETY, SCORES, "reward")
    # both safe by C < 0: pairs 0, 1, 4; pair 4 is a reward tie and is dropped
    assert chosen(rows) == {"both safe, agree": 1, "both safe, disagree": 0}
    lower_cost, _ = build_dual(ROWS, SAFETY, SCORES, "reward", reward_choice="lower-cost")
    assert chosen(lower_cost) == {"both safe, agree": 0, "both safe, disagree": 1, "refusal vs alternative": 0}
    both, counts = build_dual(ROWS, SAFETY, SCORES, "reward+safety")
    assert chosen(both) == {**chosen(rows), "one unsafe": 1} and counts["reward"]["total"] == 2


def test_bad_rules_are_clear_errors():
    with pytest.raises(ValueError, match="unknown D_dual rule 'labels'"):
        build_dual(ROWS, SAFETY, None, "labels")
    with pytest.raises(ValueError, match="needs the response scores"):
        build_dual(ROWS, SAFETY, None, "reward")
