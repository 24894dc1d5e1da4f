"""Where artifacts live: ``MIDPO_HOME``, the artifact root (file:// or s3://) and atomic, write-once versions.

An artifact version is a folder under the root. It is *complete* exactly when its ``_MANIFEST.json``
exists; the manifest is written last (s3: uploaded after every file; file://: the folder is assembled in
a temporary sibling and renamed into place), so a crash never leaves a version that looks complete, and
a complete version is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from midpo.parallel import launched_processes

log = logging.getLogger(__name__)

MANIFEST = "_MANIFEST.json"


def midpo_home() -> Path:
    """Everything of the embedded default lives here (``MIDPO_HOME``, default ``./midpo-runs``)."""
    return Path(os.environ.get("MIDPO_HOME", "midpo-runs")).resolve()


def artifact_root() -> str:
    """``MIDPO_ARTIFACT_ROOT`` (s3://bucket/prefix or file://...), default ``file://$MIDPO_HOME/artifacts``."""
    root = os.environ.get("MIDPO_ARTIFACT_ROOT") or (midpo_home() / "artifacts").as_uri()
    return root.rstrip("/")


def use_standard_s3_retries() -> None:
    """Every boto3 client of this process retries like :func:`s3_client`'s (standard mode, 8 attempts:
    5xx, throttling, dropped connections), MLflow's included, which otherwise gets boto3's legacy 5. A
    choice of the user's (``AWS_RETRY_MODE``, ``AWS_MAX_ATTEMPTS``) wins."""
    os.environ.setdefault("AWS_RETRY_MODE", "standard")
    os.environ.setdefault("AWS_MAX_ATTEMPTS", "8")


def s3_client() -> Any:
    """A boto3 S3 client; endpoint and credentials come from the standard AWS variables."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(retries={"mode": "standard", "max_attempts": 8}))


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


class NotFound(FileNotFoundError):
    """A path or URI that does not exist; the message says what and where."""


def local_copy(uri: str) -> Path:
    """A local path for ``uri``: a plain path, ``file://``, ``builtin:NAME`` (vendored data) or ``s3://``.

    s3 objects are downloaded once into ``$MIDPO_HOME/cache/s3``, keyed by bucket, key and ETag.
    """
    if uri.startswith("builtin:"):
        path = builtin_path(uri[len("builtin:") :])
    elif uri.startswith("s3://"):
        return _download_s3_object(uri)
    elif uri.startswith("file://"):
        path = Path(urlparse(uri).path)
    else:
        path = Path(uri)
    if not path.exists():
        raise NotFound(f"{uri}: no such file or directory")
    return path


def builtin_path(name: str) -> Path:
    """A file of the vendored real data (midpo/resources/data, see its SOURCES.md)."""
    return Path(str(resources.files("midpo.resources").joinpath("data", name)))


def _download_s3_object(uri: str) -> Path:
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    client = s3_client()
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NoSuchBucket"):
            raise NotFound(f"{uri}: no such object") from None
        raise
    etag = head["ETag"].strip('"')
    dest = midpo_home() / "cache" / "s3" / hashlib.sha256(f"{bucket}/{key}@{etag}".encode()).hexdigest()[:24]
    target = dest / Path(key).name
    if not target.exists():
        dest.mkdir(parents=True, exist_ok=True)
        tmp = dest / f".{uuid.uuid4().hex}.part"
        client.download_file(bucket, key, str(tmp))
        os.replace(tmp, target)
    return target


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class ArtifactRef:
    """A pointer that crosses stage boundaries: a URI and the content version behind it."""

    uri: str
    version: str


class ArtifactStore:
    """Write-once, atomically published artifact versions under a file:// or s3:// root."""

    def __init__(self, root: str | None = None) -> None:
        self.root = (root or artifact_root()).rstrip("/")
        if not self.root.startswith(("file://", "s3://")):
            raise ValueError(f"artifact root must be file:// or s3://, got {self.root!r}")
        self.is_s3 = self.root.startswith("s3://")

    def uri(self, key: str) -> str:
        return f"{self.root}/{key.strip('/')}"

    def ref(self, key: str) -> ArtifactRef:
        """The reference of the artifact at ``key`` (its version is the key's last part)."""
        return ArtifactRef(self.uri(key), key.rsplit("/", 1)[-1])

    def _local(self, key: str) -> Path:
        return Path(urlparse(self.uri(key)).path)

    def is_complete(self, key: str) -> bool:
        if not self.is_s3:
            return (self._local(key) / MANIFEST).is_file()
        from botocore.exceptions import ClientError

        bucket, prefix = split_s3(self.uri(key))
        try:
            s3_client().head_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NoSuchBucket"):
                return False
            raise

    def manifest(self, key: str) -> dict[str, Any]:
        if not self.is_s3:
            return json.loads((self._local(key) / MANIFEST).read_text())
        bucket, prefix = split_s3(self.uri(key))
        body = s3_client().get_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")["Body"].read()
        return json.loads(body)

    def publish_from_main_process(self, local_dir: Path, key: str, metadata: dict[str, Any] | None = None) -> ArtifactRef:
        """:meth:`publish` where every process of a launch (midpo.launch) runs the same code, the trained
        result in the main process's folder only: the main process publishes, the others wait for it (a
        collective: every process must call it). Outside a launch, plain :meth:`publish`."""
        if launched_processes() == 1:
            return self.publish(local_dir, key, metadata)
        from accelerate import PartialState

        state = PartialState()
        if state.is_main_process:
            self.publish(local_dir, key, metadata)
        state.wait_for_everyone()
        return self.ref(key)

    def publish(self, local_dir: Path, key: str, metadata: dict[str, Any] | None = None) -> ArtifactRef:
        """Publish ``local_dir`` as version ``key``; a complete version already there is kept, not overwritten."""
        version = key.rstrip("/").rsplit("/", 1)[-1]
        if self.is_complete(key):
            log.info("artifact %s already exists; keeping it", self.uri(key))
            return ArtifactRef(self.uri(key), version)
        files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file() and p.name != MANIFEST)
        manifest = {
            "key": key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": {str(p.relative_to(local_dir)): {"sha256": sha256_file(p), "size": p.stat().st_size} for p in files},
            "metadata": metadata or {},
        }
        if self.is_s3:
            self._publish_s3(local_dir, files, key, manifest)
        else:
            self._publish_local(local_dir, files, key, manifest)
        return ArtifactRef(self.uri(key), version)

    def _publish_local(self, local_dir: Path, files: list[Path], key: str, manifest: dict[str, Any]) -> None:
        dest = self._local(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
        try:
            for p in files:
                target = staging / p.relative_to(local_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, target)
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
            if dest.exists():  # an incomplete leftover (no manifest) of an older crash: replace it
                shutil.rmtree(dest)
            os.rename(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _publish_s3(self, local_dir: Path, files: list[Path], key: str, manifest: dict[str, Any]) -> None:
        bucket, prefix = split_s3(self.uri(key))
        client = s3_client()
        for p in files:
            client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(local_dir).as_posix()}")
        # The manifest goes last and only if absent: concurrent writers cannot overwrite each other.
        from botocore.exceptions import ClientError

        try:
            client.put_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}", Body=json.dumps(manifest, indent=2).encode(), IfNoneMatch="*")
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "PreconditionFailed":
                raise
            # A manifest is there: a concurrent writer's, or ours when boto3 retried a PUT that took effect
            # but whose reply was lost (a dropped connection). Either way the version is complete: keep it.
            same = self.manifest(key)["files"] == manifest["files"]
            (log.info if same else log.warning)("artifact %s was published meanwhile%s; keeping it", self.uri(key), "" if same else " with other files")

    def children(self, prefix: str) -> list[str]:
        """Names of the folders directly under ``prefix`` (complete or not: check :meth:`is_complete`), sorted."""
        if not self.is_s3:
            folder = self._local(prefix)
            if not folder.is_dir():
                return []
            return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))  # skip staging
        bucket, key_prefix = split_s3(self.uri(prefix))
        names: set[str] = set()
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{key_prefix}/", Delimiter="/"):
            names.update(cp["Prefix"][len(key_prefix) + 1 :].rstrip("/") for cp in page.get("CommonPrefixes", []))
        return sorted(names)

    def delete(self, key: str) -> None:
        """Remove version ``key``: the manifest first (the version is incomplete from then on), then its files.

        A crash part-way leaves an incomplete version, never a complete one with missing files.
        """
        if not self.is_s3:
            dest = self._local(key)
            (dest / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(dest, ignore_errors=True)
            return
        bucket, prefix = split_s3(self.uri(key))
        client = s3_client()
        client.delete_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")  # the slash: not checkpoint-10 for checkpoint-1
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        for i in range(0, len(keys), 1000):  # delete_objects takes at most 1000 keys
            client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True})

    def key_of(self, uri: str) -> str:
        """The key of an artifact URI under this root."""
        if not uri.startswith(self.root + "/"):
            raise ValueError(f"{uri} is not under the artifact root {self.root}")
        return uri[len(self.root) + 1 :]

    def fetch(self, key: str, dest: Path | None = None) -> Path:
        """A local folder holding complete version ``key`` (s3: downloaded once into the cache)."""
        if not self.is_complete(key):
            raise NotFound(f"{self.uri(key)}: no complete artifact (missing {MANIFEST})")
        if not self.is_s3:
            return self._local(key)
        manifest = self.manifest(key)
        dest = dest or midpo_home() / "cache" / "artifacts" / hashlib.sha256(self.uri(key).encode()).hexdigest()[:24]
        if (dest / MANIFEST).is_file():
            return dest
        bucket, prefix = split_s3(self.uri(key))
        client = s3_client()
        staging = dest.with_name(dest.name + f".{uuid.uuid4().hex}.partial")
        for rel in manifest["files"]:
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, f"{prefix}/{rel}", str(target))
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staging, dest)
        except OSError:  # another process fetched it first
            shutil.rmtree(staging, ignore_errors=True)
        return dest
