"""``Scorer``: the one batched scoring API of the reward and cost models (and of any external scorer).

``Scorer.load(folder).score(prompts, responses, contexts=None) -> list[float]`` renders each
(prompt, response) with the folder's prompt template, exactly as training tokenized it
(:meth:`midpo.models.template.PromptTemplate.tokenize`), pads the batch on the **right** with the
tokenizer's pad id, and reads the model's score at the last non-pad token (the pooling of transformers'
``*ForSequenceClassification``). Used for SPE-DPO margins, D_dual reward ranking and evaluation.

Accepted folders:

- a score model trained by :func:`midpo.judges.score.train_score_model` (``midpo_score.json`` names the
  template family);
- any Hugging Face sequence-classification folder with ``num_labels=1``; its tokenizer's chat template
  renders the dialogue (:func:`midpo.models.template.template_for`);
- a safe-rlhf score model (PKU ``beaver-7b-*-reward`` / ``-cost``: architecture ``LlamaForScore``, head
  ``score_head`` with an optional bias, no chat template): the head is mapped onto ``score`` and, when the
  tokenizer has no chat template, safe-rlhf's ``BEGINNING OF CONVERSATION: USER: ... ASSISTANT:`` format is
  used (:data:`SAFE_RLHF_CHAT_TEMPLATE`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from midpo.models.template import PromptTemplate, template_for

log = logging.getLogger(__name__)

SCORE_META = "midpo_score.json"  # written beside a score model trained by midpo
BASE_META = "midpo_base.json"  # midpo.models.tiny.BASE_META (not imported: that module is heavier)

# safe-rlhf's dialogue format (safe_rlhf/configs/constants.py: PROMPT_BEGIN, PROMPT_USER, PROMPT_ASSISTANT),
# as Jinja for tokenizers that ship without a chat template (PKU beaver score models). Single-turn rows
# render exactly as safe-rlhf renders them; earlier turns are a best reading of its multi-turn format.
SAFE_RLHF_CHAT_TEMPLATE = (
    "BEGINNING OF CONVERSATION: "
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}USER: {{ m['content'] }} ASSISTANT:"
    "{% else %}{{ m['content'] }}{{ eos_token }} {% endif %}"
    "{% endfor %}"
)
Message = dict[str, str]


def _folder(path: str | Path) -> Path:
    spec = str(path)
    folder = Path(urlparse(spec).path) if spec.startswith("file://") else Path(spec)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{spec}: not a Hugging Face model folder (no config.json)")
    return folder


def template_family(folder: Path) -> str | None:
    """The template family midpo recorded for ``folder`` (score or base metadata), else None."""
    for name in (SCORE_META, BASE_META):
        meta = folder / name
        if meta.is_file():
            family = json.loads(meta.read_text()).get("template")
            if family:
                return family
    return None


def load_tokenizer_and_template(folder: Path, family: str | None = None, chat_template: str | None = None) -> tuple[Any, PromptTemplate]:
    """The folder's tokenizer (pad token set by :func:`prepare_tokenizer`) and its prompt template."""
    from transformers import AutoTokenizer

    from midpo.models.tokenizer import prepare_tokenizer

    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(folder))
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer, template_for(tokenizer, family or template_family(folder))


def _is_safe_rlhf(config: Any) -> bool:
    return any(a.endswith("ForScore") for a in (getattr(config, "architectures", None) or []))


def load_sequence_scorer(folder: Path, dtype: Any = None) -> Any:
    """A ``*ForSequenceClassification`` with one output from ``folder`` (safe-rlhf score models converted)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(folder)
    if not _is_safe_rlhf(config):
        if config.num_labels != 1:
            raise ValueError(f"{folder}: a scorer needs a sequence-classification model with num_labels=1, got num_labels={config.num_labels}")
        return AutoModelForSequenceClassification.from_pretrained(folder, dtype=dtype)

    # safe-rlhf (LlamaForScore): same backbone under ``model.``, the head is ``score_head`` (bias optional).
    if getattr(config, "score_dim", 1) != 1:
        raise ValueError(f"{folder}: safe-rlhf score model with score_dim={config.score_dim}; a scorer needs 1")
    config.num_labels = 1
    config.architectures = None
    model = AutoModelForSequenceClassification.from_pretrained(folder, config=config, dtype=dtype, key_mapping={r"^score_head\.": "score."})
    if getattr(config, "score_bias", getattr(config, "bias", False)):
        bias = _read_tensor(folder, "score_head.bias")
        head = torch.nn.Linear(model.score.in_features, 1, bias=True, dtype=model.score.weight.dtype, device=model.score.weight.device)
        with torch.no_grad():
            head.weight.copy_(model.score.weight)
            head.bias.copy_(bias.to(head.bias.dtype))
        model.score = head
    log.info("%s: safe-rlhf score model (%s) loaded as %s", folder, "LlamaForScore", type(model).__name__)
    return model


def _read_tensor(folder: Path, name: str) -> Any:
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            if name in f.keys():
                return f.get_tensor(name)
    raise KeyError(f"{folder}: no tensor {name!r} in its safetensors files")


class Scorer:
    """Batched, gradient-free scores ``s(x, y)`` of a sequence-classification model with one output.

    Rows are rendered with ``template`` and tokenized exactly as training tokenized them; a batch is
    padded on the right with ``tokenizer.pad_token_id`` (set in ``model.config`` too, so the model's
    pooling finds the last real token), and rows are sorted by length so batches carry little padding.
    A score does not depend on the batch it is computed in (tested).
    """

    def __init__(self, model: Any, tokenizer: Any, template: PromptTemplate, batch_size: int = 64) -> None:
        if getattr(model.config, "num_labels", None) != 1:
            raise ValueError(f"a scorer needs num_labels=1, got {getattr(model.config, 'num_labels', None)}")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: pass it through midpo.models.tokenizer.prepare_tokenizer")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template
        self.batch_size = batch_size
        self.pad_id = int(tokenizer.pad_token_id)
        # transformers pools at the rightmost token that is not ``config.pad_token_id``: it must be the id we pad with.
        model.config.get_text_config().pad_token_id = self.pad_id
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # prepare_tokenizer added a pad token
            model.resize_token_embeddings(len(tokenizer))

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | None = None,
        dtype: Any = None,
        batch_size: int = 64,
        family: str | None = None,
        chat_template: str | None = None,
    ) -> "Scorer":
        """A scorer from a local folder (path or ``file://``): a midpo score model or any HF
        sequence-classification folder with ``num_labels=1`` (module docstring).

        ``device``: None = CUDA when available, else CPU. ``family`` forces a template family (``world`` or
        ``chat``); ``chat_template`` (Jinja) replaces the tokenizer's own.
        """
        from midpo.models.load import inference_device

        folder = _folder(path)
        model = load_sequence_scorer(folder, dtype)
        if chat_template is None and _is_safe_rlhf_folder(folder):
            chat_template = _fallback_chat_template(folder)
        tokenizer, template = load_tokenizer_and_template(folder, family, chat_template)
        model.to(device or inference_device())
        scorer = cls(model, tokenizer, template, batch_size)
        log.info("scorer %s: %s template, %.2fM params, %s", folder, template.family, model.num_parameters() / 1e6, model.device)
        return scorer

    def tokenize(self, prompt: str, response: str, context: Sequence[Message] = ()) -> list[int]:
        """The ids of one row: prompt and completion exactly as training tokenizes them."""
        prompt_ids, completion_ids = self.template.tokenize(self.tokenizer, prompt, response, context)
        return prompt_ids + completion_ids

    def score(self, prompts: Sequence[str], responses: Sequence[str], contexts: Sequence[Sequence[Message]] | None = None) -> list[float]:
        """One score per (prompt, response[, context]) row, in input order."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        contexts = contexts if contexts is not None else [()] * len(prompts)
        if len(contexts) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(contexts)} contexts")
        ids = [self.tokenize(p, r, c or ()) for p, r, c in zip(prompts, responses, contexts)]
        return self.score_ids(ids)

    def score_ids(self, rows: Sequence[Sequence[int]]) -> list[float]:
        """Scores of already tokenized rows (each the whole prompt + completion ids)."""
        import torch

        if any(len(r) == 0 for r in rows):
            raise ValueError("an empty row cannot be scored")
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # longest first: similar lengths share a batch
        out = [0.0] * len(rows)
        device = self.model.device
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                width = len(rows[idx[0]])
                input_ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)  # (B, T), right padded
                attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
                for b, i in enumerate(idx):
                    input_ids[b, : len(rows[i])] = torch.tensor(rows[i], dtype=torch.long)
                    attention_mask[b, : len(rows[i])] = 1
                logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits  # (B, 1)
                for b, value in zip(idx, logits[:, 0].float().cpu().tolist()):
                    out[b] = value
        return out

    def __repr__(self) -> str:
        return f"Scorer({type(self.model).__name__}, template={self.template.family!r}, batch_size={self.batch_size})"


def _is_safe_rlhf_folder(folder: Path) -> bool:
    try:
        archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForScore") for a in archs)


def _fallback_chat_template(folder: Path) -> str | None:
    """safe-rlhf tokenizers carry no chat template: use safe-rlhf's dialogue format then."""
    cfg_path = folder / "tokenizer_config.json"
    has_template = (folder / "chat_template.jinja").is_file() or (cfg_path.is_file() and json.loads(cfg_path.read_text()).get("chat_template"))
    if has_template:
        return None
    log.info("%s: safe-rlhf score model without a chat template: using safe-rlhf's dialogue format", folder)
    return SAFE_RLHF_CHAT_TEMPLATE
