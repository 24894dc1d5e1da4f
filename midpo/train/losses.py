"""Preference losses with one contract, and the data rule of each method (midpo-method.md).

Every loss is a function

    loss(policy: LogProbs, reference: LogProbs, batch: dict, *, beta: float, **params) -> (losses (B,), metrics)

registered by name in :data:`LOSSES` (torchtune's contract: log-probs in, per-example losses out; the
trainer reduces them). ``policy`` and ``reference`` hold sequence log-probs summed over completion tokens,
``batch`` the per-pair columns the loss declares in :data:`LOSS_COLUMNS` (float tensors of shape (B,)).
``metrics`` maps TRL's metric names to detached per-example tensors (B,); the trainer averages them.

With the implicit reward log-ratio

    h = [log π(y_w) - log π_ref(y_w)] - [log π(y_l) - log π_ref(y_l)]

the losses are

==========  ==========================================================  ===============================
name        per-pair loss                                                columns
==========  ==========================================================  ===============================
dpo         -log σ(β h)                                                  -
spe_dpo     -log σ(β h - max(0, m))        (MidPO stage 1)               margin
safedpo     -log σ(β h - (u_l - u_w) Δ)    (SafeDPO, Δ = 10)             chosen_unsafe, rejected_unsafe
bfpo        (h - g / β)^2,  g = B1 B3 s_w - B3 s_l - a  (BFPO, β 0.01)   chosen_unsafe, rejected_unsafe
modpo       -log σ(β/w h + (1-w)/w (C(y_w) - C(y_l)))   (MODPO, w 0.5)   chosen_cost, rejected_cost
==========  ==========================================================  ===============================

u = unsafety indicator in {0, 1}, s = 1 - u, C = cost (C > 0 unsafe). A loss's own defaults (e.g. BFPO's
β = 0.01) are in :data:`LOSS_DEFAULTS`; :func:`resolve_params` merges them with the caller's.

A method's DATA RULE (:data:`DATA_RULES`) maps rows to rows before training and counts what it did:
SafeDPO's reorder, dropping pairs without the labels a loss needs. Rules are idempotent, so applying one
twice (once in the pipeline, once in ``train_adapter``) changes nothing. A swap exchanges every
``chosen*``/``rejected*`` column pair (reference log-probs included), flips ``chosen_index`` and negates
``margin``, so values joined by (pair_id, chosen_index) stay attached to the right response.
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

Row = dict[str, Any]
Metrics = dict[str, torch.Tensor]
LossFn = Callable[..., tuple[torch.Tensor, Metrics]]
DataRule = Callable[[Iterable[Mapping[str, Any]]], tuple[list[Row], dict[str, int]]]


@dataclass(frozen=True)
class LogProbs:
    """Sequence log-probs of the chosen and rejected responses, summed over completion tokens: (B,) each."""

    chosen: torch.Tensor
    rejected: torch.Tensor

    def __post_init__(self) -> None:
        if self.chosen.shape != self.rejected.shape or self.chosen.dim() != 1:
            raise ValueError(f"chosen and rejected must both be (B,), got {tuple(self.chosen.shape)} and {tuple(self.rejected.shape)}")


LOSSES: dict[str, LossFn] = {}
LOSS_COLUMNS: dict[str, tuple[str, ...]] = {}  # per-pair columns each loss reads from the batch
LOSS_DEFAULTS: dict[str, dict[str, float]] = {}  # the method's own defaults (``beta`` here overrides the config's)


def register(name: str, columns: tuple[str, ...] = (), **defaults: float) -> Callable[[LossFn], LossFn]:
    def wrap(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        LOSS_COLUMNS[name] = columns
        LOSS_DEFAULTS[name] = dict(defaults)
        return fn

    return wrap


def resolve_params(name: str, beta: float, params: Mapping[str, Any] | None = None) -> tuple[float, dict[str, Any]]:
    """``(beta, params)`` for loss ``name``: the caller's ``params`` over the loss's defaults over ``beta``.

    A ``beta`` in ``params`` (or in the loss's defaults, as BFPO's 0.01) wins over the ``beta`` argument
    (the config's). Unknown parameter names raise here, not at the first training step.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r} (known: {', '.join(sorted(LOSSES))})")
    merged = {**LOSS_DEFAULTS[name], **dict(params or {})}
    beta = float(merged.pop("beta", beta))
    known = [p for p in inspect.signature(LOSSES[name]).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "beta"]
    unknown = sorted(set(merged) - {p.name for p in known})
    if unknown:
        raise ValueError(f"loss {name!r} has no parameter {unknown[0]!r} (parameters: beta, {', '.join(p.name for p in known) or 'none'})")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    return beta, merged


def _logratios(policy: LogProbs, reference: LogProbs) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(y_w) - log π_ref(y_w), log π(y_l) - log π_ref(y_l)), each (B,)."""
    return policy.chosen - reference.chosen, policy.rejected - reference.rejected


def _reward_metrics(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float) -> Metrics:
    """TRL's reward metrics: implicit rewards β·log-ratio, their margin and how often chosen wins."""
    chosen, rejected = (beta * chosen_logratio).detach(), (beta * rejected_logratio).detach()
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": (chosen > rejected).to(chosen.dtype),
    }


def _column(batch: Mapping[str, Any], name: str, like: torch.Tensor) -> torch.Tensor:
    try:
        value = batch[name]
    except KeyError:
        raise KeyError(f"the loss needs the per-pair column {name!r}, which is not in the batch (keys: {sorted(batch)})") from None
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


# --------------------------------------------------------------------------------------------------
# Losses


@register("dpo")
def dpo(policy: LogProbs, reference: LogProbs, batch: Mapping[str, Any], *, beta: float) -> tuple[torch.Tensor, Metrics]:
    """DPO (Rafailov et al. 2023, eq. 7): ``-log σ(β h)``."""
    cw, cl = _logratios(policy, reference)
    return -F.logsigmoid(beta * (cw - cl)), _reward_metrics(cw, cl, beta)


@register("spe_dpo", columns=("margin",))
def spe_dpo(policy: LogProbs, reference: LogProbs, batch: Mapping[str, Any], *, beta: float) -> tuple[torch.Tensor, Metrics]:
    """SPE-DPO (MidPO stage 1): ``-log σ(β h - max(0, m))`` with the per-pair target margin ``m``.

    ``m`` comes from the single preference's frozen score model (:func:`spe_margins`): C(y_l) - C(y_w) for
    the safety expert, R(y_w) - R(y_l) for the helpfulness expert. Clipped at 0: a pair the score model
    disagrees with (m < 0) trains as plain DPO.
    """
    cw, cl = _logratios(policy, reference)
    margin = _column(batch, "margin", cw).clamp(min=0.0)
    metrics = _reward_metrics(cw, cl, beta)
    metrics["spe/margin"] = margin.detach()
    return -F.logsigmoid(beta * (cw - cl) - margin), metrics


@register("safedpo", columns=("chosen_unsafe", "rejected_unsafe"), delta=10.0)
def safedpo(policy: LogProbs, reference: LogProbs, batch: Mapping[str, Any], *, beta: float, delta: float = 10.0) -> tuple[torch.Tensor, Metrics]:
    """SafeDPO: ``-log σ(β h - (u_l - u_w) Δ)``, u in {0, 1} the unsafety indicators, Δ >= 0.

    After :func:`safedpo_rule` only (safe, safe) and (safe over unsafe) pairs remain, so the offset Δ
    applies exactly to the safe-over-unsafe pairs: they must win by a larger implicit-reward margin.
    """
    if delta < 0:
        raise ValueError(f"SafeDPO needs delta >= 0, got {delta}")
    cw, cl = _logratios(policy, reference)
    offset = (_column(batch, "rejected_unsafe", cw) - _column(batch, "chosen_unsafe", cw)) * delta
    metrics = _reward_metrics(cw, cl, beta)
    metrics["safedpo/offset"] = offset.detach()
    return -F.logsigmoid(beta * (cw - cl) - offset), metrics


@register("bfpo", columns=("chosen_unsafe", "rejected_unsafe"), beta=0.01, b1=3.0, a=0.5)
def bfpo(policy: LogProbs, reference: LogProbs, batch: Mapping[str, Any], *, beta: float, b1: float = 3.0, a: float = 0.5) -> tuple[torch.Tensor, Metrics]:
    """BFPO (Zhang et al. 2024): ``(h - g / β)^2`` with ``g = B1 B3 s_w - B3 s_l - a``, B3 = 1 / (B1 - 1).

    s = 1 - u is the safety indicator. Defaults B1 = 3, a = 0.5 (β = 0.01) give the targets g =
    +1 (safe over unsafe), +0.5 (both safe), -0.5 (both unsafe), -1 (unsafe over safe).
    """
    if b1 == 1:
        raise ValueError("BFPO needs b1 != 1 (B3 = 1 / (b1 - 1))")
    cw, cl = _logratios(policy, reference)
    b3 = 1.0 / (b1 - 1.0)
    safe_w = 1.0 - _column(batch, "chosen_unsafe", cw)
    safe_l = 1.0 - _column(batch, "rejected_unsafe", cw)
    target = b1 * b3 * safe_w - b3 * safe_l - a
    metrics = _reward_metrics(cw, cl, beta)
    metrics["bfpo/target"] = target.detach()
    return ((cw - cl) - target / beta) ** 2, metrics


@register("modpo", columns=("chosen_cost", "rejected_cost"), w=0.5)
def modpo(policy: LogProbs, reference: LogProbs, batch: Mapping[str, Any], *, beta: float, w: float = 0.5) -> tuple[torch.Tensor, Metrics]:
    """MODPO (Zhou et al. 2024) on helpfulness pairs with the cost model as the margin objective.

    ``-log σ((β / w) h - ((1 - w) / w) (r(y_w) - r(y_l)))`` with the harmlessness reward r = -C; at w = 0.5
    this is ``-log σ(2β h + (C(y_w) - C(y_l)))``. A costlier chosen response lowers the loss: the cost
    objective already accounts for part of the preference, so the policy's own margin need not.
    """
    if not 0.0 < w <= 1.0:
        raise ValueError(f"MODPO needs 0 < w <= 1, got {w}")
    cw, cl = _logratios(policy, reference)
    cost_gap = _column(batch, "chosen_cost", cw) - _column(batch, "rejected_cost", cw)
    metrics = _reward_metrics(cw, cl, beta)
    metrics["modpo/cost_gap"] = cost_gap.detach()
    return -F.logsigmoid((beta / w) * (cw - cl) + ((1.0 - w) / w) * cost_gap), metrics


# --------------------------------------------------------------------------------------------------
# Data rules


def swap(row: Mapping[str, Any]) -> Row:
    """The same pair with chosen and rejected exchanged: every ``...chosen...``/``...rejected...`` column pair
    (texts, labels, costs, ``ref_chosen_logps``/``ref_rejected_logps``) swapped, ``chosen_index`` flipped,
    the antisymmetric ``margin`` negated."""
    out = dict(row)
    for key in row:
        if "chosen" in key and key != "chosen_index":
            other = key.replace("chosen", "rejected")
            if other in row:
                out[key], out[other] = row[other], row[key]
    if "chosen_index" in row and row["chosen_index"] is not None:
        out["chosen_index"] = 1 - int(row["chosen_index"])
    if row.get("margin") is not None:
        out["margin"] = -row["margin"]
    return out


def _has(row: Mapping[str, Any], columns: Iterable[str]) -> bool:
    """Every column present, not null and (if numeric) finite."""
    for c in columns:
        v = row.get(c)
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return False
    return True


def _require(columns: tuple[str, ...]) -> DataRule:
    """A rule that keeps the rows holding every ``columns`` value and drops (and counts) the rest."""

    def rule(rows: Iterable[Mapping[str, Any]]) -> tuple[list[Row], dict[str, int]]:
        counts: Counter[str] = Counter()
        out = []
        for row in rows:
            if _has(row, columns):
                out.append(dict(row))
                counts["kept"] += 1
            else:
                counts["dropped_missing_" + "_".join(c for c in columns if not _has(row, [c]))] += 1
        return out, {"kept": 0, **counts}

    rule.__doc__ = f"Keep rows with {', '.join(columns) or 'anything'}; drop and count the others."
    return rule


def safedpo_rule(rows: Iterable[Mapping[str, Any]]) -> tuple[list[Row], dict[str, int]]:
    """SafeDPO's reorder of helpfulness pairs: a safe response beats an unsafe one.

    chosen unsafe and rejected safe -> swapped (``swapped``); both unsafe -> dropped
    (``dropped_both_unsafe``); unknown labels -> dropped (``dropped_unlabeled``); else kept as is.
    """
    counts: Counter[str] = Counter({"kept": 0, "swapped": 0, "dropped_both_unsafe": 0, "dropped_unlabeled": 0})
    out = []
    for row in rows:
        if not _has(row, ("chosen_unsafe", "rejected_unsafe")):
            counts["dropped_unlabeled"] += 1
            continue
        uw, ul = bool(row["chosen_unsafe"]), bool(row["rejected_unsafe"])
        if uw and ul:
            counts["dropped_both_unsafe"] += 1
            continue
        if uw and not ul:
            row = swap(row)
            counts["swapped"] += 1
        out.append(dict(row))
        counts["kept"] += 1
    return out, dict(counts)


DATA_RULES: dict[str, DataRule] = {
    "dpo": _require(()),
    "spe_dpo": _require(("margin",)),
    "safedpo": safedpo_rule,
    "bfpo": _require(("chosen_unsafe", "rejected_unsafe")),
    "modpo": _require(("chosen_cost", "rejected_cost")),
}


def apply_data_rule(name: str, rows: Iterable[Mapping[str, Any]]) -> tuple[list[Row], dict[str, int]]:
    """``(rows, counts)`` after the data rule of loss ``name``."""
    if name not in DATA_RULES:
        raise ValueError(f"unknown loss {name!r} (known: {', '.join(sorted(DATA_RULES))})")
    return DATA_RULES[name](rows)


# --------------------------------------------------------------------------------------------------
# Per-pair columns from labels and scores


def attach_safety_labels(rows: Iterable[Mapping[str, Any]], pairs: Iterable[Mapping[str, Any]]) -> list[Row]:
    """Add ``chosen_unsafe``/``rejected_unsafe`` (1.0, 0.0, or None if unlabeled) from the canonical pairs
    (``is_response_{0,1}_safe``), joined by (pair_id, chosen_index), never by position."""
    labels = {p["pair_id"]: (p["is_response_0_safe"], p["is_response_1_safe"]) for p in pairs}
    out = []
    for row in rows:
        if row["pair_id"] not in labels:
            raise KeyError(f"pair {row['pair_id']!r} is not in the pairs table")
        safe = labels[row["pair_id"]]
        ci = int(row["chosen_index"])
        unsafe = [None if s is None else float(not s) for s in safe]
        out.append({**row, "chosen_unsafe": unsafe[ci], "rejected_unsafe": unsafe[1 - ci]})
    return out


def spe_margins(rows: Iterable[Mapping[str, Any]], expert: str) -> list[Row]:
    """Add SPE-DPO's ``margin`` from per-response scores already joined onto the rows.

    ``safety``: C(y_l) - C(y_w) from ``chosen_cost``/``rejected_cost``; ``helpfulness``: R(y_w) - R(y_l)
    from ``chosen_reward``/``rejected_reward``. Positive when the score model agrees with the label. The
    loss clips at 0; the unclipped value is kept so disagreement can be counted.
    """
    if expert == "safety":
        return [{**r, "margin": float(r["rejected_cost"]) - float(r["chosen_cost"])} for r in rows]
    if expert == "helpfulness":
        return [{**r, "margin": float(r["chosen_reward"]) - float(r["rejected_reward"])} for r in rows]
    raise ValueError(f"expert must be 'safety' or 'helpfulness', got {expert!r}")
