"""The Prefect API that flows run from this process (``midpo run``, ``midpo retrain``, benchmarks) report to."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

from midpo.config import MidpoConfig
from midpo.storage import midpo_home


@contextmanager
def prefect_api(cfg: MidpoConfig) -> Iterator[int]:
    """The Prefect API this process's flows report to, with its ``gpu`` limit; yields the limit's size.

    A configured API (``PREFECT_API_URL``, a Prefect profile, a test harness) is used as it is. Without
    one, a server of this run's own (``midpo.stack.serve_prefect``, database under ``$MIDPO_HOME/prefect``),
    and Prefect's results there too. The limit is created where missing, sized ``run.gpu_slots`` (default
    one per visible GPU, 1 without one; at least ``run.launch``'s processes); an existing one is left as its operator sized it."""
    if PREFECT_API_URL.value():
        settings = nullcontext()
    else:
        from midpo.stack import serve_prefect

        home = midpo_home() / "prefect"
        settings = temporary_settings({PREFECT_API_URL: serve_prefect(home), PREFECT_LOCAL_STORAGE_PATH: home / "storage"})
    with settings:
        import torch
        from midpo_tasks.stages import ensure_gpu_limit

        from midpo.launch import processes

        slots = cfg.run.gpu_slots or torch.cuda.device_count() or 1
        if cfg.run.launch is not None:  # a launched stage holds a slot per process
            slots = max(slots, processes(cfg.run.launch))
        yield ensure_gpu_limit(slots)


