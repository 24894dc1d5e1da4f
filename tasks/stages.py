"""One Prefect task runs one pipeline stage; the logic lives in ``midpo.pipeline``.

A stage that runs a model (``Stage.gpu``) runs in a child process the task launches, holding a slot of the
global concurrency limit ``gpu`` (strict: a missing limit is an error, never a silent free-for-all). When
the child dies (killed, out of memory, a lost spot machine), the task fails and Prefect retries it; the
retry resumes from the stage's last checkpoint. A dying flow process, by contrast, ends Crashed and is not
retried. Only transient failures are retried (``midpo.transient``): a config or data error fails at once.

The cache key of a task run is the stage, the URIs and versions of its inputs and its config section, the
same things its artifacts are keyed by: a rerun with unchanged inputs finds the task cached and runs
nothing. A cached result is trusted only while its artifacts exist (a retention policy may have removed
them); otherwise the stage runs again.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from prefect import get_run_logger, task
from prefect.concurrency.sync import concurrency
from prefect.tasks import exponential_backoff

from midpo.config import ConfigError, MidpoConfig
from midpo.data.schema import content_hash
from midpo.launch import launch_stage, launches, processes, section_of
from midpo.parallel import available_cores, run_in_child, stopping
from midpo.pipeline import Stage, StageOutput, execute_stage
from midpo.storage import ArtifactRef, ArtifactStore, artifact_root
from midpo.transient import is_transient

log = logging.getLogger(__name__)

GPU = "gpu"  # the tag of model stages' task runs and the name of the global concurrency limit sizing them
# Never served from Prefect's cache: `data` reads sources outside the artifact store (new files land there),
# `register` points a registry alias (a side effect every run must have).
UNCACHED = ("data", "register")


def stage_cache_key(_context: Any, parameters: dict[str, Any]) -> str | None:
    stage: Stage = parameters["stage"]
    if stage.name in UNCACHED:
        return None
    section = section_of(stage, parameters["cfg"])
    inputs = {name: [ref.uri, ref.version] for name, ref in sorted(parameters["inputs"].items())}
    return f"midpo-{stage.name}-{content_hash({'inputs': inputs, 'config': dataclasses.asdict(section), 'root': artifact_root()})[:24]}"


def _retry_transient(_task: Any, _task_run: Any, state: Any) -> bool:
    exc = state.data
    if not isinstance(exc, BaseException) or stopping():  # never after Ctrl-C
        return False
    transient = is_transient(exc)
    if not transient:
        log.error("not retrying: %s is not a transient failure", type(exc).__name__)
    return transient


def gpu_slots() -> int:
    """The size of the ``gpu`` concurrency limit of the current Prefect API."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(GPU).limit


def ensure_gpu_limit(slots: int) -> int:
    """Create the ``gpu`` limit with ``slots`` slots where it does not exist (``midpo run``'s own API); an
    existing one (a stack's, a cluster's) is left as its operator sized it. Returns its size."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(GPU).limit
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU, limit=slots))
            return slots


# Retry transient failures only (S3 5xx, a reset connection): the stages' and the retrain tasks' policy.
TRANSIENT_RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=5),  # 5, 10, 20 s
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": _retry_transient,
}


@task(
    task_run_name="{stage.name}",
    **TRANSIENT_RETRIES,
    cache_key_fn=stage_cache_key,
    persist_result=True,
)
def run_stage(stage: Stage, cfg: MidpoConfig, inputs: dict[str, ArtifactRef], parent_run_id: str | None = None) -> StageOutput:
    """The stage on its upstream stages' outputs, tracked as an MLflow run nested under ``parent_run_id``;
    a model stage in a child process with its share of the cores, or on several processes under
    ``accelerate launch`` (``run.launch``) holding a slot per process."""
    if not stage.gpu:
        return execute_stage(stage, cfg, inputs, parent_run_id=parent_run_id)
    limit = gpu_slots()
    slots = processes(cfg.run.launch) if launches(cfg, stage) else 1  # a launch holds a slot per process
    if slots > limit:
        raise ConfigError(f"stage {stage.name} launches {slots} processes, but the {GPU!r} concurrency limit has {limit} slot(s): "
                          f"raise it (prefect gcl update {GPU} --limit {slots}) or lower run.launch.num_processes")
    asked = time.monotonic()
    with concurrency(GPU, occupy=slots, strict=True):
        # in the task run's log: when the stage got its slots, the start of its time on the hardware
        get_run_logger().info("%s holds %d %r slot(s) of %d after %.1f s", stage.name, slots, GPU, limit, time.monotonic() - asked)
        threads = cfg.run.torch_threads or max(1, available_cores() // limit)
        if launches(cfg, stage):
            return launch_stage(stage, cfg, inputs, parent_run_id, threads=threads * slots)
        return run_in_child(execute_stage, stage, cfg, inputs, False, parent_run_id, threads=threads)


def _complete(out: StageOutput) -> bool:
    store = ArtifactStore()
    return all(store.is_complete(store.key_of(ref.uri)) for ref in out.outputs.values())


def execute(stage: Stage, cfg: MidpoConfig, inputs: dict[str, ArtifactRef], parent_run_id: str | None) -> StageOutput:
    """``midpo.pipeline.StageExecutor`` as a task run of :func:`run_stage`, tagged ``gpu`` where the stage is.
    A task served from Prefect's cache counts as a cache hit."""
    task_ = run_stage.with_options(tags={GPU} if stage.gpu else set())
    state = task_(stage, cfg, inputs, parent_run_id, return_state=True)
    out: StageOutput = state.result()
    if state.name != "Cached":
        return out
    if not _complete(out):
        log.warning("stage %s: its cached result names artifacts that no longer exist; running it again", stage.name)
        return task_.with_options(refresh_cache=True)(stage, cfg, inputs, parent_run_id)
    return dataclasses.replace(out, cache_hit=True, seconds=None)  # the time it took to find, not to make
