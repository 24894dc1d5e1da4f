"""Training stages under `accelerate launch` (run.launch, midpo.launch): two real processes on the CPU over gloo
with infra/accelerate/ddp.yaml, in-process and through the flow. What a GPU machine adds (NCCL, ZeRO-3, FSDP)
is not run here (docs/cluster.md)."""

from __future__ import annotations

import _thread
import json
import os
import threading
import time

import mlflow
import psutil
import pytest
import torch
from safetensors.torch import load_file

from midpo.config import ConfigError, load_config
from midpo.launch import LaunchFailed, launch_stage
from midpo.pipeline import STAGES, run_pipeline
from midpo.storage import ArtifactStore
from midpo.tracking import tracking_uri
from midpo.transient import is_transient

pytestmark = pytest.mark.shared_home  # one MIDPO_HOME: the world, base, judges and passes are built once

DDP = "infra/accelerate/ddp.yaml"


def launched(*stages: str, processes: int = 2) -> list[str]:
    return [f"run.launch.config_file={DDP}", f"run.launch.num_processes={processes}", f"run.launch.stages=[{', '.join(stages)}]"]


EXPERTS = launched("safety-expert", "helpfulness-expert")  # launched together or not at all (one effective batch)


def expert(overrides: list[str]) -> tuple[str, dict[str, torch.Tensor], dict]:
    """Train (or find) tiny-ci's safety expert in-process: (version, adapter weights, midpo_adapter.json)."""
    summary = run_pipeline(load_config("tiny-ci", overrides), None, until="safety-expert")
    store = ArtifactStore()
    folder = store.fetch(store.key_of(summary.outputs["safety-expert"].uri))
    return summary.outputs["safety-expert"].version, load_file(str(folder / "adapter_model.safetensors")), json.loads((folder / "midpo_adapter.json").read_text())


def rank_processes() -> list[psutil.Process]:
    """The ranks of this module's launches, orphans included (they are nobody's children)."""
    found = []
    for proc in psutil.process_iter():
        try:
            cmd = proc.cmdline()
            # not the launcher, which names the ranks' command too
            if cmd[-3:-1] == ["midpo.launch", "rank"] and "accelerate" not in cmd and proc.environ().get("MIDPO_HOME") == os.environ["MIDPO_HOME"]:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            pass
    return found


def no_rank_left(seconds: float = 15) -> bool:
    deadline = time.time() + seconds
    while rank_processes() and time.time() < deadline:
        time.sleep(0.2)
    return rank_processes() == []


def test_two_launched_processes_train_the_adapter_one_process_trains_on_their_global_batch():
    """DDP over 2 processes at 4 pairs each takes the same steps as one process at 8: the same adapter up to
    float rounding. Only the main rank publishes, tracks and mirrors checkpoints; the version records the
    process count."""
    mirrored = ["training.sync_checkpoints=true", "training.save_steps=2"]  # rank 0 alone publishes them, mid-training
    version, two, meta = expert([*EXPERTS, "training.per_device_batch_size=4", *mirrored])
    one_version, one, one_meta = expert(["training.per_device_batch_size=8"])
    assert meta["metrics"]["processes"] == 2 and one_meta["metrics"]["processes"] == 1
    assert meta["training"]["processes"] == 2 and "processes" not in one_meta["training"]  # one process keeps old versions valid
    assert meta["metrics"]["steps"] == one_meta["metrics"]["steps"] == 5  # 40 pairs, global batch 8
    assert version != one_version
    assert two.keys() == one.keys() and len(two) == 4  # lora_A and lora_B of down_proj in both layers
    for name in two:
        assert torch.allclose(two[name], one[name], rtol=0, atol=1e-6), (name, (two[name] - one[name]).abs().max())
    assert any(not torch.equal(one[name], torch.zeros_like(one[name])) for name in one)  # it trained
    store = ArtifactStore()
    assert store.is_complete(f"checkpoints/adapters/safety-expert/{version}/checkpoint-4")  # 2 was pruned: the newest 2 stay

    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.get_experiment_by_name(load_config("tiny-ci").run.experiment)
    runs = mlflow.MlflowClient().search_runs([experiment.experiment_id], "tags.`midpo.stage` = 'safety-expert'")
    assert sorted(r.data.metrics["safety-expert.processes"] for r in runs) == [1.0, 2.0]  # one stage run per launch


def test_an_error_on_the_ranks_reaches_the_caller_as_itself():
    """A config error inside the launched stage is re-raised as that error (so it is not retried); a config
    file that does not exist fails before any process starts."""
    cfg = load_config("tiny-ci", [*EXPERTS, "training.lora.target_modules=[no_such_module]"])
    summary = run_pipeline(load_config("tiny-ci"), None, until="passes")
    stage = next(s for s in STAGES if s.name == "safety-expert")
    with pytest.raises(ValueError, match="no_such_module") as failure:
        launch_stage(stage, cfg, summary.outputs, None)
    assert not is_transient(failure.value)

    missing = load_config("tiny-ci", [*EXPERTS, "run.launch.config_file=infra/accelerate/nope.yaml"])
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        launch_stage(stage, missing, summary.outputs, None)


def test_a_launched_baselines_stage_merges_once_on_the_main_process():
    """merge-half in a launched stage: the main process merges the launched experts (the others wait), so
    the merged adapter names the experts the MoE uses."""
    summary = run_pipeline(load_config("tiny-ci", [*launched("safety-expert", "helpfulness-expert", "baselines"), "training.baselines=[merge-half]"]), None, until="baselines")
    store = ArtifactStore()
    merged = store.manifest(store.key_of(summary.outputs["merge-half"].uri))["metadata"]
    assert merged["members"] == {m: summary.outputs[m].version for m in ("safety-expert", "helpfulness-expert")}
    for name in ("safety-expert", "helpfulness-expert"):
        assert store.manifest(store.key_of(summary.outputs[name].uri))["metadata"]["metrics"]["processes"] == 2
    with pytest.raises(ConfigError, match="together or none"):  # experts and baselines on different batches
        load_config("tiny-ci", [*EXPERTS, "training.baselines=[merge-half]"])


def test_a_killed_rank_fails_the_launch_as_transient_and_leaves_no_process(midpo_home):
    cfg = load_config("tiny-ci", [*EXPERTS, "training.seed=7", "training.epochs=40"])  # a new version: it trains
    summary = run_pipeline(load_config("tiny-ci"), None, until="passes")
    stage = next(s for s in STAGES if s.name == "safety-expert")
    killed: list[int] = []

    def kill_rank_1_at_the_first_checkpoint() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if any((midpo_home / "checkpoints" / "adapters" / "safety-expert").glob("*/checkpoint-*/trainer_state.json")):
                for proc in rank_processes():
                    try:
                        if proc.environ().get("RANK") == "1":
                            proc.kill()
                            killed.append(proc.pid)
                    except psutil.NoSuchProcess:
                        pass
            time.sleep(0.05)

    killer = threading.Thread(target=kill_rank_1_at_the_first_checkpoint, daemon=True)
    killer.start()
    with pytest.raises(LaunchFailed) as failure:
        launch_stage(stage, cfg, summary.outputs, None)
    killer.join(timeout=1)
    assert killed and is_transient(failure.value)
    assert no_rank_left()


def test_ctrl_c_while_a_launch_runs_stops_every_rank():
    from midpo import parallel

    cfg = load_config("tiny-ci", [*EXPERTS, "training.seed=8", "training.epochs=50"])
    summary = run_pipeline(load_config("tiny-ci"), None, until="passes")
    stage = next(s for s in STAGES if s.name == "safety-expert")
    seen: list[int] = []

    def interrupt_once_ranks_run() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and len(rank_processes()) < 2:
            time.sleep(0.2)
        seen.extend(p.pid for p in rank_processes())
        _thread.interrupt_main()

    watcher = threading.Thread(target=interrupt_once_ranks_run, daemon=True)
    watcher.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            launch_stage(stage, cfg, summary.outputs, None)
        watcher.join(timeout=1)
        assert len(seen) == 2
        assert no_rank_left()
    finally:
        parallel._stopping.clear()  # this test process goes on running children


@pytest.mark.usefixtures("prefect_harness")
def test_the_flow_launches_the_experts_and_the_router_holding_a_slot_per_process():
    from test_flow import flow_run, set_gpu_limit, stage_runs

    overrides = launched("safety-expert", "helpfulness-expert", "router")

    set_gpu_limit(1)  # a launch of 2 processes cannot hold 2 slots of 1: a config error, not retried
    state, tasks = flow_run(*overrides)
    assert state.is_failed()
    assert tasks["safety-expert"][0].run_count == 1
    with pytest.raises(ConfigError, match="launches 2 processes, but the 'gpu' concurrency limit has 1 slot"):
        state.result()

    set_gpu_limit(2)
    state, tasks = flow_run(*overrides)
    assert state.is_completed()
    summary = state.result()
    store = ArtifactStore()
    for name in ("safety-expert", "helpfulness-expert", "router"):
        meta = store.manifest(store.key_of(summary["outputs"][name]))["metadata"]
        assert meta["metrics"]["processes"] == 2, name
    # each launch held both slots: the experts trained one after the other
    runs = stage_runs()
    safety, helpful = runs["safety-expert"].info, runs["helpfulness-expert"].info
    assert safety.end_time <= helpful.start_time or helpful.end_time <= safety.start_time

    again, tasks = flow_run(*overrides)  # the Prefect cache key holds the process count: all cached
    assert set(again.result()["run"]["cache_hits"]) == set(summary["run"]["stage_seconds"])
    assert {tasks[name][0].state_name for name in ("safety-expert", "helpfulness-expert", "router")} == {"Cached"}
    assert again.result()["outputs"] == summary["outputs"]
