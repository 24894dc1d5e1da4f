"""``midpo stack up | down | status``: a local stack on one machine, without Docker (docs/stack.md).

Four processes: a moto S3-protocol endpoint (bucket ``midpo``), an MLflow tracking server that proxies its
artifacts to that bucket, a Prefect server (work pool ``midpo-local``, global concurrency limit ``gpu``,
the deployments of ``prefect.yaml``) and a process worker that runs flow runs against all three.

The library never imports Prefect (docs/layout.md): everything here drives the ``prefect``, ``mlflow`` and
``moto_server`` executables of the running interpreter's environment through ``subprocess`` and checks
health with plain HTTP (urllib) and boto3. Each process runs in its own session, so ``down`` stops it and
every child it spawned (uvicorn workers) by its process group id, even from another shell.

State lives in ``$MIDPO_HOME/stack/``: ``stack.json`` (pids, ports, URLs and the generated credentials of
the local endpoint, mode 0600), ``logs/<service>.log``, ``prefect/`` (the server's PREFECT_HOME),
``mlflow.db`` and ``worker-home/`` (the worker's MIDPO_HOME for caches). The credentials are printed only
by ``status --env``; nothing logged contains them.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from midpo.storage import midpo_home

log = logging.getLogger(__name__)

BUCKET = "midpo"
POOL = "midpo-local"
GPU_LIMIT = "gpu"
REGION = "us-east-1"
WORKER_NAME = "midpo-stack-worker"
SERVICES = ("s3", "mlflow", "prefect", "worker")  # start order; ``down`` stops in reverse
SETUP = "setup"  # the log of the prefect CLI commands (work pool, limit, deployments)
DEFAULT_PORTS = {"s3": 9000, "mlflow": 5000, "prefect": 4200}
START_TIMEOUT_S = 180.0  # a loaded 2-core machine starts the Prefect server in up to ~30 s; leave room
STOP_TIMEOUT_S = 10.0

# Inherited variables that would point a stack process somewhere else than the stack: a user's Prefect
# profile or database, another tracking server, another S3 endpoint or real AWS credentials.
_DROPPED_PREFIXES = ("PREFECT_", "MLFLOW_")
_DROPPED = {
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "MIDPO_HOME",
    "MIDPO_ARTIFACT_ROOT",
}


class StackError(RuntimeError):
    """A stack operation failed; ``service`` says which one, ``log_tail`` the end of its log file."""

    def __init__(self, message: str, service: str | None = None, log_tail: str = "") -> None:
        super().__init__(message)
        self.service = service
        self.log_tail = log_tail


@dataclass
class Service:
    """One process of the stack: enough to find it again (pid, start time) and to check it (url)."""

    name: str
    pid: int
    url: str
    port: int | None = None
    started: str | None = None  # the process's start time (Linux /proc): a reused pid is not ours


@dataclass
class StackState:
    """What ``stack.json`` holds. ``complete`` is false while ``up`` is still starting services."""

    services: dict[str, Service] = field(default_factory=dict)
    access_key: str = ""
    secret_key: str = ""
    gpu_slots: int = 2
    repo_root: str = ""
    complete: bool = False

    @property
    def env(self) -> dict[str, str]:
        """The variables a client needs to use the stack (what ``status --env`` prints)."""
        s = self.services
        return {
            "PREFECT_API_URL": f"{s['prefect'].url}/api",
            "MLFLOW_TRACKING_URI": s["mlflow"].url,
            "AWS_ENDPOINT_URL": s["s3"].url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "MIDPO_ARTIFACT_ROOT": f"s3://{BUCKET}/artifacts",
        }


# ---------------------------------------------------------------------------------------------- paths


def stack_dir() -> Path:
    return midpo_home() / "stack"


def state_path() -> Path:
    return stack_dir() / "stack.json"


def log_path(service: str) -> Path:
    return stack_dir() / "logs" / f"{service}.log"


def repo_root() -> Path:
    """The source checkout holding ``prefect.yaml``: deployments are file paths relative to it."""
    import midpo

    root = Path(midpo.__file__).resolve().parents[1]
    if not (root / "prefect.yaml").is_file():
        raise StackError(
            f"no prefect.yaml in {root}: `midpo stack up` deploys the flows of a source checkout; "
            "run it from a clone of the repository installed with `pip install -e .[stack]`"
        )
    return root


def executable(name: str) -> Path:
    """An executable of this interpreter's environment (not whatever ``PATH`` finds first)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        extra = " (pip install 'midpo[stack]' installs moto[server])" if name == "moto_server" else ""
        raise StackError(f"{path} not found: {name} must be installed in the environment of {sys.executable}{extra}")
    return path


# ----------------------------------------------------------------------------------------- state file


def load_state() -> StackState | None:
    path = state_path()
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    raw["services"] = {name: Service(**svc) for name, svc in raw.get("services", {}).items()}
    return StackState(**raw)


def save_state(state: StackState) -> None:
    """Write ``stack.json`` atomically with mode 0600 from the first byte: it holds the credentials."""
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(state), f, indent=2)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ processes


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux); None elsewhere or when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else fields[19]  # state, ..., starttime (field 22 of stat)


def alive(svc: Service) -> bool:
    """Whether the process of ``svc`` is running (a zombie or a reused pid counts as gone)."""
    try:  # our own child (``up`` in this process): reap it, or a zombie would look alive
        if os.waitpid(svc.pid, os.WNOHANG)[0] == svc.pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(svc.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if Path("/proc").is_dir():
        started = _proc_start(svc.pid)
        return started is not None and (svc.started is None or started == svc.started)
    return True


def _stop(svc: Service, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM to the service's process group (its own session), then SIGKILL after ``timeout`` s."""
    if not alive(svc):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(svc.pid, sig)
        except ProcessLookupError:
            return
        except PermissionError as e:
            raise StackError(f"cannot signal {svc.name} (pid {svc.pid}): {e}", svc.name) from None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not alive(svc):
                try:  # children that outlived the leader (a server's uvicorn process, a flow run): no mercy
                    os.killpg(svc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                log.info("%s stopped (pid %d)", svc.name, svc.pid)
                return
            time.sleep(0.1)
        if sig == signal.SIGTERM:
            log.warning("%s (pid %d) did not stop within %.0f s of SIGTERM: killing it", svc.name, svc.pid, timeout)
    if alive(svc):
        raise StackError(f"{svc.name} (pid {svc.pid}) is still running after SIGKILL", svc.name)


def _base_env() -> dict[str, str]:
    """This process's environment minus anything that would point a stack process elsewhere."""
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED and not k.startswith(_DROPPED_PREFIXES)}
    local = "127.0.0.1,localhost"
    for name in ("NO_PROXY", "no_proxy"):  # a user's HTTP proxy must not carry calls between local services
        env[name] = f"{env[name]},{local}" if env.get(name) else local
    return env


def _spawn(name: str, argv: Sequence[str | Path], env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session with its output appended to ``logs/<name>.log``."""
    path = log_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as out:
        out.write(f"\n===== midpo stack: {name} starting at {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n".encode())
        out.flush()
        return subprocess.Popen(
            [str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )


def log_tail(name: str, lines: int = 30) -> str:
    try:
        return "\n".join(log_path(name).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _cli(argv: Sequence[str | Path], env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen[str]:
    """Start a short ``prefect`` CLI command (several run at once: each spends seconds importing Prefect)."""
    return subprocess.Popen(
        [str(a) for a in argv], env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(proc: subprocess.Popen[str], ok: Sequence[str] = ()) -> bool:
    """Wait for a CLI command, append its output to ``logs/setup.log``; False when it failed unless an
    ``ok`` text is in its output; raises on any other failure."""
    out, _ = proc.communicate()
    argv = [str(a) for a in proc.args]  # type: ignore[union-attr]
    with log_path(SETUP).open("a") as f:
        f.write(f"$ prefect {' '.join(argv[1:])}  (exit {proc.returncode})\n{out}\n")
    if proc.returncode == 0:
        return True
    if any(text in out for text in ok):
        return False
    raise StackError(f"`prefect {' '.join(argv[1:])}` failed (exit {proc.returncode})", SETUP, log_tail(SETUP))


def _free_port(name: str, preferred: int) -> int:
    """``preferred`` when nothing listens there, else a free port chosen by the kernel (logged)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is not busy
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            pass
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    log.info("%s: port %d is busy; using %d", name, preferred, port)
    return port


# --------------------------------------------------------------------------------------- health checks

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a user's proxy


def _http(url: str, data: dict[str, Any] | None = None, timeout: float = 3.0) -> Any:
    """GET (or POST ``data`` as JSON) ``url``; the decoded JSON body, or the text when it is not JSON."""
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    with _OPENER.open(req, timeout=timeout) as resp:
        text = resp.read().decode()
    try:
        return json.loads(text)
    except ValueError:
        return text


def _http_ok(url: str) -> bool:
    try:
        _http(url)
        return True
    except (OSError, urllib.error.URLError):
        return False


def _s3_client(state: StackState) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=state.services["s3"].url,
        aws_access_key_id=state.access_key,
        aws_secret_access_key=state.secret_key,
        region_name=REGION,
        config=Config(connect_timeout=3, read_timeout=5, retries={"max_attempts": 1}),
    )


def _s3_up(state: StackState) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        _s3_client(state).head_bucket(Bucket=BUCKET)
        return True
    except (BotoCoreError, ClientError):  # connection refused, missing bucket (moto restarted): down either way
        return False


def online_workers(prefect_url: str) -> dict[str, float]:
    """The workers the Prefect server lists as ONLINE for the pool: name -> last heartbeat (epoch s)."""
    from datetime import datetime

    try:
        workers = _http(f"{prefect_url}/api/work_pools/{POOL}/workers/filter", data={})
    except (OSError, urllib.error.URLError):
        return {}
    return {
        w["name"]: datetime.fromisoformat(w["last_heartbeat_time"].replace("Z", "+00:00")).timestamp()
        for w in workers
        if isinstance(w, dict) and w.get("status") == "ONLINE" and w.get("last_heartbeat_time")
    }


def healthy(state: StackState, name: str) -> bool:
    """The service's process runs and it answers its health check."""
    svc = state.services.get(name)
    if svc is None or not alive(svc):
        return False
    if name == "s3":
        return _s3_up(state)
    if name == "mlflow":
        return _http_ok(f"{svc.url}/health")
    if name == "prefect":
        return _http_ok(f"{svc.url}/api/health")
    if name == "worker":
        return "prefect" in state.services and WORKER_NAME in online_workers(state.services["prefect"].url)
    raise ValueError(name)


def _wait(name: str, proc: subprocess.Popen[bytes], ready: Callable[[], bool], t0: float, what: str) -> None:
    """Poll ``ready`` until it holds; fail at once when the process exits, or after START_TIMEOUT_S."""
    while not ready():
        if proc.poll() is not None:
            raise StackError(f"{name} exited with status {proc.returncode} while starting", name, log_tail(name))
        if time.monotonic() - t0 > START_TIMEOUT_S:
            raise StackError(f"{name} was not ready after {START_TIMEOUT_S:.0f} s", name, log_tail(name))
        time.sleep(0.25)
    log.info("%s up at %s (%.1f s)", name, what, time.monotonic() - t0)


# ---------------------------------------------------------------------------------------------- up


def _record(state: StackState, name: str, proc: subprocess.Popen[bytes], url: str, port: int | None) -> Service:
    svc = Service(name=name, pid=proc.pid, url=url, port=port, started=_proc_start(proc.pid))
    state.services[name] = svc
    save_state(state)  # at once: an interrupted ``up`` leaves nothing that ``down`` cannot find
    return svc


def _start(state: StackState, gpu_slots: int) -> None:
    """Start every service in order, recording each in ``stack.json`` as soon as it runs."""
    root = Path(state.repo_root)
    home = stack_dir()
    base = _base_env()
    creds = {"AWS_ACCESS_KEY_ID": state.access_key, "AWS_SECRET_ACCESS_KEY": state.secret_key, "AWS_DEFAULT_REGION": REGION}

    # 1. S3-protocol endpoint (moto accepts any key pair; it keeps objects in memory only).
    t0 = time.monotonic()
    port = _free_port("s3", DEFAULT_PORTS["s3"])
    url = f"http://127.0.0.1:{port}"
    proc = _spawn("s3", [executable("moto_server"), "-H", "127.0.0.1", "-p", str(port)], base)
    _record(state, "s3", proc, url, port)
    _wait("s3", proc, lambda: _http_ok(f"{url}/moto-api/"), t0, url)
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        _s3_client(state).create_bucket(Bucket=BUCKET)
    except (BotoCoreError, ClientError) as e:
        raise StackError(f"creating bucket {BUCKET} failed: {type(e).__name__}: {e}", "s3", log_tail("s3")) from None
    s3_url = url

    # 2. MLflow (proxies artifacts to s3://midpo/mlflow) and 3. Prefect server: both start at once (their
    # imports take seconds of CPU each), then each is waited for in order.
    t_mlflow = time.monotonic()
    mlflow_port = _free_port("mlflow", DEFAULT_PORTS["mlflow"])
    mlflow_env = {**base, **creds, "AWS_ENDPOINT_URL": s3_url, "MLFLOW_S3_ENDPOINT_URL": s3_url, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow_argv = [executable("mlflow"), "server", "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}", "--artifacts-destination", f"s3://{BUCKET}/mlflow"]
    mlflow_proc = _spawn("mlflow", [*mlflow_argv, "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"], mlflow_env, cwd=home)
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    _record(state, "mlflow", mlflow_proc, mlflow_url, mlflow_port)

    t_prefect = time.monotonic()
    prefect_port = _free_port("prefect", DEFAULT_PORTS["prefect"])
    prefect_home = home / "prefect"
    prefect_home.mkdir(parents=True, exist_ok=True)
    server_env = {**base, "PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    prefect_proc = _spawn("prefect", [executable("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)], server_env, cwd=home)
    prefect_url = f"http://127.0.0.1:{prefect_port}"
    _record(state, "prefect", prefect_proc, prefect_url, prefect_port)

    _wait("mlflow", mlflow_proc, lambda: _http_ok(f"{mlflow_url}/health"), t_mlflow, mlflow_url)
    _wait("prefect", prefect_proc, lambda: _http_ok(f"{prefect_url}/api/health"), t_prefect, prefect_url)

    # 4. Work pool and the ``gpu`` limit at once (the limit is updated when the server's database already has
    # it), then the deployments of prefect.yaml and 5. the process worker, also at once: flow runs inherit the
    # worker's environment, i.e. the whole stack.
    t0 = time.monotonic()
    prefect = executable("prefect")
    api_env = {**base, "PREFECT_HOME": str(prefect_home), "PREFECT_API_URL": f"{prefect_url}/api"}
    log_path(SETUP).write_text("")
    pool = _cli([prefect, "work-pool", "create", POOL, "--type", "process", "--overwrite"], api_env)
    gcl = _cli([prefect, "gcl", "create", GPU_LIMIT, "--limit", str(gpu_slots)], api_env)
    _finish(pool)
    if not _finish(gcl, ok=["already exists"]):
        _finish(_cli([prefect, "gcl", "update", GPU_LIMIT, "--limit", str(gpu_slots)], api_env))
    deploy = _cli([prefect, "--no-prompt", "deploy", "--all"], api_env, cwd=root)

    worker_home = home / "worker-home"
    worker_home.mkdir(parents=True, exist_ok=True)
    worker_env = {
        **api_env,
        **creds,
        "MLFLOW_TRACKING_URI": mlflow_url,
        "AWS_ENDPOINT_URL": s3_url,
        "MIDPO_ARTIFACT_ROOT": f"s3://{BUCKET}/artifacts",
        "MIDPO_HOME": str(worker_home),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "midpo",
    }
    t_worker, since = time.monotonic(), time.time() - 1.0
    worker = _spawn("worker", [prefect, "worker", "start", "--pool", POOL, "--name", WORKER_NAME], worker_env, cwd=root)
    _record(state, "worker", worker, f"pool {POOL}", None)
    _finish(deploy)
    log.info("prefect: work pool %s, concurrency limit %s=%d, deployments of %s (%.1f s)", POOL, GPU_LIMIT, gpu_slots, root / "prefect.yaml", time.monotonic() - t0)
    # A heartbeat since this start: the server still lists a worker of an earlier ``up`` as online for 90 s.
    _wait("worker", worker, lambda: online_workers(prefect_url).get(WORKER_NAME, 0.0) >= since, t_worker, f"pool {POOL} (online)")


def up(gpu_slots: int = 2) -> int:
    """Start the stack (0), or say it already runs (0); on a failure stop what was started (1)."""
    if gpu_slots < 1:
        raise StackError("--gpu-slots must be at least 1")
    existing = load_state()
    if existing is not None:
        running = [s for s in existing.services.values() if alive(s)]
        if existing.complete and len(running) == len(SERVICES):
            log.info("the stack is already up (%s); `midpo stack status` checks it, `midpo stack down` stops it", state_path())
            if gpu_slots != existing.gpu_slots:
                log.warning("it has %d gpu slot(s), not %d: `prefect gcl update gpu --limit %d` resizes it", existing.gpu_slots, gpu_slots, gpu_slots)
            return 0
        if running:
            log.warning("a partial stack is running (%s): stopping it first", ", ".join(f"{s.name} pid {s.pid}" for s in running))
        else:
            log.info("removing a stale %s (its processes are gone)", state_path())
        _stop_all(existing)
        state_path().unlink(missing_ok=True)

    state = StackState(access_key=secrets.token_hex(10).upper(), secret_key=secrets.token_hex(20), gpu_slots=gpu_slots, repo_root=str(repo_root()))
    t0 = time.monotonic()
    try:
        _start(state, gpu_slots)
    except BaseException as e:  # Ctrl-C included: never leave half a stack behind
        failed = e.service if isinstance(e, StackError) else None
        try:
            _stop_all(state)
        finally:
            state_path().unlink(missing_ok=True)
        if not isinstance(e, StackError):
            raise
        print(f"error: stack up failed: {e}", file=sys.stderr)
        if failed:
            print(f"--- last lines of {log_path(failed)} ---\n{e.log_tail}", file=sys.stderr)
        return 1
    state.complete = True
    save_state(state)
    log.info("stack up in %.1f s; use it with: eval \"$(midpo stack status --env)\"", time.monotonic() - t0)
    return 0


# --------------------------------------------------------------------------------------- down, status


def _stop_all(state: StackState) -> None:
    """Stop every recorded service, the worker first (it would only log errors once the server is gone)."""
    errors = []
    for name in reversed(SERVICES):
        if name in state.services:
            try:
                _stop(state.services[name])
            except StackError as e:
                errors.append(str(e))
    if errors:
        raise StackError("; ".join(errors))


def down() -> int:
    """Stop every process of ``stack.json`` and remove the file (0, also when nothing was up)."""
    state = load_state()
    if state is None:
        log.info("no stack is up (no %s)", state_path())
        return 0
    t0 = time.monotonic()
    _stop_all(state)
    state_path().unlink(missing_ok=True)
    log.info("stack down in %.1f s (state, logs and databases stay in %s)", time.monotonic() - t0, stack_dir())
    return 0


def status(env: bool = False) -> int:
    """A table of every service and its health (0 when all are up), or with ``env`` the export lines."""
    state = load_state()
    if state is None:
        print(f"no stack is up (no {state_path()}); start one with `midpo stack up`", file=sys.stderr)
        return 1
    if env:  # only export lines on stdout: the output is meant for eval
        if not state.complete or not all(name in state.services and alive(state.services[name]) for name in SERVICES):
            print("the stack is not (completely) up: see `midpo stack status`", file=sys.stderr)
            return 1
        for name, value in state.env.items():
            print(f"export {name}={shlex.quote(value)}")
        return 0
    print(f"{'service':8s} {'pid':>8s}  {'url':32s} state")
    ok = state.complete
    for name in SERVICES:
        svc = state.services.get(name)
        up = svc is not None and healthy(state, name)
        ok = ok and up
        print(f"{name:8s} {svc.pid if svc else '-':>8}  {svc.url if svc else '-':32s} {'up' if up else 'down'}")
    return 0 if ok else 1


# ------------------------------------------------------------------------- a server for one process


def serve_prefect(home: Path) -> str:
    """A Prefect server for this process alone (``midpo run`` without ``PREFECT_API_URL``): SQLite under
    ``home``, a free port, stopped when the process exits. Returns its API URL.

    Prefect's own temporary server would do the same, but in this process's group: Ctrl-C in the terminal
    stopped it along with the run, which then spent minutes retrying the dead API instead of ending. Here
    the server has a session of its own and outlives the interrupt until the run has recorded it."""
    import atexit

    home.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    t0 = time.monotonic()
    with (home / "server.log").open("ab") as out:
        argv = [str(executable("prefect")), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    atexit.register(_stop_server, proc)
    url = f"http://127.0.0.1:{port}"
    while not _http_ok(f"{url}/api/health"):
        if proc.poll() is not None or time.monotonic() - t0 > START_TIMEOUT_S:
            _stop_server(proc)
            tail = "\n".join((home / "server.log").read_text(errors="replace").splitlines()[-20:])
            raise StackError(f"the Prefect server for this run did not start (log: {home / 'server.log'})", "prefect", tail)
        time.sleep(0.25)
    log.info("Prefect API of this run at %s (%.1f s; database under %s)", url, time.monotonic() - t0, home)
    return f"{url}/api"


def _stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
