"""Shared fixtures: an isolated MIDPO_HOME for every test, and a local S3-protocol endpoint (moto) on demand."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def module_home(tmp_path_factory):
    return tmp_path_factory.mktemp("midpo-home")


@pytest.fixture(autouse=True)
def midpo_home(request, tmp_path, monkeypatch) -> Iterator:
    """Every test gets its own MIDPO_HOME (caches, artifacts) under tmp_path; nothing is written into the repo.

    A module marked ``shared_home`` shares one (``module_home``): its tests read what one module-scoped
    pipeline run built."""
    if request.node.get_closest_marker("shared_home"):
        home = request.getfixturevalue("module_home")
    else:
        home = tmp_path / "midpo-home"
        home.mkdir()
    monkeypatch.setenv("MIDPO_HOME", str(home))
    monkeypatch.delenv("MIDPO_ARTIFACT_ROOT", raising=False)
    yield home


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (a free port), started once per session; yields its http:// URL.

    While the session lasts, AWS_ENDPOINT_URL and test credentials point every boto3 client at it; the
    previous environment is restored at the end.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", url)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            mp.delenv(name, raising=False)
        try:
            yield url
        finally:
            server.stop()


@pytest.fixture
def bucket(s3_endpoint) -> str:
    """A fresh, empty bucket on the moto endpoint; returns its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One real, temporary Prefect API (SQLite) for the whole session (Prefect's testing guide)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):  # a loaded 2-core machine needs more than 30 s
        yield
