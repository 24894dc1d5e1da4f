"""The two SPE-DPO experts: one-time passes (reference log-probs, response scores) and their training.

Every step is a versioned artifact under the artifact root, so each runs once per input versions:

    refs/<base, dataset, max_length, bf16>      log pi_ref of every response of every pair (refs.py)
    scores/<reward, cost, dataset>              R and C of every response of every pair (frozen judges)
    experts/<name>/<refs, scores, training>     a PEFT LoRA adapter + midpo_adapter.json

The two experts train in parallel child processes (spawned: a killed child fails its stage, the parent
survives), each resuming from its checkpoints under ``$MIDPO_HOME/checkpoints/<expert key>``.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from midpo.config import TrainingConfig
from midpo.data.prepare import load_pairs_table, load_subset
from midpo.data.schema import content_hash
from midpo.storage import ArtifactRef, ArtifactStore, midpo_home

log = logging.getLogger(__name__)

# expert -> (the subset it trains on, the score column its margin comes from)
EXPERTS = {"safety": ("safety", "cost"), "helpfulness": ("helpfulness", "reward")}
SCORES_FILE = "scores.parquet"


def _ref(store: ArtifactStore, key: str) -> ArtifactRef:
    return ArtifactRef(store.uri(key), key.rsplit("/", 1)[-1])


def _folder(store: ArtifactStore, ref: ArtifactRef) -> Path:
    return store.fetch(store.key_of(ref.uri))


def reference_key(base: ArtifactRef, dataset: ArtifactRef, cfg: TrainingConfig) -> tuple[str, dict[str, Any]]:
    meta = {"base": base.version, "dataset": dataset.version, "max_length": cfg.max_length, "bf16": cfg.bf16}
    return f"refs/{content_hash(meta)[:16]}", meta


def scores_key(reward: ArtifactRef, cost: ArtifactRef, dataset: ArtifactRef) -> tuple[str, dict[str, Any]]:
    meta = {"reward": reward.version, "cost": cost.version, "dataset": dataset.version}
    return f"scores/{content_hash(meta)[:16]}", meta


def reference_artifact(base: ArtifactRef, dataset: ArtifactRef, cfg: TrainingConfig, store: ArtifactStore) -> tuple[ArtifactRef, bool]:
    """Reference log-probs of the base for both responses of every pair, once per (base, data, length, bf16)."""
    from midpo.models.load import load_model
    from midpo.train.refs import reference_table, save_reference_table

    key, meta = reference_key(base, dataset, cfg)
    if store.is_complete(key):
        return _ref(store, key), True
    model, tokenizer, template = load_model(_folder(store, base))
    table = reference_table(model, tokenizer, template, load_pairs_table(dataset, store), max_length=cfg.max_length, bf16=cfg.bf16)
    with tempfile.TemporaryDirectory(prefix="midpo-refs-") as tmp:
        save_reference_table(table, Path(tmp), meta)
        return store.publish(Path(tmp), key, metadata=meta), False


def scores_artifact(reward: ArtifactRef, cost: ArtifactRef, dataset: ArtifactRef, store: ArtifactStore) -> tuple[ArtifactRef, bool]:
    """R and C of both responses of every pair from the frozen judges, once per (reward, cost, data)."""
    import datasets

    from midpo.judges.scorer import Scorer

    key, meta = scores_key(reward, cost, dataset)
    if store.is_complete(key):
        return _ref(store, key), True
    pairs = load_pairs_table(dataset, store).to_list()
    prompts = [p["prompt"] for p in pairs] * 2
    responses = [p["response_0"] for p in pairs] + [p["response_1"] for p in pairs]
    contexts = [p["context"] for p in pairs] * 2
    columns: dict[str, list[Any]] = {
        "pair_id": [p["pair_id"] for p in pairs] * 2,
        "response_index": [0] * len(pairs) + [1] * len(pairs),
    }
    for name, judge in (("reward", reward), ("cost", cost)):
        columns[name] = Scorer.load(_folder(store, judge)).score(prompts, responses, contexts)
    with tempfile.TemporaryDirectory(prefix="midpo-scores-") as tmp:
        datasets.Dataset.from_dict(columns).to_parquet(str(Path(tmp) / SCORES_FILE))
        return store.publish(Path(tmp), key, metadata=meta), False


def expert_rows(name: str, dataset: ArtifactRef, refs: ArtifactRef, scores: ArtifactRef, store: ArtifactStore, split: str = "train") -> list[dict[str, Any]]:
    """The expert's subset with reference log-probs and its SPE-DPO margin, joined by (pair id, response)."""
    import datasets

    from midpo.train.losses import spe_margins
    from midpo.train.refs import attach_reference, join_response_values, load_reference_table

    subset, score = EXPERTS[name]
    table, _ = load_reference_table(_folder(store, refs))
    score_table = datasets.Dataset.from_parquet(str(_folder(store, scores) / SCORES_FILE))
    rows = attach_reference(load_subset(dataset, subset, split, store).to_list(), table)
    rows = join_response_values(rows, score_table, score, (f"chosen_{score}", f"rejected_{score}"))
    return spe_margins(rows, name)


def expert_key(name: str, refs: ArtifactRef, scores: ArtifactRef, cfg: TrainingConfig) -> str:
    version = content_hash({"expert": name, "loss": "spe_dpo", "refs": refs.version, "scores": scores.version, "training": dataclasses.asdict(cfg)})
    return f"experts/{name}/{version[:16]}"


def train_expert(name: str, base: ArtifactRef, dataset: ArtifactRef, refs: ArtifactRef, scores: ArtifactRef, cfg: TrainingConfig) -> tuple[ArtifactRef, dict[str, float], bool]:
    """Train (or find) one expert adapter. Runs in a child process: everything it needs is a reference."""
    from midpo.train.trainer import train_adapter

    store = ArtifactStore()
    key = expert_key(name, refs, scores, cfg)
    if store.is_complete(key):
        return _ref(store, key), store.manifest(key)["metadata"].get("metrics", {}), True
    rows = expert_rows(name, dataset, refs, scores, store)
    checkpoints = midpo_home() / "checkpoints" / key
    with tempfile.TemporaryDirectory(prefix=f"midpo-{name}-") as tmp:
        metrics = train_adapter(_folder(store, base), rows, "spe_dpo", cfg, tmp, checkpoint_dir=checkpoints, data_version=dataset.version)
        ref = store.publish(Path(tmp), key, metadata={"expert": name, "base": dataclasses.asdict(base), "dataset": dataset.version, "metrics": metrics})
    return ref, metrics, False


def plan_experts(base: ArtifactRef, dataset: ArtifactRef, reward: ArtifactRef, cost: ArtifactRef, cfg: TrainingConfig) -> tuple[dict[str, ArtifactRef], bool]:
    """The references ``train_experts`` would return, and whether all of them exist already (dry run)."""
    store = ArtifactStore()
    keys = {"refs": reference_key(base, dataset, cfg)[0], "scores": scores_key(reward, cost, dataset)[0]}
    outputs = {name: _ref(store, key) for name, key in keys.items()}
    for name in EXPERTS:
        keys[f"{name}-expert"] = expert_key(name, outputs["refs"], outputs["scores"], cfg)
    return {name: _ref(store, key) for name, key in keys.items()}, all(store.is_complete(k) for k in keys.values())


def train_experts(base: ArtifactRef, dataset: ArtifactRef, reward: ArtifactRef, cost: ArtifactRef, cfg: TrainingConfig) -> tuple[dict[str, ArtifactRef], dict[str, float], bool]:
    """Both experts, concurrently in two child processes, after the shared one-time passes."""
    store = ArtifactStore()
    refs, refs_hit = reference_artifact(base, dataset, cfg, store)
    scores, scores_hit = scores_artifact(reward, cost, dataset, store)
    outputs: dict[str, ArtifactRef] = {"refs": refs, "scores": scores}
    metrics: dict[str, float] = {}
    hits = [refs_hit, scores_hit]
    with ProcessPoolExecutor(max_workers=len(EXPERTS), mp_context=get_context("spawn")) as pool:
        futures = {name: pool.submit(train_expert, name, base, dataset, refs, scores, cfg) for name in EXPERTS}
        for name, future in futures.items():
            ref, m, hit = future.result()
            outputs[f"{name}-expert"] = ref
            metrics.update({f"{name}.{k}": float(v) for k, v in m.items() if isinstance(v, (int, float))})
            hits.append(hit)
    return outputs, metrics, all(hits)
