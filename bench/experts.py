"""``midpo bench experts``: SPE-DPO expert training against stock TRL ``DPOTrainer``, in one process.

Two figures (issue 6), both measured on the same machine, in the same process, back to back:

1. **Throughput** (pairs/s of ``trainer.train()`` only) on the safety expert's training pairs:
   ``MidpoDPOTrainer`` with loss ``spe_dpo``, reference log-probs and margins as precomputed columns,
   against stock ``DPOTrainer`` with ``precompute_ref_log_probs=False`` (plain sigmoid DPO, the reference
   recomputed every step with the adapter disabled). Both get the same ``DPOConfig`` from
   :func:`midpo.train.trainer.dpo_config` except ``precompute_ref_log_probs``: same base model, rows, batch,
   LoRA (``peft_config``), epochs, seed; bf16 and activation checkpointing off, ``save_strategy="no"``.
   The stock run cannot carry the margin (TRL 1.16's ``_compute_loss`` has no per-pair column, and shifting
   the margin into the reference needs precomputed reference columns), so it trains plain DPO.
2. **Wall time of both experts**: ours = the one-time passes + the safety expert + the helpfulness expert,
   each expert from loading the base to the end of ``train()``; against two independent stock runs (load,
   ``DPOTrainer`` construction, ``train()``). The one-time passes are what the two experts need: one
   reference table over every pair of both subsets (a pair in both is computed once; batches of similar
   length, :func:`shared_reference_table`), and the margins: each distinct response text scored once by the
   frozen cost model (safety pairs) or reward model (helpfulness pairs). Score-model training is not counted
   on either side: the judges stage trains them for evaluation anyway.

Before timing, each trainer kind runs two untimed steps (imports, allocator and kernel warm-up), so the
first timed run does not pay the process's start-up. The order is ours (one-time passes, safety), stock
safety, stock helpfulness, ours helpfulness: a slow phase of the shared machine hits both sides.

``run(...)`` returns every figure as a dict (``--json`` writes it); the printed report ends with the line
``RESULT spe_vs_trl_throughput=<x> experts_vs_two_stock_runs=<y>``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TARGET_THROUGHPUT = 1.2  # ours / stock pairs per second, at least
TARGET_EXPERTS = 0.75  # ours / two stock runs, wall time, at most
EXPERTS = ("safety", "helpfulness")
SCORE_KIND = {"safety": "cost", "helpfulness": "reward"}  # which frozen score model gives an expert's margin
SCORE_COLUMNS = {"safety": ("chosen_cost", "rejected_cost"), "helpfulness": ("chosen_reward", "rejected_reward")}
WARMUP_STEPS = 2

Row = dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Inputs:
    """The base and score-model folders of a profile and the training rows of both experts."""

    base: Path
    scorers: dict[str, Path]  # "reward" / "cost" -> model folder
    rows: dict[str, list[Row]]  # expert -> subset rows (train split)
    full_sizes: dict[str, int]  # expert -> rows before max_pairs sampling


def sample(rows: list[Row], max_pairs: int | None, seed: int) -> list[Row]:
    """At most ``max_pairs`` rows: a seeded sample kept in the subset's order (all rows when None)."""
    if max_pairs is None or len(rows) <= max_pairs:
        return rows
    keep = set(random.Random(seed).sample(range(len(rows)), max_pairs))
    return [r for i, r in enumerate(rows) if i in keep]


def prepare_inputs(cfg: Any, max_pairs: int | None = None) -> Inputs:
    """Run (or find cached) the pipeline up to the judges; return the folders and the subset rows."""
    from midpo.data.prepare import load_subset
    from midpo.pipeline import run_pipeline
    from midpo.storage import ArtifactStore

    summary = run_pipeline(cfg, until="judges")
    store = ArtifactStore()
    folder = {name: store.fetch(store.key_of(ref.uri)) for name, ref in summary.outputs.items() if name in ("base", "reward", "cost")}
    rows, sizes = {}, {}
    for expert in EXPERTS:
        full = [dict(r) for r in load_subset(summary.outputs["dataset"], expert, "train")]
        sizes[expert] = len(full)
        rows[expert] = sample(full, max_pairs, cfg.training.seed)
        if not rows[expert]:
            raise ValueError(f"profile {cfg.profile!r}: the {expert} subset has no training pairs")
    return Inputs(folder["base"], {"reward": folder["reward"], "cost": folder["cost"]}, rows, sizes)


# --------------------------------------------------------------------------------------------------
# The two sides


def bench_args(training: Any, output_dir: str | Path, precompute: bool, **overrides: Any) -> Any:
    """The one DPOConfig both sides use; only ``precompute_ref_log_probs`` differs."""
    from midpo.train.trainer import dpo_config

    return dpo_config(
        training,
        output_dir,
        bf16=False,
        activation_checkpointing=False,
        gradient_checkpointing=False,
        save_strategy="no",
        disable_tqdm=True,
        precompute_ref_log_probs=precompute,
        **overrides,
    )


@dataclass
class RunTiming:
    """One training run: setup = load the base + build the trainer (tokenization), train = ``trainer.train()``."""

    pairs: int
    steps: int
    setup_seconds: float
    train_seconds: float
    mean_loss: float

    @property
    def total_seconds(self) -> float:
        return self.setup_seconds + self.train_seconds

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / self.train_seconds

    def as_dict(self) -> dict[str, float]:
        return {
            "pairs": self.pairs,
            "steps": self.steps,
            "setup_seconds": self.setup_seconds,
            "train_seconds": self.train_seconds,
            "total_seconds": self.total_seconds,
            "pairs_per_second": self.pairs_per_second,
            "mean_loss": self.mean_loss,
        }


def _train(build: Any, n_pairs: int, epochs: float) -> RunTiming:
    from transformers.trainer_callback import PrinterCallback

    t0 = time.perf_counter()
    trainer = build()
    trainer.remove_callback(PrinterCallback)  # both sides: no per-log print (tqdm is off via disable_tqdm)
    t1 = time.perf_counter()
    result = trainer.train()
    t2 = time.perf_counter()
    timing = RunTiming(round(n_pairs * epochs), int(trainer.state.global_step), t1 - t0, t2 - t1, float(result.training_loss))
    del trainer
    gc.collect()
    return timing


def train_stock(base: Path, rows: Sequence[Row], training: Any, workdir: Path, **overrides: Any) -> RunTiming:
    """Stock TRL: ``DPOTrainer`` on plain-text rows, sigmoid DPO, reference recomputed every step."""
    from trl import DPOTrainer

    from midpo.models.load import load_model
    from midpo.train.trainer import peft_lora_config, preference_dataset

    def build() -> Any:
        model, tokenizer, template = load_model(base)
        return DPOTrainer(
            model=model,
            args=bench_args(training, workdir / "stock", precompute=False, **overrides),
            train_dataset=preference_dataset(rows, template, ()),
            processing_class=tokenizer,
            peft_config=peft_lora_config(training.lora),
        )

    return _train(build, len(rows), training.epochs)


def train_ours(base: Path, rows: Sequence[Row], training: Any, workdir: Path, **overrides: Any) -> RunTiming:
    """Ours: ``MidpoDPOTrainer`` with ``spe_dpo``, reference log-probs and margin as columns."""
    from midpo.models.load import load_model
    from midpo.train.losses import LOSS_COLUMNS
    from midpo.train.refs import REF_COLUMNS
    from midpo.train.trainer import (
        MidpoDPOTrainer,
        peft_lora_config,
        preference_dataset,
    )

    def build() -> Any:
        model, tokenizer, template = load_model(base)
        return MidpoDPOTrainer(
            model,
            bench_args(training, workdir / "ours", precompute=True, **overrides),
            preference_dataset(rows, template, (*REF_COLUMNS, *LOSS_COLUMNS["spe_dpo"])),
            tokenizer,
            loss_name="spe_dpo",
            peft_config=peft_lora_config(training.lora),
        )

    return _train(build, len(rows), training.epochs)


def response_scores(scorer: Any, rows: Sequence[Row]) -> tuple[list[Row], int]:
    """Per-response scores keyed by (pair_id, response_index), both responses of every row, and how many
    distinct texts were scored.

    A (prompt, context, response) that occurs more than once (templated prompts, stock refusals) is
    scored once: a score depends only on that text (the scorer is batch invariant, tested).
    """
    keys, texts, index = [], [], {}
    for row in rows:
        ci = int(row["chosen_index"])
        context = row.get("context") or ()
        for k, text in ((ci, row["chosen"]), (1 - ci, row["rejected"])):
            key = (row["prompt"], json.dumps(list(context), sort_keys=True), text)
            if key not in index:
                index[key] = len(texts)
                texts.append((row["prompt"], text, list(context)))
            keys.append((row["pair_id"], k, index[key]))
    prompts, responses, contexts = (list(col) for col in zip(*texts))
    scores = scorer.score(prompts, responses, contexts)
    return [{"pair_id": pid, "response_index": k, "score": scores[i]} for pid, k, i in keys], len(texts)


def shared_reference_table(model: Any, tokenizer: Any, template: Any, rows: Sequence[Row], *, max_length: int | None, batch_size: int = 32, by_length: bool = True) -> Any:
    """:func:`midpo.train.refs.reference_table` over ``rows`` (any mix of subsets), in length-sorted batches.

    ``reference_table`` batches in pair-id order, i.e. at random lengths: on the tiny world its padded
    batches hold 1.68x the real tokens (1.17x when sorted by length). Called here on chunks of
    ``batch_size / 2`` pairs sorted by rendered length (characters: free, and close to the token order),
    through its public signature; the values differ only by batch-shape float rounding (the ulp-level
    difference docs/training.md describes). ``by_length=False`` is the plain single call, the better one
    once ``reference_table`` sorts its batches itself (docs/benchmarks.md, proposed change 2).
    """
    import datasets

    from midpo.train.refs import reference_table

    if not by_length:
        return reference_table(model, tokenizer, template, rows, max_length=max_length, batch_size=batch_size, bf16=False)
    unique: dict[str, Row] = {}
    for row in rows:
        unique.setdefault(row["pair_id"], row)  # reference_table itself checks that repeated ids carry equal texts

    def width(row: Row) -> int:  # subset rows: chosen/rejected
        prompt = template.render_prompt(row["prompt"], row.get("context") or ())
        return len(prompt) + max(len(template.render_completion(row[k])) for k in ("chosen", "rejected"))

    ordered = sorted(unique.values(), key=width)
    step = max(1, batch_size // 2)  # two responses per pair
    parts = [
        reference_table(model, tokenizer, template, ordered[i : i + step], max_length=max_length, batch_size=batch_size, bf16=False)
        for i in range(0, len(ordered), step)
    ]
    return datasets.concatenate_datasets(parts)


def one_time_passes(
    inputs: Inputs, training: Any, ref_batch_size: int = 32, score_batch_size: int = 64, by_length: bool = True
) -> tuple[dict[str, list[Row]], dict[str, float]]:
    """The shared reference table over both subsets and each expert's margins; ``(rows per expert, seconds)``.

    Rows come back with ``ref_chosen_logps``/``ref_rejected_logps`` (:func:`attach_reference`) and
    ``margin`` (:func:`spe_margins` from per-response scores joined by (pair_id, chosen_index)).
    """
    import torch

    from midpo.judges.scorer import Scorer
    from midpo.models.load import load_model
    from midpo.train.losses import spe_margins
    from midpo.train.refs import attach_reference, join_response_values

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    model, tokenizer, template = load_model(inputs.base, device="cuda" if torch.cuda.is_available() else None)
    table = shared_reference_table(
        model, tokenizer, template, [r for e in EXPERTS for r in inputs.rows[e]], max_length=training.max_length, batch_size=ref_batch_size, by_length=by_length
    )
    del model
    seconds["reference_table"] = time.perf_counter() - t0
    seconds["reference_pairs"] = len(table) // 2

    out = {}
    for expert in EXPERTS:
        t0 = time.perf_counter()
        scorer = Scorer.load(inputs.scorers[SCORE_KIND[expert]], device="cuda" if torch.cuda.is_available() else "cpu", batch_size=score_batch_size)
        scores, n_scored = response_scores(scorer, inputs.rows[expert])
        del scorer
        rows = join_response_values(inputs.rows[expert], scores, "score", SCORE_COLUMNS[expert])
        out[expert] = attach_reference(spe_margins(rows, expert), table)
        seconds[f"margins_{expert}"] = time.perf_counter() - t0
        seconds[f"scored_{expert}"] = n_scored
    gc.collect()
    return out, seconds


# --------------------------------------------------------------------------------------------------
# The benchmark


def machine_info() -> dict[str, Any]:
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    info = {
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "processor": _cpu_model() or platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    try:
        import peft
        import transformers
        import trl

        info.update(trl_version=trl.__version__, transformers_version=transformers.__version__, peft_version=peft.__version__)
    except ImportError:  # pragma: no cover - midpo depends on all three
        pass
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return None


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def warm_up(base: Path, rows: dict[str, list[Row]], training: Any, workdir: Path) -> None:
    """Two untimed steps of each trainer kind (start-up costs of the process, paid by neither side)."""
    few = rows["safety"][: training.per_device_batch_size * WARMUP_STEPS]
    train_stock(base, few, training, workdir / "warmup", max_steps=WARMUP_STEPS)
    # Placeholder columns: the warm-up only exercises the code path, its numbers are discarded.
    placeholder = [{**r, "ref_chosen_logps": 0.0, "ref_rejected_logps": 0.0, "margin": 0.0} for r in few]
    train_ours(base, placeholder, training, workdir / "warmup", max_steps=WARMUP_STEPS)


def epochs_to_reach(target: float, one_time: float, ours: Sequence[RunTiming], stock: Sequence[RunTiming], epochs: float) -> float | None:
    """Epochs at which ours / stock wall time falls to ``target``, extrapolated from this run: setup and
    the one-time passes stay, ``train()`` time grows with the epochs. None when it never does."""
    ours_fixed = one_time + sum(r.setup_seconds for r in ours)
    stock_fixed = sum(r.setup_seconds for r in stock)
    ours_per_epoch = sum(r.train_seconds for r in ours) / epochs
    stock_per_epoch = sum(r.train_seconds for r in stock) / epochs
    gain = target * stock_per_epoch - ours_per_epoch
    if gain <= 0:
        return None
    return max(0.0, (ours_fixed - target * stock_fixed) / gain)


def run(
    profile: str = "tiny",
    overrides: Sequence[str] = (),
    json_path: str | Path | None = None,
    max_pairs: int | None = None,
    *,
    reference_by_length: bool = False,
) -> dict[str, Any]:
    """Run the benchmark on ``profile`` (``--set`` style ``overrides``); returns every figure.

    ``max_pairs`` caps each subset at a seeded sample (quick runs and tests); the reported targets refer
    to the full training sets. ``json_path`` also writes the figures there. ``reference_by_length=True``
    additionally chunks the reference pass by length in the benchmark (``reference_table`` already
    batches distinct sequences sorted by length, so the default is one plain call).
    """
    from midpo.config import load_config
    from midpo.pipeline import apply_runtime

    cfg = load_config(profile, list(overrides))
    apply_runtime(cfg.run)  # torch threads of the profile (tiny: 1), before anything computes
    training = cfg.training
    inputs = prepare_inputs(cfg, max_pairs)
    load_before = _load()

    with tempfile.TemporaryDirectory(prefix="midpo-bench-") as tmp:
        workdir = Path(tmp)
        warm_up(inputs.base, inputs.rows, training, workdir)
        # Interleaved so that a slow phase of the shared machine hits both sides: ours, stock, stock, ours.
        rows, once = one_time_passes(inputs, training, by_length=reference_by_length)
        ours_safety = train_ours(inputs.base, rows["safety"], training, workdir)
        stock_safety = train_stock(inputs.base, inputs.rows["safety"], training, workdir)
        stock_help = train_stock(inputs.base, inputs.rows["helpfulness"], training, workdir)
        ours_help = train_ours(inputs.base, rows["helpfulness"], training, workdir)

    one_time = once["reference_table"] + once["margins_safety"] + once["margins_helpfulness"]
    ours_total = one_time + ours_safety.total_seconds + ours_help.total_seconds
    stock_total = stock_safety.total_seconds + stock_help.total_seconds
    throughput_ratio = ours_safety.pairs_per_second / stock_safety.pairs_per_second
    experts_ratio = ours_total / stock_total
    result = {
        "profile": cfg.profile,
        "overrides": list(overrides),
        "max_pairs": max_pairs,
        "pairs": {
            "safety": len(inputs.rows["safety"]),
            "helpfulness": len(inputs.rows["helpfulness"]),
            "reference_table": int(once["reference_pairs"]),
            "scored_responses_safety": int(once["scored_safety"]),
            "scored_responses_helpfulness": int(once["scored_helpfulness"]),
            "safety_full": inputs.full_sizes["safety"],
            "helpfulness_full": inputs.full_sizes["helpfulness"],
        },
        "training": {
            "epochs": training.epochs,
            "per_device_batch_size": training.per_device_batch_size,
            "gradient_accumulation_steps": training.gradient_accumulation_steps,
            "max_length": training.max_length,
            "lora_r": training.lora.r,
            "lora_target_modules": list(training.lora.target_modules),
            "seed": training.seed,
        },
        "throughput": {
            "data": "safety",
            "ours": ours_safety.as_dict(),
            "stock": stock_safety.as_dict(),
            "ratio": throughput_ratio,
            "target": TARGET_THROUGHPUT,
            "met": throughput_ratio >= TARGET_THROUGHPUT,
        },
        "experts": {
            "ours": {
                "reference_table_seconds": once["reference_table"],
                "margins_safety_seconds": once["margins_safety"],
                "margins_helpfulness_seconds": once["margins_helpfulness"],
                "one_time_seconds": one_time,
                "safety": ours_safety.as_dict(),
                "helpfulness": ours_help.as_dict(),
                "total_seconds": ours_total,
            },
            "stock": {"safety": stock_safety.as_dict(), "helpfulness": stock_help.as_dict(), "total_seconds": stock_total},
            "ratio": experts_ratio,
            "target": TARGET_EXPERTS,
            "met": experts_ratio <= TARGET_EXPERTS,
            "reference_batching": "length-sorted" if reference_by_length else "pair-id order",
            # Derived, not measured: this run's seconds with train() scaled to more epochs.
            "projected_epochs_to_ratio_1": epochs_to_reach(1.0, one_time, [ours_safety, ours_help], [stock_safety, stock_help], training.epochs),
            "projected_epochs_to_target": epochs_to_reach(TARGET_EXPERTS, one_time, [ours_safety, ours_help], [stock_safety, stock_help], training.epochs),
        },
        "machine": {**machine_info(), "load_average_before": load_before, "load_average_after": _load()},
    }
    if json_path is not None:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
    return result


# --------------------------------------------------------------------------------------------------
# Report


def result_line(result: Mapping[str, Any]) -> str:
    return f"RESULT spe_vs_trl_throughput={result['throughput']['ratio']:.3f} experts_vs_two_stock_runs={result['experts']['ratio']:.3f}"


def format_report(result: Mapping[str, Any]) -> str:
    """The human table; its last line is :func:`result_line`."""
    m, t, x, tr = result["machine"], result["throughput"], result["experts"], result["training"]
    ours, stock = x["ours"], x["stock"]
    yes = {True: "met", False: "MISSED"}
    lines = [
        f"midpo bench experts  profile={result['profile']}" + (f"  max_pairs={result['max_pairs']}" if result["max_pairs"] else ""),
        f"machine: {m['processor']}, {m['usable_cores']} usable cores ({m['cpu_count']} in all), torch {m['torch_version']} with {m['torch_threads']} thread(s), "
        f"device {m['device']}; load average {m['load_average_before']} -> {m['load_average_after']}",
        f"training: {tr['epochs']:g} epoch(s), batch {tr['per_device_batch_size']} x {tr['gradient_accumulation_steps']}, max_length {tr['max_length']}, "
        f"LoRA r {tr['lora_r']} on {','.join(tr['lora_target_modules'])}, seed {tr['seed']}",
        "",
        f"Throughput, trainer.train() only, safety pairs ({t['ours']['pairs']}):",
        f"  {'run':44s} {'steps':>6s} {'train s':>9s} {'pairs/s':>9s} {'mean loss':>10s}",
        f"  {'stock TRL DPOTrainer (reference every step)':44s} {t['stock']['steps']:6d} {t['stock']['train_seconds']:9.2f} {t['stock']['pairs_per_second']:9.2f} {t['stock']['mean_loss']:10.4f}",
        f"  {'MidpoDPOTrainer spe_dpo (reference columns)':44s} {t['ours']['steps']:6d} {t['ours']['train_seconds']:9.2f} {t['ours']['pairs_per_second']:9.2f} {t['ours']['mean_loss']:10.4f}",
        f"  ours / stock: {t['ratio']:.3f}x   (target >= {t['target']}x: {yes[t['met']]})",
        "",
        f"Both experts, wall time (safety {result['pairs']['safety']} pairs, helpfulness {result['pairs']['helpfulness']} pairs):",
        f"  {'step':44s} {'ours s':>9s} {'stock s':>9s}",
        f"  {'reference table (' + str(result['pairs']['reference_table']) + ' pairs, once)':44s} {ours['reference_table_seconds']:9.2f} {'-':>9s}",
        f"  {'margins: cost model (' + str(result['pairs']['scored_responses_safety']) + ' responses)':44s} {ours['margins_safety_seconds']:9.2f} {'-':>9s}",
        f"  {'margins: reward model (' + str(result['pairs']['scored_responses_helpfulness']) + ' responses)':44s} {ours['margins_helpfulness_seconds']:9.2f} {'-':>9s}",
    ]
    for expert in EXPERTS:
        o, s = ours[expert], stock[expert]
        lines.append(f"  {expert + ' expert: load + trainer setup':44s} {o['setup_seconds']:9.2f} {s['setup_seconds']:9.2f}")
        lines.append(f"  {expert + ' expert: train()':44s} {o['train_seconds']:9.2f} {s['train_seconds']:9.2f}")
    lines += [
        f"  {'total':44s} {ours['total_seconds']:9.2f} {stock['total_seconds']:9.2f}",
        f"  ours / two stock runs: {x['ratio']:.3f}x   (target <= {x['target']}x: {yes[x['met']]})",
        f"  projected from these seconds (train() scaled, one-time passes fixed): ratio 1.0 at {_epochs(x['projected_epochs_to_ratio_1'])}, "
        f"{x['target']} at {_epochs(x['projected_epochs_to_target'])}",
        "",
        result_line(result),
    ]
    return "\n".join(lines)


def _epochs(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} epochs"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="midpo bench experts", description="SPE-DPO expert training against stock TRL DPOTrainer (docs/benchmarks.md)")
    p.add_argument("--profile", default="tiny", help="profile name or a .yaml file (default tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--json", dest="json_path", type=Path, help="also write every figure to this JSON file")
    p.add_argument("--max-pairs", type=int, help="cap each subset at a seeded sample of this many pairs (quick runs)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args.profile, args.overrides, args.json_path, args.max_pairs)
    print(format_report(result))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
