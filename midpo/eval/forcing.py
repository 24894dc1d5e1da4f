"""Teacher-forced sequence log-probabilities: ``log p(response | prompt)`` summed over response tokens.

Prompt and response are tokenized by :meth:`PromptTemplate.tokenize`, exactly as TRL tokenizes training
rows, so the figure here is the one a DPO loss sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from midpo.models.template import PromptTemplate


@torch.no_grad()
def response_logprobs(
    model: Any,
    tokenizer: Any,
    template: PromptTemplate,
    prompts: Sequence[str],
    responses: Sequence[str],
    batch_size: int = 64,
) -> list[float]:
    """Sum of log-probabilities of each response's tokens (EOS included) given its rendered prompt."""
    rows = [template.tokenize(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    out: list[float] = []
    pad = tokenizer.pad_token_id
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        seqs = [p + c for p, c in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)  # (B, T), right padded
        mask = torch.zeros_like(ids)
        target = torch.zeros_like(ids, dtype=torch.bool)  # response tokens
        for b, ((p, c), s) in enumerate(zip(chunk, seqs)):
            ids[b, : len(s)] = torch.tensor(s)
            mask[b, : len(s)] = 1
            target[b, len(p) : len(s)] = True
        ids, mask, target = ids.to(model.device), mask.to(model.device), target.to(model.device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1): token t+1 given <= t
        out += (logp * target[:, 1:]).sum(dim=1).tolist()
    return out
