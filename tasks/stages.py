"""One Prefect task runs one pipeline stage; the logic lives in ``midpo.pipeline``."""

from __future__ import annotations

from prefect import task

from midpo.config import MidpoConfig
from midpo.pipeline import Stage, StageOutput, execute_stage
from midpo.storage import ArtifactRef

GPU_TAG = "gpu"  # stages that train or run a model; a concurrency limit on the tag sizes them to the GPU slots


@task(retries=2, retry_delay_seconds=[5, 30], task_run_name="{stage.name}")
def run_stage(stage: Stage, cfg: MidpoConfig, inputs: dict[str, ArtifactRef], parent_run_id: str | None = None) -> StageOutput:
    """The stage on its upstream stages' outputs, tracked as an MLflow run nested under ``parent_run_id``."""
    return execute_stage(stage, cfg, inputs, parent_run_id=parent_run_id)


def execute(stage: Stage, cfg: MidpoConfig, inputs: dict[str, ArtifactRef], parent_run_id: str | None) -> StageOutput:
    """``midpo.pipeline.StageExecutor`` as a task run of :func:`run_stage`, tagged ``gpu`` where the stage is."""
    return run_stage.with_options(tags={GPU_TAG} if stage.gpu else set())(stage, cfg, inputs, parent_run_id)
