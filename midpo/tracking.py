"""MLflow tracking: where runs go and one context manager per stage.

Without ``MLFLOW_TRACKING_URI`` the embedded default is a SQLite store under ``MIDPO_HOME`` whose
experiments keep their artifacts under the artifact root (never ``./mlruns`` of the working directory).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from midpo.storage import artifact_root, local_copy, midpo_home

OUTPUT_TAG = "midpo.output."  # + output name, on a stage run: the version it produced or found (lineage)

# The embedded defaults this process returned: ``mlflow.set_tracking_uri`` exports its URI as
# MLFLOW_TRACKING_URI (for subprocesses), so that variable alone no longer says whether the user
# configured a tracking server (a later MIDPO_HOME would be ignored, experiments would land in ./mlruns).
_EXPORTED: set[str] = set()


def _configured_uri() -> str | None:
    """``MLFLOW_TRACKING_URI`` when the user set it; None when unset or only the embedded default."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return None if not uri or uri in _EXPORTED or uri == _default_uri() else uri


def _default_uri() -> str:
    return f"sqlite:///{midpo_home() / 'mlflow.db'}"


def tracking_uri() -> str:
    if uri := _configured_uri():
        return uri
    midpo_home().mkdir(parents=True, exist_ok=True)
    _EXPORTED.add(_default_uri())
    return _default_uri()


def _experiment_id(name: str) -> str:
    import mlflow

    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    # A tracking server with an artifact root decides the location itself; the local store needs one.
    location = None if _configured_uri() else f"{artifact_root()}/mlflow"
    return mlflow.create_experiment(name, artifact_location=location)


@contextmanager
def stage_run(
    experiment: str, stage: str, params: dict[str, Any] | None = None, tags: dict[str, str] | None = None, parent_run_id: str | None = None
) -> Iterator[Any]:
    """An MLflow run for one stage; nested under ``parent_run_id`` (a stage in another thread: MLflow's active
    run is per thread), else under the active run if any. Yields the ``mlflow`` module."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    nested = parent_run_id is not None or mlflow.active_run() is not None
    run = mlflow.start_run(
        experiment_id=_experiment_id(experiment), run_name=stage, nested=nested, parent_run_id=parent_run_id, tags={"midpo.stage": stage, **(tags or {})}
    )
    with run:
        if params:
            mlflow.log_params(_flatten(params))
        yield mlflow


# MLflow's limit on the metrics of one log_batch call (mlflow.utils.validation.MAX_METRICS_PER_BATCH).
_BATCH = 1000


def curve_metrics(history: list[dict[str, Any]], timestamp_ms: int | None = None) -> list[Any]:
    """The metrics of a transformers ``log_history``: every numeric key of every entry at its ``step``.

    Entries without a step, the ``step`` key itself, booleans and non-numbers are skipped; a (key, step,
    value) seen twice (``epoch`` appears in the train, eval and summary entries of one step) is kept once.
    """
    from mlflow.entities import Metric

    timestamp_ms = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    metrics, seen = [], set()
    for entry in history:
        step = entry.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        for key, value in entry.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            ident = (key, step, "nan" if math.isnan(value) else value)
            if ident not in seen:
                seen.add(ident)
                metrics.append(Metric(key, float(value), timestamp_ms, step))
    return metrics


def log_curves(experiment: str, name: str, history_uri: str) -> str:
    """Log a transformers ``log_history.json`` (file://, s3://, a path) as step-wise metric histories of an
    MLflow run named ``name``, nested under the active run (the stage's); returns the new run's id."""
    import mlflow
    from mlflow import MlflowClient

    history = json.loads(local_copy(history_uri).read_text(encoding="utf-8"))
    metrics = curve_metrics(history)
    mlflow.set_tracking_uri(tracking_uri())
    tags = {"midpo.curves_of": name, "midpo.curves_uri": history_uri}
    with mlflow.start_run(experiment_id=_experiment_id(experiment), run_name=name, nested=mlflow.active_run() is not None, tags=tags) as run:
        client = MlflowClient()
        for i in range(0, len(metrics), _BATCH):
            client.log_batch(run.info.run_id, metrics=metrics[i : i + _BATCH], synchronous=True)
    return run.info.run_id


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """MLflow params are flat strings: nested sections become dotted keys."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


def log_dataset(ref: Any, context: str = "training") -> None:
    """The dataset version as an MLflow dataset input of the active run: its URI as the source, its content
    version as the digest (nothing is read: the dataset stays where the artifact root keeps it)."""
    import warnings

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # a file:// URI matches two equivalent local source types; MLflow says so
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(ref.uri)
    mlflow.log_input(MetaDataset(source, name="midpo-dataset", digest=ref.version), context=context)
