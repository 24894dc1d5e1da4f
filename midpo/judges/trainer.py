"""``ScoreTrainer``: TRL's ``RewardTrainer`` with a pluggable loss (midpo.judges.losses) and per-response signs.

TRL 1.16's ``RewardTrainer`` brings what a score model needs: a model passed in (``num_labels=1``),
``peft_config`` (LoRA, ``task_type="SEQ_CLS"``), pre-tokenized ``chosen_ids`` / ``rejected_ids`` columns
(its own tokenization is skipped when they exist; rows over ``max_length`` are filtered), a right-padding
preference collator (``[chosen; rejected]`` stacked, 2B rows), the model's ``pad_token_id`` set for
last-token pooling, and the Trainer's progress bars. Its loss is fixed Bradley-Terry, so this subclass
owns ``compute_loss`` and takes the loss as an argument; the reward and cost models are the same trainer
with different loss functions.

Overrides (each covered by tests/test_score_models.py; TRL is pinned):

- :class:`ScoreCollator` adds ``chosen_sign`` / ``rejected_sign`` tensors (+1 unsafe, -1 safe, 0 unknown);
- ``_set_signature_columns_if_needed`` keeps those columns (``remove_unused_columns`` would drop them);
- ``compute_loss`` pops them (so they never reach ``model.forward``), scores the 2B rows, and applies the
  loss; it logs ``accuracy`` (pairs in the label's order), ``sign_accuracy`` (labelled responses on the
  right side of 0, cost only), ``margin`` and ``mean_score``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl import RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from midpo.judges.losses import ScoreLoss

SIGN_COLUMNS = ("chosen_sign", "rejected_sign")


@dataclass
class ScoreCollator(DataCollatorForPreference):
    """TRL's preference collator (right padding, chosen rows then rejected rows) plus the safety signs."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().torch_call(examples)
        for name in SIGN_COLUMNS:
            # e[name], not e.get: a column dropped on the way (remove_unused_columns) must fail, not train as 0
            out[name] = torch.tensor([float(e[name]) for e in examples], dtype=torch.float)  # (B,)
        return out


class ScoreTrainer(RewardTrainer):
    """One trainer for every score model: ``loss_fn(chosen, rejected, chosen_sign, rejected_sign)`` -> (B,).

    ``chosen_higher``: whether the label's preferred (chosen) response should score higher (reward) or
    lower (cost: chosen = the safer one); only the logged ``accuracy`` reads it.
    """

    def __init__(self, *args: Any, loss_fn: ScoreLoss, chosen_higher: bool = True, **kwargs: Any) -> None:
        self.loss_fn = loss_fn
        self.chosen_higher = chosen_higher
        super().__init__(*args, **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["chosen_ids", "rejected_ids", *SIGN_COLUMNS]

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        mode = "train" if self.model.training else "eval"
        chosen_sign, rejected_sign = (inputs.pop(name) for name in SIGN_COLUMNS)  # (B,) each
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        scores = outputs.logits.squeeze(-1)  # (2B,): chosen rows, then rejected rows
        chosen, rejected = torch.chunk(scores, chunks=2)  # (B,), (B,)
        losses = self.loss_fn(chosen, rejected, chosen_sign, rejected_sign)  # (B,)
        loss = losses.mean()

        with torch.no_grad():
            margin = (chosen - rejected) if self.chosen_higher else (rejected - chosen)
            self._metrics[mode]["accuracy"].append((margin > 0).float().mean().item())
            self._metrics[mode]["margin"].append(margin.mean().item())
            self._metrics[mode]["mean_score"].append(scores.mean().item())
            signs = torch.cat([chosen_sign, rejected_sign])  # (2B,), same order as scores
            labelled = signs != 0
            if labelled.any():
                self._metrics[mode]["sign_accuracy"].append(((signs * scores)[labelled] > 0).float().mean().item())
        return (loss, outputs) if return_outputs else loss
