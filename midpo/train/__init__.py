"""Preference training: losses by name, reference log-probs computed once, one trainer family.

- :mod:`midpo.train.losses`: ``LogProbs``, ``LOSSES`` (dpo, spe_dpo, safedpo, bfpo, modpo), ``DATA_RULES``
  (no torch-heavy imports beyond torch)
- :mod:`midpo.train.refs`: ``reference_table``, ``attach_reference``, ``sequence_logps``
- :mod:`midpo.train.trainer`: ``MidpoDPOTrainer``, ``dpo_config``, ``train_adapter``

The trainer's names are resolved on first use (PEP 562): importing TRL costs seconds.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "LogProbs": "midpo.train.losses",
    "LOSSES": "midpo.train.losses",
    "LOSS_COLUMNS": "midpo.train.losses",
    "DATA_RULES": "midpo.train.losses",
    "apply_data_rule": "midpo.train.losses",
    "reference_table": "midpo.train.refs",
    "attach_reference": "midpo.train.refs",
    "sequence_logps": "midpo.train.refs",
    "MidpoDPOTrainer": "midpo.train.trainer",
    "dpo_config": "midpo.train.trainer",
    "train_adapter": "midpo.train.trainer",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'midpo.train' has no attribute {name!r}")
