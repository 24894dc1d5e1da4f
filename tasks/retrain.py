"""The Prefect tasks of the ``midpo-retrain`` flow: thin wrappers over :mod:`midpo.retrain`.

Never served from Prefect's cache (each poll must look at the prefix and the ledger as they are now);
transient failures (S3 5xx, a reset connection) are retried like the pipeline's stages.
"""

from __future__ import annotations

from typing import Any

from midpo_tasks.stages import TRANSIENT_RETRIES
from prefect import task
from prefect.cache_policies import NO_CACHE

from midpo import retrain
from midpo.config import load_config


@task(name="ingest", **TRANSIENT_RETRIES, cache_policy=NO_CACHE)
def ingest(prefix: str, profile: str, overrides: list[str]) -> dict[str, Any]:
    """New files under ``prefix``: validated under the profile's data rules, quarantined or merged into the
    pool (``IngestResult.to_dict``)."""
    return retrain.ingest(prefix, load_config(profile, overrides).data).to_dict()


@task(name="plan", **TRANSIENT_RETRIES, cache_policy=NO_CACHE)
def plan(prefix: str, profile: str, overrides: list[str], force: bool) -> dict[str, Any]:
    """Whether the pool changed the profile's dataset version (a dry run of the data stage)."""
    return retrain.plan(prefix, profile, overrides, force=force).to_dict()


@task(name="record", **TRANSIENT_RETRIES, cache_policy=NO_CACHE)
def record(prefix: str, decided: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """What the pipeline trained on, into the ledger: the next poll compares against it."""
    return retrain.record(prefix, retrain.RetrainPlan(**decided), summary)
