"""The score models of midpo-method.md: a reward model R and a cost model C (C > 0 = unsafe).

Both are ``AutoModelForSequenceClassification(num_labels=1)`` initialised from the base model folder
(backbone from the base, a fresh linear head), read at the last non-pad token of prompt + response
rendered with the base's template. They differ only in data and loss (midpo.judges.losses):

- **reward** (Bradley-Terry) on the helpfulness pairs: chosen = the better response;
- **cost** (Safe RLHF: pairwise + per-response sign terms) on the canonical pairs with a safer label:
  chosen = the safer response; a sign term is skipped where the response's safety label is null.

Training is :class:`midpo.judges.trainer.ScoreTrainer` (TRL's ``RewardTrainer`` with a pluggable loss).
:func:`train_score_model` is the pipeline stage (published once as ``judges/<kind>/<version>``),
:func:`evaluate_score_models` the held-out accuracies, :class:`midpo.judges.scorer.Scorer` the scoring API.

torch, transformers and TRL are imported inside the functions: ``midpo.config`` may import
:class:`ScoreConfig`, and loading a profile must not cost the seconds of importing TRL.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from midpo.data.schema import PreferencePair, content_hash
from midpo.judges.scorer import SCORE_META
from midpo.storage import MANIFEST, ArtifactRef, ArtifactStore

log = logging.getLogger(__name__)

KINDS = ("reward", "cost")
Kind = Literal["reward", "cost"]
# Bump when build_score_model changes what it produces from the same inputs (part of the cache key).
BUILD_VERSION = 1
METRIC_NAMES = (
    "reward_pairwise_accuracy",
    "cost_pairwise_accuracy",
    "cost_sign_accuracy",
    "reward_pairwise_accuracy_noisy",
    "cost_pairwise_accuracy_noisy",
    "cost_sign_accuracy_noisy",
)


# --------------------------------------------------------------------------------------------------
# Config


@dataclass
class ScoreLoraConfig:
    """LoRA on the backbone of a large base (peft ``task_type="SEQ_CLS"``: the head trains in full and is saved)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha < 1 or not self.target_modules:
            raise ValueError("lora needs r >= 1, alpha >= 1 and at least one target module")


@dataclass
class ScoreConfig:
    """Training of one score model. Defaults measured on the tiny world (docs/judges.md): three epochs
    over every pair at lr 1e-3 are the reward model's (:func:`default_reward_config`); the cost model
    needs one epoch on 2,000 pairs (:func:`default_cost_config`). TRL's surprising defaults are written out: TRL's RewardConfig would
    turn bf16 and gradient checkpointing on and use lr 1e-4. A profile section replaces the whole
    default, so profiles write every field out."""

    learning_rate: float = 1e-3
    epochs: float = 3.0
    batch_size: int = 32
    max_length: int = 128  # tokens of prompt + response; longer pairs are dropped (and counted)
    seed: int = 0  # head init and data order
    bf16: bool = False
    gradient_checkpointing: bool = False
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    max_pairs: int | None = None  # a seeded sample of at most this many training pairs (None: all)
    lora: ScoreLoraConfig | None = None  # None: full fine-tune (the tiny base); LoRA for a large base
    logging_steps: int = 10

    def __post_init__(self) -> None:
        if not (self.learning_rate > 0 and self.epochs > 0):
            raise ValueError("learning_rate and epochs must be positive")
        for name in ("batch_size", "max_length", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ValueError(f"max_pairs must be >= 1 or null, got {self.max_pairs}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


def default_reward_config() -> ScoreConfig:
    """The reward model's defaults for a ``JudgesConfig`` (``field(default_factory=default_reward_config)``)."""
    return ScoreConfig()


def default_cost_config() -> ScoreConfig:
    """The cost model's defaults for a ``JudgesConfig``: one epoch on a 2,000-pair sample at lr 3e-4 gets
    its sign (safe/unsafe) right on the tiny world in a fraction of the reward model's time (docs/judges.md)."""
    return ScoreConfig(learning_rate=3e-4, epochs=1.0, max_pairs=2000)


# --------------------------------------------------------------------------------------------------
# Data: one row shape for both kinds


def _sign(is_safe: bool | None) -> float:
    from_losses = {None: 0.0, True: -1.0, False: 1.0}  # midpo.judges.losses.safety_sign, without importing torch
    return from_losses[is_safe]


def canonical_pairs(dataset_ref: ArtifactRef, split: str, store: ArtifactStore | None = None) -> list[PreferencePair]:
    """The canonical pairs of one split of a prepared dataset, as :class:`PreferencePair` objects."""
    from midpo.data.prepare import load_pairs_table

    out = []
    for row in load_pairs_table(dataset_ref, store):
        row = dict(row)
        if row.pop("split") == split:
            out.append(PreferencePair.from_row(row))
    return out


def _row(pair_id: str, prompt: str, context: list[dict[str, str]], chosen: str, rejected: str, chosen_sign: float = 0.0, rejected_sign: float = 0.0) -> dict[str, Any]:
    return {"pair_id": pair_id, "prompt": prompt, "context": context, "chosen": chosen, "rejected": rejected, "chosen_sign": chosen_sign, "rejected_sign": rejected_sign}


def reward_rows(dataset_ref: ArtifactRef, split: str = "train", store: ArtifactStore | None = None) -> list[dict[str, Any]]:
    """The helpfulness subset (every pair with a better label): chosen = the better response."""
    from midpo.data.prepare import load_subset

    return [_row(r["pair_id"], r["prompt"], list(r["context"] or []), r["chosen"], r["rejected"]) for r in load_subset(dataset_ref, "helpfulness", split, store)]


def cost_row(pair: PreferencePair) -> dict[str, Any] | None:
    """A cost-model row of a canonical pair: chosen = the safer response, with both responses' signs
    (+1 unsafe, -1 safe, 0 null); None when the pair has no safer label."""
    if pair.safer_response_id is None:
        return None
    responses = (pair.response_0, pair.response_1)
    safe = (pair.is_response_0_safe, pair.is_response_1_safe)
    s = pair.safer_response_id
    return _row(pair.pair_id, pair.prompt, pair.context, responses[s], responses[1 - s], _sign(safe[s]), _sign(safe[1 - s]))


def cost_rows(dataset_ref: ArtifactRef, split: str = "train", store: ArtifactStore | None = None) -> list[dict[str, Any]]:
    """Every canonical pair of ``split`` with a safer label (safety labels used where present)."""
    return [row for p in canonical_pairs(dataset_ref, split, store) if (row := cost_row(p)) is not None]


ROWS: dict[str, Callable[..., list[dict[str, Any]]]] = {"reward": reward_rows, "cost": cost_rows}


def sample_rows(rows: list[dict[str, Any]], max_pairs: int | None, seed: int) -> list[dict[str, Any]]:
    """At most ``max_pairs`` rows, a seeded sample in the original order (all rows when None)."""
    if max_pairs is None or len(rows) <= max_pairs:
        return rows
    keep = set(random.Random(seed).sample(range(len(rows)), max_pairs))
    return [r for i, r in enumerate(rows) if i in keep]


# --------------------------------------------------------------------------------------------------
# Build


def trainer_args(cfg: ScoreConfig, output_dir: str) -> Any:
    """TRL's RewardConfig (the ScoreTrainer's arguments) with every surprising default written out."""
    from trl import RewardConfig

    from midpo.trl_args import common_args

    return RewardConfig(
        **common_args(
            output_dir=output_dir, learning_rate=cfg.learning_rate, epochs=cfg.epochs, batch_size=cfg.batch_size,
            lr_scheduler=cfg.lr_scheduler, warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay, seed=cfg.seed,
            bf16=cfg.bf16, gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        ),
        max_grad_norm=cfg.max_grad_norm,
        max_length=cfg.max_length,
        center_rewards_coefficient=None,
        disable_dropout=True,
        save_strategy="no",
        logging_steps=cfg.logging_steps,
    )


def tokenize_rows(rows: Sequence[dict[str, Any]], tokenizer: Any, template: Any) -> list[dict[str, Any]]:
    """``chosen_ids`` / ``rejected_ids`` (prompt + completion, exactly as the Scorer tokenizes) and the signs."""
    out = []
    for r in rows:
        ids = {}
        for side in ("chosen", "rejected"):
            prompt_ids, completion_ids = template.tokenize(tokenizer, r["prompt"], r[side], r["context"])
            ids[f"{side}_ids"] = prompt_ids + completion_ids
        out.append({**ids, "chosen_sign": float(r["chosen_sign"]), "rejected_sign": float(r["rejected_sign"])})
    return out


def build_score_model(kind: Kind, cfg: ScoreConfig, base_folder: Path, rows: Sequence[dict[str, Any]], out_dir: Path) -> dict[str, float]:
    """Train a ``kind`` score model from ``base_folder`` on ``rows`` (:func:`reward_rows` / :func:`cost_rows`
    shape) and save a plain HF sequence-classification folder (+ ``midpo_score.json``) into ``out_dir``.
    Returns small metrics (pairs, dropped_too_long, steps, train_seconds, final_loss, train_accuracy, ...)."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, set_seed

    from midpo.judges.losses import LOSSES
    from midpo.judges.scorer import load_tokenizer_and_template
    from midpo.judges.trainer import ScoreCollator, ScoreTrainer

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not rows:
        raise ValueError(f"no training pairs for the {kind} model")
    t_start = time.perf_counter()
    base_folder, out_dir = Path(base_folder), Path(out_dir)
    tokenizer, template = load_tokenizer_and_template(base_folder)
    examples = tokenize_rows(rows, tokenizer, template)
    kept = [e for e in examples if max(len(e["chosen_ids"]), len(e["rejected_ids"])) <= cfg.max_length]
    dropped = len(examples) - len(kept)
    if dropped:
        log.warning("%s model: %d of %d pairs exceed max_length %d tokens and are dropped", kind, dropped, len(examples), cfg.max_length)
    if not kept:
        raise ValueError(f"every {kind} training pair exceeds max_length {cfg.max_length}")

    set_seed(cfg.seed)  # the fresh head is initialised inside from_pretrained
    model = AutoModelForSequenceClassification.from_pretrained(base_folder, num_labels=1)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # prepare_tokenizer added a pad token
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    peft_config = None
    if cfg.lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="SEQ_CLS", r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=list(cfg.lora.target_modules))
    log.info("%s model: %d pairs, base %s (%.2fM params), %s", kind, len(kept), base_folder, model.num_parameters() / 1e6, "LoRA" if peft_config else "full fine-tune")

    with tempfile.TemporaryDirectory(prefix=f"midpo-{kind}-") as scratch:
        trainer = ScoreTrainer(
            model=model,
            args=trainer_args(cfg, scratch),
            train_dataset=Dataset.from_list(kept),
            processing_class=tokenizer,
            data_collator=ScoreCollator(pad_token_id=tokenizer.pad_token_id),
            peft_config=peft_config,
            loss_fn=LOSSES[kind],
            chosen_higher=kind == "reward",
        )
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        t0 = time.perf_counter()
        result = trainer.train()
        train_seconds = time.perf_counter() - t0
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    accuracies = [h["accuracy"] for h in history if "accuracy" in h]

    model = trainer.model
    if peft_config is not None:
        model = model.merge_and_unload()  # a plain sequence-classification folder: Scorer.load needs no peft
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    metrics = {
        "pairs": float(len(kept)),
        "dropped_too_long": float(dropped),
        "params": float(model.num_parameters()),
        "trainable_params": float(trainable),
        "steps": float(trainer.state.global_step),
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - t_start,
        "first_loss": float(losses[0]) if losses else math.nan,
        "final_loss": float(losses[-1]) if losses else math.nan,
        "mean_loss": float(result.training_loss),
        "train_accuracy": float(accuracies[-1]) if accuracies else math.nan,
    }
    meta = {"kind": kind, "template": template.family, "build_version": BUILD_VERSION, "config": dataclasses.asdict(cfg), "metrics": metrics}
    (out_dir / SCORE_META).write_text(json.dumps(meta, indent=2))
    log.info("%s model trained in %.1f s (%d steps), final loss %.4f, train accuracy %.3f -> %s", kind, train_seconds, metrics["steps"], metrics["final_loss"], metrics["train_accuracy"], out_dir)
    return metrics


# --------------------------------------------------------------------------------------------------
# Pipeline stage


# midpo's own metadata beside a model's files: provenance and timings, not the model, so no part of its version
_NOT_MODEL = (MANIFEST, "midpo_base.json")


def _model_files_version(files: dict[str, Any]) -> str:
    return content_hash({k: v for k, v in files.items() if k not in _NOT_MODEL})[:16]


def folder_version(folder: Path) -> str:
    """A content version of a model folder: of every file but midpo's metadata (a bit-identical rebuild of a
    base gives the same version), from its artifact manifest (sha256 of every file) when it is a published
    artifact, else by hashing the files (once per call; a large base is better passed as an ArtifactRef,
    whose manifest is read without downloading the weights)."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if manifest.is_file():
        return _model_files_version(json.loads(manifest.read_text())["files"])
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in _NOT_MODEL):
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digests[str(path.relative_to(folder))] = {"sha256": h.hexdigest(), "size": path.stat().st_size}  # as a manifest lists it
    return _model_files_version(digests)


def _resolve_base(base: Path | str | ArtifactRef, store: ArtifactStore) -> tuple[Callable[[], Path], str]:
    """``(fetch the folder, content version)``: a folder and the ArtifactRef of the same base give one version."""
    if isinstance(base, ArtifactRef):
        key = store.key_of(base.uri)
        return (lambda: store.fetch(key)), _model_files_version(store.manifest(key)["files"])
    spec = str(base)
    folder = Path(urlparse(spec).path) if spec.startswith("file://") else Path(spec)
    return (lambda: folder), folder_version(folder)


def score_key(kind: Kind, cfg: ScoreConfig, base_version: str, dataset_version: str) -> str:
    """``judges/<kind>/<version>``: the hash of the base and dataset versions, the config and the build code."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    version = content_hash({"kind": kind, "base": base_version, "dataset": dataset_version, "config": dataclasses.asdict(cfg), "build_version": BUILD_VERSION})[:16]
    return f"judges/{kind}/{version}"


def score_model_ref(kind: Kind, cfg: ScoreConfig, base: Path | str | ArtifactRef, dataset_ref: ArtifactRef, store: ArtifactStore) -> ArtifactRef:
    """The reference :func:`train_score_model` publishes to (for dry runs: is it there already?). A base the
    plan has not published yet has no content version: the planned reference stands on its version instead,
    and nothing built on it is a cache hit."""
    if isinstance(base, ArtifactRef) and not store.is_complete(store.key_of(base.uri)):
        return store.ref(score_key(kind, cfg, f"planned:{base.version}", dataset_ref.version))
    key = score_key(kind, cfg, _resolve_base(base, store)[1], dataset_ref.version)
    return store.ref(key)


def train_score_model(
    kind: Kind,
    cfg: ScoreConfig,
    base_folder: Path | str | ArtifactRef,
    dataset_ref: ArtifactRef,
    store: ArtifactStore | None = None,
) -> tuple[ArtifactRef, dict[str, float], bool]:
    """Train and publish the ``kind`` score model once: ``(ref, metrics, cache_hit)``.

    ``base_folder``: the base model folder (or its ArtifactRef). Training data: the ``train`` split of
    ``dataset_ref`` (:data:`ROWS`). An existing version costs nothing (metrics read from its manifest).
    """
    store = store or ArtifactStore()
    fetch_base, base_version = _resolve_base(base_folder, store)
    key = score_key(kind, cfg, base_version, dataset_ref.version)
    ref = store.ref(key)
    if store.is_complete(key):
        log.info("%s model %s exists: cache hit", kind, ref.uri)
        return ref, store.manifest(key).get("metadata", {}).get("metrics", {}), True
    rows = sample_rows(ROWS[kind](dataset_ref, "train", store), cfg.max_pairs, cfg.seed)
    with tempfile.TemporaryDirectory(prefix=f"midpo-{kind}-out-") as tmp:
        metrics = build_score_model(kind, cfg, fetch_base(), rows, Path(tmp))
        ref = store.publish(Path(tmp), key, metadata={"kind": kind, "metrics": metrics, "base_version": base_version, "dataset_version": dataset_ref.version, "config": dataclasses.asdict(cfg)})
    return ref, metrics, False


# --------------------------------------------------------------------------------------------------
# Held-out accuracy


def pairwise_accuracy(scores_0: Sequence[float], scores_1: Sequence[float], preferred: Sequence[int | None], higher_is_preferred: bool = True) -> tuple[float, int]:
    """Share of labelled pairs whose preferred response (index 0/1; None = unlabelled, skipped) scores
    strictly higher (or lower, for a cost). A tie counts as wrong. Returns (accuracy, pairs counted)."""
    hits = n = 0
    for s0, s1, p in zip(scores_0, scores_1, preferred, strict=True):
        if p is None:
            continue
        diff = (s0 - s1) if p == 0 else (s1 - s0)
        hits += (diff > 0) if higher_is_preferred else (diff < 0)
        n += 1
    return (hits / n if n else math.nan), n


def sign_accuracy(costs: Sequence[float], safe: Sequence[bool | None]) -> tuple[float, int]:
    """Share of labelled responses on the right side of 0 (cost > 0 exactly when unsafe); None skipped."""
    hits = n = 0
    for c, s in zip(costs, safe, strict=True):
        if s is None:
            continue
        hits += (c > 0) == (not s)
        n += 1
    return (hits / n if n else math.nan), n


def _scorer(model: Any, store: ArtifactStore, batch_size: int) -> Any:
    from midpo.judges.scorer import Scorer

    if isinstance(model, Scorer):
        return model
    if isinstance(model, ArtifactRef):
        return Scorer.load(store.fetch(store.key_of(model.uri)), batch_size=batch_size)
    return Scorer.load(model, batch_size=batch_size)


def score_pairs(scorer: Any, pairs: Sequence[PreferencePair]) -> tuple[list[float], list[float]]:
    """Scores of response_0 and response_1 of every pair (one batched call)."""
    n = len(pairs)
    scores = scorer.score([p.prompt for p in pairs] * 2, [p.response_0 for p in pairs] + [p.response_1 for p in pairs], [p.context for p in pairs] * 2)
    return scores[:n], scores[n:]


def pair_metrics(reward: tuple[list[float], list[float]], cost: tuple[list[float], list[float]], labels: Sequence[dict[str, Any]], suffix: str = "") -> dict[str, float]:
    """The three accuracies of one label set (``labels``: the four PKU label fields per pair)."""
    r0, r1 = reward
    c0, c1 = cost
    acc_r, n_r = pairwise_accuracy(r0, r1, [lab["better_response_id"] for lab in labels])
    acc_c, n_c = pairwise_accuracy(c0, c1, [lab["safer_response_id"] for lab in labels], higher_is_preferred=False)
    acc_s, n_s = sign_accuracy(c0 + c1, [lab["is_response_0_safe"] for lab in labels] + [lab["is_response_1_safe"] for lab in labels])
    return {
        f"reward_pairwise_accuracy{suffix}": acc_r,
        f"cost_pairwise_accuracy{suffix}": acc_c,
        f"cost_sign_accuracy{suffix}": acc_s,
        f"n_reward_pairs{suffix}": float(n_r),
        f"n_cost_pairs{suffix}": float(n_c),
        f"n_cost_responses{suffix}": float(n_s),
    }


LABEL_FIELDS = ("is_response_0_safe", "is_response_1_safe", "better_response_id", "safer_response_id")


def evaluate_score_models(
    reward: Any,
    cost: Any,
    dataset_ref: ArtifactRef,
    store: ArtifactStore | None = None,
    oracle: Callable[[PreferencePair], dict[str, Any]] | None = None,
    split: str = "eval",
    by_kind: bool = False,
    batch_size: int = 64,
) -> dict[str, float]:
    """Held-out accuracies of a reward and a cost model on the ``split`` canonical pairs of ``dataset_ref``.

    ``reward`` / ``cost``: a Scorer, an ArtifactRef or a folder. ``*_noisy`` metrics compare with the
    dataset's own (training) labels; the unsuffixed ones with ``oracle(pair)`` (the world's
    :func:`midpo.world.clean_labels`), present only when an oracle is given. Also returns the number of
    labelled pairs / responses behind each (``n_*``); ``by_kind`` adds every figure per prompt kind
    (``<name>.<kind>``).
    """
    store = store or ArtifactStore()
    pairs = canonical_pairs(dataset_ref, split, store)
    if not pairs:
        raise ValueError(f"dataset {dataset_ref.version} has no {split} pairs")
    r_scores = score_pairs(_scorer(reward, store, batch_size), pairs)
    c_scores = score_pairs(_scorer(cost, store, batch_size), pairs)
    label_sets = {"_noisy": [{f: getattr(p, f) for f in LABEL_FIELDS} for p in pairs]}
    if oracle is not None:
        label_sets[""] = [oracle(p) for p in pairs]
    metrics: dict[str, float] = {}
    for suffix, labels in label_sets.items():
        metrics.update(pair_metrics(r_scores, c_scores, labels, suffix))
        if by_kind:
            for kind in sorted({p.prompt_kind or "unknown" for p in pairs}):
                idx = [i for i, p in enumerate(pairs) if (p.prompt_kind or "unknown") == kind]
                pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
                part = pair_metrics((pick(r_scores[0]), pick(r_scores[1])), (pick(c_scores[0]), pick(c_scores[1])), pick(labels), suffix)
                metrics.update({f"{k}.{kind}": v for k, v in part.items()})
    log.info("score models on %d %s pairs: %s", len(pairs), split, ", ".join(f"{k} {metrics[k]:.3f}" for k in METRIC_NAMES if k in metrics))
    return metrics
