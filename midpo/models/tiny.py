"""The tiny base model: a from-scratch Llama trained by causal-LM SFT on the synthetic world.

``build_tiny_base`` trains the word-level tokenizer, builds a ``LlamaForCausalLM`` (real gate/up/down
MLPs, widths from :class:`TinyBaseConfig`), fine-tunes it with TRL's ``SFTTrainer`` on the examples
rendered with the ``world`` template, and saves a plain Hugging Face folder::

    config.json  generation_config.json  model.safetensors      the model
    tokenizer.json  tokenizer_config.json  chat_template.jinja   the tokenizer (+ the world template)
    midpo_base.json                                               template family, config, SFT data hash, metrics

``base_stage`` is the pipeline stage around it: the folder is published once as
``bases/<hash of (config, SFT data)>`` and reused on every later run.

Loss: on completions only (TRL's default for prompt-completion data). The prompts come from the world's
generator; modelling them would spend the tiny model's capacity on the prompt distribution, and every
later stage (DPO, scoring, generation) only ever uses p(response | prompt). The SFT data includes harmful
compliance on purpose (tiny-world-notes.md): the base must be unsafe, and imperfect on both axes, for
the safety and helpfulness experts to have something to fix. Nothing is filtered here.

torch, transformers and TRL are imported inside the functions: ``midpo.config`` imports
:class:`TinyBaseConfig`, and loading a profile must not cost the ~8 s of importing TRL.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from midpo.data.schema import content_hash
from midpo.storage import ArtifactRef, ArtifactStore

log = logging.getLogger(__name__)

BASE_META = "midpo_base.json"
# Bump when build_tiny_base changes what it produces from the same config and data (part of the cache key).
BUILD_VERSION = 1


@dataclass
class TinyBaseConfig:
    """Widths of the tiny Llama and its SFT hyperparameters (defaults measured on the tiny world, see docs/models.md)."""

    # model (LlamaConfig fields)
    hidden_size: int = 128
    num_layers: int = 4
    intermediate_size: int = 512  # gate/up/down MLP width; the router's gates read this width
    num_heads: int = 4  # head dim = hidden_size / num_heads; no grouped-query attention
    max_position: int = 256  # RoPE positions; rows longer than max_length are truncated before this matters
    tie_word_embeddings: bool = True
    # SFT (TRL SFTConfig fields). SFT's learning rate is not DPO's: from scratch, 5e-3 was the best of
    # 1e-3..5e-3 on the world (docs/models.md); DPO on top wants ~5e-4 (hidden 128), less when wider.
    learning_rate: float = 5e-3
    epochs: float = 3.0
    batch_size: int = 32
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 128  # tokens of prompt + completion; longer rows are truncated (and counted)
    completion_only_loss: bool = True
    seed: int = 0
    logging_steps: int = 10
    # TRL's surprising defaults, written out: TRL would turn bf16 and gradient checkpointing on and use
    # lr 2e-5 (SFT) / 1e-6 (DPO). bf16 and checkpointing are fields so a GPU profile may flip them knowingly.
    bf16: bool = False
    gradient_checkpointing: bool = False
    save_strategy: Literal["no"] = "no"  # the result is the final model; no intermediate checkpoints

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "intermediate_size", "num_heads", "max_position", "batch_size", "max_length", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"head dim {self.hidden_size // self.num_heads} must be even (RoPE)")
        if self.max_length > self.max_position:
            raise ValueError(f"max_length {self.max_length} exceeds max_position {self.max_position}")
        if not (self.learning_rate > 0 and self.epochs > 0):
            raise ValueError("learning_rate and epochs must be positive")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


# --------------------------------------------------------------------------------------------------
# Data


def _turns(example: dict[str, Any]) -> tuple[str, str, list[dict[str, str]]]:
    try:
        prompt, response = example["prompt"], example["response"]
    except KeyError:
        raise ValueError(f"an SFT example needs 'prompt' and 'response', got keys {sorted(example)}") from None
    return prompt, response, list(example.get("context") or [])


def examples_hash(examples: Sequence[dict[str, Any]]) -> str:
    """Content hash of what SFT reads from the examples (prompt, response, context), in order."""
    return content_hash([dict(zip(("prompt", "response", "context"), _turns(e))) for e in examples])


def tokenizer_texts(examples: Sequence[dict[str, Any]], vocab_texts: Iterable[str] = ()) -> list[str]:
    """Every text the tokenizer must know: prompts, responses, context turns, plus ``vocab_texts``."""
    texts: list[str] = []
    for e in examples:
        prompt, response, context = _turns(e)
        texts += [prompt, response, *(t["content"] for t in context)]
    return texts + list(vocab_texts)


# --------------------------------------------------------------------------------------------------
# Model


def build_tiny_model(cfg: TinyBaseConfig, tokenizer: Any) -> Any:
    """A freshly initialised ``LlamaForCausalLM`` (seeded by ``cfg.seed``) sized for ``tokenizer``."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, set_seed

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position,
        hidden_act="silu",  # SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    set_seed(cfg.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=64,
    )
    return model


def sft_config(cfg: TinyBaseConfig, output_dir: str) -> Any:
    """TRL's SFTConfig with every surprising default written out (midpo.trl_args)."""
    from trl import SFTConfig

    from midpo.trl_args import common_args

    return SFTConfig(
        **common_args(
            output_dir=output_dir, learning_rate=cfg.learning_rate, epochs=cfg.epochs, batch_size=cfg.batch_size,
            lr_scheduler=cfg.lr_scheduler, warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay, seed=cfg.seed,
            bf16=cfg.bf16, gradient_checkpointing=cfg.gradient_checkpointing,
        ),
        max_grad_norm=cfg.max_grad_norm,
        max_length=cfg.max_length,
        completion_only_loss=cfg.completion_only_loss,
        packing=False,
        shuffle_dataset=False,  # the Trainer's sampler shuffles each epoch (seeded by data_seed)
        save_strategy=cfg.save_strategy,
        logging_steps=cfg.logging_steps,
    )


# --------------------------------------------------------------------------------------------------
# Build


def build_tiny_base(
    cfg: TinyBaseConfig,
    examples: Sequence[dict[str, Any]],
    out_dir: Path,
    vocab_texts: Iterable[str] = (),
) -> dict[str, float]:
    """Train tokenizer + tiny Llama by SFT on ``examples`` ([{prompt, response, context?}]) into ``out_dir``.

    ``vocab_texts`` adds words the tokenizer must know beyond the SFT data (e.g. words that only appear
    in later preference pairs or eval prompts); a word missing from the tokenizer becomes ``<unk>``.
    Returns small metrics: params, train_seconds, final_loss (last logged), mean_loss, steps, ...
    """
    from datasets import Dataset
    from trl import SFTTrainer

    from midpo.models.template import WorldTemplate
    from midpo.models.tokenizer import train_world_tokenizer

    if not examples:
        raise ValueError("no SFT examples")
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    template = WorldTemplate()
    rows = []
    for e in examples:
        prompt, response, context = _turns(e)
        rows.append(template.sft_example(prompt, response, context))
    tokenizer = train_world_tokenizer(tokenizer_texts(examples, vocab_texts))
    model = build_tiny_model(cfg, tokenizer)
    n_params = model.num_parameters()
    log.info(
        "tiny base: %d examples, vocab %d, hidden %d, layers %d, ffn %d, %.2fM params",
        len(rows), len(tokenizer), cfg.hidden_size, cfg.num_layers, cfg.intermediate_size, n_params / 1e6,
    )

    lengths = [len(tokenizer(r["prompt"] + r["completion"])["input_ids"]) for r in rows]
    truncated = sum(n > cfg.max_length for n in lengths)
    if truncated:
        log.warning("%d of %d SFT rows exceed max_length %d tokens and are truncated", truncated, len(rows), cfg.max_length)

    with tempfile.TemporaryDirectory(prefix="midpo-sft-") as scratch:
        trainer = SFTTrainer(
            model=model,
            args=sft_config(cfg, scratch),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
        t0 = time.perf_counter()
        result = trainer.train()
        train_seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out_dir)  # safetensors
    tokenizer.save_pretrained(out_dir)
    metrics = {
        "params": float(n_params),
        "vocab_size": float(len(tokenizer)),
        "examples": float(len(rows)),
        "mean_tokens": sum(lengths) / len(lengths),
        "truncated_rows": float(truncated),
        "steps": float(trainer.state.global_step),
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - t_start,
        "first_loss": float(losses[0]) if losses else math.nan,
        "final_loss": float(losses[-1]) if losses else math.nan,
        "mean_loss": float(result.training_loss),
    }
    meta = {
        "template": template.family,
        "build_version": BUILD_VERSION,
        "config": dataclasses.asdict(cfg),
        "sft_data_hash": examples_hash(examples),
        "metrics": metrics,
    }
    (out_dir / BASE_META).write_text(json.dumps(meta, indent=2))
    log.info("tiny base trained in %.1f s (%d steps), final loss %.4f -> %s", train_seconds, metrics["steps"], metrics["final_loss"], out_dir)
    return metrics


# --------------------------------------------------------------------------------------------------
# Pipeline stage


def base_key(cfg: TinyBaseConfig, examples: Sequence[dict[str, Any]], vocab_texts: Iterable[str] = ()) -> str:
    """``bases/<version>``: the hash of the config, the SFT data, the extra vocabulary and the build code version."""
    version = content_hash(
        {
            "config": dataclasses.asdict(cfg),
            "sft_data": examples_hash(examples),
            "vocab_texts": content_hash(sorted(set(vocab_texts))),
            "build_version": BUILD_VERSION,
        }
    )[:16]
    return f"bases/{version}"


def base_stage(
    cfg: TinyBaseConfig,
    examples: Sequence[dict[str, Any]],
    store: ArtifactStore | None = None,
    vocab_texts: Iterable[str] = (),
) -> tuple[ArtifactRef, dict[str, float], bool]:
    """Build and publish the tiny base once: ``(ref, metrics, cache_hit)``; an existing version costs nothing."""
    store = store or ArtifactStore()
    vocab_texts = list(vocab_texts)
    key = base_key(cfg, examples, vocab_texts)
    if store.is_complete(key):
        log.info("base %s exists: cache hit", store.uri(key))
        metrics = store.manifest(key).get("metadata", {}).get("metrics", {})
        return store.ref(key), metrics, True
    with tempfile.TemporaryDirectory(prefix="midpo-base-") as tmp:
        metrics = build_tiny_base(cfg, examples, Path(tmp), vocab_texts)
        ref = store.publish(Path(tmp), key, metadata={"metrics": metrics, "sft_data_hash": examples_hash(examples), "template": "world"})
    return ref, metrics, False
