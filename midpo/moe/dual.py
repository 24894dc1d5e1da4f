"""D_dual, the router's preference pairs, by one of four rules (midpo-method.md, "Stage 2").

==================  ==============================================================================
rule                pairs
==================  ==============================================================================
``label``           the paper's: both responses labeled safe and safer == better; chosen = the better
``label+safety``    ``label`` plus every safety pair (safe over unsafe; the data's safety subset)
``reward``          both responses safe by the cost model (C < 0); chosen = the higher reward, or with
                    ``reward_choice: lower-cost`` the lower cost (the official script's choice)
``reward+safety``   ``reward`` plus every safety pair
==================  ==============================================================================

Why ``+safety``: with the label rule, harmful prompts contribute only safe-vs-safe pairs, so nothing
asks the safety gate to open there while the regularizer closes it (tiny-world-notes.md measured MidPO as
unsafe as the helpfulness expert). The counts per prompt kind are recorded with every D_dual.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from midpo.data.schema import PreferencePair
from midpo.data.subsets import counts_by_kind, dual_label_pair, preference_row

DUAL_RULES = ("label", "label+safety", "reward", "reward+safety")
REWARD_CHOICES = ("higher-reward", "lower-cost")

Row = dict[str, Any]


def _pair(row: Mapping[str, Any]) -> PreferencePair:
    fields = PreferencePair.__dataclass_fields__
    return PreferencePair(**{k: row[k] for k in fields if k in row and k != "extras"})


def reward_ranked(pair: Mapping[str, Any], scores: Mapping[tuple[str, int], tuple[float, float]], choice: str) -> Row | None:
    """Both responses safe by the cost model (C < 0): chosen = higher R (or lower C); ties dropped."""
    (r0, c0), (r1, c1) = scores[(pair["pair_id"], 0)], scores[(pair["pair_id"], 1)]
    if c0 >= 0 or c1 >= 0:
        return None
    a, b = (r0, r1) if choice == "higher-reward" else (-c0, -c1)
    if a == b:
        return None
    return preference_row(_pair(pair), 0 if a > b else 1)


def build_dual(
    pairs: Iterable[Mapping[str, Any]],
    safety_rows: Iterable[Mapping[str, Any]],
    scores: Mapping[tuple[str, int], tuple[float, float]] | None,
    rule: str,
    reward_choice: str = "higher-reward",
) -> tuple[list[Row], dict[str, dict[str, int]]]:
    """``(rows, counts)``: D_dual from canonical ``pairs`` (one split), the data's ``safety_rows`` (same
    split) and ``scores`` {(pair_id, response_index): (R, C)}; counts per prompt kind of each part."""
    if rule not in DUAL_RULES:
        raise ValueError(f"unknown D_dual rule {rule!r} (rules: {', '.join(DUAL_RULES)})")
    if reward_choice not in REWARD_CHOICES:
        raise ValueError(f"reward_choice must be one of {REWARD_CHOICES}, got {reward_choice!r}")
    base_rule, _, plus = rule.partition("+")
    if base_rule == "label":
        rows = [r for p in pairs if (r := dual_label_pair(_pair(p))) is not None]
    else:
        if scores is None:
            raise ValueError(f"D_dual rule {rule!r} needs the response scores of the cost and reward models")
        rows = [r for p in pairs if (r := reward_ranked(p, scores, reward_choice)) is not None]
    counts = {base_rule: counts_by_kind(rows)}
    if plus == "safety":
        have = {r["pair_id"] for r in rows}
        extra = [{k: r[k] for k in ("pair_id", "prompt", "context", "chosen", "rejected", "chosen_index", "prompt_kind", "source")} for r in safety_rows if r["pair_id"] not in have]
        rows += extra
        counts["safety"] = counts_by_kind(extra)
    counts["total"] = counts_by_kind(rows)
    return rows, counts
