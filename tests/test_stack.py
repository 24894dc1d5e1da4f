"""``midpo stack up | down | status``: one real local stack (moto, MLflow server, Prefect server and worker)
for the module, started by the CLI in a subprocess as a user would; plus the failure and bookkeeping paths."""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from midpo import stack
from midpo.cli import main

EXPERTS = ("safety-expert", "helpfulness-expert")


def _cli(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MIDPO_ARTIFACT_ROOT"}
    env["MIDPO_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "midpo.cli", "stack", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def running(module_home) -> Iterator[dict]:
    """``midpo stack up --gpu-slots 2`` in a subprocess; ``down`` at the end whatever happened."""
    t0 = time.monotonic()
    done = _cli(module_home, "up", "--gpu-slots", "2")
    seconds = time.monotonic() - t0
    try:
        assert done.returncode == 0, f"stack up failed:\n{done.stdout}\n{done.stderr}"
        state = json.loads((module_home / "stack" / "stack.json").read_text())
        print(f"stack up took {seconds:.1f} s", file=sys.stderr)
        yield {"state": state, "up": done, "seconds": seconds}
    finally:
        if (module_home / "stack" / "stack.json").exists():  # a test failed before test_down_stops_every_process
            _cli(module_home, "down", timeout=120)


def _env(capsys) -> dict[str, str]:
    capsys.readouterr()
    assert main(["stack", "status", "--env"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith("export ") for line in lines)
    return dict(shlex.split(line[len("export ") :])[0].split("=", 1) for line in lines)


@pytest.mark.shared_home
def test_up_starts_every_service_and_status_says_so(running, capsys):
    assert main(["stack", "status"]) == 0
    table = capsys.readouterr().out
    for name in stack.SERVICES:
        assert any(line.split()[:1] == [name] and line.split()[-1] == "up" for line in table.splitlines()), table
    log = running["up"].stderr
    assert "s3 up at http://127.0.0.1:" in log and "mlflow up at" in log and "prefect up at" in log and "worker up at" in log
    state_file = Path(os.environ["MIDPO_HOME"]) / "stack" / "stack.json"
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600  # it holds the credentials


@pytest.mark.shared_home
def test_env_points_at_the_live_endpoints(running, capsys):
    import boto3
    import httpx
    from mlflow import MlflowClient

    env = _env(capsys)
    assert set(env) == {
        "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "MIDPO_ARTIFACT_ROOT",
    }  # fmt: skip
    assert env["MIDPO_ARTIFACT_ROOT"] == "s3://midpo/artifacts"
    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    assert "midpo" in [b["Name"] for b in s3.list_buckets()["Buckets"]]

    # MLflow: the client needs no AWS settings, the server proxies the artifact into the moto bucket.
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    run = client.create_run(client.create_experiment("stack-test"))
    artifact = Path(os.environ["MIDPO_HOME"]) / "hello.txt"
    artifact.write_text("hello")
    client.log_artifact(run.info.run_id, str(artifact))
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="midpo", Prefix="mlflow/").get("Contents", [])]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/hello.txt") for k in keys), keys

    with httpx.Client(base_url=env["PREFECT_API_URL"], trust_env=False, timeout=10) as api:
        pool = api.get("/work_pools/midpo-local").raise_for_status().json()
        assert pool["type"] == "process"
        deployment = api.get("/deployments/name/midpo/full-pipeline").raise_for_status().json()
        assert deployment["work_pool_name"] == "midpo-local"
        assert api.get("/v2/concurrency_limits/gpu").raise_for_status().json()["limit"] == 2
        deadline = time.monotonic() + 30
        while not (online := [w for w in api.post("/work_pools/midpo-local/workers/filter", json={}).json() if w["status"] == "ONLINE"]):
            assert time.monotonic() < deadline, "no worker online for midpo-local"
            time.sleep(1)
        assert online[0]["name"] == stack.WORKER_NAME


@pytest.mark.shared_home
def test_up_twice_starts_nothing_new(running, caplog):
    home = Path(os.environ["MIDPO_HOME"])
    caplog.set_level(logging.INFO, logger="midpo.stack")
    assert main(["stack", "up", "--gpu-slots", "2"]) == 0
    assert "already up" in caplog.text
    assert json.loads((home / "stack" / "stack.json").read_text())["services"] == running["state"]["services"]
    assert (home / "stack" / "logs" / "s3.log").read_text().count("midpo stack: s3 starting") == 1


@pytest.mark.shared_home
def test_the_deployment_runs_the_pipeline_on_the_stack(running, capsys):
    """`prefect deployment run midpo/full-pipeline` on tiny-ci, through the worker: the registered version, its
    alias and lineage, nested MLflow runs, the artifacts in S3, the experts side by side; no secret anywhere."""
    import boto3
    import httpx
    from mlflow import MlflowClient

    env = _env(capsys)
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("MIDPO_", "AWS_", "MLFLOW_", "PREFECT_"))} | env
    prefect = Path(sys.executable).parent / "prefect"
    argv = [str(prefect), "deployment", "run", "midpo/full-pipeline", "--param", "profile=tiny-ci", "--watch", "--watch-timeout", "900"]
    done = subprocess.run(argv, env=run_env, capture_output=True, text=True, timeout=1000, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    with httpx.Client(base_url=env["PREFECT_API_URL"], trust_env=False, timeout=10) as api:
        deployment = api.get("/deployments/name/midpo/full-pipeline").raise_for_status().json()
        (flow_run,) = api.post("/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment["id"]]}}}).raise_for_status().json()
        assert flow_run["state"]["type"] == "COMPLETED"
        tasks = {t["name"]: t for t in api.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run["id"]]}}}).json()}

        def slot_taken(expert: str) -> datetime:  # when the expert got its gpu slot: the line its task run logs then
            logs = api.post("/logs/filter", json={"logs": {"task_run_id": {"any_": [tasks[expert]["id"]]}}}).raise_for_status().json()
            (line,) = [entry for entry in logs if " slot(s) of " in entry["message"]]
            return datetime.fromisoformat(line["timestamp"])

        taken = {e: slot_taken(e) for e in EXPERTS}
    assert {"safety-expert", "helpfulness-expert", "register"} <= set(tasks) and "gpu" in tasks["safety-expert"]["tags"]

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    version = client.get_model_version_by_alias("midpo", "challenger")
    experiment = client.get_experiment_by_name("midpo-tiny-ci")
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    by_stage = {r.data.tags["midpo.stage"]: r for r in runs if "midpo.stage" in r.data.tags}
    parent = by_stage["pipeline"]
    stages = [t for t in tasks if t in by_stage]
    assert len(stages) == len(tasks) and all(by_stage[s].data.tags["mlflow.parentRunId"] == parent.info.run_id for s in stages)
    assert by_stage["data"].data.metrics["safety_train_pairs"] > 0 and parent.data.metrics["wall_seconds"] > 0
    # lineage: the dataset, the base and the runs that trained the parts
    assert version.tags["midpo.dataset_version"] == client.get_run(parent.info.run_id).inputs.dataset_inputs[0].dataset.digest
    assert version.tags["midpo.base_version"] == by_stage["base"].data.tags["midpo.output.base"]
    for stage in ("safety-expert", "helpfulness-expert", "router"):
        assert version.tags[f"midpo.{stage.replace('-', '_')}_run"] == by_stage[stage].info.run_id
    # the two experts ran side by side (a gpu limit of 2): each took its slot before the other's task run ended
    ended = {e: datetime.fromisoformat(tasks[e]["end_time"]) for e in EXPERTS}
    assert taken["safety-expert"] < ended["helpfulness-expert"] and taken["helpfulness-expert"] < ended["safety-expert"]

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="midpo") for o in page.get("Contents", [])]
    uri = version.tags["midpo.midpo_uri"]
    assert uri.startswith("s3://midpo/artifacts/models/midpo/") and f"{uri[len('s3://midpo/'):]}/_MANIFEST.json" in keys
    for prefix in ("artifacts/datasets/", "artifacts/bases/", "artifacts/adapters/safety-expert/", "artifacts/routers/", "artifacts/evals/midpo/"):
        assert any(k.startswith(prefix) and k.endswith("/_MANIFEST.json") for k in keys), prefix
    assert any(k.startswith("mlflow/") and "/report/report.md" in k for k in keys)  # the report, in the parent run
    # the credentials reach no MLflow record and no stored byte
    secret = running["state"]["secret_key"]
    assert not [r.info.run_id for r in runs if secret in json.dumps([r.data.params, r.data.tags])]
    assert secret not in json.dumps(dict(version.tags))
    assert not [k for k in keys if secret.encode() in s3.get_object(Bucket="midpo", Key=k)["Body"].read()]


@pytest.mark.shared_home
def test_the_secret_is_in_no_log(running):
    secret = running["state"]["secret_key"]
    logs = Path(os.environ["MIDPO_HOME"]) / "stack" / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["mlflow.log", "prefect.log", "s3.log", "setup.log", "worker.log"]
    assert not [p for p in logs.iterdir() if secret.encode() in p.read_bytes()]
    assert secret not in running["up"].stdout + running["up"].stderr


@pytest.mark.shared_home
def test_down_stops_every_process(running, capsys):
    services = [stack.Service(**s) for s in running["state"]["services"].values()]
    done = _cli(Path(os.environ["MIDPO_HOME"]), "down", timeout=120)
    assert done.returncode == 0, done.stderr
    assert not any(stack.alive(s) for s in services)
    assert not (Path(os.environ["MIDPO_HOME"]) / "stack" / "stack.json").exists()
    assert main(["stack", "status"]) == 1
    assert main(["stack", "status", "--env"]) == 1 and capsys.readouterr().out == ""


def test_down_and_status_with_nothing_up(capsys, caplog):
    caplog.set_level(logging.INFO, logger="midpo.stack")
    assert main(["stack", "down"]) == 0
    assert "no stack is up" in caplog.text
    assert main(["stack", "status"]) == 1
    assert main(["stack", "status", "--env"]) == 1
    assert capsys.readouterr().out == ""


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_failing_service_stops_what_was_started(monkeypatch, capsys, caplog, tmp_path):
    """mlflow exits at once: up says so with its log's tail, stops moto and the Prefect server, exits 1; a
    stale stack.json (dead pids) is cleaned up first."""
    stale = stack.StackState(services={"s3": stack.Service("s3", _dead_pid(), "http://127.0.0.1:1")}, secret_key="old")
    stack.save_state(stale)
    fake = tmp_path / "mlflow"
    fake.write_text("#!/bin/sh\necho 'mlflow: cannot open the backend store' >&2\nexit 3\n")
    fake.chmod(0o755)
    real = stack.executable
    monkeypatch.setattr(stack, "executable", lambda name: fake if name == "mlflow" else real(name))
    started: list[stack.Service] = []
    record = stack._record
    monkeypatch.setattr(stack, "_record", lambda *a, **k: started.append(record(*a, **k)) or started[-1])
    caplog.set_level(logging.INFO, logger="midpo.stack")

    assert main(["stack", "up"]) == 1
    err = capsys.readouterr().err
    assert "mlflow exited with status 3" in err and "cannot open the backend store" in err
    assert "removing a stale" in caplog.text
    assert [s.name for s in started] == ["s3", "mlflow", "prefect"]
    assert not any(stack.alive(s) for s in started)
    assert not stack.state_path().exists()


def test_a_busy_default_port_is_replaced_by_a_free_one(caplog):
    caplog.set_level(logging.INFO, logger="midpo.stack")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        port = stack._free_port("s3", taken)
    assert port != taken and f"port {taken} is busy; using {port}" in caplog.text


def test_state_file_is_private_and_env_lines_quote_values(capsys):
    services = {n: stack.Service(n, os.getpid(), f"http://127.0.0.1:{p}", p) for n, p in [("s3", 1), ("mlflow", 2), ("prefect", 3), ("worker", 4)]}
    stack.save_state(stack.StackState(services=services, access_key="AK", secret_key="it's $ecret", complete=True))
    assert stat.S_IMODE(stack.state_path().stat().st_mode) == 0o600
    assert main(["stack", "status", "--env"]) == 0
    out = capsys.readouterr().out
    assert shlex.split(next(line for line in out.splitlines() if "SECRET" in line)) == ["export", "AWS_SECRET_ACCESS_KEY=it's $ecret"]


def test_a_stale_stack_shows_down_and_down_cleans_it_up(capsys):
    dead = _dead_pid()
    services = {n: stack.Service(n, dead, f"http://127.0.0.1:{p}", p) for n, p in [("s3", 1), ("mlflow", 2), ("prefect", 3), ("worker", 4)]}
    stack.save_state(stack.StackState(services=services, complete=True))
    assert main(["stack", "status"]) == 1
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [r.split()[0] for r in rows] == list(stack.SERVICES) and all(r.split()[-1] == "down" for r in rows)
    assert main(["stack", "down"]) == 0
    assert not stack.state_path().exists()


def test_up_outside_a_source_checkout_says_so(monkeypatch, tmp_path, capsys):
    import midpo

    monkeypatch.setattr(midpo, "__file__", str(tmp_path / "site-packages" / "midpo" / "__init__.py"))
    assert main(["stack", "up"]) == 1
    err = capsys.readouterr().err
    assert "no prefect.yaml in" in err and "source checkout" in err
    assert not stack.state_path().exists()
