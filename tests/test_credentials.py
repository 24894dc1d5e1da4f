"""No credential leaks: a whole pipeline run on an S3 artifact root, then every log line, MLflow record and
stored byte is searched for the secret."""

import json
import logging
import uuid
from pathlib import Path

import boto3
import mlflow

from midpo.cli import main
from midpo.config import load_config
from midpo.tracking import tracking_uri


def test_the_secret_appears_in_no_log_mlflow_record_or_artifact(bucket, s3_endpoint, midpo_home, monkeypatch, caplog, capsys, tmp_path):
    secret = f"midpo-test-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)  # moto accepts any key pair
    monkeypatch.setenv("MIDPO_ARTIFACT_ROOT", f"s3://{bucket}/midpo")
    caplog.set_level(logging.DEBUG)
    assert main(["run", "--profile", "tiny-ci", "--report-dir", str(tmp_path / "report")]) == 0

    out = capsys.readouterr()
    assert secret not in out.out + out.err and secret not in caplog.text
    mlflow.set_tracking_uri(tracking_uri())
    runs = mlflow.search_runs(experiment_names=[load_config("tiny-ci").run.experiment])
    assert len(runs) > 5 and secret not in runs.to_json()  # params, metrics, tags of every run
    client = mlflow.MlflowClient()
    versions = client.search_model_versions("name = 'midpo'")
    assert versions and secret not in json.dumps([dict(v) for v in versions], default=str)

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in page.get("Contents", [])]
    assert any(k.startswith("midpo/mlflow/") for k in keys) and any(k.startswith("midpo/models/midpo/") for k in keys)
    needle = secret.encode()
    leaked = [k for k in keys if needle in s3.get_object(Bucket=bucket, Key=k)["Body"].read()]
    leaked += [str(p) for p in Path(midpo_home).rglob("*") if p.is_file() and needle in p.read_bytes()]  # MLflow's SQLite, caches
    leaked += [str(p) for p in (tmp_path / "report").rglob("*") if p.is_file() and needle in p.read_bytes()]
    assert not leaked, f"the secret is stored in {leaked[:5]}"
