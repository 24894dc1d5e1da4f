"""The pipeline as one ordered list of stages (pipeline.md), run in-process by ``midpo run``.

A stage is a plain function: its own config section and the references produced so far in, output
references and small metrics out. Outputs land under the artifact root keyed by their inputs' versions,
so a rerun with unchanged inputs is a cache hit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from midpo import stages, tracking
from midpo.config import MidpoConfig, RunConfig
from midpo.eval.report import write_report
from midpo.judges.score import METRIC_NAMES
from midpo.stages import StageOutput
from midpo.storage import ArtifactRef, ArtifactStore, midpo_home

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    name: str
    section: str  # the only config section the stage receives; a profile without it skips the stage
    run: Callable[[Any, dict[str, ArtifactRef], bool], StageOutput]  # (section, inputs, dry_run)


STAGES: list[Stage] = [
    Stage("world", "world", stages.world_stage),
    Stage("data", "data", stages.data_stage),
    Stage("base", "base", stages.base_stage),
    Stage("judges", "judges", stages.judges_stage),
    Stage("experts", "training", stages.experts_stage),
    Stage("dual", "router", stages.dual_stage),
    Stage("router", "router", stages.router_stage),
    Stage("moe", "router", stages.moe_stage),
    Stage("eval", "eval", stages.eval_stage),
    Stage("register", "registry", stages.register_stage),
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


def default_report_dir(profile: str) -> Path:
    return midpo_home() / "reports" / f"{profile}-{time.strftime('%Y%m%d-%H%M%S')}"


def apply_runtime(run: RunConfig) -> None:
    """Process-wide settings of a profile (torch threads) before any stage computes; child processes
    (the experts) inherit them through OMP_NUM_THREADS."""
    if run.torch_threads:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(run.torch_threads)
        torch.set_num_threads(run.torch_threads)


def stages_for(cfg: MidpoConfig, until: str | None = None) -> list[Stage]:
    """The stages this profile runs, in order: those whose config section it has, up to ``until``."""
    names = [s.name for s in STAGES]
    if until is not None and until not in names:
        raise ValueError(f"unknown stage {until!r}: one of {', '.join(names)}")
    last = names.index(until) if until else len(names) - 1
    return [s for s in STAGES[: last + 1] if getattr(cfg, s.section) is not None]


def execute_stage(stage: Stage, cfg: MidpoConfig, inputs: dict[str, ArtifactRef], dry_run: bool = False) -> StageOutput:
    """Run one stage on its own config section, tracked as an MLflow run (nested under an active parent)."""
    section = getattr(cfg, stage.section)
    if dry_run:
        return stage.run(section, dict(inputs), True)
    t0 = time.perf_counter()
    with tracking.stage_run(cfg.run.experiment, stage.name, params={stage.section: dataclasses.asdict(section)}) as mlflow:
        out = stage.run(section, dict(inputs), False)
        mlflow.log_metrics({**out.metrics, "cache_hit": float(out.cache_hit)})
        for name, uri in out.curves.items():  # on a cache hit too: the history is part of the artifact
            tracking.log_curves(cfg.run.experiment, name, uri)
    seconds = time.perf_counter() - t0
    budget = cfg.run.stage_budgets.get(stage.name)
    if budget is not None and seconds > budget:
        log.warning("stage %s took %.1f s, over its budget of %.1f s", stage.name, seconds, budget)
    return out


def run_pipeline(cfg: MidpoConfig, report_dir: Path | None = None, dry_run: bool = False, until: str | None = None) -> RunSummary:
    """Run the profile's stages in order (up to ``until``); ``dry_run`` only resolves the plan and the cache hits.

    With a ``report_dir``, the report goes there: metrics.json (interfaces.md), report.md and plots.
    """
    start = time.perf_counter()
    apply_runtime(cfg.run)
    refs: dict[str, ArtifactRef] = {}
    seconds: dict[str, float] = {}
    metrics: dict[str, dict[str, float]] = {}
    hits: list[str] = []
    stages = stages_for(cfg, until)
    parent = nullcontext() if dry_run else tracking.stage_run(cfg.run.experiment, "pipeline", params={"profile": cfg.profile})
    with parent:
        for i, stage in enumerate(stages, 1):
            log.info("stage %d/%d: %s", i, len(stages), stage.name)
            t0 = time.perf_counter()
            out = execute_stage(stage, cfg, refs, dry_run)
            seconds[stage.name] = time.perf_counter() - t0
            refs.update(out.outputs)
            metrics[stage.name] = out.metrics
            if out.cache_hit:
                hits.append(stage.name)
    summary = RunSummary(cfg.profile, refs, seconds, hits, metrics, time.perf_counter() - start, None if dry_run else report_dir)
    if summary.report_dir is not None:
        judges = {k: v for k, v in metrics.get("judges", {}).items() if k in JUDGE_METRICS}
        write_report(summary.report_dir, {**collect_evals(refs), **({"judges": judges} if judges else {}), "run": summary.run_section()})
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
