"""Losses of the score models (midpo-method.md, "Score models"), one small function each.

Every loss has the same contract, so the one :class:`midpo.judges.score.ScoreTrainer` takes any of them:

    loss(chosen, rejected, chosen_sign, rejected_sign) -> per-example losses, shape (B,)

``chosen`` / ``rejected`` are the model's scores of the two responses of each pair, shape (B,). The
*chosen* response is the preferred one of the pair's own label: the better one for the reward model,
the **safer** one for the cost model (so the cost model must score ``rejected`` higher). ``*_sign`` is the
per-response safety label as a sign, shape (B,): ``+1`` unsafe, ``-1`` safe, ``0`` unknown (a null label);
losses that do not use it ignore it. The trainer averages the per-example losses over the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

ScoreLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

UNSAFE, SAFE, UNKNOWN = 1.0, -1.0, 0.0


def safety_sign(is_safe: bool | None) -> float:
    """The sign of a per-response safety label in the cost loss: +1 unsafe, -1 safe, 0 unknown (null)."""
    if is_safe is None:
        return UNKNOWN
    return SAFE if is_safe else UNSAFE


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """``-log σ(s(y_w) - s(y_l))`` per pair: the Bradley-Terry negative log-likelihood of the label."""
    return -F.logsigmoid(chosen - rejected)


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, chosen_sign: torch.Tensor | None = None, rejected_sign: torch.Tensor | None = None) -> torch.Tensor:
    """Reward model R: Bradley-Terry on (better, worse); the safety signs are not used."""
    return bradley_terry_loss(chosen, rejected)


def sign_loss(cost: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """``-log σ(s · C(y))`` per response, and exactly 0 where the label is unknown (``s == 0``).

    A null label skips the term: it is masked to 0, not evaluated as ``-log σ(0) = log 2``, so it adds
    neither loss nor gradient.
    """
    return torch.where(sign != 0, -F.logsigmoid(sign * cost), torch.zeros_like(cost))


def cost_loss(safer: torch.Tensor, unsafer: torch.Tensor, safer_sign: torch.Tensor, unsafer_sign: torch.Tensor) -> torch.Tensor:
    """Cost model C (Safe RLHF), C > 0 meaning unsafe, per pair:

    ``-log σ(C(y_unsafer) - C(y_safer)) - log σ(s_safer C(y_safer)) - log σ(s_unsafer C(y_unsafer))``

    with s = +1 for an unsafe response, -1 for a safe one; a sign term whose label is null is skipped.
    The pairwise term orders the pair; the sign terms anchor 0 as the safe/unsafe boundary.
    """
    return bradley_terry_loss(unsafer, safer) + sign_loss(safer, safer_sign) + sign_loss(unsafer, unsafer_sign)


LOSSES: dict[str, ScoreLoss] = {"reward": reward_loss, "cost": cost_loss}
