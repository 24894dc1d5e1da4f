"""A training stage on several processes, one per GPU, under ``accelerate launch`` (``run.launch``).

:func:`launch_stage` writes the stage, the config and the input references to a folder and starts::

    python -m midpo.launch accelerate --config_file CONFIG --num_processes N --main_process_port PORT \\
        -m midpo.launch rank FOLDER

The first ``midpo.launch`` is accelerate's own launcher (``accelerate launch``) run so that it dies with
the process that started it; it starts N processes of the second, the ranks. Every rank runs the stage
function: the trainer splits the batches across them (DDP) or also shards the model (DeepSpeed ZeRO-3,
FSDP) and gathers the weights before saving (``MidpoDPOTrainer.save_trained``). The main rank alone
publishes (``ArtifactStore.publish``) and tracks the stage as an MLflow run, and writes the stage's output,
or its exception, back to the folder. The caller re-raises that exception, so a retry policy sees the real
failure (a config error is not retried); a launch that died without one (a rank killed) is a
:class:`LaunchFailed`, which is transient.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import socket
import sys
import tempfile
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from midpo.config import ConfigError, LaunchConfig, MidpoConfig, TrainingConfig
from midpo.parallel import LAUNCHED, die_with_parent, main_process_first, run_command

if TYPE_CHECKING:
    from midpo.pipeline import Stage
    from midpo.stages import StageOutput
    from midpo.storage import ArtifactRef

log = logging.getLogger(__name__)

SPEC, OUTPUT, ERROR = "stage.pkl", "output.pkl", "error.pkl"


class LaunchFailed(RuntimeError):
    """The launched processes exited with an error and the main rank left no exception (a rank was killed)."""


def launches(cfg: MidpoConfig, stage: Stage) -> bool:
    """Whether ``stage`` runs under ``accelerate launch`` in this profile."""
    return cfg.run.launch is not None and stage.name in cfg.run.launch.stages


def processes(launch: LaunchConfig) -> int:
    """The number of processes a launch starts: ``num_processes``, or one per visible GPU."""
    import torch

    n = launch.num_processes or torch.cuda.device_count()
    if n < 1:
        raise ConfigError("run.launch.num_processes is null and no GPU is visible: set it (one process per GPU)")
    return n


def section_of(stage: Stage, cfg: MidpoConfig) -> Any:
    """The config section ``stage`` receives. A launched stage's training config holds its number of
    processes: it multiplies the effective batch, so it is part of what the adapter's version hashes."""
    section = getattr(cfg, stage.section)
    if not launches(cfg, stage):
        return section
    n = processes(cfg.run.launch)
    if isinstance(section, TrainingConfig):
        return dataclasses.replace(section, processes=n)
    return dataclasses.replace(section, training=dataclasses.replace(section.training, processes=n))  # the router's


def config_file(launch: LaunchConfig) -> Path:
    path = Path(launch.config_file).expanduser().absolute()
    if not path.is_file():
        raise ConfigError(f"run.launch.config_file: {path} does not exist (a relative path is read from {Path.cwd()}; see infra/accelerate)")
    return path


def _free_port() -> int:
    """A port for the ranks' rendezvous: two launches on one machine (the experts side by side) must not share one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_stage(stage: Stage, cfg: MidpoConfig, inputs: dict[str, ArtifactRef], parent_run_id: str | None, threads: int | None = None) -> StageOutput:
    """Run ``stage`` on :func:`processes` processes under ``accelerate launch`` and return the main rank's
    output. ``threads`` (the caller's share of the cores) are split between the ranks."""
    launch = cfg.run.launch
    assert launch is not None and stage.name in launch.stages, f"stage {stage.name} is not launched in this profile"
    n = processes(launch)
    with tempfile.TemporaryDirectory(prefix=f"midpo-launch-{stage.name}-") as tmp:
        folder = Path(tmp)
        (folder / SPEC).write_bytes(pickle.dumps((stage, cfg, inputs, parent_run_id)))
        cmd = [
            sys.executable, "-m", "midpo.launch", "accelerate",
            "--config_file", str(config_file(launch)), "--num_processes", str(n), "--main_process_port", str(_free_port()),
            "-m", "midpo.launch", "rank", str(folder),
        ]
        env = {**os.environ, LAUNCHED: "1"}
        if threads:
            env["OMP_NUM_THREADS"] = str(max(1, threads // n))
        log.info("stage %s: launching %d processes with %s", stage.name, n, launch.config_file)
        code = run_command(cmd, env)
        if (folder / ERROR).is_file():
            error, trace = pickle.loads((folder / ERROR).read_bytes())
            log.error("stage %s failed on the main rank:\n%s", stage.name, trace)
            raise error
        if code != 0 or not (folder / OUTPUT).is_file():
            raise LaunchFailed(f"stage {stage.name}: the {n} launched processes exited with code {code} and no result; their log is above")
        return pickle.loads((folder / OUTPUT).read_bytes())


def _run_rank(folder: Path) -> None:
    """One rank: the stage function; on the main rank tracked as a stage run, its output written back."""
    import signal

    import torch
    from accelerate import PartialState

    from midpo.pipeline import execute_stage
    from midpo.storage import ArtifactStore

    die_with_parent(signal.SIGKILL)  # with torchrun, should it be killed before it can stop this rank
    if not torch.cuda.is_available():  # gloo processes on the CPU; TrainingArguments reads the same switch
        os.environ["ACCELERATE_USE_CPU"] = "true"
    state = PartialState(cpu=not torch.cuda.is_available())
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {state.process_index}] %(levelname)s %(name)s: %(message)s")
    stage, cfg, inputs, parent_run_id = pickle.loads((folder / SPEC).read_bytes())
    try:
        store = ArtifactStore()
        with main_process_first():  # one download of the inputs (the base) into the local cache, not one per rank
            for ref in inputs.values():
                store.fetch(store.key_of(ref.uri))
        if state.is_main_process:
            out = execute_stage(stage, cfg, inputs, parent_run_id=parent_run_id)
            (folder / OUTPUT).write_bytes(pickle.dumps(out))
        else:
            stage.run(section_of(stage, cfg), dict(inputs), False)
    except BaseException as e:
        if state.is_main_process and not _peer_failed(e):
            (folder / ERROR).write_bytes(_pickled_error(e))
        raise


def _peer_failed(e: BaseException) -> bool:
    """A collective that failed because another rank died (NCCL: a ``DistError``; gloo: a RuntimeError of its
    transport). It says nothing about why: the launch then fails as a :class:`LaunchFailed`."""
    import torch.distributed

    return isinstance(e, torch.distributed.DistError) or (isinstance(e, RuntimeError) and "gloo/transport" in str(e))


def _pickled_error(e: BaseException) -> bytes:
    trace = traceback.format_exc()
    try:
        pickle.loads(pickle.dumps(e))  # an exception whose constructor takes other arguments does not round-trip
        return pickle.dumps((e, trace))
    except Exception:
        return pickle.dumps((RuntimeError(f"{type(e).__name__}: {e}"), trace))


def _run_launcher(args: list[str]) -> None:
    """accelerate's ``accelerate launch``, dying with the process that started it (torchrun then stops its
    ranks), so a killed pipeline leaves no rank holding a GPU."""
    import signal

    from accelerate.commands.launch import launch_command, launch_command_parser

    die_with_parent(signal.SIGTERM)
    launch_command(launch_command_parser().parse_args(args))


def main(argv: list[str] | None = None) -> Any:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["accelerate"]:
        return _run_launcher(argv[1:])
    if argv[:1] == ["rank"] and len(argv) == 2:
        return _run_rank(Path(argv[1]))
    raise SystemExit("usage: python -m midpo.launch accelerate ARGS... | rank FOLDER (started by midpo.launch.launch_stage)")


if __name__ == "__main__":
    main()
