"""The ``midpo-retrain`` flow: ingest new preference files from a watched prefix, and run the ``midpo`` flow
as a subflow only when the profile's dataset version changed (docs/lifecycle.md).

Deployed as ``midpo-retrain/retrain`` (prefect.yaml) with a cron schedule that polls the prefix; on demand:
``prefect deployment run midpo-retrain/retrain`` or ``midpo retrain --prefix URI``.
"""

from __future__ import annotations

from typing import Any

from midpo_flows.pipeline import midpo
from midpo_tasks import retrain as tasks
from prefect import flow

from midpo.config import load_config
from midpo.retrain import summarize


@flow(name="midpo-retrain")
def midpo_retrain(
    prefix: str, profile: str = "tiny", overrides: list[str] | None = None, force: bool = False, report_dir: str | None = None
) -> dict[str, Any]:
    """Poll ``prefix`` (``s3://bucket/prefix/``, a folder or ``file://``) once; retrain ``profile`` when the new
    data changed its dataset version (``force``: run anyway; every unchanged stage is a cache hit). Returns a
    summary: new, merged and quarantined files, the pool and dataset versions, whether it ran and why."""
    overrides = list(overrides or [])
    ingested = tasks.ingest(prefix, profile, overrides)
    decided = tasks.plan(prefix, profile, overrides, force)
    summary = None
    if decided["run"]:
        summary = midpo(profile=profile, overrides=decided["overrides"], report_dir=report_dir)
        tasks.record(prefix, decided, summary)
    registry = load_config(profile, overrides).registry
    return summarize(ingested, decided, summary, registry.model_name if registry else "midpo")
