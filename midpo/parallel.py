"""Independent jobs of one stage (the experts, the score models, the evaluations of several models): one
after another in-process, or in spawned child processes ``workers`` at a time.

Children are spawned, not forked: torch's and the tokenizers' thread pools do not survive a fork. A killed
child fails its own job with ``BrokenProcessPool`` while the parent survives. Children inherit the
environment (``MIDPO_HOME``, credentials) and split the parent's torch threads between them, so parallel
jobs never oversubscribe the cores; a job alone uses all of them (on the tiny world 2 threads train 1.5x
faster than 1). Figures are reproducible at a fixed thread count: the tiny base and score models come out
bit-identical on 1 and 2 threads, the router and sampled generation do not. Each child pays seconds of
imports, so callers spawn only for real work.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any


def _use_threads(n: int) -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def run_in_children(fn: Callable[..., Any], jobs: Mapping[str, tuple[Any, ...]], workers: int) -> dict[str, Any]:
    """``{name: fn(*args)}`` for every job, each in a spawned child, at most ``workers`` at once, each child
    with its share of the parent's torch threads."""
    if not jobs:
        return {}
    import torch

    n = max(1, min(workers, len(jobs)))
    share = max(1, torch.get_num_threads() // n)
    with ProcessPoolExecutor(max_workers=n, mp_context=get_context("spawn"), initializer=_use_threads, initargs=(share,)) as pool:
        futures = {name: pool.submit(fn, *args) for name, args in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def run_jobs(fn: Callable[..., Any], jobs: Mapping[str, tuple[Any, ...]], workers: int) -> dict[str, Any]:
    """:func:`run_in_children` when there is parallel work to do; in-process, one after another, when
    ``workers`` is 1 or there is a single job (no child to pay for)."""
    if workers <= 1 or len(jobs) <= 1:
        return {name: fn(*args) for name, args in jobs.items()}
    return run_in_children(fn, jobs, workers)
