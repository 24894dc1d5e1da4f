"""The ``midpo`` flow: the stages of ``midpo.pipeline.STAGES`` in order, one task each.

Deployed as ``midpo/full-pipeline`` (prefect.yaml): ``prefect deployment run midpo/full-pipeline``.
"""

from __future__ import annotations

from midpo_tasks.stages import run_stage
from prefect import flow

from midpo import tracking
from midpo.config import load_config
from midpo.pipeline import STAGES


@flow(name="midpo", log_prints=False)
def midpo(profile: str = "tiny", overrides: list[str] | None = None) -> dict[str, str]:
    """Run the pipeline on ``profile``; returns the URI of every output artifact."""
    cfg = load_config(profile, overrides or [])
    refs = {}
    with tracking.stage_run(cfg.run.experiment, "pipeline", params={"profile": cfg.profile}):
        for stage in STAGES:
            refs.update(run_stage(stage, cfg, refs).outputs)
    return {name: ref.uri for name, ref in refs.items()}
