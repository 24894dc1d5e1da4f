"""The one-time passes every preference method shares, each a versioned artifact under the artifact root:

    refs/<base, dataset, max_length, bf16>      log pi_ref of both responses of every pair (refs.py)
    scores/<reward, cost, dataset>              R and C of both responses of every pair (frozen judges)

Both are keyed by (pair id, response index), so any subset, and SafeDPO's swaps, join onto them.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from midpo.config import TrainingConfig
from midpo.data.prepare import load_pairs_table
from midpo.data.schema import content_hash
from midpo.storage import ArtifactRef, ArtifactStore

log = logging.getLogger(__name__)

SCORES_FILE = "scores.parquet"


def folder_of(store: ArtifactStore, ref: ArtifactRef) -> Path:
    return store.fetch(store.key_of(ref.uri))


def load_scores(store: ArtifactStore, scores: ArtifactRef) -> Any:
    """The scores artifact's table: ``pair_id``, ``response_index``, ``reward``, ``cost``."""
    import datasets

    return datasets.Dataset.from_parquet(str(folder_of(store, scores) / SCORES_FILE))


def reference_key(base: ArtifactRef, dataset: ArtifactRef, cfg: TrainingConfig) -> tuple[str, dict[str, Any]]:
    meta = {"base": base.version, "dataset": dataset.version, "max_length": cfg.max_length, "bf16": cfg.bf16}
    return f"refs/{content_hash(meta)[:16]}", meta


def scores_key(reward: ArtifactRef, cost: ArtifactRef, dataset: ArtifactRef) -> tuple[str, dict[str, Any]]:
    meta = {"reward": reward.version, "cost": cost.version, "dataset": dataset.version}
    return f"scores/{content_hash(meta)[:16]}", meta


def reference_artifact(base: ArtifactRef, dataset: ArtifactRef, cfg: TrainingConfig, store: ArtifactStore) -> tuple[ArtifactRef, bool]:
    """Reference log-probs of the base for both responses of every pair, once per (base, data, length, bf16)."""
    from midpo.models.load import inference_device, load_model
    from midpo.train.refs import reference_table, save_reference_table

    key, meta = reference_key(base, dataset, cfg)
    if store.is_complete(key):
        return store.ref(key), True
    model, tokenizer, template = load_model(folder_of(store, base), inference_device())
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
        return store.ref(key), True
    pairs = load_pairs_table(dataset, store).to_list()
    prompts = [p["prompt"] for p in pairs] * 2
    responses = [p["response_0"] for p in pairs] + [p["response_1"] for p in pairs]
    contexts = [p["context"] for p in pairs] * 2
    columns: dict[str, list[Any]] = {
        "pair_id": [p["pair_id"] for p in pairs] * 2,
        "response_index": [0] * len(pairs) + [1] * len(pairs),
    }
    for name, judge in (("reward", reward), ("cost", cost)):
        columns[name] = Scorer.load(folder_of(store, judge)).score(prompts, responses, contexts)
    with tempfile.TemporaryDirectory(prefix="midpo-scores-") as tmp:
        datasets.Dataset.from_dict(columns).to_parquet(str(Path(tmp) / SCORES_FILE))
        return store.publish(Path(tmp), key, metadata=meta), False
