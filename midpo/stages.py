"""The stage functions of the pipeline: ``(config section, input refs, dry_run) -> StageOutput``.

Each is a thin adapter over the library (data, world, models, eval): it resolves its inputs from the
references of earlier stages, calls one library function, and returns output references and small
metrics. Outputs land under the artifact root keyed by a hash of their inputs' versions and the config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from midpo.config import (
    BaseConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    JudgesConfig,
    RegistryConfig,
    RouterConfig,
    TrainingConfig,
)
from midpo.data.prepare import prepare
from midpo.data.schema import content_hash
from midpo.models.tiny import base_key
from midpo.parallel import run_jobs
from midpo.storage import ArtifactRef, ArtifactStore, local_copy
from midpo.tracking import OUTPUT_TAG, tracking_uri
from midpo.world import EVAL_SETS, vocabulary
from midpo.world.artifact import SFT, build_world
from midpo.world.config import WorldConfig


@dataclass
class StageOutput:
    outputs: dict[str, ArtifactRef]
    metrics: dict[str, float] = field(default_factory=dict)
    cache_hit: bool = False
    # training curves to log, {run name: URI of a transformers ``log_history.json``}: URIs, not the curves
    curves: dict[str, str] = field(default_factory=dict)
    seconds: float | None = None  # the stage's own wall time (set by the pipeline), without waiting for a slot


def _need(inputs: dict[str, ArtifactRef], name: str, stage: str) -> ArtifactRef:
    if name not in inputs:
        raise ConfigError(f"stage {stage} needs the output {name!r}, which no earlier stage of this profile produced")
    return inputs[name]


def _read_jsonl(uri: str) -> list[dict[str, Any]]:
    with local_copy(uri).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def world_stage(cfg: WorldConfig, inputs: dict[str, ArtifactRef], dry_run: bool = False) -> StageOutput:
    ref, summary, hit = build_world(cfg, ArtifactStore(), dry_run)
    dual = summary.get("dual", {}).get("label", {})
    return StageOutput({"world": ref}, {f"dual_label_{k}": float(v) for k, v in dual.items()}, hit)


def resolve_sources(cfg: DataConfig, inputs: dict[str, ArtifactRef]) -> DataConfig:
    """Replace ``artifact:OUTPUT/PATH`` sources by the URI of that file in an earlier stage's output."""
    sources = []
    for src in cfg.sources:
        if src.uri.startswith("artifact:"):
            name, _, path = src.uri[len("artifact:") :].partition("/")
            if name not in inputs:
                raise ConfigError(f"data.sources: {src.uri} names output {name!r}, which no earlier stage produced (have: {', '.join(inputs) or 'none'})")
            src = dataclasses.replace(src, uri=f"{inputs[name].uri}/{path}")
        sources.append(src)
    return dataclasses.replace(cfg, sources=sources)


def data_stage(cfg: DataConfig, inputs: dict[str, ArtifactRef], dry_run: bool = False) -> StageOutput:
    prepared = prepare(resolve_sources(cfg, inputs), dry_run=dry_run)
    counts = {
        f"{name}_{split}_pairs": float(by_split[split]["total"])
        for name, by_split in prepared.meta.get("subsets", {}).items()
        for split in by_split
    }
    excluded = {f"excluded_{reason}": float(n) for reason, n in prepared.meta.get("exclusions", {}).items()}
    return StageOutput({"dataset": prepared.ref}, {**counts, **excluded}, prepared.cache_hit)


def base_stage(cfg: BaseConfig, inputs: dict[str, ArtifactRef], dry_run: bool = False) -> StageOutput:
    """The base policy: an existing model (``base.model``) published once as ``bases/<hash of the source>``,
    or the tiny base (``base.tiny``): SFT on the world's dialogues, its tokenizer knowing the whole world vocabulary."""
    from midpo.models.tiny import base_stage as build_base

    if cfg.model is not None:
        from midpo.models.existing import publish_base

        ref, metrics, hit = publish_base(cfg.model, ArtifactStore(), dry_run=dry_run)
        return StageOutput({"base": ref}, metrics, hit)
    assert cfg.tiny is not None  # BaseConfig sets exactly one of the two
    world = _need(inputs, "world", "base")
    examples = _read_jsonl(f"{world.uri}/{SFT}")
    store = ArtifactStore()
    if dry_run:
        key = base_key(cfg.tiny, examples, vocabulary())
        return StageOutput({"base": store.ref(key)}, {}, store.is_complete(key))
    ref, metrics, hit = build_base(cfg.tiny, examples, store, vocabulary())
    return StageOutput({"base": ref}, metrics, hit)


def judges_stage(cfg: JudgesConfig, inputs: dict[str, ArtifactRef], dry_run: bool = False) -> StageOutput:
    """Reward and cost models on the base (margins, evaluation), one after another in-process with every
    core, or ``cfg.parallel`` at a time in child processes.

    Held-out accuracies: against the dataset's own labels (``*_noisy``) and, on the world, the oracle's
    clean labels.
    """
    from midpo.judges.score import evaluate_score_models, score_model_ref, train_score_model
    from midpo.world import clean_labels

    base, dataset = _need(inputs, "base", "judges"), _need(inputs, "dataset", "judges")
    store = ArtifactStore()
    jobs = {kind: (kind, getattr(cfg, kind), base, dataset) for kind in ("reward", "cost")}
    refs = {kind: score_model_ref(*job, store) for kind, job in jobs.items()}
    if dry_run:
        return StageOutput(refs, {}, all(store.is_complete(store.key_of(r.uri)) for r in refs.values()))
    todo = {kind: job for kind, job in jobs.items() if not store.is_complete(store.key_of(refs[kind].uri))}
    trained = {kind: train_score_model(*job) for kind, job in jobs.items() if kind not in todo}  # cache hits, in-process
    trained.update(run_jobs(train_score_model, todo, cfg.parallel))
    (reward, _, reward_hit), (cost, _, cost_hit) = trained["reward"], trained["cost"]
    metrics = evaluate_score_models(reward, cost, dataset, store, oracle=clean_labels if "world" in inputs else None)
    return StageOutput({"reward": reward, "cost": cost}, {k: v for k, v in metrics.items() if not math.isnan(v)}, reward_hit and cost_hit)


def refusal_stage(cfg: JudgesConfig, inputs: dict[str, ArtifactRef], dry_run: bool = False) -> StageOutput:
    """The refusal classifier (evaluation), independent of the base: it never trains on a prompt of an eval
    set it may judge (the world's, the XSTest eval half). A profile with ``judges.refusal: null`` has none."""
    from midpo.eval.sets import build_eval_sets, xstest_eval_prompts
    from midpo.judges.refusal import judges_metrics, train_refusal_judge

    if cfg.refusal is None:
        return StageOutput({}, {}, True)
    world = inputs.get("world")
    exclude = [p for es in build_eval_sets(list(EVAL_SETS), {"world": world}) for p in es.prompts] if world else []
    exclude += xstest_eval_prompts()
    ref, metrics, hit = train_refusal_judge(cfg.refusal, ArtifactStore(), exclude_prompts=set(exclude), dry_run=dry_run)
    return StageOutput({"refusal": ref}, judges_metrics(metrics), hit)


def passes_stage(cfg: TrainingConfig, inputs: dict[str, ArtifactRef], dry_run: bool = False) -> StageOutput:
    """The one-time passes every method and the router share: the base's reference log-probs and the
    judges' reward and cost of both responses of every pair (``refs``, ``scores``)."""
    from midpo.train.passes import reference_artifact, reference_key, scores_artifact, scores_key

    base, dataset = _need(inputs, "base", "passes"), _need(inputs, "dataset", "passes")
    reward, cost = _need(inputs, "reward", "passes"), _need(inputs, "cost", "passes")
    store = ArtifactStore()
    if dry_run:
        keys = {"refs": reference_key(base, dataset, cfg)[0], "scores": scores_key(reward, cost, dataset)[0]}
        return StageOutput({k: store.ref(key) for k, key in keys.items()}, {}, all(map(store.is_complete, keys.values())))
    refs, refs_hit = reference_artifact(base, dataset, cfg, store)
    scores, scores_hit = scores_artifact(reward, cost, dataset, store)
    return StageOutput({"refs": refs, "scores": scores}, {}, refs_hit and scores_hit)


def _methods(names: list[str], cfg: TrainingConfig, inputs: dict[str, ArtifactRef], stage: str, dry_run: bool) -> StageOutput:
    """Train (or find) the adapters of ``names`` on the shared passes: ``{method: ref}`` and their curves."""
    from midpo.train.methods import plan_methods, train_methods
    from midpo.train.trainer import LOG_HISTORY

    needed = [_need(inputs, name, stage) for name in ("base", "dataset", "reward", "cost")]
    if dry_run:
        outputs, complete = plan_methods(names, *needed, cfg)
        return StageOutput({n: outputs[n] for n in names}, {}, complete)
    outputs, metrics, hit = train_methods(names, *needed, cfg)
    store = ArtifactStore()
    curves = {f"{n}-training": f"{outputs[n].uri}/{LOG_HISTORY}" for n in names if LOG_HISTORY in store.manifest(store.key_of(outputs[n].uri))["files"]}
    return StageOutput({n: outputs[n] for n in names}, {k: v for k, v in metrics.items() if k.split(".", 1)[0] in names}, hit, curves)


def expert_stage(name: str, cfg: TrainingConfig, inputs: dict[str, ArtifactRef], dry_run: bool = False) -> StageOutput:
    """One SPE-DPO expert (``safety-expert``: cost margins; ``helpfulness-expert``: reward margins). The two
    are stages of their own so that they train side by side, each in its own task and process."""
    return _methods([name], cfg, inputs, name, dry_run)


def baselines_stage(cfg: TrainingConfig, inputs: dict[str, ArtifactRef], dry_run: bool = False) -> StageOutput:
    """The comparison methods the profile asks for (``training.baselines``), ``cfg.parallel`` at a time in
    child processes; ``merge-half`` merges the experts trained before."""
    return _methods(list(cfg.baselines), cfg, inputs, "baselines", dry_run)


def _folder(ref: ArtifactRef) -> Path:
    from midpo.train.passes import folder_of

    return folder_of(ArtifactStore(), ref)


def dual_stage(cfg: RouterConfig, inputs: dict[str, ArtifactRef], dry_run: bool = False) -> StageOutput:
    """D_dual by ``router.dual_rule`` from the dataset's train split (and the response scores for the
    reward rules): ``dual/<hash>`` with ``train.parquet`` and its counts per prompt kind."""
    import datasets

    from midpo.data.prepare import load_pairs_table, load_subset
    from midpo.moe.dual import build_dual
    from midpo.train.passes import load_scores

    dataset, scores = _need(inputs, "dataset", "dual"), _need(inputs, "scores", "dual")
    store = ArtifactStore()
    version = content_hash({"dataset": dataset.version, "scores": scores.version, "rule": cfg.dual_rule, "choice": cfg.reward_choice})[:16]
    key = f"dual/{version}"
    ref = store.ref(key)
    if store.is_complete(key) or dry_run:
        counts = store.manifest(key)["metadata"]["counts"] if store.is_complete(key) else {}
        return StageOutput({"dual": ref}, _count_metrics(counts), store.is_complete(key))
    pairs = [p for p in load_pairs_table(dataset, store).to_list() if p["split"] == "train"]
    by_response = {(r["pair_id"], int(r["response_index"])): (r["reward"], r["cost"]) for r in load_scores(store, scores)}
    rows, counts = build_dual(pairs, load_subset(dataset, "safety", "train", store).to_list(), by_response, cfg.dual_rule, cfg.reward_choice)
    if not rows:
        raise ConfigError(f"router.dual_rule {cfg.dual_rule!r} leaves no router pairs in this dataset ({counts}); choose another rule")
    with tempfile.TemporaryDirectory(prefix="midpo-dual-") as tmp:
        datasets.Dataset.from_list(rows).to_parquet(str(Path(tmp) / "train.parquet"))
        ref = store.publish(Path(tmp), key, metadata={"rule": cfg.dual_rule, "reward_choice": cfg.reward_choice, "counts": counts})
    return StageOutput({"dual": ref}, _count_metrics(counts), False)


def _count_metrics(counts: dict[str, dict[str, int]]) -> dict[str, float]:
    return {f"{part}_{kind}": float(n) for part, by_kind in counts.items() for kind, n in by_kind.items()}


def router_stage(cfg: RouterConfig, inputs: dict[str, ArtifactRef], dry_run: bool = False) -> StageOutput:
    """The gates over both frozen experts, trained on D_dual against the base: ``routers/<hash>``."""
    import datasets

    from midpo.train.refs import attach_reference, load_reference_table
    from midpo.train.trainer import LOG_HISTORY

    needed = {n: _need(inputs, n, "router") for n in ("base", "dual", "refs", "safety-expert", "helpfulness-expert")}
    store = ArtifactStore()
    versions = {n: r.version for n, r in needed.items()}
    version = content_hash({**versions, "training": cfg.training.recipe(), "gate": dataclasses.asdict(cfg.gate), "reg_weight": cfg.reg_weight})[:16]
    key = f"routers/{version}"
    ref = store.ref(key)
    curves = {"router-training": f"{ref.uri}/{LOG_HISTORY}"}  # not "router": that is the stage run
    if store.is_complete(key):
        return StageOutput({"router": ref}, store.manifest(key)["metadata"]["metrics"], True, curves)
    if dry_run:
        return StageOutput({"router": ref}, {}, False)
    from midpo.moe.router import train_router
    from midpo.storage import midpo_home

    table, _ = load_reference_table(_folder(needed["refs"]))
    rows = attach_reference(datasets.Dataset.from_parquet(str(_folder(needed["dual"]) / "train.parquet")).to_list(), table)
    mirror = (store, f"checkpoints/{key}") if cfg.training.sync_checkpoints else None
    with tempfile.TemporaryDirectory(prefix="midpo-router-") as tmp:
        metrics = train_router(
            _folder(needed["base"]), _folder(needed["safety-expert"]), _folder(needed["helpfulness-expert"]), rows,
            cfg.training, cfg.gate, cfg.reg_weight, tmp, checkpoint_dir=midpo_home() / "checkpoints" / key,
            checkpoint_mirror=mirror, experts={n: versions[n] for n in ("safety-expert", "helpfulness-expert")}, data_version=needed["dual"].version,
        )
        ref = store.publish_from_main_process(Path(tmp), key, metadata={**versions, "metrics": metrics})  # under a launch, every process is here
    return StageOutput({"router": ref}, metrics, False, curves)


def moe_stage(cfg: RouterConfig, inputs: dict[str, ArtifactRef], dry_run: bool = False) -> StageOutput:
    """The MidPO model as one folder (base, both experts, gates, hashed config): ``models/midpo/<hash>``."""
    from midpo.moe.package import save_moe

    parts = {n: _need(inputs, n, "moe") for n in ("base", "safety-expert", "helpfulness-expert", "router")}
    store = ArtifactStore()
    version = content_hash({n: r.version for n, r in parts.items()})[:16]
    key = f"models/midpo/{version}"
    ref = store.ref(key)
    if store.is_complete(key) or dry_run:
        return StageOutput({"midpo": ref}, {}, store.is_complete(key))
    with tempfile.TemporaryDirectory(prefix="midpo-moe-") as tmp:
        folder = save_moe(Path(tmp) / "midpo", *(_folder(parts[n]) for n in ("base", "safety-expert", "helpfulness-expert", "router")))
        ref = store.publish(folder, key, metadata={n: r.version for n, r in parts.items()})
    return StageOutput({"midpo": ref}, {}, False)


# evaluated when the pipeline produced them, in this order (interfaces.md's method names)
METHODS = ("base", "safety-expert", "helpfulness-expert", "midpo", "merge-half", "dpo-helpful", "dpo-harmless", "dpo-mix", "safedpo", "bfpo", "modpo")


def judges_for(inputs: dict[str, ArtifactRef]) -> Any:
    """The reward and cost models (judges stage) and the refusal classifier (refusal stage), loaded once, as
    evaluation judges."""
    from midpo.eval.evaluate import Judges
    from midpo.judges.refusal import RefusalJudge
    from midpo.judges.scorer import Scorer

    store = ArtifactStore()
    loaded: dict[str, Any] = {k: Scorer.load(store.fetch(store.key_of(inputs[k].uri))) for k in ("reward", "cost") if k in inputs}
    if "refusal" in inputs:
        loaded["refusal"] = RefusalJudge.load(store.fetch(store.key_of(inputs["refusal"].uri)))
    return Judges(**loaded) if loaded else None


@dataclass(frozen=True)
class EvalJob:
    """One model's evaluation: everything its figures depend on, and where they land (``evals/<method>/<hash>``)."""

    method: str
    model: ArtifactRef
    sets: list[Any]  # EvalSet
    cfg: EvalConfig
    base: ArtifactRef | None  # an adapter is merged into it for generation
    judges: dict[str, ArtifactRef]
    reference: ArtifactRef | None = None  # the base's evaluation: the samples win_rate_vs_base compares with

    @property
    def key(self) -> str:
        versions = {
            "model": self.model.version,
            "sets": content_hash([[es.name, es.kind, es.prompts, es.world, es.safety_judge, es.categories] for es in self.sets]),
            "judges": {k: v.version for k, v in self.judges.items()},
            "reference": self.reference.version if self.reference else None,
            "eval": self.cfg.protocol(),
        }
        return f"evals/{self.method}/{content_hash(versions)[:16]}"


def run_eval_job(job: EvalJob) -> tuple[ArtifactRef, dict[str, Any], bool]:
    """Evaluate one model once: ``(ref, metrics, cache_hit)``."""
    from midpo.eval.evaluate import evaluate_model, reference_values
    from midpo.models.load import inference_device, load_model, load_with_adapter

    store = ArtifactStore()
    if store.is_complete(job.key):
        return store.ref(job.key), json.loads((store.fetch(job.key) / "metrics.json").read_text()), True
    folder = store.fetch(store.key_of(job.model.uri))
    if (folder / "adapter_config.json").is_file():
        if job.base is None:
            raise ConfigError(f"{job.method}: {job.model.uri} is an adapter; its base is needed to evaluate it")
        lm, tokenizer, template = load_with_adapter(store.fetch(store.key_of(job.base.uri)), folder, inference_device())
    else:
        lm, tokenizer, template = load_model(folder, inference_device())
    reference = None
    if job.reference is not None:
        reference = reference_values(_read_jsonl(f"{job.reference.uri}/samples.jsonl"))
    metrics, samples = evaluate_model(lm, tokenizer, template, job.sets, job.cfg, judges_for(job.judges), reference)
    with tempfile.TemporaryDirectory(prefix="midpo-eval-") as tmp:
        out = Path(tmp)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
        ref = store.publish(out, job.key, metadata={"method": job.method, "model": dataclasses.asdict(job.model)})
    return ref, metrics, False


def eval_stage(cfg: EvalConfig, inputs: dict[str, ArtifactRef], dry_run: bool = False) -> StageOutput:
    """Evaluate every model among the inputs (:data:`METHODS`) that has no evaluation there yet, on the eval
    sets: the base first (its samples are the reference of the others' ``win_rate_vs_base``), then the
    others ``cfg.parallel`` at a time in child processes. The pipeline runs it twice: for the base, experts
    and baselines once they exist, then for the MoE."""
    from midpo.eval.sets import build_eval_sets

    methods = [m for m in METHODS if m in inputs and f"eval/{m}" not in inputs]
    store = ArtifactStore()
    if dry_run and not all(store.is_complete(store.key_of(r.uri)) for r in inputs.values()):
        # a plan ahead of its inputs: the sets (from the dataset) and the models are not there to key by yet
        return StageOutput({f"eval/{m}": store.ref(f"eval/{m}/planned") for m in methods}, {}, False)
    sets = build_eval_sets(cfg.sets, inputs)
    judges = {k: inputs[k] for k in ("reward", "cost", "refusal") if k in inputs}

    def job(method: str, reference: ArtifactRef | None = None) -> EvalJob:
        return EvalJob(method, inputs[method], sets, cfg, inputs.get("base"), judges, reference)

    def planned(j: EvalJob) -> tuple[ArtifactRef, dict[str, Any], bool]:
        return store.ref(j.key), {}, store.is_complete(j.key)

    results: dict[str, tuple[ArtifactRef, dict[str, Any], bool]] = {}
    reference = inputs.get("eval/base")
    if "base" in methods:
        results["base"] = planned(job("base")) if dry_run else run_eval_job(job("base"))
        reference = results["base"][0]
    jobs = {m: job(m, reference) for m in methods if m != "base"}
    if dry_run:
        results.update({m: planned(j) for m, j in jobs.items()})
    else:
        todo = {m: (j,) for m, j in jobs.items() if not store.is_complete(j.key)}
        results.update({m: run_eval_job(j) for m, j in jobs.items() if m not in todo})  # cache hits, in-process
        results.update(run_jobs(run_eval_job, todo, cfg.parallel))
    outputs, flat = {}, {}
    for method in methods:  # in METHODS order
        ref, metrics, _ = results[method]
        outputs[f"eval/{method}"] = ref
        flat.update({f"{method}.{s}.{k}": v for s, m in metrics.items() for k, v in m.items() if isinstance(v, float)})
    return StageOutput(outputs, flat, all(hit for _, _, hit in results.values()))


LINEAGE = ("dataset", "base", "safety-expert", "helpfulness-expert", "router", "midpo")


def register_stage(cfg: RegistryConfig, inputs: dict[str, ArtifactRef], dry_run: bool = False) -> StageOutput:
    """The packaged MoE as a new version of the registered model, with lineage tags, alias ``cfg.alias``.

    One version per MoE version: a rerun with the same inputs finds it (tag ``midpo.model_version``) and
    only points the alias at it again. Must run inside an MLflow run (the pipeline's stage run).
    """
    import mlflow

    parts = {n: _need(inputs, n, "register") for n in LINEAGE}
    version = parts["midpo"].version
    client = mlflow.MlflowClient(tracking_uri())  # a dry run has no stage run to set it
    found = client.search_model_versions(f"name = '{cfg.model_name}' and tags.`midpo.model_version` = '{version}'") if _registered(client, cfg.model_name) else []
    if dry_run:
        return StageOutput({}, {}, bool(found))
    if found:
        registered = max(int(v.version) for v in found)
    else:
        from midpo.moe.serving import log_moe_model

        info = log_moe_model(_folder(parts["midpo"]), registered_model_name=cfg.model_name)
        registered = int(info.registered_model_version)
        tags = {f"midpo.{n.replace('-', '_')}_version": r.version for n, r in parts.items()}
        tags.update({f"midpo.{n.replace('-', '_')}_uri": r.uri for n, r in parts.items()})
        tags.update({"midpo.model_version": version, "midpo.run_id": mlflow.active_run().info.run_id})
        tags.update({f"midpo.{n.replace('-', '_')}_run": run for n in TRAINED_LINEAGE if (run := _producing_run(n, parts[n].version))})
        for key, value in tags.items():
            client.set_model_version_tag(cfg.model_name, str(registered), key, value)
    client.set_registered_model_alias(cfg.model_name, cfg.alias, str(registered))
    return StageOutput({}, {"registered_version": float(registered)}, bool(found))


TRAINED_LINEAGE = ("safety-expert", "helpfulness-expert", "router")  # the registered version names their training runs


def _producing_run(output: str, version: str) -> str | None:
    """The MLflow stage run that produced ``output`` at ``version`` (not one that found it cached)."""
    import mlflow

    experiment = mlflow.active_run().info.experiment_id
    runs = mlflow.search_runs([experiment], f"tags.`{OUTPUT_TAG}{output}` = '{version}' and metrics.cache_hit = 0", output_format="list", max_results=1)
    return runs[0].info.run_id if runs else None


def _registered(client: Any, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException:
        return False
