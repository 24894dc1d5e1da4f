"""Each loss against numbers computed by hand, and each method's data rule.

One fixture pair is used throughout (torchtune's style: the arithmetic is in the docstrings):

    policy    log π(y_w) = -10, log π(y_l) = -14
    reference log π_ref(y_w) = -11, log π_ref(y_l) = -12
    chosen log-ratio  = -10 - (-11) = 1,  rejected log-ratio = -14 - (-12) = -2
    h = 1 - (-2) = 3,  with β = 0.1: β h = 0.3

and ``-log σ(x) = log(1 + e^(-x))``.
"""

import math

import pytest
import torch

from midpo.train.losses import (
    DATA_RULES,
    LOSS_COLUMNS,
    LOSSES,
    LogProbs,
    apply_data_rule,
    attach_safety_labels,
    resolve_params,
    safedpo_rule,
    spe_margins,
    swap,
)


def pair(n: int = 1) -> tuple[LogProbs, LogProbs]:
    policy = LogProbs(torch.full((n,), -10.0, dtype=torch.float64), torch.full((n,), -14.0, dtype=torch.float64))
    reference = LogProbs(torch.full((n,), -11.0, dtype=torch.float64), torch.full((n,), -12.0, dtype=torch.float64))
    return policy, reference


def col(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_registry_covers_every_method():
    assert set(LOSSES) == set(LOSS_COLUMNS) == set(DATA_RULES) == {"dpo", "spe_dpo", "safedpo", "bfpo", "modpo"}


def test_dpo_and_trl_reward_metrics():
    """-log σ(0.3) = log(1 + e^-0.3) = log(1 + 0.740818) = 0.554355.

    rewards: chosen β·1 = 0.1, rejected β·(-2) = -0.2, margin 0.3, accuracy 1.
    """
    losses, m = LOSSES["dpo"](*pair(), {}, beta=0.1)
    close(losses, [0.5543552444685271])
    close(m["rewards/chosen"], [0.1])
    close(m["rewards/rejected"], [-0.2])
    close(m["rewards/margins"], [0.30000000000000004])
    close(m["rewards/accuracies"], [1.0])


def test_spe_dpo_margin_is_clipped_at_zero():
    """m = 0.5:  -log σ(0.3 - 0.5) = log(1 + e^0.2) = log(2.221403) = 0.798139.
    m = -0.5: clipped to 0, so DPO: 0.554355.  m = 0: exactly DPO (same tensor, bit for bit)."""
    policy, reference = pair(3)
    losses, m = LOSSES["spe_dpo"](policy, reference, {"margin": col(0.5, -0.5, 0.0)}, beta=0.1)
    close(losses, [0.7981388693815918, 0.5543552444685271, 0.5543552444685271])
    close(m["spe/margin"], [0.5, 0.0, 0.0])
    dpo_losses, _ = LOSSES["dpo"](policy, reference, {}, beta=0.1)
    assert torch.equal(losses[2], dpo_losses[2]) and torch.equal(losses[1], dpo_losses[1])


def test_spe_margins_for_both_experts_and_both_directions():
    """Safety: m = C(y_l) - C(y_w).  C_w = -1, C_l = 2: m = 3, -log σ(0.3 - 3) = log(1 + e^2.7) = log(15.879732) = 2.765044.
    Reversed costs: m = -3, clipped: DPO 0.554355.
    Helpfulness: m = R(y_w) - R(y_l).  R_w = 1.5, R_l = 0.5: m = 1, -log σ(0.3 - 1) = log(1 + e^0.7) = log(3.013753) = 1.103186.
    Reversed rewards: m = -1, clipped: DPO 0.554355."""
    safety = spe_margins([{"chosen_cost": -1.0, "rejected_cost": 2.0}, {"chosen_cost": 2.0, "rejected_cost": -1.0}], "safety")
    helpful = spe_margins([{"chosen_reward": 1.5, "rejected_reward": 0.5}, {"chosen_reward": 0.5, "rejected_reward": 1.5}], "helpfulness")
    assert [r["margin"] for r in safety] == [3.0, -3.0] and [r["margin"] for r in helpful] == [1.0, -1.0]
    margins = col(*(r["margin"] for r in safety + helpful))
    losses, _ = LOSSES["spe_dpo"](*pair(4), {"margin": margins}, beta=0.1)
    close(losses, [2.765043561776591, 0.5543552444685271, 1.103186048885458, 0.5543552444685271])
    with pytest.raises(ValueError, match="expert"):
        spe_margins([], "cost")


def test_safedpo_offset_only_for_safe_over_unsafe():
    """Δ = 10.  (u_w, u_l) = (0, 1): -log σ(0.3 - 10) = log(1 + e^9.7) = log(16318.607) = 9.700061.
    (0, 0): offset 0, DPO 0.554355.  Δ = 0: plain DPO for both."""
    policy, reference = pair(2)
    batch = {"chosen_unsafe": col(0, 0), "rejected_unsafe": col(1, 0)}
    losses, m = LOSSES["safedpo"](policy, reference, batch, beta=0.1, delta=10.0)
    close(losses, [9.700061281617296, 0.5543552444685271])
    close(m["safedpo/offset"], [10.0, 0.0])
    losses0, _ = LOSSES["safedpo"](policy, reference, batch, beta=0.1, delta=0.0)
    close(losses0, [0.5543552444685271] * 2)
    assert resolve_params("safedpo", 0.1) == (0.1, {"delta": 10.0})


def test_safedpo_rule_swaps_drops_and_counts():
    rows = [
        {"pair_id": "a", "chosen": "x", "rejected": "y", "chosen_index": 0, "chosen_unsafe": 1.0, "rejected_unsafe": 0.0, "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0},
        {"pair_id": "b", "chosen": "x", "rejected": "y", "chosen_index": 1, "chosen_unsafe": 1.0, "rejected_unsafe": 1.0},
        {"pair_id": "c", "chosen": "x", "rejected": "y", "chosen_index": 0, "chosen_unsafe": 0.0, "rejected_unsafe": 1.0},
        {"pair_id": "d", "chosen": "x", "rejected": "y", "chosen_index": 0, "chosen_unsafe": 0.0, "rejected_unsafe": 0.0},
        {"pair_id": "e", "chosen": "x", "rejected": "y", "chosen_index": 0, "chosen_unsafe": None, "rejected_unsafe": 0.0},
    ]
    out, counts = safedpo_rule(rows)
    assert counts == {"kept": 3, "swapped": 1, "dropped_both_unsafe": 1, "dropped_unlabeled": 1}
    assert [r["pair_id"] for r in out] == ["a", "c", "d"]
    a = out[0]  # swapped: texts, labels, index and the joined reference values all follow the response
    assert (a["chosen"], a["rejected"], a["chosen_index"]) == ("y", "x", 1)
    assert (a["chosen_unsafe"], a["rejected_unsafe"]) == (0.0, 1.0)
    assert (a["ref_chosen_logps"], a["ref_rejected_logps"]) == (-2.0, -1.0)
    assert out[1] == rows[2] and out[2] == rows[3]
    again, counts2 = safedpo_rule(out)  # idempotent
    assert again == out and counts2["swapped"] == 0 and counts2["kept"] == 3


def test_swap_negates_margin_and_is_an_involution():
    row = {"pair_id": "a", "chosen": "x", "rejected": "y", "chosen_index": 1, "margin": 2.0, "chosen_cost": 1.0, "rejected_cost": -1.0}
    s = swap(row)
    assert (s["chosen"], s["chosen_index"], s["margin"], s["chosen_cost"]) == ("y", 0, -2.0, -1.0)
    assert swap(s) == row


def test_bfpo_four_targets():
    """β = 0.01 (BFPO's default), B1 = 3, B3 = 1/2, a = 0.5:  g = 1.5 s_w - 0.5 s_l - 0.5
      safe over unsafe  g = 1.5 - 0   - 0.5 = +1    loss (3 - 100)^2 =  9409
      both safe         g = 1.5 - 0.5 - 0.5 = +0.5  loss (3 -  50)^2 =  2209
      both unsafe       g = 0   - 0   - 0.5 = -0.5  loss (3 +  50)^2 =  2809
      unsafe over safe  g = 0   - 0.5 - 0.5 = -1    loss (3 + 100)^2 = 10609"""
    beta, params = resolve_params("bfpo", 0.1)  # the config's 0.1 loses to BFPO's own default
    assert (beta, params) == (0.01, {"b1": 3.0, "a": 0.5})
    batch = {"chosen_unsafe": col(0, 0, 1, 1), "rejected_unsafe": col(1, 0, 1, 0)}
    losses, m = LOSSES["bfpo"](*pair(4), batch, beta=beta, **params)
    close(m["bfpo/target"], [1.0, 0.5, -0.5, -1.0])
    close(losses, [9409.0, 2209.0, 2809.0, 10609.0])
    assert resolve_params("bfpo", 0.1, {"beta": 0.05})[0] == 0.05
    assert math.isclose(resolve_params("spe_dpo", 0.2)[0], 0.2)  # no default of its own: the config's beta


def test_modpo_sign():
    """w = 0.5: -log σ(2β h + (C_w - C_l)), 2β h = 0.6.
      C_w = 1, C_l = -1 (costlier chosen): -log σ(2.6)  = log(1 + e^-2.6) = 0.071645
      C_w = -1, C_l = 1:                   -log σ(-1.4) = log(1 + e^1.4)  = 1.620417
      equal costs:                          -log σ(0.6)  = log(1 + e^-0.6) = 0.437488"""
    batch = {"chosen_cost": col(1, -1, 0.3), "rejected_cost": col(-1, 1, 0.3)}
    losses, m = LOSSES["modpo"](*pair(3), batch, beta=0.1, **resolve_params("modpo", 0.1)[1])
    close(losses, [0.07164469196766982, 1.620417409918451, 0.4374879504858856])
    assert losses[0] < losses[2] < losses[1]
    close(m["modpo/cost_gap"], [2.0, -2.0, 0.0])


def test_losses_are_per_example_and_differentiable():
    policy = LogProbs(torch.tensor([-10.0, -3.0], requires_grad=True), torch.tensor([-14.0, -2.0], requires_grad=True))
    reference = LogProbs(torch.tensor([-11.0, -3.0]), torch.tensor([-12.0, -2.0]))
    batch = {"margin": torch.ones(2), "chosen_unsafe": torch.zeros(2), "rejected_unsafe": torch.ones(2), "chosen_cost": torch.zeros(2), "rejected_cost": torch.zeros(2)}
    for name, fn in LOSSES.items():
        beta, params = resolve_params(name, 0.1)
        losses, metrics = fn(policy, reference, {c: batch[c] for c in LOSS_COLUMNS[name]}, beta=beta, **params)
        assert losses.shape == (2,), name
        assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(metrics)
        assert all(v.shape == (2,) and not v.requires_grad for v in metrics.values()), name
        (grad,) = torch.autograd.grad(losses.sum(), policy.chosen)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_missing_column_and_bad_params_are_errors():
    with pytest.raises(KeyError, match="margin"):
        LOSSES["spe_dpo"](*pair(), {}, beta=0.1)
    with pytest.raises(ValueError, match="no parameter 'gamma'"):
        resolve_params("dpo", 0.1, {"gamma": 1.0})
    with pytest.raises(ValueError, match="unknown loss"):
        resolve_params("ppo", 0.1)
    with pytest.raises(ValueError, match="both be"):
        LogProbs(torch.zeros(2), torch.zeros(3))


def test_require_rules_drop_and_count_missing_columns():
    rows = [{"pair_id": "a", "margin": 1.0}, {"pair_id": "b", "margin": None}, {"pair_id": "c", "margin": float("nan")}, {"pair_id": "d"}]
    out, counts = apply_data_rule("spe_dpo", rows)
    assert [r["pair_id"] for r in out] == ["a"] and counts == {"kept": 1, "dropped_missing_margin": 3}
    out, counts = apply_data_rule("dpo", rows)
    assert len(out) == 4 and counts == {"kept": 4}
    out, counts = apply_data_rule("modpo", [{"chosen_cost": 1.0, "rejected_cost": None}])
    assert out == [] and counts == {"kept": 0, "dropped_missing_rejected_cost": 1}


def test_safety_labels_join_by_pair_and_chosen_index():
    pairs = [
        {"pair_id": "a", "is_response_0_safe": True, "is_response_1_safe": False},
        {"pair_id": "b", "is_response_0_safe": None, "is_response_1_safe": True},
    ]
    rows = [{"pair_id": "b", "chosen_index": 1}, {"pair_id": "a", "chosen_index": 1}, {"pair_id": "a", "chosen_index": 0}]
    out = attach_safety_labels(rows, pairs)
    assert [(r["chosen_unsafe"], r["rejected_unsafe"]) for r in out] == [(0.0, None), (1.0, 0.0), (0.0, 1.0)]
    with pytest.raises(KeyError, match="zz"):
        attach_safety_labels([{"pair_id": "zz", "chosen_index": 0}], pairs)
