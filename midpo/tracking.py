"""MLflow tracking: where runs go and one context manager per stage.

Without ``MLFLOW_TRACKING_URI`` the embedded default is a SQLite store under ``MIDPO_HOME`` whose
experiments keep their artifacts under the artifact root (never ``./mlruns`` of the working directory).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from midpo.storage import artifact_root, midpo_home


def tracking_uri() -> str:
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    midpo_home().mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{midpo_home() / 'mlflow.db'}"


def _experiment_id(name: str) -> str:
    import mlflow

    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    # A tracking server with an artifact root decides the location itself; the local store needs one.
    location = None if os.environ.get("MLFLOW_TRACKING_URI") else f"{artifact_root()}/mlflow"
    return mlflow.create_experiment(name, artifact_location=location)


@contextmanager
def stage_run(experiment: str, stage: str, params: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> Iterator[Any]:
    """An MLflow run for one stage; nested when a parent run is active. Yields the ``mlflow`` module."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    nested = mlflow.active_run() is not None
    with mlflow.start_run(experiment_id=_experiment_id(experiment), run_name=stage, nested=nested, tags={"midpo.stage": stage, **(tags or {})}):
        if params:
            mlflow.log_params(_flatten(params))
        yield mlflow


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
