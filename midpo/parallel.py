"""Work in child processes: a pipeline stage that runs a model (``run_in_child``) and the independent jobs
of one stage (the score models, the evaluations of several models: ``run_jobs``).

Children come from a fork server that imported torch, transformers and midpo once: starting one costs a
fork instead of seconds of imports, and nothing is forked from a process whose torch or tokenizer thread
pools already run (they do not survive a fork). A killed child fails its own job with
``BrokenProcessPool`` while the parent survives, which is what lets a Prefect task retry it.

Children run in the caller's current environment (``MIDPO_HOME``, credentials) and directory, and get
an explicit share of torch threads, so parallel jobs never oversubscribe the cores. Figures are
reproducible at a fixed thread count: the tiny base and score models come out bit-identical on 1 and 2
threads, the router and sampled generation do not. Children ignore Ctrl-C: the parent stops them
(:func:`stop_children`), so an interrupted run ends instead of retrying what the signal killed.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor, wait
from contextlib import contextmanager
from multiprocessing.context import BaseContext
from typing import Any

# Imported once by the fork server; every child forks with them loaded.
PRELOAD = ["torch", "transformers", "peft", "trl", "datasets", "midpo.pipeline", "midpo.train.methods", "midpo.eval.evaluate"]

_context: BaseContext | None = None
_pools: weakref.WeakSet[ProcessPoolExecutor] = weakref.WeakSet()  # the pools with live children, to stop them
_commands: weakref.WeakSet[subprocess.Popen[bytes]] = weakref.WeakSet()  # running launchers (run_command)
_stopping = threading.Event()


def _children() -> BaseContext:
    """The fork-server context (spawn where there is no fork server, i.e. Windows)."""
    global _context
    if _context is None:
        if "forkserver" in multiprocessing.get_all_start_methods():
            _context = multiprocessing.get_context("forkserver")
            _context.set_forkserver_preload(PRELOAD)
        else:
            _context = multiprocessing.get_context("spawn")
    return _context


def available_cores() -> int:
    """The cores this process may run on (``sched_getaffinity`` is Linux-only; macOS has every core)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Interrupted(RuntimeError):
    """The run was interrupted (Ctrl-C) while this job waited to start."""


def die_with_parent(sig: int) -> None:
    """Get ``sig`` when the parent process dies (Linux's PR_SET_PDEATHSIG; elsewhere nothing)."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, sig)


def _child_init(threads: int, log_level: int, env: dict[str, str], cwd: str) -> None:
    import torch

    # Ctrl-C in a terminal reaches the whole process group: the parent alone decides (stop_children), so a
    # child never dies of it half-way into a retry.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL)  # with the fork server, which exits with the parent: no orphan keeps a GPU busy
    # The fork server's environment and directory are those of when it started: use the caller's current ones.
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    if not logging.getLogger().handlers:  # the parent's log lines go to stderr; a child's should too
        logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("midpo").setLevel(log_level)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def run_in_children(fn: Callable[..., Any], jobs: Mapping[str, tuple[Any, ...]], workers: int, threads: int | None = None) -> dict[str, Any]:
    """``{name: fn(*args)}`` for every job, each in a child process, at most ``workers`` at once. Each child
    gets ``threads`` torch threads (default: its share of the parent's)."""
    if not jobs:
        return {}
    n = max(1, min(workers, len(jobs)))
    share = threads or max(1, _threads() // n)
    level = logging.getLogger("midpo").getEffectiveLevel()
    if _stopping.is_set():
        raise Interrupted("the run was interrupted; no new child process starts")
    with ProcessPoolExecutor(max_workers=n, mp_context=_children(), initializer=_child_init, initargs=(share, level, dict(os.environ), os.getcwd())) as pool:
        _pools.add(pool)
        try:
            futures = {name: pool.submit(fn, *args) for name, args in jobs.items()}
            pending = set(futures.values())
            while pending:  # with a timeout: a signal handled by another thread never wakes a lock wait
                _, pending = wait(pending, timeout=0.5)
        except KeyboardInterrupt:  # Ctrl-C here (midpo compare, in-process stages): the children ignore it
            stop_children()
            raise
        return {name: future.result() for name, future in futures.items()}


def stop_children() -> None:
    """Stop the run (Ctrl-C): kill every live child of this process's pools; none starts from now on, and
    :func:`stopping` tells retry logic not to try again."""
    _stopping.set()
    for pool in list(_pools):
        # the executor has no public kill; a pool already shut down holds None there
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()
    for command in list(_commands):
        if command.poll() is None:
            # torchrun puts every rank in a session of its own and, on SIGTERM, stops them before it exits
            os.killpg(command.pid, signal.SIGTERM)


def run_command(cmd: list[str], env: Mapping[str, str]) -> int:
    """Run ``cmd`` (a launcher such as ``accelerate launch``) in a process group of its own and return its
    exit code. Ctrl-C in a terminal does not reach it (a session of its own): :func:`stop_children` stops it."""
    if _stopping.is_set():
        raise Interrupted("the run was interrupted; no new process starts")
    command = subprocess.Popen(cmd, env=dict(env), start_new_session=True)
    _commands.add(command)
    try:
        while True:  # with a timeout, for the same reason as run_in_children
            try:
                return command.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
    except KeyboardInterrupt:
        stop_children()
        raise
    except BaseException:  # anything else ending the wait (a timeout of the task, a bug): this command stops too
        if command.poll() is None:
            os.killpg(command.pid, signal.SIGTERM)
        raise


def stopping() -> bool:
    return _stopping.is_set()


def run_in_child(fn: Callable[..., Any], *args: Any, threads: int | None = None) -> Any:
    """``fn(*args)`` in one child process with ``threads`` torch threads (default: all of the parent's)."""
    return run_in_children(fn, {"job": args}, 1, threads)["job"]


LAUNCHED = "MIDPO_LAUNCHED"  # set in the processes midpo.launch starts (a pod's own WORLD_SIZE means nothing here)


def launched_processes() -> int:
    """How many processes ``midpo.launch`` started for this stage; 1 outside a launch."""
    return int(os.environ.get("WORLD_SIZE", "1")) if os.environ.get(LAUNCHED) else 1


@contextmanager
def main_process_first() -> Iterator[None]:
    """Under a launch, the main process runs the block, then the others (accelerate's ``main_process_first``;
    every process must enter it); outside one, just the block."""
    if launched_processes() == 1:
        yield
        return
    from accelerate import PartialState

    with PartialState().main_process_first():
        yield


def run_jobs(fn: Callable[..., Any], jobs: Mapping[str, tuple[Any, ...]], workers: int) -> dict[str, Any]:
    """:func:`run_in_children` when there is parallel work to do; in-process, one after another, when
    ``workers`` is 1, there is a single job (no child to pay for), or under a launcher (every process of
    the launch runs the same jobs in the same order, so that their collectives match)."""
    if workers <= 1 or len(jobs) <= 1 or launched_processes() > 1:
        return {name: fn(*args) for name, args in jobs.items()}
    return run_in_children(fn, jobs, workers)
