"""The pipeline as a graph of stages (pipeline.md): run by the ``midpo`` flow (``midpo run``, the
``full-pipeline`` deployment), or in-process by :func:`run_pipeline` alone (dry runs, compare, tests).

A stage is a plain function: its own config section and the references its upstream stages produced in,
output references and small metrics out. Outputs land under the artifact root keyed by their inputs'
versions, so a rerun with unchanged inputs is a cache hit. In one process the stages run one at a time:
each keeps the cores busy on its own (torch threads, child processes), and transformers builds models
under a process-wide patch (accelerate's ``init_empty_weights``), so two stages loading models at once
in one process can corrupt each other (measured: SmolLM2's reference pass got meta-device weights).
The flow's executor runs every stage that runs a model (``Stage.gpu``) in a process of its own, so there
independent stages run side by side.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from midpo import stages, tracking
from midpo.config import MidpoConfig, RunConfig
from midpo.eval.report import write_report
from midpo.judges.score import METRIC_NAMES
from midpo.launch import launch_stage, launches, section_of
from midpo.parallel import available_cores, stop_children
from midpo.stages import StageOutput
from midpo.storage import ArtifactRef, ArtifactStore, midpo_home

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    name: str
    section: str  # the only config section the stage receives; a profile without it skips the stage
    run: Callable[[Any, dict[str, ArtifactRef], bool], StageOutput]  # (section, inputs, dry_run)
    needs: tuple[str, ...] = ()  # the stages it runs after (those the profile runs); it reads everything upstream
    gpu: bool = False  # runs a model: its own process, a slot of the `gpu` concurrency limit in a flow
    when: Callable[[MidpoConfig], bool] | None = None  # beyond its section: whether the profile runs it


def _has_baselines(cfg: MidpoConfig) -> bool:
    return bool(cfg.training and cfg.training.baselines)


# In an order that respects ``needs`` (the order of a one-at-a-time run and of --dry-run's plan).
STAGES: list[Stage] = [
    Stage("world", "world", stages.world_stage),
    Stage("data", "data", stages.data_stage, ("world",)),
    Stage("base", "base", stages.base_stage, ("world",), gpu=True),
    Stage("refusal", "judges", stages.refusal_stage, ("world",), gpu=True),
    Stage("judges", "judges", stages.judges_stage, ("data", "base"), gpu=True),
    Stage("passes", "training", stages.passes_stage, ("judges",), gpu=True),
    Stage("safety-expert", "training", partial(stages.expert_stage, "safety-expert"), ("passes",), gpu=True),
    Stage("helpfulness-expert", "training", partial(stages.expert_stage, "helpfulness-expert"), ("passes",), gpu=True),
    Stage("baselines", "training", stages.baselines_stage, ("safety-expert", "helpfulness-expert"), gpu=True, when=_has_baselines),
    Stage("dual", "router", stages.dual_stage, ("passes",)),
    Stage("router", "router", stages.router_stage, ("dual", "safety-expert", "helpfulness-expert"), gpu=True),
    Stage("moe", "router", stages.moe_stage, ("router",)),
    # base, experts, baselines; then the MoE against the same base samples
    Stage("eval", "eval", stages.eval_stage, ("judges", "refusal", "safety-expert", "helpfulness-expert", "baselines"), gpu=True),
    Stage("eval-midpo", "eval", stages.eval_stage, ("eval", "moe"), gpu=True),
    Stage("register", "registry", stages.register_stage, ("moe", "eval-midpo")),
]


@dataclass
class RunSummary:
    profile: str
    outputs: dict[str, ArtifactRef]
    stage_seconds: dict[str, float]
    cache_hits: list[str]
    stage_metrics: dict[str, dict[str, float]]
    wall_seconds: float
    report_dir: Path | None

    def run_section(self) -> dict[str, Any]:
        """The ``run`` section of metrics.json (interfaces.md)."""
        dataset = self.outputs.get("dataset")
        return {
            "profile": self.profile,
            "dataset_version": dataset.version if dataset else None,
            "wall_seconds": round(self.wall_seconds, 3),
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "cache_hits": self.cache_hits,
        }

    def to_dict(self) -> dict[str, Any]:
        """What a flow run returns: small and JSON-serializable (URIs, not objects)."""
        return {
            "run": self.run_section(),
            "outputs": {name: ref.uri for name, ref in self.outputs.items()},
            "report_dir": str(self.report_dir) if self.report_dir else None,
        }


def default_report_dir(profile: str) -> Path:
    return midpo_home() / "reports" / f"{profile}-{time.strftime('%Y%m%d-%H%M%S')}"


def apply_runtime(run: RunConfig) -> None:
    """Process-wide settings of a profile (torch threads) before any stage computes; child processes
    inherit them through OMP_NUM_THREADS and split them (midpo.parallel)."""
    import torch

    threads = run.torch_threads or available_cores()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def stages_for(cfg: MidpoConfig, until: str | Sequence[str] | None = None) -> list[Stage]:
    """The stages this profile runs (those whose config section it has), in :data:`STAGES` order: all of
    them, or the ``until`` stage(s) and everything upstream of them."""
    names = [s.name for s in STAGES]
    targets = [until] if isinstance(until, str) else list(until or [])
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise ValueError(f"unknown stage {', '.join(map(repr, unknown))}: one of {', '.join(names)}")
    present = {s.name: s for s in STAGES if getattr(cfg, s.section) is not None and (s.when is None or s.when(cfg))}
    keep = set(present) if until is None else set(targets).union(*(upstream(t, present) for t in targets))
    return [s for s in present.values() if s.name in keep]


def upstream(name: str, graph: dict[str, Stage]) -> set[str]:
    """Every stage ``name`` depends on, directly or not (among those in ``graph``)."""
    out: set[str] = set()
    todo = [n for n in graph[name].needs if n in graph] if name in graph else []
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo += [m for m in graph[n].needs if m in graph]
    return out


def execute_stage(
    stage: Stage, cfg: MidpoConfig, inputs: dict[str, ArtifactRef], dry_run: bool = False, parent_run_id: str | None = None
) -> StageOutput:
    """Run one stage on its own config section, tracked as an MLflow run (nested under ``parent_run_id``)."""
    section = section_of(stage, cfg)
    if dry_run:
        return stage.run(section, dict(inputs), True)
    t0 = time.perf_counter()
    params = {stage.section: dataclasses.asdict(section)}
    with tracking.stage_run(cfg.run.experiment, stage.name, params=params, parent_run_id=parent_run_id) as mlflow:
        out = stage.run(section, dict(inputs), False)
        mlflow.log_metrics({**out.metrics, "cache_hit": float(out.cache_hit)})
        mlflow.set_tags({f"{tracking.OUTPUT_TAG}{name}": ref.version for name, ref in out.outputs.items()})  # lineage: who made what
        for name, uri in out.curves.items():  # on a cache hit too: the history is part of the artifact
            tracking.log_curves(cfg.run.experiment, name, uri)
    seconds = time.perf_counter() - t0
    out = dataclasses.replace(out, seconds=seconds)
    budget = cfg.run.stage_budgets.get(stage.name)
    status = "cache hit" if out.cache_hit else "done"
    if budget is not None and seconds > budget:
        log.warning("stage %s: %s in %.1f s, over its budget of %.0f s", stage.name, status, seconds, budget)
    else:
        log.info("stage %s: %s in %.1f s%s", stage.name, status, seconds, f" (budget {budget:.0f} s)" if budget is not None else "")
    return out


def _in_process(stage: Stage, cfg: MidpoConfig, inputs: dict[str, ArtifactRef], parent_run_id: str | None) -> StageOutput:
    if launches(cfg, stage):  # on several processes: they cannot be this one
        return launch_stage(stage, cfg, inputs, parent_run_id)
    return execute_stage(stage, cfg, inputs, parent_run_id=parent_run_id)


def run_graph(plan: list[Stage], run_one: Callable[[Stage, dict[str, ArtifactRef]], StageOutput], workers: int) -> dict[str, StageOutput]:
    """Run every stage of ``plan`` once its upstream stages are done, at most ``workers`` at once; each gets
    the outputs of its upstream stages only (what ran beside it never leaks in). A failure stops new
    stages from starting; those running finish and keep what they published."""
    graph = {s.name: s for s in plan}
    done: dict[str, StageOutput] = {}
    order = [s.name for s in plan]

    def inputs_of(stage: Stage) -> dict[str, ArtifactRef]:
        up = upstream(stage.name, graph)
        return {k: v for n in order if n in up for k, v in done[n].outputs.items()}

    def ready(pending: list[Stage]) -> list[Stage]:
        return [s for s in pending if all(n in done for n in s.needs if n in graph)]

    pending = list(plan)
    if workers <= 1:  # in the calling thread: Ctrl-C stops the running stage, not only the next one
        while pending:
            if not ready(pending):
                raise ValueError(f"stages {', '.join(s.name for s in pending)} wait on each other")
            stage = ready(pending)[0]
            pending.remove(stage)
            done[stage.name] = run_one(stage, inputs_of(stage))
        return done
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stage") as pool:
        running: dict[Future[StageOutput], Stage] = {}
        try:
            while pending or running:
                if not running and not ready(pending):
                    raise ValueError(f"stages {', '.join(s.name for s in pending)} wait on each other")
                for stage in ready(pending)[: workers - len(running)]:
                    pending.remove(stage)
                    # in the caller's context (a Prefect flow run's, when the flow drives the graph)
                    running[pool.submit(contextvars.copy_context().run, run_one, stage, inputs_of(stage))] = stage
                # with a timeout: a signal handled by another thread never wakes a lock wait, so Ctrl-C would
                # wait for the next stage to finish
                finished, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in finished:
                    done[running.pop(future).name] = future.result()  # a failure raises here; the pool drains
        except KeyboardInterrupt:  # Ctrl-C: the stages' child processes stop now, nothing retries or starts
            log.warning("interrupted: stopping %s", ", ".join(s.name for s in running.values()) or "the run")
            stop_children()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return done


# How one stage executes: (stage, config, inputs, parent MLflow run id) -> output. In-process by default;
# the `midpo` flow passes its Prefect task, so a flow run and `midpo run` share everything else.
StageExecutor = Callable[[Stage, MidpoConfig, dict[str, ArtifactRef], "str | None"], StageOutput]


def run_pipeline(
    cfg: MidpoConfig,
    report_dir: Path | None = None,
    dry_run: bool = False,
    until: str | Sequence[str] | None = None,
    execute: StageExecutor | None = None,
) -> RunSummary:
    """Run the profile's stages (up to ``until``); ``dry_run`` only resolves the plan and the cache hits.

    One MLflow parent run holds the resolved config (config.json), the dataset version as a dataset input,
    and a nested run per stage. With a ``report_dir``, the report goes there: metrics.json
    (interfaces.md), report.md and plots.
    """
    start = time.perf_counter()
    apply_runtime(cfg.run)
    plan = stages_for(cfg, until)
    seconds: dict[str, float] = {}
    parent = nullcontext() if dry_run else tracking.stage_run(cfg.run.experiment, "pipeline", params={"profile": cfg.profile})
    with parent as parent_run:
        parent_id = parent_run.active_run().info.run_id if parent_run is not None else None
        if parent_run is not None:
            parent_run.log_dict(dataclasses.asdict(cfg), "config.json")  # the resolved config, overrides applied

        def run_one(stage: Stage, inputs: dict[str, ArtifactRef]) -> StageOutput:
            log.info("stage %d/%d: %s", [s.name for s in plan].index(stage.name) + 1, len(plan), stage.name)
            t0 = time.perf_counter()
            out = execute_stage(stage, cfg, inputs, True) if dry_run else (execute or _in_process)(stage, cfg, inputs, parent_id)
            seconds[stage.name] = out.seconds if out.seconds is not None else time.perf_counter() - t0
            return out

        # In-process, stages run one at a time (see the module docstring); an executor that isolates them
        # (the flow's task: model stages in processes of their own, gated by the `gpu` limit) runs the
        # graph as wide as it goes.
        done = run_graph(plan, run_one, workers=len(plan) if execute is not None and not dry_run else 1)
        dataset = next((done[s.name].outputs["dataset"] for s in plan if "dataset" in done[s.name].outputs), None)
        if parent_run is not None and dataset is not None:
            tracking.log_dataset(dataset)
        refs = {k: v for s in plan for k, v in done[s.name].outputs.items()}
        metrics = {s.name: done[s.name].metrics for s in plan}
        hits = [s.name for s in plan if done[s.name].cache_hit]
        seconds = {s.name: seconds[s.name] for s in plan}
        summary = RunSummary(cfg.profile, refs, seconds, hits, metrics, time.perf_counter() - start, None if dry_run else report_dir)
        if not dry_run and cfg.run.budget is not None and summary.wall_seconds > cfg.run.budget:
            log.warning("the run took %.1f s, over its budget of %.0f s (run.budget)", summary.wall_seconds, cfg.run.budget)
        if summary.report_dir is not None:
            judges = {k: v for stage in ("judges", "refusal") for k, v in metrics.get(stage, {}).items() if k in JUDGE_METRICS}
            write_report(summary.report_dir, {**collect_evals(refs), **({"judges": judges} if judges else {}), "run": summary.run_section()})
        if parent_run is not None:
            parent_run.log_metrics({"wall_seconds": summary.wall_seconds, "cache_hits": float(len(hits)), "stages": float(len(plan))})
            if summary.report_dir is not None:  # where a worker's local disk is not where users look
                parent_run.log_artifacts(str(summary.report_dir), "report")
    return summary


# The judges' figures that metrics.json reports (interfaces.md); the stage logs more detail to MLflow.
JUDGE_METRICS = (
    *METRIC_NAMES,
    "refusal_classifier_accuracy",
    "refusal_strmatch_accuracy",
)


def collect_evals(refs: dict[str, ArtifactRef]) -> dict[str, Any]:
    """``{method: {eval set: metrics}}`` from the ``eval/<method>`` outputs of the eval stage."""
    store = ArtifactStore()
    return {
        name.split("/", 1)[1]: json.loads((store.fetch(store.key_of(ref.uri)) / "metrics.json").read_text())
        for name, ref in refs.items()
        if name.startswith("eval/")
    }
