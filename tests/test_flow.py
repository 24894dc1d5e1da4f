"""The `midpo` flow on a real Prefect API: one task run per stage, model stages in child processes under the
`gpu` concurrency limit, the experts side by side, retries that resume, and Prefect's cache on a rerun."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from pathlib import Path

import mlflow
import psutil
import pytest

from midpo.config import load_config
from midpo.pipeline import stages_for
from midpo.storage import ArtifactStore
from midpo.tracking import tracking_uri

pytestmark = pytest.mark.usefixtures("prefect_harness")

STAGES = [s.name for s in stages_for(load_config("tiny-ci"))]


def set_gpu_limit(slots: int) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    from midpo_tasks.stages import GPU, ensure_gpu_limit

    ensure_gpu_limit(slots)
    with get_client(sync_client=True) as client:
        client.update_global_concurrency_limit(GPU, GlobalConcurrencyLimitUpdate(limit=slots))


def flow_run(*overrides: str):
    """The flow in this process on tiny-ci; returns (the flow run's state, {task run name: [task runs]})."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from midpo_flows.pipeline import midpo

    state = midpo(profile="tiny-ci", overrides=list(overrides), return_state=True)
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    by_name: dict[str, list] = {}
    for tr in task_runs:
        by_name.setdefault(tr.name, []).append(tr)
    return state, by_name


def run_flow(*overrides: str):
    """:func:`flow_run` that must succeed: (its summary, {task run name: [task runs]}, the flow run's state)."""
    state, by_name = flow_run(*overrides)
    return state.result(), by_name, state


def slot_taken(task_run) -> datetime:
    """When ``task_run`` got its ``gpu`` slot(s), from the line it logs then."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)  # the run's logs reach the API in batches
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run.id])))
    (taken,) = [entry.timestamp for entry in logs if " slot(s) of " in entry.message]
    return taken


def stage_runs() -> dict[str, object]:
    """The MLflow stage runs of tiny-ci's experiment, by stage name (the newest of each)."""
    mlflow.set_tracking_uri(tracking_uri())
    runs = mlflow.MlflowClient().search_runs(
        [mlflow.get_experiment_by_name(load_config("tiny-ci").run.experiment).experiment_id], "tags.`midpo.stage` != ''", order_by=["start_time ASC"]
    )
    return {r.data.tags["midpo.stage"]: r for r in runs}


def test_flow_runs_the_graph_with_the_experts_side_by_side_and_a_rerun_is_all_cached():
    set_gpu_limit(2)
    summary, tasks, state = run_flow()
    assert state.is_completed()
    methods = {"base", "safety-expert", "helpfulness-expert", "midpo"}
    shared = {"world", "dataset", "reward", "cost", "refusal", "refs", "scores", "dual", "router"}
    assert set(summary["outputs"]) == shared | methods | {f"eval/{m}" for m in methods}
    assert list(summary["run"]["stage_seconds"]) == STAGES and summary["run"]["cache_hits"] == []
    # one task run per stage, tagged gpu where it runs a model; nested MLflow runs under the pipeline run
    assert set(tasks) == set(STAGES) and all(len(v) == 1 for v in tasks.values())
    for stage in stages_for(load_config("tiny-ci")):
        assert set(tasks[stage.name][0].tags) == ({"gpu"} if stage.gpu else set()), stage.name
    runs = stage_runs()
    parent = runs["pipeline"].info.run_id
    assert all(runs[name].data.tags["mlflow.parentRunId"] == parent for name in STAGES)
    # the two experts ran side by side: each took its gpu slot before the other's task run ended
    safety, helpful = tasks["safety-expert"][0], tasks["helpfulness-expert"][0]
    assert slot_taken(safety) < helpful.end_time and slot_taken(helpful) < safety.end_time

    again, tasks, _ = run_flow()
    assert again["run"]["cache_hits"] == STAGES  # every stage: Prefect's cache, or the artifact store for data/register
    states = {name: runs_[0].state_name for name, runs_ in tasks.items()}
    assert {n for n, s in states.items() if s == "Cached"} == set(STAGES) - {"data", "register"}, states
    assert again["outputs"] == summary["outputs"]

    # a cached result is trusted only while its artifacts exist (a retention policy may remove them)
    store = ArtifactStore()
    store.delete(store.key_of(summary["outputs"]["eval/midpo"]))
    third, tasks, _ = run_flow()
    assert sorted(t.state_name for t in tasks["eval-midpo"]) == ["Cached", "Completed"]  # found stale, then run again
    assert "eval-midpo" not in third["run"]["cache_hits"]
    assert store.is_complete(store.key_of(third["outputs"]["eval/midpo"])) and third["outputs"] == summary["outputs"]


def _kill_training_child_at_checkpoint(home: Path, killed: list[int]) -> None:
    """Wait for the safety expert's first checkpoint, then SIGKILL the stage's process (a fork-server child)."""
    deadline = time.time() + 300
    while time.time() < deadline and not killed:
        if any((home / "checkpoints" / "adapters" / "safety-expert").glob("*/checkpoint-*/trainer_state.json")):
            for proc in psutil.Process().children(recursive=True):
                try:
                    parent = proc.parent()
                    if parent is not None and "forkserver" in " ".join(parent.cmdline()):
                        proc.kill()
                        killed.append(proc.pid)
                except psutil.NoSuchProcess:
                    pass
        time.sleep(0.05)


def test_a_killed_training_child_is_retried_and_resumes_from_its_checkpoint(midpo_home):
    set_gpu_limit(1)  # one model stage at a time: the only fork-server child at the first checkpoint trains the safety expert
    killed: list[int] = []
    killer = threading.Thread(target=_kill_training_child_at_checkpoint, args=(midpo_home, killed), daemon=True)
    killer.start()
    summary, tasks, state = run_flow("training.save_steps=2", "training.epochs=4")
    killer.join(timeout=1)
    assert killed, "the safety expert's child was never killed"
    assert state.is_completed()
    (task_run,) = tasks["safety-expert"]
    assert task_run.run_count == 2 and task_run.state_name == "Completed"  # failed once (BrokenProcessPool), retried
    runs = stage_runs()
    resumed = runs["safety-expert"].data.metrics["safety-expert.resumed_from_step"]
    assert resumed >= 2 and resumed % 2 == 0  # the retry started from a checkpoint, not from step 0
    assert runs["safety-expert"].data.metrics["safety-expert.steps"] > resumed
    # with one slot, the experts never trained at the same time
    safety, helpful = runs["safety-expert"].info, runs["helpfulness-expert"].info
    assert safety.end_time <= helpful.start_time or helpful.end_time <= safety.start_time
    assert summary["run"]["cache_hits"] == []


def test_only_transient_failures_are_retried():
    from concurrent.futures.process import BrokenProcessPool

    from botocore.exceptions import ClientError, EndpointConnectionError
    from midpo_tasks.stages import _retry_transient

    from midpo.config import ConfigError
    from midpo.data.prepare import DataError

    class Failed:  # what Prefect hands retry_condition_fn: a Failed state holding the exception
        def __init__(self, exc):
            self.data = exc

    def s3_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    def wrapped(inner: BaseException) -> RuntimeError:
        try:
            raise inner
        except BaseException as e:
            try:
                raise RuntimeError("mlflow: failed to upload") from e
            except RuntimeError as outer:
                return outer

    transient = [BrokenProcessPool("child killed"), ConnectionResetError(), EndpointConnectionError(endpoint_url="http://s3"),
                 s3_error("SlowDown", 503), s3_error("InternalError", 500), wrapped(ConnectionResetError())]
    permanent = [ConfigError("bad key"), DataError("bad file"), s3_error("AccessDenied", 403), s3_error("NoSuchBucket", 404), ValueError("bug")]
    assert all(_retry_transient(None, None, Failed(e)) for e in transient)
    assert not any(_retry_transient(None, None, Failed(e)) for e in permanent)


def test_ctrl_c_ends_midpo_run_quickly_and_leaves_no_process(tmp_path):
    """Ctrl-C in a terminal (SIGINT to the foreground process group) during `midpo run`: the run stops its
    stage's child, records the crash, stops its own Prefect server and exits 130, with nothing retried."""
    import os
    import signal
    import subprocess
    import sys

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))} | {"MIDPO_HOME": str(home)}
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        run = subprocess.Popen([sys.executable, "-m", "midpo.cli", "run", "--profile", "tiny-ci"], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while "stage 5/14: judges" not in log.read_text(errors="replace"):  # a model stage is running in its child
            assert run.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(run.pid, signal.SIGINT)
        t0 = time.time()
        assert run.wait(timeout=60) == 130, log.read_text()[-3000:]
        seconds = time.time() - t0
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    assert "interrupted: stopping" in text and "Retry 1/" not in text
    assert seconds < 30, seconds

    def ours(proc: psutil.Process) -> bool:
        try:
            environ = proc.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            return False
        return environ.get("MIDPO_HOME") == str(home) or environ.get("PREFECT_HOME") == str(home / "prefect")

    deadline = time.time() + 10  # the fork server exits once it reads its parent's end of file
    while (left := [p.info["cmdline"] for p in psutil.process_iter(["cmdline"]) if ours(p)]) and time.time() < deadline:
        time.sleep(0.2)
    assert not left


def test_ctrl_c_while_waiting_on_children_stops_them():
    """In-process work (midpo compare, a dry run's stages) waits on child jobs in the main thread: the
    children ignore Ctrl-C, so the interrupt must stop them rather than wait for their jobs to end."""
    import _thread

    from midpo import parallel

    timer = threading.Timer(12.0, _thread.interrupt_main)  # after the fork server's imports: the children sleep
    timer.start()
    t0 = time.time()
    try:
        with pytest.raises(KeyboardInterrupt):
            parallel.run_in_children(time.sleep, {"a": (60,), "b": (60,)}, workers=2)
        assert time.time() - t0 < 30  # not the children's 60 s
        assert parallel.stopping()
    finally:
        timer.cancel()
        parallel._stopping.clear()  # this test process goes on running children
