"""One trainer family for every preference method: ``MidpoDPOTrainer(DPOTrainer)`` with a loss chosen by name.

TRL 1.16 keeps all of DPO's losses in one private method (``DPOTrainer._compute_loss``). This trainer
owns ``compute_loss`` instead: it computes the policy's sequence log-probs itself on TRL's batch layout
(2B rows, chosen then rejected, ``completion_mask``; :func:`midpo.train.refs.sequence_logps`), reads the
reference log-probs from the precomputed ``ref_chosen_logps``/``ref_rejected_logps`` columns
(:mod:`midpo.train.refs`, computed once per base and data version) and applies a loss of
:mod:`midpo.train.losses`.

Per-pair columns a loss needs (``margin``, ``chosen_unsafe``, ...) survive TRL's two drop points:
``_set_signature_columns_if_needed`` keeps them through ``remove_unused_columns``, and
:class:`PreferenceCollator` turns them into float tensors. Only ``input_ids``/``attention_mask`` ever reach
``model.forward`` (Llama silently ignores unknown keywords, which would turn a margin loss into plain DPO
without an error). Overrides of private TRL methods are pinned to trl 1.16 and each is covered by
tests/test_trainer.py.

:func:`train_adapter` builds everything from a model folder and rows, resumes from the last complete
checkpoint, and saves the PEFT adapter with a ``midpo_adapter.json`` (config, data version, losses' params).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import torch
from accelerate import PartialState
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from midpo.config import LoraConfig, TrainingConfig
from midpo.data.schema import content_hash
from midpo.train.losses import (
    LOSS_COLUMNS,
    LOSSES,
    LogProbs,
    apply_data_rule,
    resolve_params,
)
from midpo.train.refs import REF_COLUMNS, sequence_logps
from midpo.trl_args import common_args

if TYPE_CHECKING:
    from midpo.storage import ArtifactStore

log = logging.getLogger(__name__)

ADAPTER_META = "midpo_adapter.json"
LOG_HISTORY = "log_history.json"
MODEL_INPUTS = ("input_ids", "attention_mask")  # the only batch keys passed to model.forward


# --------------------------------------------------------------------------------------------------
# Configuration


def dpo_config(cfg: TrainingConfig, output_dir: str | Path, **overrides: Any) -> DPOConfig:
    """TRL's ``DPOConfig`` from a :class:`TrainingConfig`, with every surprising TRL default written out.

    TRL would use lr 1e-6, bf16 on (an error on CPU), gradient checkpointing on, checkpoints every 500
    steps with seed 42; here they come from ``cfg`` or are set on purpose. ``precompute_ref_log_probs`` is on because the
    reference comes from columns (:class:`MidpoDPOTrainer`). ``overrides`` are DPOConfig fields (tests use
    ``max_steps``, ``logging_steps``; the pipeline may set ``report_to=["mlflow"]``).
    """
    kwargs: dict[str, Any] = dict(
        **common_args(
            output_dir=str(output_dir), learning_rate=cfg.learning_rate, epochs=cfg.epochs, batch_size=cfg.per_device_batch_size,
            lr_scheduler=cfg.lr_scheduler, warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay, seed=cfg.seed,
            bf16=cfg.bf16, gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        ),
        per_device_eval_batch_size=cfg.per_device_batch_size,
        max_length=cfg.max_length,
        truncation_mode="keep_start",  # refs.py truncates the same way
        beta=cfg.beta,
        save_strategy=cfg.save_strategy,
        save_steps=cfg.save_steps,
        max_steps=cfg.max_steps,
        save_total_limit=2,  # the newest complete checkpoint survives a crash during the next save
        save_only_model=False,  # optimizer, scheduler and RNG states are what makes resume exact
        logging_steps=cfg.logging_steps,
        precompute_ref_log_probs=True,  # reference log-probs are columns (refs.py); never a second model
        disable_dropout=True,
        remove_unused_columns=True,  # MidpoDPOTrainer keeps its loss's columns in the signature
    )
    kwargs.update(overrides)
    return DPOConfig(**kwargs)


def peft_lora_config(cfg: LoraConfig) -> Any:
    """PEFT's LoraConfig for a fresh adapter on the frozen base (official: r 16, alpha 32, dropout 0, down_proj)."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def is_lora_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


# --------------------------------------------------------------------------------------------------
# Collator and trainer


@dataclass
class PreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator plus float tensors (B,) of the per-pair ``extra_columns``.

    TRL's collator builds ``input_ids``/``attention_mask``/``completion_mask`` ([chosen; rejected], 2B
    rows, right padded) and ``ref_*_logps`` and drops everything else.
    """

    extra_columns: tuple[str, ...] = ()

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().torch_call(examples)
        for name in self.extra_columns:
            values = [e.get(name) for e in examples]
            if any(v is None for v in values):
                raise KeyError(f"column {name!r} is missing or null in a training example (keys: {sorted(examples[0])})")
            out[name] = torch.tensor([float(v) for v in values], dtype=torch.float32)
        return out


class MidpoDPOTrainer(DPOTrainer):
    """``DPOTrainer`` whose loss is ``LOSSES[loss_name]``, with the reference from precomputed columns.

    Pass the plain base model and ``peft_config`` (a fresh LoRA): only the LoRA matrices train (an
    asserted allowlist; ``lm_head`` and the base stay frozen). ``loss_params`` override the loss's own
    defaults (``beta`` included: BFPO defaults to 0.01 whatever ``args.beta`` says). Metrics go through
    TRL's ``_metrics`` into ``log_history`` (and MLflow when ``report_to`` asks for it).
    """

    def __init__(
        self,
        model: Any,
        args: DPOConfig,
        train_dataset: datasets.Dataset,
        processing_class: Any,
        *,
        loss_name: str = "dpo",
        loss_params: Mapping[str, Any] | None = None,
        peft_config: Any = None,
        eval_dataset: datasets.Dataset | None = None,
        callbacks: Sequence[TrainerCallback] | None = None,
        extra_columns: Sequence[str] = (),
    ) -> None:
        self.loss_name = loss_name
        self.loss_beta, self.loss_params = resolve_params(loss_name, args.beta, loss_params)
        self.loss_fn = LOSSES[loss_name]
        self.extra_columns = tuple(dict.fromkeys((*LOSS_COLUMNS[loss_name], *extra_columns)))
        if not args.precompute_ref_log_probs:
            raise ValueError("MidpoDPOTrainer reads the reference from columns: set precompute_ref_log_probs=True (dpo_config does)")
        self._check_model(model, peft_config)
        for name, ds in (("train", train_dataset), ("eval", eval_dataset)):
            missing = [c for c in self.extra_columns if ds is not None and c not in ds.column_names]
            if missing:
                raise ValueError(f"loss {loss_name!r} needs the per-pair column(s) {missing} in the {name} dataset (has {ds.column_names})")
        if processing_class.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: prepare it with midpo.models.tokenizer.prepare_tokenizer")
        collator = PreferenceCollator(
            pad_token_id=processing_class.pad_token_id,
            max_length=args.max_length,
            truncation_mode=args.truncation_mode,
            pad_to_multiple_of=args.pad_to_multiple_of,
            extra_columns=self.extra_columns,
        )
        super().__init__(
            model=model,
            args=args,
            data_collator=collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=list(callbacks or []),
            peft_config=peft_config,
        )
        self.beta = self.loss_beta  # TRL set args.beta; the loss's own default (BFPO) wins
        self._freeze_to_allowlist()

    # -- trainable parameters --------------------------------------------------------------------------

    is_trainable = staticmethod(is_lora_parameter)  # the allowlist: a subclass trains something else
    uses_lora = True  # train_adapter attaches a fresh LoRA (peft_lora_config)

    def save_trained(self, out_dir: Path) -> None:
        """The trained result in ``out_dir``: the adapter in PEFT format, written by the main process."""
        state_dict = self.gathered_state_dict()
        if self.accelerator.is_main_process:  # adapter_config.json + adapter_model.safetensors
            self.accelerator.unwrap_model(self.model).save_pretrained(out_dir, state_dict=state_dict)

    def gathered_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The state dict to save, gathered from every process where ZeRO-3 or FSDP shard the model (every
        process must call this; the main process gets the result). ``Trainer.save_model`` would write
        nothing under FSDP's sharded state dict."""
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            # what Trainer.save_model gathers for PEFT under ZeRO-3: the parameters that trained, not the base
            return self.model_wrapped._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
        return self.accelerator.get_state_dict(self.model_wrapped)

    @staticmethod
    def _check_model(model: Any, peft_config: Any) -> None:
        from accelerate.utils import is_peft_model

        if peft_config is None or is_peft_model(model):
            # A PeftModel with a trained adapter would make TRL copy that adapter as the reference.
            raise ValueError("pass the plain base model and a peft_config (a fresh LoRA); the reference is the base")

    def _freeze_to_allowlist(self) -> None:
        """Train the allowlisted parameters (LoRA matrices) and nothing else (torchtune's
        ``set_trainable_params``), then assert it."""
        allow = {n for n, _ in self.model.named_parameters() if self.is_trainable(n)}
        if not allow:
            raise ValueError("the model has no trainable parameters on the allowlist: check peft_config.target_modules")
        for name, p in self.model.named_parameters():
            p.requires_grad_(name in allow)
        trainable = self.trainable_parameter_names()
        assert trainable == sorted(allow), f"trainable parameters outside the allowlist: {sorted(set(trainable) - allow)}"

    def trainable_parameter_names(self) -> list[str]:
        return sorted(n for n, p in self.model.named_parameters() if p.requires_grad)

    # -- TRL's drop points (private methods of trl 1.16) ---------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        """Keep the loss's per-pair columns through ``remove_unused_columns``."""
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *self.extra_columns]))

    def _precompute_ref_logps(self, dataset: datasets.Dataset, name: str, batch_size: int) -> datasets.Dataset:
        """Supplied reference columns pass through untouched (TRL would fail with "duplicated columns").

        Without them TRL computes them (adapter disabled = the base); the pipeline always supplies them.
        """
        present = [c for c in REF_COLUMNS if c in dataset.column_names]
        if len(present) == len(REF_COLUMNS):
            return dataset
        if present:
            raise ValueError(f"the {name} dataset has {present} but not both of {REF_COLUMNS}")
        log.warning("the %s dataset has no reference columns: computing them now (use midpo.train.refs to compute them once)", name)
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def compute_ref_log_probs(self, model: Any, inputs: dict[str, Any]) -> Any:
        """TRL's reference pass (used only when the columns are missing), without the extra columns."""
        return super().compute_ref_log_probs(model, {k: inputs[k] for k in (*MODEL_INPUTS, "completion_mask")})

    # -- the loss ----------------------------------------------------------------------------------------

    policy_chunks = 4  # length-sorted sub-batches of the policy pass (1 = TRL's single padded batch)

    def policy_logps(self, model: Any, inputs: Mapping[str, torch.Tensor]) -> LogProbs:
        """The policy's sequence log-probs of the batch's chosen and rejected rows (TRL layout: [chosen; rejected]).

        TRL's collator right-pads all 2B rows to the longest one. The rows are sorted by length and run in
        ``policy_chunks`` sub-batches, each cut to its own longest row: a sum over completion tokens does not
        depend on padding (up to float rounding), and far fewer pad tokens go through the model.
        """
        ids, attention, completion = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
        lengths = attention.sum(dim=1)  # (2B,): right padded
        order = torch.argsort(lengths, descending=True)
        parts = []
        for idx in order.tensor_split(max(1, min(self.policy_chunks, len(order)))):
            width = int(lengths[idx].max())
            parts.append(sequence_logps(model, ids[idx, :width], attention[idx, :width], completion[idx, :width]))
        logps = torch.cat(parts)[torch.argsort(order)]  # (2B,), back in batch order
        chosen, rejected = logps.chunk(2, dim=0)
        return LogProbs(chosen, rejected)

    def loss_and_metrics(self, model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The batch's mean loss and per-example metrics (TRL's names); a subclass adds terms here."""
        missing = [k for k in (*REF_COLUMNS, *self.extra_columns) if k not in inputs]
        if missing:
            raise KeyError(f"batch lacks {missing}: a column was dropped before the loss (keys: {sorted(inputs)})")
        policy = self.policy_logps(model, inputs)
        reference = LogProbs(inputs["ref_chosen_logps"].to(policy.chosen.dtype), inputs["ref_rejected_logps"].to(policy.chosen.dtype))
        batch = {k: inputs[k] for k in self.extra_columns}
        losses, metrics = self.loss_fn(policy, reference, batch, beta=self.beta, **self.loss_params)
        return losses.mean(), {**metrics, "logps/chosen": policy.chosen.detach(), "logps/rejected": policy.rejected.detach()}

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        if return_outputs:
            raise NotImplementedError("MidpoDPOTrainer returns no logits: evaluate with prediction_loss_only (no compute_metrics)")
        mode = "train" if self.model.training else "eval"
        loss, metrics = self.loss_and_metrics(model, inputs)
        for key, value in metrics.items():
            self._metrics[mode][key].append(self.accelerator.gather_for_metrics(value.detach().float()).mean().item())
        return loss


# --------------------------------------------------------------------------------------------------
# Data and the whole run


def preference_dataset(rows: Iterable[Mapping[str, Any]], template: Any, columns: Sequence[str]) -> datasets.Dataset:
    """TRL plain-text rows (``prompt``/``chosen``/``rejected`` rendered by ``template``) plus ``pair_id``,
    ``chosen_index`` and the numeric ``columns``."""
    data: dict[str, list[Any]] = {k: [] for k in ("pair_id", "chosen_index", "prompt", "chosen", "rejected", *columns)}
    for row in rows:
        example = template.preference_example(row["prompt"], row["chosen"], row["rejected"], row.get("context") or ())
        data["pair_id"].append(row["pair_id"])
        data["chosen_index"].append(int(row["chosen_index"]))
        for k in ("prompt", "chosen", "rejected"):
            data[k].append(example[k])
        for c in columns:
            data[c].append(float(row[c]))
    return datasets.Dataset.from_dict(data)


def last_checkpoint(checkpoint_dir: str | Path) -> str | None:
    """The newest *complete* ``checkpoint-N`` (its ``trainer_state.json``, written last, exists), or None.

    transformers writes checkpoints in place, so a process killed while saving leaves a partial folder
    that ``get_last_checkpoint`` would pick and fail to resume from.
    """
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return None
    found = []
    for p in folder.glob("checkpoint-*"):
        suffix = p.name.rsplit("-", 1)[-1]
        if p.is_dir() and suffix.isdigit() and (p / "trainer_state.json").is_file():
            found.append((int(suffix), p))
    return str(max(found)[1]) if found else None


RUN_FILE = "midpo_run.json"


def _claim_checkpoint_dir(checkpoint_dir: Path, run: Mapping[str, Any]) -> None:
    """Record which run owns ``checkpoint_dir``, or check that the recorded run is this one."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_dir / RUN_FILE
    current = json.loads(json.dumps(run))  # the JSON form, as stored
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored != current:
            diff = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
            raise ValueError(f"{checkpoint_dir} holds checkpoints of another run (differs in {', '.join(diff)}): use a fresh checkpoint_dir")
    else:
        path.write_text(json.dumps(current, indent=2, sort_keys=True))


def train_adapter(
    model_folder: str | Path,
    rows: Iterable[Mapping[str, Any]],
    loss_name: str,
    cfg: TrainingConfig,
    out_dir: str | Path,
    *,
    loss_params: Mapping[str, Any] | None = None,
    checkpoint_dir: str | Path,
    data_version: str | None = None,
    eval_rows: Iterable[Mapping[str, Any]] | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    config_overrides: Mapping[str, Any] | None = None,
    checkpoint_mirror: tuple[ArtifactStore, str] | None = None,
    trainer_cls: type[MidpoDPOTrainer] | None = None,
    trainer_kwargs: Mapping[str, Any] | None = None,
    prepare_model: Callable[[Any], Any] | None = None,
    run_meta: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Train one LoRA adapter on the base in ``model_folder`` with loss ``loss_name``; returns small metrics.

    ``rows`` are preference rows (``pair_id, prompt, context, chosen, rejected, chosen_index``) carrying
    ``ref_chosen_logps``/``ref_rejected_logps`` (:func:`midpo.train.refs.attach_reference`) and the loss's
    columns (``LOSS_COLUMNS``). The method's data rule is applied first (idempotent). Checkpoints go to
    ``checkpoint_dir``; if it holds a complete one, training resumes from it. The final adapter (PEFT
    format) and ``midpo_adapter.json`` (training config, loss and its parameters, data version, data-rule
    counts, base, metrics) go to ``out_dir``; ``log_history.json`` beside them. ``data_version`` defaults
    to a content hash of the training rows. ``eval_rows`` (same columns, e.g. the eval split) are scored
    once after training (``eval_loss``, ``eval_rewards/accuracies``, ...).

    ``checkpoint_dir`` is claimed by this run (``midpo_run.json``: loss, parameters, config, data version,
    base); resuming there with anything else is an error rather than a silent mix of two runs.

    ``checkpoint_mirror=(store, prefix)`` mirrors every checkpoint to ``<prefix>/checkpoint-N`` in the
    artifact store (the newest 2 kept; the claim at ``<prefix>/run``), and before training fetches the
    newest complete mirrored one into ``checkpoint_dir`` when it is newer than any local one, so a retry
    on another machine resumes (:mod:`midpo.train.checkpoints`).

    Another member of the trainer family (the MoE router) passes its ``trainer_cls`` (a subclass, which
    decides whether a fresh LoRA is attached, what trains and what ``save_trained`` writes), its
    ``trainer_kwargs``, ``prepare_model`` (applied to the loaded base, e.g. attaching the experts) and
    ``run_meta`` (what else the run depends on, e.g. the experts' versions: part of the claim).
    """
    import peft
    import transformers
    import trl

    from midpo.models.load import load_model

    t_start = time.perf_counter()
    rows, rule_counts = apply_data_rule(loss_name, rows)
    if not rows:
        raise ValueError(f"no training rows left after the {loss_name} data rule ({rule_counts})")
    lacking = sum(1 for r in rows if any(r.get(c) is None for c in REF_COLUMNS))
    if lacking:
        raise ValueError(f"{lacking} row(s) lack {REF_COLUMNS}: join them with midpo.train.refs.attach_reference")
    columns = (*REF_COLUMNS, *LOSS_COLUMNS[loss_name])
    data_version = data_version or content_hash(
        [{k: r.get(k) for k in ("pair_id", "prompt", "context", "chosen", "rejected", "chosen_index", *columns)} for r in rows]
    )[:16]

    eval_data = None
    if eval_rows is not None:
        eval_data, _ = apply_data_rule(loss_name, eval_rows)

    base_meta_path = Path(str(model_folder).removeprefix("file://")) / "midpo_base.json"
    base_meta = {k: v for k, v in json.loads(base_meta_path.read_text()).items() if k != "metrics"} if base_meta_path.is_file() else None
    beta, params = resolve_params(loss_name, cfg.beta, loss_params)
    run = {
        "loss": loss_name,
        "loss_params": params,
        "beta": beta,
        "training": cfg.recipe(),
        "config_overrides": dict(config_overrides or {}),
        "data_version": data_version,
        "base": base_meta,
        "trainer": (trainer_cls or MidpoDPOTrainer).__name__,
        "trainer_kwargs": dict(trainer_kwargs or {}),
        **dict(run_meta or {}),
    }
    if checkpoint_mirror is not None:
        from midpo.train.checkpoints import MirrorCheckpoints, restore_checkpoint

        callbacks = [*callbacks, MirrorCheckpoints(*checkpoint_mirror)]
    # Under `accelerate launch` every process runs this function: the main one fetches and claims the
    # checkpoint folder first, the others then find the same checkpoints and check the same claim.
    state = PartialState()
    if cfg.processes != state.num_processes:
        raise ValueError(f"training.processes is {cfg.processes}, but training runs on {state.num_processes} process(es): "
                         "run.launch sets it (midpo.launch); do not set it in a profile")
    with state.main_process_first():
        if checkpoint_mirror is not None:
            restore_checkpoint(*checkpoint_mirror, checkpoint_dir)
        _claim_checkpoint_dir(Path(checkpoint_dir), run)

    trainer_cls = trainer_cls or MidpoDPOTrainer

    def build(micro_batch: int, accumulation: int) -> MidpoDPOTrainer:
        split = {"per_device_train_batch_size": micro_batch, "per_device_eval_batch_size": micro_batch, "gradient_accumulation_steps": accumulation}
        # The arguments before the model: under DeepSpeed ZeRO-3 they make from_pretrained load it sharded.
        args = dpo_config(cfg, checkpoint_dir, **{**dict(config_overrides or {}), **split})
        model, tokenizer, template = load_model(model_folder)
        if prepare_model is not None:
            prepare_model(model)
        return trainer_cls(
            model,
            args,
            preference_dataset(rows, template, columns),
            tokenizer,
            loss_name=loss_name,
            loss_params=loss_params,
            peft_config=peft_lora_config(cfg.lora) if trainer_cls.uses_lora else None,
            eval_dataset=preference_dataset(eval_data, template, columns) if eval_data else None,
            callbacks=callbacks,
            **dict(trainer_kwargs or {}),
        )

    micro_batch = int((config_overrides or {}).get("per_device_train_batch_size", cfg.per_device_batch_size))
    accumulation = int((config_overrides or {}).get("gradient_accumulation_steps", cfg.gradient_accumulation_steps))
    oom_retries = 0
    while True:
        trainer = build(micro_batch, accumulation)
        resume = last_checkpoint(checkpoint_dir)
        resumed_step = 0
        if resume:
            resumed_step = int(json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"])
            log.info("resuming %s from %s (step %d)", loss_name, resume, resumed_step)
        t0 = time.perf_counter()
        try:
            result = trainer.train(resume_from_checkpoint=resume)
            break
        except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError on torch >= 2.5, the same class
            if micro_batch % 2 or state.num_processes > 1:  # the other processes would wait in a collective
                raise
        # half the micro-batch, twice the accumulation: the same effective batch, from the last checkpoint.
        # Out of the except block, so the failed step's frames (and the tensors they hold) are gone first.
        log.warning("%s: out of memory at micro-batch %d; retrying at %d x %d accumulation steps (effective batch %d)",
                    loss_name, micro_batch, micro_batch // 2, accumulation * 2, micro_batch * accumulation)
        micro_batch, accumulation, oom_retries = micro_batch // 2, accumulation * 2, oom_retries + 1
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    train_seconds = time.perf_counter() - t0

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer.save_trained(out_dir)
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    # ds_numel: the full size of a parameter ZeRO-3 partitioned (its numel() is 0 on every process)
    n_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters() if p.requires_grad)
    metrics = {
        "pairs": float(len(rows)),
        "steps": float(trainer.state.global_step),
        "resumed_from_step": float(resumed_step),
        "trainable_params": float(n_trainable),
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - t_start,
        "final_loss": float(losses[-1]) if losses else math.nan,
        "mean_loss_this_process": float(result.training_loss),  # transformers averages only the steps run here
        "micro_batch": float(micro_batch),
        "gradient_accumulation": float(accumulation),
        "oom_retries": float(oom_retries),
        "processes": float(state.num_processes),
    }
    if trainer.eval_dataset is not None:
        metrics.update({k: float(v) for k, v in trainer.evaluate().items() if isinstance(v, (int, float))})
    meta = {
        **run,
        "data_rule": rule_counts,
        "base": {"folder": str(model_folder), "meta": base_meta},
        "trainable_parameters": trainer.trainable_parameter_names(),
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__},
        "metrics": metrics,
    }
    if state.is_main_process:
        (out_dir / ADAPTER_META).write_text(json.dumps(meta, indent=2))
        (out_dir / LOG_HISTORY).write_text(json.dumps(history, indent=2))
    log.info("%s adapter: %d steps in %.1f s, final loss %.4f -> %s", loss_name, metrics["steps"], train_seconds, metrics["final_loss"], out_dir)
    return metrics
