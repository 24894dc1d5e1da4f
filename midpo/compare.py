"""``midpo compare``: every method of the comparison on the same data and base, over several seeds.

The shared, seed-independent stages run once: world, data, base, refusal, judges, the shared passes
(reference log-probs, response scores) and D_dual, each timed on its own.
Then, for seed offset ``s`` in ``range(seeds)``, the whole pipeline runs with the training, router and
evaluation seeds of the profile plus ``s`` and ``training.baselines`` = the requested baselines: the
shared stages are cache hits, the methods train and every model is evaluated with that seed's sampling.

Aggregation (:func:`aggregate_seeds`): per method, eval set and metric, the value is the mean over seeds,
``x_std`` the sample standard deviation over seeds (0 with one seed), ``x_ci`` the mean of the per-seed
95% bootstrap bounds (the typical within-seed interval over prompts, not an interval of the seed mean).
``n``, ``samples_per_prompt`` and ``judge`` are the first seed's (equal for every seed).

Costs (:func:`method_costs`): each method's own training (``train_seconds``, ``trainable_params``,
``pairs_seen``) from the experts and router stages' metrics, averaged over seeds; ``midpo`` = its router
plus both experts; ``merge-half`` = both experts (it trains nothing itself); ``base`` = 0. The shared
stages are listed once under ``costs["shared"]``. The report: :func:`midpo.eval.report.write_compare_report`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

from midpo.config import ConfigError, MidpoConfig
from midpo.pipeline import JUDGE_METRICS, RunSummary, collect_evals, run_pipeline, stages_for
from midpo.stages import METHODS as ALL_METHODS
from midpo.storage import ArtifactRef, ArtifactStore

log = logging.getLogger(__name__)

SHARED_STAGES = ("world", "data", "base", "refusal", "judges", "passes", "dual")  # seed-independent pipeline stages
SAMPLE_PROMPTS = 2  # eval prompts per set shown side by side in the report
COST_KEYS = ("train_seconds", "trainable_params", "pairs_seen")


def resolve_methods(methods: list[str] | None) -> list[str]:
    """The requested methods in interfaces.md's order (all of them by default); unknown names are errors."""
    if methods is None:
        return list(ALL_METHODS)
    names = [m.strip() for m in methods if m.strip()]
    unknown = [m for m in names if m not in ALL_METHODS]
    if unknown:
        raise ConfigError(f"unknown method {unknown[0]!r} in --methods (methods: {', '.join(ALL_METHODS)})")
    if not names:
        raise ConfigError(f"--methods names no method (methods: {', '.join(ALL_METHODS)})")
    return [m for m in ALL_METHODS if m in names]


def seed_config(cfg: MidpoConfig, offset: int, methods: list[str]) -> MidpoConfig:
    """The profile for seed offset ``offset``: training, router-training and eval seeds moved by ``offset``,
    ``training.baselines`` = the requested baselines; world, data, base and judges untouched (cache hits).
    Without ``midpo`` among the methods the router section is dropped (no D_dual, router or MoE stage).
    A comparison registers nothing: the registry section is dropped (promotion candidates come from ``run``)."""
    from midpo.train.methods import BASELINES

    training = dataclasses.replace(cfg.training, seed=cfg.training.seed + offset, baselines=[m for m in methods if m in BASELINES])
    changes: dict[str, Any] = {"training": training}
    if cfg.eval is not None:
        changes["eval"] = dataclasses.replace(cfg.eval, seed=cfg.eval.seed + offset)
    if cfg.router is not None and "midpo" in methods:
        changes["router"] = dataclasses.replace(cfg.router, training=dataclasses.replace(cfg.router.training, seed=cfg.router.training.seed + offset))
    else:
        changes["router"] = None
    return dataclasses.replace(cfg, **changes, registry=None)


# --------------------------------------------------------------------------------------------------
# Aggregation over seeds


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def aggregate_set(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's metrics of one eval set over seeds: float metrics -> mean and ``x_std``; ``x_ci`` ->
    the mean of the per-seed bounds; nested metrics (``by_category``) the same way, level by level;
    everything else (``n``, ``samples_per_prompt``, the judges' names) -> the first seed's."""
    first = per_seed[0]
    out: dict[str, Any] = {}
    for key, value in first.items():
        values = [m[key] for m in per_seed if key in m]
        if key.endswith("_ci") and isinstance(value, list):
            out[key] = [statistics.fmean(float(ci[i]) for ci in values) for i in range(len(value))]
        elif isinstance(value, dict):
            out[key] = aggregate_set(values)
        elif isinstance(value, float):
            finite = [float(v) for v in values if _is_number(v) and not math.isnan(v)]
            out[key] = statistics.fmean(finite) if finite else math.nan
            out[f"{key}_std"] = _std(finite) if finite else math.nan
        else:
            out[key] = value
    return out


def aggregate_seeds(per_seed: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """``{method: {set: metrics}}`` of every seed -> one such dict of seed means with ``x_std`` and mean CIs."""
    out: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(m for seed in per_seed for m in seed):
        sets = dict.fromkeys(s for seed in per_seed for s in seed.get(method, {}))
        out[method] = {s: aggregate_set([seed[method][s] for seed in per_seed if s in seed.get(method, {})]) for s in sets}
    return out


# --------------------------------------------------------------------------------------------------
# Costs


def pairs_seen(pairs: float, steps: float, batch: int) -> float:
    """Training examples processed: ``steps`` optimizer steps of ``batch`` pairs over epochs of ``pairs``
    (a last partial batch per epoch counted as what it holds). One device: ``batch`` = per-device batch x accumulation."""
    if pairs <= 0 or steps <= 0:
        return 0.0
    per_epoch = math.ceil(pairs / batch)
    full, rest = divmod(int(steps), per_epoch)
    return float(full * pairs + min(rest * batch, pairs))


def _trained_cost(m: dict[str, float], prefix: str, training: Any) -> dict[str, float]:
    batch = training.per_device_batch_size * training.gradient_accumulation_steps
    return {
        "train_seconds": float(m.get(f"{prefix}train_seconds", 0.0)),
        "trainable_params": float(m.get(f"{prefix}trainable_params", 0.0)),
        "pairs_seen": pairs_seen(float(m.get(f"{prefix}pairs", 0.0)), float(m.get(f"{prefix}steps", 0.0)), batch),
    }


def _sum(costs: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(sum(c[k] for c in costs)) for k in COST_KEYS}


def method_costs(cfg: MidpoConfig, summary: RunSummary, methods: list[str]) -> dict[str, dict[str, Any]]:
    """One seed's training cost per method from the experts and router stages' metrics (the recorded
    figures of the artifact on a cache hit: the cost of producing it, not of finding it)."""
    from midpo.train.methods import EXPERTS, MERGED
    from midpo.train.methods import METHODS as TRAINED

    experts_metrics = {k: v for stage in (*EXPERTS, "baselines") for k, v in summary.stage_metrics.get(stage, {}).items()}
    trained = {name: _trained_cost(experts_metrics, f"{name}.", cfg.training.for_method(name)) for name in TRAINED if f"{name}.train_seconds" in experts_metrics}
    out: dict[str, dict[str, Any]] = {}
    for method in methods:
        if method == "base":
            out[method] = {k: 0.0 for k in COST_KEYS} | {"includes": []}
        elif method in trained:
            out[method] = trained[method] | {"includes": [method]}
        elif method in MERGED:
            members = list(MERGED[method][0])
            out[method] = _sum([trained[m] for m in members]) | {"includes": members}
        elif method == "midpo":
            router = _trained_cost(summary.stage_metrics.get("router", {}), "", cfg.router.training)
            out[method] = _sum([trained[m] for m in EXPERTS] + [router]) | {"includes": [*EXPERTS, "router"]}
    return out


def mean_costs(per_seed: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for method, first in per_seed[0].items():
        values = [seed[method] for seed in per_seed if method in seed]
        out[method] = {k: statistics.fmean(v[k] for v in values) for k in COST_KEYS}
        out[method]["train_seconds_std"] = _std([v["train_seconds"] for v in values])
        out[method]["includes"] = first["includes"]
    return out


# --------------------------------------------------------------------------------------------------
# The shared stages, once


def run_shared(cfg: MidpoConfig, with_router: bool) -> dict[str, Any]:
    """The seed-independent stages, one pipeline run up to them (world, data, base, refusal, judges, the
    shared passes, and D_dual when the router is compared), each timed: ``{"seconds": {stage: s},
    "cache_hits": [...], "total_seconds": s}``. The seeds' pipeline runs then find all of them."""
    targets = ("data", "judges", "refusal", "passes", *(("dual",) if with_router else ()))
    summary = run_pipeline(cfg, until=[s.name for s in stages_for(cfg) if s.name in targets])
    seconds = {name: summary.stage_seconds[name] for name in SHARED_STAGES if name in summary.stage_seconds}
    hits = [name for name in SHARED_STAGES if name in summary.cache_hits]
    judges = {k: v for stage in ("judges", "refusal") for k, v in summary.stage_metrics.get(stage, {}).items() if k in JUDGE_METRICS}
    return {"seconds": {k: round(v, 3) for k, v in seconds.items()}, "cache_hits": hits, "total_seconds": round(sum(seconds.values()), 3), "judges": judges}


def union_counts(dataset: ArtifactRef) -> dict[str, dict[str, int]]:
    """What DPO-mix trains on: the training pairs of the safety and helpfulness subsets per prompt kind, and
    the safety pairs that reappear among the helpfulness pairs with the opposite preference."""
    from midpo.data.prepare import load_subset
    from midpo.data.subsets import counts_by_kind, reversed_pairs

    safety, helpfulness = (load_subset(dataset, name, "train").to_list() for name in ("safety", "helpfulness"))
    return {"safety": counts_by_kind(safety), "helpfulness": counts_by_kind(helpfulness), "reversed": counts_by_kind(reversed_pairs(safety, helpfulness))}


# --------------------------------------------------------------------------------------------------
# Samples and the gate heat-map (seed 0's models)


def _read_samples(ref: ArtifactRef) -> list[dict[str, Any]]:
    store = ArtifactStore()
    path = store.fetch(store.key_of(ref.uri)) / "samples.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def side_by_side(outputs: dict[str, ArtifactRef], methods: list[str], per_set: int = SAMPLE_PROMPTS) -> dict[str, list[dict[str, Any]]]:
    """``{set: [{"prompt", "responses": {method: first sample}}]}`` for the first ``per_set`` prompts of each set."""
    by_method = {m: _read_samples(outputs[f"eval/{m}"]) for m in methods if f"eval/{m}" in outputs}
    out: dict[str, list[dict[str, Any]]] = {}
    for method, records in by_method.items():
        for rec in records:
            rows = out.setdefault(rec["set"], [])
            row = next((r for r in rows if r["prompt"] == rec["prompt"]), None)
            if row is None:
                if len(rows) >= per_set:
                    continue
                row = {"prompt": rec["prompt"], "responses": {}}
                rows.append(row)
            row["responses"][method] = rec["samples"][0] if rec.get("samples") else rec.get("greedy", "")
    return out


def gate_heatmaps(moe: ArtifactRef, samples: dict[str, list[dict[str, Any]]], kinds: dict[str, str], report_dir: Path) -> dict[str, str]:
    """The gate heat-map of the packaged MoE on the first prompt of the first harmful and the first benign
    set (with midpo's first sample as the response): ``{set: PNG file name in report_dir}``."""
    from midpo.models.load import load_model
    from midpo.moe.heatmap import gate_heatmap

    store = ArtifactStore()
    model, tokenizer, _ = load_model(store.fetch(store.key_of(moe.uri)))
    out: dict[str, str] = {}
    for kind in ("harmful", "benign"):
        name = next((s for s in samples if kinds.get(s) == kind and samples[s]), None)
        if name is None:
            continue
        row = samples[name][0]
        filename = f"gates-{name}.png"
        gate_heatmap(model, tokenizer, row["prompt"], row["responses"].get("midpo"), report_dir / filename)
        out[name] = filename
    return out


# --------------------------------------------------------------------------------------------------
# The comparison


def run_compare(cfg: MidpoConfig, methods: list[str] | None, seeds: int, report_dir: Path) -> dict[str, Any]:
    """Train and evaluate ``methods`` (default: all) over ``seeds`` seeds; writes metrics.json, report.md,
    pareto.png (and oracle.png, the gate heat-maps, each seed's own report under ``seed-<s>/``) into
    ``report_dir`` and returns the metrics.json content."""
    from midpo.eval.report import set_kinds, write_compare_report

    names = resolve_methods(methods)
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    if cfg.eval is None:
        raise ConfigError(f"profile {cfg.profile} has no eval section: nothing to compare")
    if "midpo" in names and cfg.router is None:
        raise ConfigError(f"profile {cfg.profile} has no router section: it cannot build midpo (leave it out of --methods)")
    start = time.perf_counter()
    report_dir = Path(report_dir)
    shared = run_shared(seed_config(cfg, 0, names), "midpo" in names)
    evals, costs, runs, summaries = [], [], [], []
    for s in range(seeds):
        cfg_s = seed_config(cfg, s, names)
        log.info("compare: seed %d/%d (training seed %d, eval seed %d)", s + 1, seeds, cfg_s.training.seed, cfg_s.eval.seed)
        summary = run_pipeline(cfg_s, report_dir=report_dir / f"seed-{s}")
        found = collect_evals(summary.outputs)
        evals.append({m: found[m] for m in names if m in found})
        costs.append(method_costs(cfg_s, summary, names))
        runs.append({"seed_offset": s, "training_seed": cfg_s.training.seed, "eval_seed": cfg_s.eval.seed, **summary.run_section()})
        summaries.append(summary)
    missing = [m for m in names if m not in evals[0]]
    if missing:
        raise ConfigError(f"the pipeline produced no evaluation of {', '.join(missing)} on profile {cfg.profile}")
    stage_seconds: dict[str, float] = {}
    for r in runs:
        for stage, t in r["stage_seconds"].items():
            stage_seconds[stage] = round(stage_seconds.get(stage, 0.0) + t, 3)
    metrics: dict[str, Any] = aggregate_seeds(evals)
    if shared["judges"]:
        metrics["judges"] = shared["judges"]
    metrics["costs"] = {**mean_costs(costs), "shared": {k: shared[k] for k in ("seconds", "total_seconds", "cache_hits")}}
    metrics["run"] = {
        "profile": cfg.profile,
        "dataset_version": runs[0]["dataset_version"],
        "wall_seconds": round(time.perf_counter() - start, 3),
        "seeds": seeds,
        "methods": names,
        "stage_seconds": stage_seconds,
        "cache_hits": shared["cache_hits"],
        "per_seed": runs,
    }
    if "dpo-mix" in names:
        metrics["run"]["union"] = union_counts(summaries[0].outputs["dataset"])
    samples = side_by_side(summaries[0].outputs, names)
    kinds = set_kinds(metrics)
    heatmaps = gate_heatmaps(summaries[0].outputs["midpo"], samples, kinds, report_dir) if "midpo" in summaries[0].outputs else {}
    metrics["run"]["wall_seconds"] = round(time.perf_counter() - start, 3)
    write_compare_report(report_dir, metrics, samples, heatmaps)
    return metrics
