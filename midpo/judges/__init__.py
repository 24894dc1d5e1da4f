"""Judges: the reward and cost score models (docs/judges.md) and the refusal classifier (docs/refusal.md).

- :mod:`midpo.judges.score`: ``ScoreConfig``, ``train_score_model`` (stage), ``evaluate_score_models``
- :mod:`midpo.judges.scorer`: ``Scorer`` (batched scoring of any sequence-classification folder)
- :mod:`midpo.judges.losses`: ``reward_loss``, ``cost_loss`` (torch)
- :mod:`midpo.judges.trainer`: ``ScoreTrainer`` (TRL ``RewardTrainer`` with a pluggable loss)

Names are resolved on first use (PEP 562), so ``import midpo.judges`` imports neither torch nor TRL.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "ScoreConfig": "midpo.judges.score",
    "ScoreLoraConfig": "midpo.judges.score",
    "default_reward_config": "midpo.judges.score",
    "default_cost_config": "midpo.judges.score",
    "train_score_model": "midpo.judges.score",
    "build_score_model": "midpo.judges.score",
    "evaluate_score_models": "midpo.judges.score",
    "Scorer": "midpo.judges.scorer",
    "reward_loss": "midpo.judges.losses",
    "cost_loss": "midpo.judges.losses",
    "ScoreTrainer": "midpo.judges.trainer",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'midpo.judges' has no attribute {name!r}")
