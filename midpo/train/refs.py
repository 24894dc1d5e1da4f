"""Reference log-probs of the base, computed once and reused by every expert, baseline and subset.

DPO-style losses need log π_ref(y | x) of the frozen base for every response they train on. The base and
the data do not change between the safety expert, the helpfulness expert and the baselines, so the values
are computed once per (base version, data version, max_length) as a table keyed by
``(pair_id, response_index)``::

    pair_id  response_index  logp      n_tokens
    3f2a...  0               -12.71    9
    3f2a...  1               -20.03    14

and joined onto any subset by ``(pair_id, chosen_index)`` (:func:`attach_reference`): chosen is response
``chosen_index``, rejected the other one. The join never uses row positions, so subsets, SafeDPO's swaps
and TRL's dropping of over-long rows cannot misalign it.

The numbers are the ones the trainer computes. Tokenization is TRL 1.16's for plain-text rows (prompt and
prompt + completion tokenized separately; the completion starts where they diverge, the minimum over the
pair; EOS appended when missing), sequences are truncated to ``max_length`` as TRL's collator does
(``keep_start``), and the log-probs come from :func:`sequence_logps`, the function the trainer's policy
pass calls, through TRL's fused LM head. With a fresh LoRA (B = 0) the trainer's policy log-probs at step 0
equal these values up to float32 reduction order between batch shapes (tests/test_trainer.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import torch

from midpo.models.template import PromptTemplate

log = logging.getLogger(__name__)

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
TABLE_FILE, TABLE_META = "refs.parquet", "refs.json"
TABLE_FEATURES = datasets.Features(
    {
        "pair_id": datasets.Value("string"),
        "response_index": datasets.Value("int8"),
        "logp": datasets.Value("float64"),  # a float32 value, stored exactly
        "n_tokens": datasets.Value("int32"),  # completion tokens scored (after truncation)
    }
)

Row = dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Log-probs


def ensure_fused_head(model: Any) -> Any:
    """Patch TRL's fused LM head onto ``model`` (once) so ``model(..., fused_lm_head=True)`` returns
    per-token log-probs; returns ``model``. ``DPOTrainer`` patches its policy the same way."""
    from trl.trainer.utils import add_fused_lm_head

    forward = getattr(model.forward, "__func__", None)
    if getattr(getattr(forward, "__code__", None), "co_name", "") != "_fused_forward":
        add_fused_lm_head(model)
    return model


def sequence_logps(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token | prefix) over completion tokens, per row: (N,).

    ``input_ids``/``attention_mask``/``completion_mask`` are (N, T), right padded (TRL's preference
    layout). Only ``input_ids`` and ``attention_mask`` reach the model: nothing else in a batch can leak
    into ``forward`` as an ignored keyword. ``model`` must carry TRL's fused LM head (:func:`ensure_fused_head`;
    a ``DPOTrainer``'s model does).
    """
    labels = input_ids.masked_fill(completion_mask == 0, -100)  # (N, T): score completion tokens only
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True, use_cache=False)
    seq_len = completion_mask.size(1) - 1
    # (N, T-1): log p of token t+1 given <= t, zero where the label is -100. Prompt-learning PEFT prepends
    # virtual tokens: keep the positions of the real ones (as TRL does).
    return out.log_probs[:, -seq_len:].sum(dim=1)


# --------------------------------------------------------------------------------------------------
# Tokenization (TRL 1.16, plain-text rows)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_pair(tokenizer: Any, prompt: str, completions: tuple[str, str]) -> tuple[list[int], tuple[list[int], list[int]]]:
    """``(prompt_ids, (completion_ids_0, completion_ids_1))`` exactly as TRL's ``DPOTrainer._prepare_dataset``
    tokenizes a plain-text row (the split does not depend on which response is chosen)."""
    eos = tokenizer.eos_token
    completions = tuple(c if c.endswith(eos) else c + eos for c in completions)
    prompt_ids = tokenizer(text=prompt)["input_ids"]
    full = [tokenizer(text=prompt + c)["input_ids"] for c in completions]
    n = min(_common_prefix(prompt_ids, f) for f in full)
    return prompt_ids[:n], (full[0][n:], full[1][n:])


def _pair_texts(row: Mapping[str, Any]) -> tuple[str, str, Sequence[Mapping[str, str]], tuple[str, str]]:
    """``(pair_id, prompt, context, (response_0, response_1))`` from a canonical pair or a subset row."""
    if "response_0" in row:
        responses = (row["response_0"], row["response_1"])
    else:
        ci = int(row["chosen_index"])
        responses = (row["chosen"], row["rejected"]) if ci == 0 else (row["rejected"], row["chosen"])
    return row["pair_id"], row["prompt"], row.get("context") or (), responses


@torch.no_grad()
def reference_table(
    model: Any,
    tokenizer: Any,
    template: PromptTemplate,
    rows: Iterable[Mapping[str, Any]],
    *,
    max_length: int | None,
    batch_size: int = 32,
    bf16: bool = False,
) -> datasets.Dataset:
    """Reference log-probs of both responses of every pair in ``rows``: a table keyed by (pair_id, response_index).

    ``rows`` are canonical pairs (``response_0``/``response_1``) or subset rows (``chosen``/``rejected``/
    ``chosen_index``), any mix; a pair occurring in several subsets is computed once. ``model`` is the
    base (eval mode, no adapter); ``max_length`` and ``bf16`` must be the training run's.
    """
    pairs: dict[str, tuple[str, Sequence[Mapping[str, str]], tuple[str, str]]] = {}
    for row in rows:
        pid, prompt, context, responses = _pair_texts(row)
        if pid in pairs and pairs[pid] != (prompt, list(context), responses):
            raise ValueError(f"pair {pid!r} occurs twice with different texts")
        pairs[pid] = (prompt, list(context), responses)

    seqs: list[tuple[str, int, list[int], list[int]]] = []  # (pair_id, response_index, ids, completion mask)
    for pid in sorted(pairs):
        prompt, context, responses = pairs[pid]
        prompt_text = template.render_prompt(prompt, context)
        completions = (template.render_completion(responses[0]), template.render_completion(responses[1]))
        prompt_ids, completion_ids = tokenize_pair(tokenizer, prompt_text, completions)
        for k in (0, 1):
            ids = prompt_ids + completion_ids[k]
            mask = [0] * len(prompt_ids) + [1] * len(completion_ids[k])
            if max_length is not None:  # the collator's keep_start truncation
                ids, mask = ids[:max_length], mask[:max_length]
            seqs.append((pid, k, ids, mask))

    ensure_fused_head(model)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    # Each distinct (ids, mask) once, in batches of similar length: pair-id order pads batches to 1.7x the
    # real tokens on the tiny world; the table is keyed, so the order it is computed in is free.
    distinct = sorted({(tuple(s[2]), tuple(s[3])) for s in seqs}, key=lambda k: (len(k[0]), k))
    values: dict[tuple[tuple[int, ...], tuple[int, ...]], float] = {}
    for i in range(0, len(distinct), batch_size):
        chunk = distinct[i : i + batch_size]
        width = max(len(s) for s, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (N, T), right padded like TRL's collator
        attention = torch.zeros_like(ids)
        completion = torch.zeros_like(ids)
        for b, (s, m) in enumerate(chunk):
            ids[b, : len(s)] = torch.tensor(s)
            attention[b, : len(s)] = 1
            completion[b, : len(s)] = torch.tensor(m)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = sequence_logps(model, ids.to(device), attention.to(device), completion.to(device))
        values.update(zip(chunk, out.float().cpu().tolist()))
    logps = [values[(tuple(s[2]), tuple(s[3]))] for s in seqs]
    log.info("reference log-probs: %d pairs, %d responses", len(pairs), len(seqs))
    return datasets.Dataset.from_dict(
        {
            "pair_id": [s[0] for s in seqs],
            "response_index": [s[1] for s in seqs],
            "logp": logps,
            "n_tokens": [sum(s[3]) for s in seqs],
        },
        features=TABLE_FEATURES,
    )


# --------------------------------------------------------------------------------------------------
# Joining and storage


def join_response_values(
    rows: Iterable[Mapping[str, Any]], table: datasets.Dataset | Iterable[Mapping[str, Any]], value: str, names: tuple[str, str]
) -> list[Row]:
    """Add per-response ``value``s of a table keyed by (pair_id, response_index) to preference rows as
    ``names = (chosen column, rejected column)``: chosen is response ``chosen_index``. Missing keys raise."""
    index = {(r["pair_id"], int(r["response_index"])): r[value] for r in table}
    out, missing = [], []
    for row in rows:
        pid, ci = row["pair_id"], int(row["chosen_index"])
        key_w, key_l = (pid, ci), (pid, 1 - ci)
        if key_w not in index or key_l not in index:
            missing.append(pid)
            continue
        out.append({**row, names[0]: index[key_w], names[1]: index[key_l]})
    if missing:
        raise KeyError(f"{len(missing)} pair(s) have no {value!r} in the table, e.g. {missing[0]!r}: was it computed for this data version?")
    return out


def attach_reference(rows: Iterable[Mapping[str, Any]], table: datasets.Dataset | Iterable[Mapping[str, Any]]) -> list[Row]:
    """Rows plus ``ref_chosen_logps``/``ref_rejected_logps`` from a :func:`reference_table`, by (pair_id, chosen_index)."""
    return join_response_values(rows, table, "logp", REF_COLUMNS)


def save_reference_table(table: datasets.Dataset, folder: Path, meta: Mapping[str, Any]) -> Path:
    """Write ``refs.parquet`` + ``refs.json`` (what the values depend on: base and data versions, max_length,
    bf16, template) into ``folder``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table.to_parquet(str(folder / TABLE_FILE))
    (folder / TABLE_META).write_text(json.dumps({**meta, "rows": len(table)}, indent=2, sort_keys=True))
    return folder


def load_reference_table(folder: Path, expect: Mapping[str, Any] | None = None) -> tuple[datasets.Dataset, dict[str, Any]]:
    """``(table, meta)`` from :func:`save_reference_table`; ``expect`` (e.g. ``{"max_length": 512}``) must match the meta."""
    import pyarrow.parquet as pq
    from datasets.table import InMemoryTable

    folder = Path(folder)
    meta = json.loads((folder / TABLE_META).read_text())
    for key, value in (expect or {}).items():
        if meta.get(key) != value:
            raise ValueError(f"{folder}: reference table has {key}={meta.get(key)!r}, expected {value!r}")
    table = datasets.Dataset(InMemoryTable(pq.read_table(folder / TABLE_FILE)), info=datasets.DatasetInfo(features=TABLE_FEATURES))
    return table, meta
