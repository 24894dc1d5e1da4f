"""Cluster configs (docs/cluster.md), validated as far as a machine without Docker, GPUs or Kubernetes can:
the compose file against the Compose Specification's JSON schema, the Kubernetes work pool's base job
template against a real Prefect API (``prefect work-pool create --type kubernetes``, deployments and flow
runs with its job variables), the setup script of the compose ``setup`` service against that API, the
accelerate configs through accelerate's own launcher validation, and the alpaca7b profile's loading.

``tests/data/compose-spec.json`` is schema/compose-spec.json of github.com/compose-spec/compose-spec (commit
170098ba07d9f53c383a41bfd4c5166b0a4529a6, Apache-2.0)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from unittest import mock

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yml"
TEMPLATE = INFRA / "k8s" / "base-job-template.json"
ACCELERATE = {"fsdp": INFRA / "accelerate" / "fsdp.yaml", "deepspeed": INFRA / "accelerate" / "deepspeed_zero3.yaml"}

SERVICES = {"postgres", "prefect-server", "mlflow", "minio", "createbucket", "setup", "worker"}
ONE_SHOT = {"createbucket", "setup"}
# environment variables whose value is a credential: only ever ${VAR} from infra/.env, never a default
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|ROOT_USER")
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def template() -> dict:
    return json.loads(TEMPLATE.read_text())


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    return dict(item.split("=", 1) for item in env) if isinstance(env, list) else {k: str(v) for k, v in env.items()}


def env_example() -> dict[str, str]:
    lines = (INFRA / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.lstrip().startswith("#"))


# --------------------------------------------------------------------------------------------------
# docker-compose.yml


def test_compose_parses_and_follows_the_compose_spec():
    import jsonschema

    doc = compose()
    assert SERVICES <= set(doc["services"])
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    errors = [f"{'/'.join(map(str, e.path))}: {e.message[:200]}" for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    assert not errors, errors
    # the schema is strict: a misspelt key of the GPU reservation would not pass
    bad = copy.deepcopy(doc)
    bad["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilites"] = ["gpu"]
    assert not jsonschema.Draft7Validator(schema).is_valid(bad)


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$ (a literal $), as `docker compose config` does."""

    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == ":-" else ""

    return INTERPOLATION.sub(one, text.replace("$$", "\0")).replace("\0", "$")


def test_compose_interpolates_with_the_env_example():
    """With infra/.env.example as infra/.env every required variable is set, and the result is still valid."""
    import jsonschema

    doc = yaml.safe_load(_interpolate(COMPOSE.read_text(), env_example()))
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    assert not list(jsonschema.Draft7Validator(schema).iter_errors(doc))
    escaped = set(re.findall(r"\$\$\{(\w+)\}", COMPOSE.read_text()))  # $${X}: for the container's shell
    assert set(re.findall(r"\$\{(\w+)\}", json.dumps(doc))) == escaped
    worker = env_of(doc["services"]["worker"])
    assert worker["AWS_ACCESS_KEY_ID"] == env_example()["MIDPO_S3_ACCESS_KEY"]
    assert "$MINIO_ROOT_USER" in doc["services"]["createbucket"]["command"][0]  # left for the container's shell
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):  # a missing secret stops compose, never a default
        _interpolate(COMPOSE.read_text(), {k: v for k, v in env_example().items() if k != "POSTGRES_PASSWORD"})


def test_gpu_worker_reserves_nvidia_gpus_and_runs_the_process_pool():
    worker = compose()["services"]["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device.get("count", "all") == "all"
    assert worker["build"]["dockerfile"] == "infra/Dockerfile" and (INFRA / worker["build"]["context"]).resolve() == ROOT
    command = " ".join(worker["command"])
    assert "prefect worker start" in command and "--pool midpo-gpu" in command and "--type process" in command
    env = env_of(worker)
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert env["MIDPO_ARTIFACT_ROOT"] == "s3://midpo/artifacts"
    assert env["PREFECT_LOGGING_EXTRA_LOGGERS"] == "midpo"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"} <= set(env)


def test_servers_are_configured_as_the_stack_needs():
    services = compose()["services"]
    prefect = env_of(services["prefect-server"])
    assert prefect["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "@postgres:5432/prefect" in prefect["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect["PREFECT_SERVER_API_HOST"] == "0.0.0.0"

    mlflow = services["mlflow"]
    args = [str(a) for a in mlflow["command"]]
    assert args[args.index("--artifacts-destination") + 1] == "s3://midpo/mlflow"
    hosts = INTERPOLATION.sub(lambda m: m.group(3) or "", args[args.index("--allowed-hosts") + 1]).split(",")
    assert "mlflow" in hosts and "mlflow:*" in hosts  # the worker's Host header (mlflow:5000), else 403
    env = env_of(mlflow)
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://") and "@postgres:5432/mlflow" in env["MLFLOW_BACKEND_STORE_URI"]
    assert "CREATE DATABASE mlflow" in (INFRA / "postgres" / "initdb" / "10-mlflow-db.sql").read_text()

    bucket = " ".join(services["createbucket"]["command"])
    assert "mc mb --ignore-existing local/midpo" in bucket


def test_healthchecks_and_start_order():
    services = compose()["services"]
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no", name
        else:
            assert service["healthcheck"]["test"], f"{name} has no healthcheck"
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            want = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
            assert spec["condition"] == want, (name, dep, spec)
    deps = {name: set(s.get("depends_on") or {}) for name, s in services.items()}
    assert {"setup", "mlflow", "createbucket"} <= deps["worker"]
    assert "postgres" in deps["prefect-server"] and "postgres" in deps["mlflow"] and "prefect-server" in deps["setup"]


def test_no_literal_secrets():
    text = COMPOSE.read_text()
    doc = compose()
    required = {m.group(1) for m in INTERPOLATION.finditer(text) if m.group(2) == ":?"}
    checked = 0
    for name, service in doc["services"].items():
        for key, value in env_of(service).items():
            if SECRET_NAME.search(key):
                checked += 1
                m = INTERPOLATION.fullmatch(value)
                assert m and m.group(2) == ":?", f"{name}: {key} must be ${{VAR:?...}} from infra/.env, not {value!r}"
            userinfo = re.search(r"://([^/]*)@", INTERPOLATION.sub("VAR", value))  # credentials inside a URL
            if userinfo:
                checked += 1
                assert userinfo.group(1).split(":")[1:] == ["VAR"], f"{name}: {key} holds a literal password"
                assert ":?" in value.split("@")[0], f"{name}: {key}'s password must be ${{VAR:?...}}"
    assert checked >= 8
    # every credential compose requires is documented in .env.example, with a placeholder value only
    example = env_example()
    assert required <= set(example), required - set(example)
    for key, value in example.items():
        if "PASSWORD" in key or "SECRET" in key:
            assert "change-me" in value, key
    assert ".env" in (INFRA / ".gitignore").read_text().split()


def test_worker_image_keeps_a_torch_within_the_project_range():
    dockerfile = (INFRA / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.MULTILINE).group(1)
    assert base.startswith("pytorch/pytorch:") and "cuda" in base
    version = tuple(int(x) for x in base.split(":")[1].split("-")[0].split("."))
    assert (2, 4, 0) <= version <= (2, 13, 0)
    assert "RUN pip install ." in dockerfile and "PIP_CONSTRAINT=/etc/pip-constraints.txt" in dockerfile
    assert compose()["services"]["worker"]["build"]["args"]["BASE_IMAGE"].endswith(base + "}")
    pin = subprocess.run([sys.executable, str(INFRA / "scripts" / "pin-torch.py")], capture_output=True, text=True, check=True)
    import torch

    assert pin.stdout.strip() == f"torch=={torch.__version__}"


# --------------------------------------------------------------------------------------------------
# Kubernetes work pool: base job template


def _render(values: dict) -> dict:
    """The job configuration the way a Prefect worker renders it: variable defaults, then ``values``."""
    from prefect.utilities.templating import apply_values

    t = template()
    defaults = {k: p["default"] for k, p in t["variables"]["properties"].items() if p.get("default") is not None}
    return apply_values(t["job_configuration"], {**defaults, **values})


def _container(job_configuration: dict) -> dict:
    (container,) = job_configuration["job_manifest"]["spec"]["template"]["spec"]["containers"]
    return container


def test_job_template_requests_gpus_through_a_variable():
    t = template()
    assert set(t) == {"job_configuration", "variables"}
    props = t["variables"]["properties"]
    manifest = t["job_configuration"]["job_manifest"]
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    container = _container(t["job_configuration"])
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert props["gpu_count"]["default"] == 1
    assert {"image", "namespace", "service_account_name", "aws_secret_name"} <= set(props)
    assert t["variables"]["required"] == ["image"]  # Prefect's own image has no midpo
    assert {"secretRef": {"name": "{{ aws_secret_name }}"}} in container["envFrom"]
    assert manifest["spec"]["template"]["spec"]["serviceAccountName"] == "{{ service_account_name }}"

    # rendered: the variable's default, then a deployment's value; requests always equal limits
    for values, gpus in (({"image": "midpo:1"}, 1), ({"image": "midpo:1", "gpu_count": 8}, 8), ({"image": "midpo:1", "gpu_count": "4"}, "4")):
        rendered = _render(values)
        resources = _container(rendered)["resources"]
        assert resources == {"limits": {"nvidia.com/gpu": gpus}, "requests": {"nvidia.com/gpu": gpus}}
        assert _container(rendered)["image"] == "midpo:1" and rendered["namespace"] == "midpo"
        assert _container(rendered)["envFrom"][0] == {"secretRef": {"name": "midpo-aws"}}


def test_job_template_extends_the_kubernetes_workers_default():
    """Everything of the kubernetes worker's default template (as the Prefect server ships it for offline
    use) is still there: its variables and its job configuration keys and placeholders."""
    import prefect
    from prefect.server.schemas.actions import validate_base_job_template

    registry = Path(prefect.__file__).parent / "server" / "api" / "collections_data" / "views" / "aggregate-worker-metadata.json"
    default = json.loads(registry.read_text())["prefect-kubernetes"]["kubernetes"]["default_base_job_configuration"]
    t = template()
    assert set(default["variables"]["properties"]) <= set(t["variables"]["properties"])
    for key, value in default["job_configuration"].items():
        if key != "job_manifest":
            assert t["job_configuration"][key] == value, key
    default_container = _container(default["job_configuration"])
    container = _container(t["job_configuration"])
    for key in ("env", "image", "imagePullPolicy", "args", "name"):
        assert container[key] == default_container[key], key
    validate_base_job_template(t)  # the server's check: every placeholder is a declared variable
    broken = copy.deepcopy(t)
    del broken["variables"]["properties"]["gpu_count"]
    with pytest.raises(ValueError, match="gpu_count"):
        validate_base_job_template(broken)


def _prefect_cli() -> list[str]:
    exe = Path(sys.executable).parent / "prefect"
    return [str(exe)] if exe.exists() else [shutil.which("prefect") or "prefect"]


def _cli_env(tmp_path: Path) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_work_pool_create_accepts_the_template(prefect_harness, tmp_path):
    """``prefect work-pool create NAME --type kubernetes --base-job-template FILE`` against a real local
    Prefect API (the CLI checks the type against the server's worker registry, the server the template)."""
    from prefect import get_client

    name = f"midpo-gpu-k8s-{uuid.uuid4().hex[:6]}"
    done = subprocess.run([*_prefect_cli(), "work-pool", "create", name, "--type", "kubernetes", "--base-job-template", str(TEMPLATE)],
                          cwd=ROOT, env=_cli_env(tmp_path), capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool(name)
        assert pool.type == "kubernetes" and pool.base_job_template == template()
        client.delete_work_pool(name)


def test_deployments_and_flow_runs_are_checked_against_the_template_variables(prefect_harness):
    """The server validates job variables with the template's schema: gpu_count must be a positive integer
    (or its digits, as ``--job-variable gpu_count=8`` passes them), and a flow run needs an image."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import PrefectHTTPStatusError

    pool = f"midpo-gpu-k8s-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="kubernetes", base_job_template=template()))
        flow_id = client.create_flow_from_name(f"midpo-cluster-test-{uuid.uuid4().hex[:6]}")
        try:
            for variables in ({"image": "midpo:1", "gpu_count": 8}, {"image": "midpo:1", "gpu_count": "8"}, {}):
                client.create_deployment(flow_id, f"ok-{uuid.uuid4().hex[:6]}", work_pool_name=pool, job_variables=variables)
            for variables in ({"gpu_count": 0}, {"gpu_count": "two"}):
                with pytest.raises(PrefectHTTPStatusError, match="gpu_count|not valid|is less than"):
                    client.create_deployment(flow_id, f"bad-{uuid.uuid4().hex[:6]}", work_pool_name=pool, job_variables=variables)
            without_image = client.create_deployment(flow_id, f"noimage-{uuid.uuid4().hex[:6]}", work_pool_name=pool)
            with pytest.raises(PrefectHTTPStatusError, match="image"):
                client.create_flow_run_from_deployment(without_image)
            with_image = client.create_deployment(flow_id, f"image-{uuid.uuid4().hex[:6]}", work_pool_name=pool, job_variables={"image": "midpo:1"})
            run = client.create_flow_run_from_deployment(with_image, job_variables={"gpu_count": 2})
            assert run.job_variables == {"gpu_count": 2}
        finally:
            client.delete_work_pool(pool)
            client.delete_flow(flow_id)


def test_setup_script_creates_pool_limit_and_deployment(prefect_harness, tmp_path):
    """infra/scripts/prefect-setup.sh (the compose ``setup`` service) against a real Prefect API: the
    process pool, the ``gpu`` limit created then resized, and ``full-pipeline`` deployed on that pool from
    the checkout it runs in. The harness's ``gpu`` limit is restored afterwards (other tests size it)."""
    from prefect import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitUpdate,
        WorkPoolCreate,
    )
    from prefect.exceptions import ObjectNotFound

    pool = f"midpo-gpu-test-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        try:
            before = client.read_global_concurrency_limit_by_name("gpu").limit
        except ObjectNotFound:
            before = None
    env = {**_cli_env(tmp_path), "MIDPO_WORK_POOL": pool, "MIDPO_DEPLOYMENTS": "full-pipeline"}
    try:
        for slots in ("3", "5"):  # the second run finds everything and resizes the limit
            done = subprocess.run(["bash", str(INFRA / "scripts" / "prefect-setup.sh")], cwd=tmp_path, env={**env, "MIDPO_GPU_SLOTS": slots},
                                  capture_output=True, text=True, timeout=300, check=False)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            with get_client(sync_client=True) as client:
                assert client.read_global_concurrency_limit_by_name("gpu").limit == int(slots)
        with get_client(sync_client=True) as client:
            assert client.read_work_pool(pool).type == "process"
            k8s = f"midpo-gpu-k8s-{uuid.uuid4().hex[:6]}"
            client.create_work_pool(WorkPoolCreate(name=k8s, type="kubernetes", base_job_template=template()))
        # a pool of another type is refused, never converted
        done = subprocess.run(["bash", str(INFRA / "scripts" / "prefect-setup.sh")], cwd=tmp_path, env={**env, "MIDPO_WORK_POOL": k8s},
                              capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 1 and "exists with type kubernetes" in done.stderr, done.stdout[-2000:] + done.stderr[-2000:]
        with get_client(sync_client=True) as client:
            assert client.read_work_pool(k8s).type == "kubernetes" and client.read_work_pool(k8s).base_job_template == template()
            client.delete_work_pool(k8s)
            deployment = client.read_deployment_by_name("midpo/full-pipeline")
            assert deployment.work_pool_name == pool and deployment.entrypoint == "flows/pipeline.py:midpo"
            # flow runs start in the directory the deployment was made from: the image's checkout
            assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
            client.delete_deployment(deployment.id)
            client.delete_work_pool(pool)
    finally:
        with get_client(sync_client=True) as client:
            if before is None:
                client.delete_global_concurrency_limit_by_name("gpu")
            else:
                client.update_global_concurrency_limit("gpu", GlobalConcurrencyLimitUpdate(limit=before))


# --------------------------------------------------------------------------------------------------
# accelerate configs and the alpaca7b profile


@pytest.mark.parametrize("kind", sorted(ACCELERATE))
def test_accelerate_config_passes_accelerates_launch_validation(kind, monkeypatch):
    """The file as ``accelerate launch --config_file`` reads it (unknown keys are an error there), the
    environment the launcher would give each of the 8 processes, and the plugin a rank builds from it."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = ACCELERATE[kind]
    raw = yaml.safe_load(path.read_text())
    assert raw["num_processes"] == 8 and raw["num_machines"] == 1 and raw["mixed_precision"] == "bf16"
    cfg = load_config_from_file(str(path))
    assert cfg.distributed_type.value == {"fsdp": "FSDP", "deepspeed": "DEEPSPEED"}[kind]

    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    with mock.patch("torch.cuda.is_available", return_value=True), mock.patch("torch.cuda.device_count", return_value=8):
        args, defaults, mp_from_config = _validate_launch_command(args)
    assert args.num_processes == 8 and args.mixed_precision == "bf16"
    if kind == "fsdp":
        assert args.use_fsdp
        env = prepare_multi_gpu_env(args)
    else:
        assert args.use_deepspeed
        args.deepspeed_fields_from_accelerate_config = ",".join([*defaults.deepspeed_config, *(["mixed_precision"] if mp_from_config else [])])
        _, env = prepare_deepspeed_cmd_env(args)
    for key, value in env.items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    if kind == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin

        assert raw["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True and plugin.cpu_ram_efficient_loading is False
    else:
        from accelerate.utils import DeepSpeedPlugin

        assert raw["deepspeed_config"]["zero_stage"] == 3
        plugin = DeepSpeedPlugin()
        assert plugin.zero_stage == 3 and plugin.zero3_init_flag
        # left to the TrainingArguments, so the trainer's out-of-memory fallback cannot contradict it
        assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto" and plugin.gradient_clipping == "auto"


def test_alpaca7b_profile_loads_and_matches_the_launch_precision():
    from midpo.config import load_config

    cfg = load_config("alpaca7b")
    assert cfg.profile == "alpaca7b" and cfg.data.sources[0].format == "pku"
    assert cfg.training.bf16 is True  # the accelerate configs' mixed_precision: bf16
    for path in ACCELERATE.values():
        assert yaml.safe_load(path.read_text())["mixed_precision"] == "bf16"


def test_alpaca7b_profile_plans_the_whole_graph_with_its_training_launched_on_every_gpu():
    """The profile as shipped: every stage of the graph (no world, no baselines), the experts and the router
    under `accelerate launch` with the ZeRO-3 config, one process per GPU, the paper's effective batch of 32
    on 8 GPUs. (tests/test_launch.py runs launches for real, on the CPU.)"""
    from midpo.config import load_config
    from midpo.launch import launches, section_of
    from midpo.pipeline import STAGES, stages_for

    cfg = load_config("alpaca7b", ["run.launch.num_processes=8"])  # null here: one per GPU, and this machine has none
    plan = stages_for(cfg)
    assert [s.name for s in plan] == [s.name for s in STAGES if s.name not in ("world", "baselines")]
    assert [s.name for s in plan if launches(cfg, s)] == ["safety-expert", "helpfulness-expert", "router"]
    assert (ROOT / cfg.run.launch.config_file).resolve() == ACCELERATE["deepspeed"].resolve()
    expert = section_of(next(s for s in plan if s.name == "safety-expert"), cfg)
    assert expert.processes * expert.per_device_batch_size * expert.gradient_accumulation_steps == 32
    assert section_of(next(s for s in plan if s.name == "router"), cfg).training.processes == 8
    assert section_of(next(s for s in plan if s.name == "judges"), cfg) == cfg.judges  # one process, one GPU
    assert load_config("alpaca7b").run.launch.num_processes is None


def test_alpaca7b_dry_run_on_a_fresh_machine_plans_every_stage_and_its_launches(midpo_home, tmp_path):
    """docs/cluster.md's step 3: the plan before anything exists (the judges and eval cannot be keyed by a
    base or dataset not built yet, and must not fail for it), with the launched stages named. Local copies
    stand in for the hub's base and data. Nothing is written where the command runs (MLflow's default
    store would be ./mlflow.db)."""
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "midpo.cli", "run", "--profile", "alpaca7b", "--dry-run", "--set", "run.launch.num_processes=8",
         "--set", "data.sources.0.uri=builtin:pku_saferlhf_sample.jsonl", "--set", "base.model=smollm2"],
        capture_output=True, text=True, timeout=600, cwd=workdir,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert not list(workdir.iterdir())
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.strip()}
    from midpo.config import load_config
    from midpo.pipeline import stages_for

    plan = [s.name for s in stages_for(load_config("alpaca7b", ["run.launch.num_processes=8"]))]
    assert all("would run" in lines[name] for name in plan)
    launched = [name for name in plan if "on 8 processes (infra/accelerate/deepspeed_zero3.yaml)" in lines[name]]
    assert launched == ["safety-expert", "helpfulness-expert", "router"]
