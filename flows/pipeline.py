"""The ``midpo`` flow: the stage graph of ``midpo.pipeline.STAGES``, one task run per stage.

The same scheduler as ``midpo run`` (``midpo.pipeline.run_graph``): a stage starts once its upstream stages
are done, ``run.stage_workers`` at a time. Deployed as ``midpo/full-pipeline`` (prefect.yaml):
``prefect deployment run midpo/full-pipeline``.
"""

from __future__ import annotations

from midpo_tasks.stages import run_stage
from prefect import flow

from midpo import tracking
from midpo.config import load_config
from midpo.pipeline import Stage, apply_runtime, run_graph, stages_for
from midpo.storage import ArtifactRef


@flow(name="midpo", log_prints=False)
def midpo(profile: str = "tiny", overrides: list[str] | None = None) -> dict[str, str]:
    """Run the pipeline on ``profile``; returns the URI of every output artifact."""
    cfg = load_config(profile, overrides or [])
    apply_runtime(cfg.run)
    plan = stages_for(cfg)
    with tracking.stage_run(cfg.run.experiment, "pipeline", params={"profile": cfg.profile}) as mlflow:
        parent = mlflow.active_run().info.run_id

        def run_one(stage: Stage, inputs: dict[str, ArtifactRef]):
            return run_stage(stage, cfg, inputs, parent)

        done = run_graph(plan, run_one, cfg.run.stage_workers)
    return {name: ref.uri for stage in plan for name, ref in done[stage.name].outputs.items()}
