"""Every preference method of the comparison, by name: the loss it trains with and the pairs it sees.

A trained method is one LoRA adapter on the frozen base, trained by :func:`midpo.train.trainer.train_adapter`
with a loss of :mod:`midpo.train.losses`; nothing else differs between methods, so adding one is one line
of :data:`METHODS`. Its rows are the union of its subsets of the prepared dataset, with the shared one-time
columns joined by (pair id, response index) (:mod:`midpo.train.passes`): reference log-probs, R and C of
both responses, the safety labels, and SPE-DPO's margin for the experts. The loss's data rule then keeps
what it can use (SafeDPO's reorder, BFPO's labeled pairs).

``merge-half`` trains nothing: both expert adapters concatenated with weights 0.5/0.5 (PEFT's exact ``cat``
combination), so its weight delta is exactly ``0.5 Δ_safety + 0.5 Δ_helpfulness``.

Artifacts: ``adapters/<method>/<hash of refs, scores, training config, loss params>`` (PEFT adapter,
``midpo_adapter.json``, ``log_history.json``); ``adapters/merge-half/<hash of both experts>``.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from midpo.config import TrainingConfig
from midpo.data.schema import content_hash
from midpo.parallel import main_process_first, run_jobs
from midpo.storage import ArtifactRef, ArtifactStore, midpo_home
from midpo.train.passes import (
    folder_of,
    load_scores,
    reference_artifact,
    reference_key,
    scores_artifact,
    scores_key,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """A preference method trained as one adapter: its loss and the dataset subsets it trains on."""

    loss: str
    subsets: tuple[str, ...]
    margin: str | None = None  # SPE-DPO: the single preference whose score model gives the margin


METHODS: dict[str, Method] = {
    "safety-expert": Method("spe_dpo", ("safety",), margin="safety"),
    "helpfulness-expert": Method("spe_dpo", ("helpfulness",), margin="helpfulness"),
    "dpo-helpful": Method("dpo", ("helpfulness",)),
    "dpo-harmless": Method("dpo", ("safety",)),
    "dpo-mix": Method("dpo", ("safety", "helpfulness")),  # the union: as many pairs as both experts together
    "safedpo": Method("safedpo", ("helpfulness",)),
    "bfpo": Method("bfpo", ("helpfulness",)),
    "modpo": Method("modpo", ("helpfulness",)),
}
EXPERTS = ("safety-expert", "helpfulness-expert")
MERGED = {"merge-half": (EXPERTS, (0.5, 0.5))}  # name -> (adapters, weights): no training
BASELINES = (*(m for m in METHODS if m not in EXPERTS), *MERGED)


def check_names(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in METHODS and n not in MERGED]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r} (methods: {', '.join((*METHODS, *MERGED))})")


# --------------------------------------------------------------------------------------------------
# Rows


def method_rows(name: str, dataset: ArtifactRef, refs: ArtifactRef, scores: ArtifactRef, store: ArtifactStore, split: str = "train") -> list[dict[str, Any]]:
    """The method's training rows: its subsets (a preference in two subsets once), with the reference
    log-probs, R and C of both responses, the safety labels and, for the experts, the SPE-DPO margin."""
    from midpo.data.prepare import load_pairs_table, load_subset
    from midpo.train.losses import attach_safety_labels, spe_margins
    from midpo.train.refs import (
        attach_reference,
        join_response_values,
        load_reference_table,
    )

    method = METHODS[name]
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for subset in method.subsets:
        for row in load_subset(dataset, subset, split, store).to_list():
            rows.setdefault((row["pair_id"], int(row["chosen_index"])), row)
    table, _ = load_reference_table(folder_of(store, refs))
    score_table = load_scores(store, scores)
    out = attach_reference(list(rows.values()), table)
    for score in ("reward", "cost"):
        out = join_response_values(out, score_table, score, (f"chosen_{score}", f"rejected_{score}"))
    out = attach_safety_labels(out, load_pairs_table(dataset, store))
    return spe_margins(out, method.margin) if method.margin else out


# --------------------------------------------------------------------------------------------------
# Training


def method_key(name: str, refs: ArtifactRef, scores: ArtifactRef, cfg: TrainingConfig) -> str:
    training = cfg.for_method(name).recipe()
    spec = {"method": name, **dataclasses.asdict(METHODS[name]), "loss_params": cfg.loss_params(name)}
    return f"adapters/{name}/{content_hash({**spec, 'refs': refs.version, 'scores': scores.version, 'training': training})[:16]}"


def train_method(name: str, base: ArtifactRef, dataset: ArtifactRef, refs: ArtifactRef, scores: ArtifactRef, cfg: TrainingConfig) -> tuple[ArtifactRef, dict[str, float], bool]:
    """Train (or find) one method's adapter. Runs in a child process: everything it needs is a reference.

    Checkpoints go to ``$MIDPO_HOME/checkpoints/<key>`` (mirrored under the artifact root with
    ``training.sync_checkpoints``); a restarted run resumes from the newest one.
    """
    from midpo.train.trainer import train_adapter

    store = ArtifactStore()
    key = method_key(name, refs, scores, cfg)
    if store.is_complete(key):
        return store.ref(key), store.manifest(key)["metadata"].get("metrics", {}), True
    rows = method_rows(name, dataset, refs, scores, store)
    training = cfg.for_method(name)
    mirror = (store, f"checkpoints/{key}") if cfg.sync_checkpoints else None
    with tempfile.TemporaryDirectory(prefix=f"midpo-{name}-") as tmp:
        metrics = train_adapter(
            folder_of(store, base), rows, METHODS[name].loss, training, tmp,
            loss_params=cfg.loss_params(name), checkpoint_dir=midpo_home() / "checkpoints" / key,
            checkpoint_mirror=mirror, data_version=dataset.version,
        )
        meta = {"method": name, "base": dataclasses.asdict(base), "dataset": dataset.version, "metrics": metrics}
        ref = store.publish_from_main_process(Path(tmp), key, metadata=meta)  # under a launch, every process is here
    return ref, metrics, False


def merge_key(name: str, adapters: dict[str, ArtifactRef]) -> str:
    members, weights = MERGED[name]
    return f"adapters/{name}/{content_hash({'members': [adapters[m].version for m in members], 'weights': list(weights)})[:16]}"


def merge_method(name: str, base: ArtifactRef, adapters: dict[str, ArtifactRef]) -> tuple[ArtifactRef, bool]:
    """A weighted sum of trained adapters as one PEFT adapter (``cat``: exact, rank = the sum of ranks).
    Under a launch, the main process merges and the others then find the merged adapter."""
    from peft import PeftModel
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from midpo.models.load import load_model

    store = ArtifactStore()
    key = merge_key(name, adapters)
    with main_process_first():
        if store.is_complete(key):
            return store.ref(key), True
        members, weights = MERGED[name]
        unset_hf_deepspeed_config()  # ZeRO-3's partitioned loading outlives the training before: a merge needs whole weights
        model, _, _ = load_model(folder_of(store, base))
        peft_model = PeftModel.from_pretrained(model, str(folder_of(store, adapters[members[0]])), adapter_name=members[0])
        for member in members[1:]:
            peft_model.load_adapter(str(folder_of(store, adapters[member])), adapter_name=member)
        peft_model.add_weighted_adapter(list(members), list(weights), adapter_name=name, combination_type="cat")
        for member in members:
            peft_model.delete_adapter(member)
        with tempfile.TemporaryDirectory(prefix=f"midpo-{name}-") as tmp:
            peft_model.save_pretrained(tmp)  # a non-default adapter name lands in a subfolder of that name
            meta = {"method": name, "members": {m: adapters[m].version for m in members}, "weights": list(weights), "base": dataclasses.asdict(base)}
            return store.publish(Path(tmp) / name, key, metadata=meta), False


def plan_methods(names: Sequence[str], base: ArtifactRef, dataset: ArtifactRef, reward: ArtifactRef, cost: ArtifactRef, cfg: TrainingConfig) -> tuple[dict[str, ArtifactRef], bool]:
    """The references :func:`train_methods` would return, and whether all of them exist already (dry run)."""
    check_names(names)
    store = ArtifactStore()
    outputs = {"refs": store.ref(reference_key(base, dataset, cfg)[0]), "scores": store.ref(scores_key(reward, cost, dataset)[0])}
    for name in _trained(names):
        outputs[name] = store.ref(method_key(name, outputs["refs"], outputs["scores"], cfg))
    for name in (n for n in names if n in MERGED):
        outputs[name] = store.ref(merge_key(name, outputs))
    return outputs, all(store.is_complete(store.key_of(r.uri)) for r in outputs.values())


def _trained(names: Sequence[str]) -> list[str]:
    """The adapters to train for ``names``: the trained methods, plus the members of merged ones."""
    needed = [*names, *(m for n in names if n in MERGED for m in MERGED[n][0])]
    return [m for m in METHODS if m in needed]


def train_methods(
    names: Sequence[str], base: ArtifactRef, dataset: ArtifactRef, reward: ArtifactRef, cost: ArtifactRef, cfg: TrainingConfig
) -> tuple[dict[str, ArtifactRef], dict[str, float], bool]:
    """The shared one-time passes, then every method of ``names``: in-process for one, else ``cfg.parallel``
    at a time in child processes (a killed child fails its method; the parent survives), then the merged ones.

    Returns ``({"refs", "scores", method: ref}, {"<method>.<metric>": value}, all cache hits)``.
    """
    check_names(names)
    store = ArtifactStore()
    refs, refs_hit = reference_artifact(base, dataset, cfg, store)
    scores, scores_hit = scores_artifact(reward, cost, dataset, store)
    outputs: dict[str, ArtifactRef] = {"refs": refs, "scores": scores}
    metrics: dict[str, float] = {}
    hits = [refs_hit, scores_hit]
    done = {n: method_key(n, refs, scores, cfg) for n in _trained(names)}
    todo = [n for n, key in done.items() if not store.is_complete(key)]
    results = {n: (store.ref(key), store.manifest(key)["metadata"].get("metrics", {}), True) for n, key in done.items() if n not in todo}
    results.update(run_jobs(train_method, {name: (name, base, dataset, refs, scores, cfg) for name in todo}, cfg.parallel))
    for name in done:
        ref, m, hit = results[name]
        outputs[name] = ref
        metrics.update({f"{name}.{k}": float(v) for k, v in m.items() if isinstance(v, (int, float))})
        hits.append(hit)
    for name in (n for n in names if n in MERGED):
        outputs[name], hit = merge_method(name, base, outputs)
        hits.append(hit)
    return outputs, metrics, all(hits)
