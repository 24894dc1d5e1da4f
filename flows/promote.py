"""The ``midpo-promote`` flow: the promotion gate of ``midpo.promote`` as a Prefect flow (docs/lifecycle.md).

Deployed as ``midpo-promote/promote`` (prefect.yaml): ``prefect deployment run midpo-promote/promote``
(default candidate: the ``challenger`` alias), ``-p version=3``, ``-p run_id=<MLflow run>``, ``-p force=true``
or ``-p rollback=true``. A refusal ends the flow run Completed with ``decision: refused`` in its result and
log (it is a decision, not a failure); a missing version or a broken evaluation fails it.

The gate's evaluations run models: they run as the task ``gate-eval``, which holds a slot of the global
concurrency limit ``gpu`` (strict, as the pipeline's model stages do), so a promotion never shares a GPU
slot with a running pipeline.
"""

from __future__ import annotations

from typing import Any

from midpo_tasks.stages import GPU
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency

from midpo import promote as gate
from midpo.config import load_config
from midpo.storage import ArtifactRef


@task(task_run_name="gate-eval", tags={GPU}, cache_policy=NO_CACHE)
def evaluate_gate(g: gate.Gate, models: dict[str, ArtifactRef]) -> gate.Results:
    """:func:`midpo.promote.evaluate` holding a ``gpu`` slot (cache hits included: finding them is cheap)."""
    with concurrency(GPU, occupy=1, strict=True):
        return gate.evaluate(g, models)


@flow(name="midpo-promote", log_prints=False)
def promote(
    profile: str = "tiny",
    overrides: list[str] | None = None,
    version: int | None = None,
    run_id: str | None = None,
    force: bool = False,
    rollback: bool = False,
) -> dict[str, Any]:
    """Gate the candidate (``version``, the version ``run_id`` registered, else ``challenger``) against the
    champion on ``profile``'s gate set, or roll ``champion`` back; returns the decision (``decision``,
    ``reason``, ``rows``, ``champion_before``/``champion_after``, ``run_id`` of its MLflow record)."""
    gate.check_request(version, run_id, force, rollback)
    cfg = load_config(profile, overrides or [])
    decision = gate.rollback(cfg) if rollback else gate.promote(cfg, version, run_id, force, evaluator=evaluate_gate)
    logger = get_run_logger()
    (logger.warning if decision.decision == "refused" else logger.info)("%s", decision.report())
    return decision.to_dict()
