"""``midpo bench pipeline``: what orchestration costs on top of the work, and what a rerun costs.

Two runs of the ``midpo`` flow (as ``midpo run`` runs it: its own Prefect API, a task per stage, model
stages in child processes under the ``gpu`` limit) on a fresh ``MIDPO_HOME``, in this process:

- **first**: from scratch. ``orchestration_overhead`` = (the flow's wall time - the sum of every stage's
  own compute) / the flow's wall time. A stage's compute is ``StageOutput.seconds``: its work from the
  moment it holds its slot (MLflow run included), so the overhead is everything else: flow and task run
  bookkeeping, child process starts, cache checks, waiting, the report. Stages that overlap (the experts
  with two slots) count twice in the sum, which makes the overhead look smaller: run with one slot (the
  CPU default) to measure it.
- **rerun**: unchanged inputs, every stage a cache hit. ``rerun_vs_first`` = its wall time / the first's.

The Prefect API's start (the run's own server, unless one is configured) is timed on its own and left
out of both walls: it is paid once per process, not per run. Targets (issue 10): overhead <= 0.10, rerun <= 0.10 of the first run.

Last line: ``RESULT orchestration_overhead=<x> rerun_vs_first=<y>``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

TARGETS = {"orchestration_overhead": 0.10, "rerun_vs_first": 0.10}


def _timed_flow(profile: str, overrides: list[str], report_dir: Path) -> tuple[dict[str, Any], float]:
    from midpo_flows.pipeline import midpo

    t0 = time.perf_counter()
    summary = midpo(profile=profile, overrides=overrides, report_dir=str(report_dir))
    return summary, time.perf_counter() - t0


def run(profile: str, overrides: list[str], json_path: Path | None = None) -> dict[str, Any]:
    """Both runs on a fresh ``MIDPO_HOME`` (a temporary folder: artifacts, MLflow, the Prefect database),
    this process's environment restored afterwards."""
    from midpo_bench.experts import _load, machine_info
    from midpo_flows.api import prefect_api

    from midpo.config import load_config

    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="midpo-bench-pipeline-") as tmp:
        home = Path(tmp)
        # a fresh store, or the first run finds a cache: no artifact root or tracking server of the user's
        with mock.patch.dict(os.environ, {"MIDPO_HOME": str(home)}):
            for name in ("MIDPO_ARTIFACT_ROOT", "MLFLOW_TRACKING_URI"):
                os.environ.pop(name, None)
            cfg = load_config(profile, overrides)
            t0 = time.perf_counter()
            with prefect_api(cfg) as slots:
                api_seconds = time.perf_counter() - t0
                first, first_wall = _timed_flow(profile, overrides, home / "reports" / "first")
                rerun, rerun_wall = _timed_flow(profile, overrides, home / "reports" / "rerun")

    compute = sum(first["run"]["stage_seconds"].values())
    result = {
        "profile": profile,
        "gpu_slots": slots,
        "api_start_seconds": round(api_seconds, 3),
        "first": {"wall_seconds": round(first_wall, 3), "stage_compute_seconds": round(compute, 3), "stage_seconds": first["run"]["stage_seconds"]},
        "rerun": {"wall_seconds": round(rerun_wall, 3), "cache_hits": rerun["run"]["cache_hits"], "stages": len(rerun["run"]["stage_seconds"])},
        "orchestration_overhead": (first_wall - compute) / first_wall,
        "rerun_vs_first": rerun_wall / first_wall,
        "targets": TARGETS,
        "machine": {**machine_info(), "load_average_before": load_before, "load_average_after": _load()},
    }
    result["met"] = {k: result[k] <= v for k, v in TARGETS.items()}
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2))
    return result


def result_line(result: dict[str, Any]) -> str:
    return f"RESULT orchestration_overhead={result['orchestration_overhead']:.3f} rerun_vs_first={result['rerun_vs_first']:.3f}"


def format_report(result: dict[str, Any]) -> str:
    first, rerun = result["first"], result["rerun"]
    rows = [
        f"pipeline benchmark: profile {result['profile']}, {result['gpu_slots']} gpu slot(s), Prefect API started in {result['api_start_seconds']:.1f} s",
        "",
        f"{'stage':18s} {'compute s':>10s}",
        *(f"{name:18s} {seconds:10.1f}" for name, seconds in first["stage_seconds"].items()),
        "",
        f"first run wall        {first['wall_seconds']:8.1f} s   stage compute {first['stage_compute_seconds']:.1f} s",
        f"orchestration overhead {result['orchestration_overhead']:7.1%}   (target <= {TARGETS['orchestration_overhead']:.0%}: {'met' if result['met']['orchestration_overhead'] else 'MISSED'})",
        f"rerun wall            {rerun['wall_seconds']:8.1f} s   cache hits {len(rerun['cache_hits'])}/{rerun['stages']}",
        f"rerun / first         {result['rerun_vs_first']:8.1%}   (target <= {TARGETS['rerun_vs_first']:.0%}: {'met' if result['met']['rerun_vs_first'] else 'MISSED'})",
        result_line(result),
    ]
    return "\n".join(rows)
