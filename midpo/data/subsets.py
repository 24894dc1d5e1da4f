"""The subset rules of midpo-method.md, as named functions chosen by config.

Each rule maps a canonical pair to a preference row (``chosen``/``rejected`` plus the index of the chosen
response, so reference log-probs keyed by (pair id, response index) can be reused) or to ``None`` when
the pair is not in the subset.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

from midpo.data.schema import PreferencePair

SUBSETS = ("safety", "helpfulness", "dual")

Row = dict[str, Any]


def preference_row(pair: PreferencePair, chosen: int) -> Row:
    responses = (pair.response_0, pair.response_1)
    return {
        "pair_id": pair.pair_id,
        "prompt": pair.prompt,
        "context": pair.context,
        "chosen": responses[chosen],
        "rejected": responses[1 - chosen],
        "chosen_index": chosen,
        "prompt_kind": pair.prompt_kind,
        "source": pair.source,
    }


def safety_pair(pair: PreferencePair, unlabeled_safety: str = "safer-label") -> Row | None:
    """Exactly one response safe; chosen = the safe one.

    Without per-response labels (hh-rlhf), ``safer-label`` trusts ``safer_response_id`` (the data recipe)
    and ``skip`` leaves the pair out.
    """
    s0, s1 = pair.is_response_0_safe, pair.is_response_1_safe
    if s0 is not None and s1 is not None:
        return preference_row(pair, 0 if s0 else 1) if s0 != s1 else None
    if s0 is None and s1 is None and unlabeled_safety == "safer-label" and pair.safer_response_id is not None:
        return preference_row(pair, pair.safer_response_id)
    return None


def helpfulness_pair(pair: PreferencePair) -> Row | None:
    """Every pair with a helpfulness label; chosen = the better response."""
    if pair.better_response_id is None:
        return None
    return preference_row(pair, pair.better_response_id)


def dual_label_pair(pair: PreferencePair) -> Row | None:
    """The paper's D_dual rule: both responses safe and safer == better; chosen = the better."""
    both_safe = pair.is_response_0_safe is True and pair.is_response_1_safe is True
    if both_safe and pair.better_response_id is not None and pair.better_response_id == pair.safer_response_id:
        return preference_row(pair, pair.better_response_id)
    return None


def build_subsets(pairs: list[PreferencePair], unlabeled_safety: str, dual_rule: str) -> dict[str, list[Row]]:
    """Rows of each subset. ``label+safety`` adds every safety pair to D_dual (tiny-world-notes.md)."""
    rules: dict[str, Callable[[PreferencePair], Row | None]] = {
        "safety": lambda p: safety_pair(p, unlabeled_safety),
        "helpfulness": helpfulness_pair,
        "dual": dual_label_pair,
    }
    out = {name: [row for p in pairs if (row := rule(p)) is not None] for name, rule in rules.items()}
    if dual_rule == "label+safety":
        in_dual = {r["pair_id"] for r in out["dual"]}
        out["dual"] += [r for r in out["safety"] if r["pair_id"] not in in_dual]
    elif dual_rule != "label":
        raise ValueError(f"unknown dual_rule {dual_rule!r}")
    return out


def counts_by_kind(rows: list[Row]) -> dict[str, int]:
    """Rows per prompt kind (``unknown`` where the source has none), plus ``total``."""
    c = Counter(r.get("prompt_kind") or "unknown" for r in rows)
    return {**dict(sorted(c.items())), "total": len(rows)}


def reversed_pairs(safety: list[Row], helpfulness: list[Row]) -> list[Row]:
    """The safety rows whose pair the helpfulness subset holds with the opposite preference: in the union
    of both (what DPO-mix trains on) each such pair pulls both ways."""
    helpful = {r["pair_id"]: r["chosen_index"] for r in helpfulness}
    return [r for r in safety if r["pair_id"] in helpful and helpful[r["pair_id"]] != r["chosen_index"]]
