"""Load a model folder as ``(model, tokenizer, template)`` and generate completions with it.

The argument is first resolved to a local Hugging Face folder by
:func:`midpo.models.provision.resolve_model` (a folder or ``file://``, ``s3://``, a hub id, a ``.gguf``
file, ``smollm2``; docs/base-models.md); every source then ends in the same :func:`prepare_tokenizer` +
:func:`template_for` steps.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from midpo.models.provision import fit_tokenizer, resolve_model
from midpo.models.template import PromptTemplate, template_for
from midpo.models.tiny import BASE_META
from midpo.models.tokenizer import prepare_tokenizer

log = logging.getLogger(__name__)


def load_model(path_or_folder: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> tuple[Any, Any, PromptTemplate]:
    """``(model in eval mode, prepared tokenizer, template)`` from anything :func:`resolve_model` accepts.

    The template family comes from the folder's ``midpo_base.json`` when there is one, else from the
    tokenizer (:func:`template_for`). A packaged MoE folder (:mod:`midpo.moe.package`) loads as the MoE.
    """
    from midpo.moe.package import is_moe_folder, load_moe, read_moe_config

    if is_moe_folder(path_or_folder):  # the packaged MidPO model: base + both experts + gates
        model, tokenizer = load_moe(path_or_folder, device, dtype)
        return model, tokenizer, template_for(tokenizer, read_moe_config(path_or_folder)["template"])
    folder = resolve_model(path_or_folder)  # a local folder with config.json, or a clear error
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(folder))
    meta_path = folder / BASE_META
    family = json.loads(meta_path.read_text())["template"] if meta_path.is_file() else None
    template = template_for(tokenizer, family)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # prepare_tokenizer added a pad token
        model.resize_token_embeddings(len(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    fit_tokenizer(tokenizer, model.config)  # model_max_length = the model's positions; truncation keeps a prompt's end
    if device is not None:
        model.to(device)
    model.eval()
    log.info("loaded %s (%s template, %.2fM params)", folder, template.family, model.num_parameters() / 1e6)
    return model, tokenizer, template


def inference_device() -> str:
    """Where the passes that only run a model (reference log-probs, scores, evaluation) run: a GPU when
    there is one. Training places itself (the Trainer, accelerate)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_with_adapter(base: str | Path, adapter: str | Path, device: str | torch.device | None = None) -> tuple[Any, Any, PromptTemplate]:
    """The base from its own folder with a PEFT adapter merged in (never from the adapter's recorded
    base path, which names the training machine's folder)."""
    from peft import PeftModel

    model, tokenizer, template = load_model(base, device)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.eval()
    return merged, tokenizer, template


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    template: PromptTemplate,
    prompts: Sequence[str],
    contexts: Sequence[Sequence[dict[str, str]]] | None = None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    batch_size: int = 64,
) -> list[str]:
    """Responses to ``prompts`` (rendered with ``template``), batched with left padding, cut at EOS."""
    assert tokenizer.padding_side == "left", "generation pads on the left: call prepare_tokenizer first"
    contexts = contexts if contexts is not None else [()] * len(prompts)
    texts = [template.render_prompt(p, c) for p, c in zip(prompts, contexts, strict=True)]
    out: list[str] = []
    for i in range(0, len(texts), batch_size):
        # Over-long prompts keep their end (truncation_side "left", set by load_model) and leave room to answer.
        limit = max(1, tokenizer.model_max_length - max_new_tokens)
        batch = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=limit).to(model.device)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if do_sample else {"do_sample": False}
        ids = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.convert_tokens_to_ids(template.eos_token),
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )  # (B, T_prompt + T_new); the prompt block is left padded to a common length
        new = ids[:, batch["input_ids"].shape[1] :]
        out += [template.completion_text(tokenizer, row.tolist()) for row in new]
    return out
