"""The ``midpo`` flow: the stage graph of ``midpo.pipeline.STAGES``, one task run per stage.

It is ``midpo run`` with each stage executed as a Prefect task (``midpo_tasks.stages.execute``): the same
scheduler (``midpo.pipeline.run_graph``), the same MLflow parent run, the same artifacts and cache hits. Deployed as ``midpo/full-pipeline`` (prefect.yaml):
``prefect deployment run midpo/full-pipeline``.
"""

from __future__ import annotations

from midpo_tasks.stages import execute
from prefect import flow

from midpo.config import load_config
from midpo.pipeline import run_pipeline


@flow(name="midpo", log_prints=False)
def midpo(profile: str = "tiny", overrides: list[str] | None = None) -> dict[str, str]:
    """Run the pipeline on ``profile``; returns the URI of every output artifact."""
    summary = run_pipeline(load_config(profile, overrides or []), execute=execute)
    return {name: ref.uri for name, ref in summary.outputs.items()}
