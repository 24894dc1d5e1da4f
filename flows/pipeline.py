"""The ``midpo`` flow: the stage graph of ``midpo.pipeline.STAGES``, one task run per stage.

``run_pipeline`` schedules the graph (a stage starts once its upstream stages are done; the two experts
side by side); each stage runs as a task run of ``midpo_tasks.stages.run_stage``. ``midpo run`` calls this
flow on its own Prefect API; deployed as ``midpo/full-pipeline`` (prefect.yaml) it runs on a worker:
``prefect deployment run midpo/full-pipeline``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from midpo_tasks.stages import execute
from prefect import flow

from midpo.config import load_config
from midpo.pipeline import default_report_dir, run_pipeline
from midpo.storage import use_standard_s3_retries


@flow(name="midpo")
def midpo(profile: str = "tiny", overrides: list[str] | None = None, report_dir: str | None = None) -> dict[str, Any]:
    """Run the pipeline on ``profile`` (a name or a YAML file) with ``overrides`` (``key=value``); the
    report goes to ``report_dir`` (default under ``$MIDPO_HOME/reports``) and into the MLflow parent run.
    Returns the run summary: stage seconds, cache hits, the URI of every output, the report folder."""
    use_standard_s3_retries()
    cfg = load_config(profile, overrides or [])
    summary = run_pipeline(cfg, Path(report_dir) if report_dir else default_report_dir(cfg.profile), execute=execute)
    return summary.to_dict()
