"""The pipeline as one ordered list of stages (pipeline.md), run in-process by ``midpo run``.

A stage is a plain function: its own config section and the references produced so far in, output
references and small metrics out. Outputs land under the artifact root keyed by their inputs' versions,
so a rerun with unchanged inputs is a cache hit. Later issues append stages to :data:`STAGES`;
:data:`PLANNED` names those that do not exist yet, and ``midpo run`` says so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from midpo import tracking
from midpo.config import ConfigError, DataConfig, MidpoConfig
from midpo.data.prepare import prepare
from midpo.storage import ArtifactRef, ArtifactStore, midpo_home
from midpo.world.artifact import build_world
from midpo.world.config import WorldConfig

log = logging.getLogger(__name__)


@dataclass
class StageOutput:
    outputs: dict[str, ArtifactRef]
    metrics: dict[str, float] = field(default_factory=dict)
    cache_hit: bool = False


@dataclass(frozen=True)
class Stage:
    name: str
    section: str  # the only config section the stage receives; a profile without it skips the stage
    run: Callable[[Any, dict[str, ArtifactRef], bool], StageOutput]  # (section, inputs, dry_run)


def world_stage(cfg: WorldConfig, inputs: dict[str, ArtifactRef], dry_run: bool = False) -> StageOutput:
    ref, summary, hit = build_world(cfg, ArtifactStore(), dry_run)
    dual = summary.get("dual", {}).get("label", {})
    return StageOutput({"world": ref}, {f"dual_label_{k}": float(v) for k, v in dual.items()}, hit)


def data_stage(cfg: DataConfig, inputs: dict[str, ArtifactRef], dry_run: bool = False) -> StageOutput:
    prepared = prepare(resolve_sources(cfg, inputs), dry_run=dry_run)
    counts = {
        f"{name}_{split}_pairs": float(by_split[split]["total"])
        for name, by_split in prepared.meta.get("subsets", {}).items()
        for split in by_split
    }
    excluded = {f"excluded_{reason}": float(n) for reason, n in prepared.meta.get("exclusions", {}).items()}
    return StageOutput({"dataset": prepared.ref}, {**counts, **excluded}, prepared.cache_hit)


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


STAGES: list[Stage] = [Stage("world", "world", world_stage), Stage("data", "data", data_stage)]
PLANNED = ["base", "judges", "experts", "dual", "router", "moe", "eval", "register"]


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
    seconds = time.perf_counter() - t0
    budget = cfg.run.stage_budgets.get(stage.name)
    if budget is not None and seconds > budget:
        log.warning("stage %s took %.1f s, over its budget of %.1f s", stage.name, seconds, budget)
    return out


def run_pipeline(cfg: MidpoConfig, report_dir: Path | None = None, dry_run: bool = False, until: str | None = None) -> RunSummary:
    """Run the profile's stages in order (up to ``until``); ``dry_run`` only resolves the plan and the cache hits.

    With a ``report_dir``, its ``metrics.json`` gets the ``run`` section of interfaces.md.
    """
    start = time.perf_counter()
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
        summary.report_dir.mkdir(parents=True, exist_ok=True)
        (summary.report_dir / "metrics.json").write_text(json.dumps({"run": summary.run_section()}, indent=2))
    return summary
