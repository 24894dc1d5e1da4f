"""Retraining on new preference data (docs/lifecycle.md): watch a prefix, validate and merge new files into a
versioned pool, and run the pipeline only when the profile's dataset version changed.

Three steps, each usable alone; the ``midpo-retrain`` flow (flows/retrain.py, which ``midpo retrain`` and
the ``retrain`` deployment run) runs them as tasks around the ``midpo`` flow:

- :func:`ingest`: list the files under the watched prefix (``s3://bucket/prefix/``, a folder or ``file://``),
  skip those the ledger already holds (keyed by URI and ETag; local files by sha256, hashed only when their
  size or mtime is not the ledger's), and validate a private copy of each new one (s3: downloaded with
  ``If-Match`` its listed ETag) with :func:`midpo.data.validate.validate` (the reason codes of ``midpo data
  validate``), under the profile's data rules: the ledger records the content that was merged. A file with an
  error is quarantined with its report under ``quarantine/<sha256>/`` and contributes nothing, never part of
  itself. The records of the good files join the pool, deduplicated by ``pair_id`` (the canonical record's
  content hash); a pool whose content changed is published write-once as ``pools/<content hash>/pool.jsonl``.
- :func:`plan`: the profile's config with the pool as one more data source, and the dataset version a dry run
  of the data stage computes, against the version the last retraining of this profile trained on.
- :func:`record`: after a pipeline run, the version it trained on goes into the ledger.

The ledger (``retrain/<watch id>/ledger.json`` under the artifact root, one per watched prefix) is replaced in
one write: on s3 a conditional PUT (``If-Match`` its ETag, ``If-None-Match: *`` the first), on file:// a
rename under a lock; a concurrent writer is detected (:class:`LedgerConflict`), never overwritten. It is
written last, after the quarantine and pool versions it points at exist, so a crash leaves the previous state
and the next poll redoes the work (every write before it is content-addressed and write-once).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from midpo.data.readers import PAIR_FORMATS, Unreadable, read_source
from midpo.data.schema import PreferencePair, Severity, content_hash
from midpo.data.validate import validate
from midpo.storage import ArtifactRef, ArtifactStore, NotFound, s3_client, sha256_file, split_s3

if TYPE_CHECKING:
    from midpo.config import DataConfig

log = logging.getLogger(__name__)

POOL_FILE = "pool.jsonl"
REPORT_FILE = "report.json"
POOLS, QUARANTINE, LEDGERS = "pools", "quarantine", "retrain"

# What became of a new file.
MERGED = "merged"  # at least one record the pool did not have
DUPLICATE = "duplicate"  # usable records, every one already in the pool
EMPTY = "empty"  # readable, no usable record (every one excluded by a warning)
QUARANTINED = "quarantined"  # an error, nothing readable, or not preference pairs: nothing merged


class LedgerConflict(RuntimeError):
    """Another ingest or retraining updated the ledger meanwhile; nothing was lost, run again."""


# --------------------------------------------------------------------------------------------------
# The watched prefix


@dataclass(frozen=True)
class WatchedFile:
    uri: str
    etag: str  # s3: the object's ETag; local files: their sha256
    size: int
    mtime_ns: int | None = None  # local files: with size and URI, what says the ledger's sha256 still holds

    @property
    def ledger_key(self) -> str:
        return f"{self.uri}#{self.etag}"


def normalize_prefix(prefix: str) -> str:
    """``s3://bucket/prefix/`` or ``file:///abs/folder/`` (always a folder: a trailing slash)."""
    if prefix.startswith("s3://"):
        bucket, key = split_s3(prefix)
        if not bucket:
            raise ValueError(f"{prefix}: no bucket")
        key = key.strip("/")
        return f"s3://{bucket}/{key + '/' if key else ''}"
    path = Path(urlparse(prefix).path if prefix.startswith("file://") else prefix).expanduser().resolve()
    return path.as_uri().rstrip("/") + "/"


def watch_id(prefix: str) -> str:
    return content_hash(normalize_prefix(prefix))[:16]


def _hidden(rel: str) -> bool:
    """Temporary uploads, markers and manifests (``.name``, ``_SUCCESS``, ``_MANIFEST.json``) are not data."""
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def list_files(prefix: str, exclude: str | None = None, known: Mapping[str, dict[str, Any]] | None = None) -> list[WatchedFile]:
    """Every data file under ``prefix`` (recursively), sorted by URI; none under ``exclude`` (the artifact
    root, when it lies inside the watched prefix). A local file is hashed only when ``known`` (the ledger's
    files) holds no entry with its URI, size and mtime."""
    prefix = normalize_prefix(prefix)
    excluded = exclude.rstrip("/") + "/" if exclude else None
    found: list[WatchedFile] = []
    if prefix.startswith("s3://"):
        bucket, key_prefix = split_s3(prefix)
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(key_prefix) :]
                if rel and not rel.endswith("/") and not _hidden(rel):
                    found.append(WatchedFile(f"s3://{bucket}/{obj['Key']}", obj["ETag"].strip('"'), obj["Size"]))
        return sorted((f for f in found if not (excluded and f.uri.startswith(excluded))), key=lambda f: f.uri)
    folder = Path(urlparse(prefix).path)
    if not folder.is_dir():
        raise NotFound(f"{prefix}: no such folder to watch")
    hashed = {(e["uri"], e["size"], e["mtime_ns"]): e["etag"] for e in (known or {}).values() if e.get("mtime_ns") is not None}
    for path in folder.rglob("*"):
        uri = path.as_uri()
        if _hidden(path.relative_to(folder).as_posix()) or (excluded and uri.startswith(excluded)) or not path.is_file():
            continue
        st = path.stat()
        etag = hashed.get((uri, st.st_size, st.st_mtime_ns)) or sha256_file(path)
        found.append(WatchedFile(uri, etag, st.st_size, st.st_mtime_ns))
    return sorted(found, key=lambda f: f.uri)


def _snapshot(f: WatchedFile, folder: Path) -> Path | None:
    """A copy of ``f`` in ``folder``, under its own name, with the content the listing saw (s3: downloaded
    with ``If-Match`` its ETag; local: size and mtime still the listing's once copied). None when it
    disappeared or changed since: the next poll lists its new version."""
    if f.uri.startswith("s3://"):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(f.uri)
        dest = folder / Path(key).name
        try:
            body = s3_client().get_object(Bucket=bucket, Key=key, IfMatch=f.etag)["Body"]
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "PreconditionFailed"):
                return None
            raise
        with dest.open("wb") as out:
            shutil.copyfileobj(body, out)
        return dest
    source = Path(unquote(urlparse(f.uri).path))
    dest = folder / source.name
    try:
        shutil.copyfile(source, dest)
        st = source.stat()
    except FileNotFoundError:
        return None
    return dest if (st.st_size, st.st_mtime_ns) == (f.size, f.mtime_ns) else None


# --------------------------------------------------------------------------------------------------
# The ledger


class Ledger:
    """One JSON object per watched prefix: the files seen, the current pool, what each profile trained on."""

    def __init__(self, prefix: str, store: ArtifactStore | None = None) -> None:
        self.store = store or ArtifactStore()
        self.prefix = normalize_prefix(prefix)
        self.key = f"{LEDGERS}/{watch_id(prefix)}/ledger.json"
        self.uri = self.store.uri(self.key)

    def empty(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "files": {}, "pool": None, "trained": {}}

    def load(self) -> tuple[dict[str, Any], str | None]:
        """The ledger and a token for :meth:`save` (None: there is none yet)."""
        if self.store.is_s3:
            from botocore.exceptions import ClientError

            bucket, key = split_s3(self.uri)
            try:
                obj = s3_client().get_object(Bucket=bucket, Key=key)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                    return self.empty(), None
                raise
            return json.loads(obj["Body"].read()), obj["ETag"]
        path = self._path()
        if not path.is_file():
            return self.empty(), None
        data = path.read_bytes()
        return json.loads(data), hashlib.sha256(data).hexdigest()

    def save(self, ledger: dict[str, Any], token: str | None) -> None:
        """Replace the ledger in one write, only if it is still the one ``token`` was read with."""
        body = json.dumps(ledger, indent=2, sort_keys=True).encode()
        if self.store.is_s3:
            from botocore.exceptions import ClientError

            bucket, key = split_s3(self.uri)
            condition = {"IfMatch": token} if token else {"IfNoneMatch": "*"}
            try:
                s3_client().put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json", **condition)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                    raise LedgerConflict(f"{self.uri} was updated by another run meanwhile; run again") from None
                raise
            return
        import fcntl

        path = self._path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / ".ledger.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            if current != token:
                raise LedgerConflict(f"{self.uri} was updated by another run meanwhile; run again")
            tmp = path.with_name(f".ledger.{os.getpid()}.tmp")
            tmp.write_bytes(body)
            os.replace(tmp, path)

    def _path(self) -> Path:
        return Path(urlparse(self.uri).path)


# --------------------------------------------------------------------------------------------------
# Ingest


@dataclass
class IngestResult:
    """What one ingest did. ``files``: one entry per new file (uri, etag, sha256, status, counts, quarantine)."""

    prefix: str
    ledger: str
    files: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0  # files the ledger already held
    records_added: int = 0
    duplicates_dropped: int = 0  # usable records already in the pool (or earlier in this batch)
    pool: str | None = None  # URI of the pool file after this ingest
    pool_version: str | None = None
    pool_records: int = 0
    changed: bool = False  # a new pool version was published

    @property
    def merged(self) -> list[str]:
        return [f["uri"] for f in self.files if f["status"] == MERGED]

    @property
    def quarantined(self) -> list[str]:
        return [f["quarantine"] for f in self.files if f["status"] == QUARANTINED]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "merged": self.merged, "quarantined": self.quarantined}


def ingest(prefix: str, data: DataConfig, *, fmt: str = "auto", store: ArtifactStore | None = None) -> IngestResult:
    """Validate and merge the new files under ``prefix`` into its pool (see the module docstring), with the
    data rules of ``data`` (the profile's ``data`` section: ``max_chars``, ``unlabeled_safety``, ``dual_rule``)."""
    if fmt != "auto" and fmt not in PAIR_FORMATS:
        raise ValueError(f"format must be auto or one of {', '.join(PAIR_FORMATS)}, got {fmt!r}")
    store = store or ArtifactStore()
    ledger = Ledger(prefix, store)
    state, token = ledger.load()
    result = IngestResult(ledger.prefix, ledger.uri)
    new = []
    for f in list_files(prefix, exclude=store.root, known=state["files"]):
        if f.ledger_key in state["files"]:
            result.skipped += 1
        else:
            new.append(f)
    pool = _load_pool(store, state["pool"])
    options = {"max_chars": data.max_chars, "unlabeled_safety": data.unlabeled_safety, "dual_rule": data.dual_rule}
    added_from = []
    for f in new:
        entry = _ingest_file(f, fmt, store, options, pool, result)
        if entry is None:
            continue  # gone or changed since the listing
        state["files"][f.ledger_key] = entry
        result.files.append(entry)
        if entry["status"] == MERGED:
            added_from.append(f.uri)
    if result.records_added:  # new pair_ids: new content, a new version
        before = state["pool"] and state["pool"]["version"]
        after = pool_version(pool.values())
        ref = _publish_pool(store, pool, after, {"previous": before, "added_from": added_from, "prefix": ledger.prefix})
        state["pool"] = {"version": after, "uri": f"{ref.uri}/{POOL_FILE}", "records": len(pool)}
        result.changed = True
    if state["pool"]:
        result.pool, result.pool_version, result.pool_records = state["pool"]["uri"], state["pool"]["version"], state["pool"]["records"]
    if result.files:
        state["prefix"] = ledger.prefix
        ledger.save(state, token)
    log.info(
        "ingest %s: %d new file(s) (%d merged, %d quarantined), %d already seen; %d record(s) added, %d duplicate(s) dropped; pool %s%s",
        ledger.prefix, len(result.files), len(result.merged), len(result.quarantined), result.skipped,
        result.records_added, result.duplicates_dropped, result.pool_version, " (new)" if result.changed else "",
    )  # fmt: skip
    return result


def _ingest_file(
    f: WatchedFile, fmt: str, store: ArtifactStore, options: dict[str, Any], pool: dict[str, PreferencePair], result: IngestResult
) -> dict[str, Any] | None:
    """Validate a copy of one file; merge its records into ``pool`` (all of them or, on any error, none).
    None when the file disappeared or changed since the listing."""
    with tempfile.TemporaryDirectory(prefix="midpo-ingest-") as tmp:
        path = _snapshot(f, Path(tmp))
        if path is None:
            log.warning("%s disappeared or changed since the listing; the next poll reads it", f.uri)
            return None
        return _ingest_copy(f, path, fmt, store, options, pool, result)


def _ingest_copy(
    f: WatchedFile, path: Path, fmt: str, store: ArtifactStore, options: dict[str, Any], pool: dict[str, PreferencePair], result: IngestResult
) -> dict[str, Any]:
    sha = sha256_file(path)
    entry: dict[str, Any] = {"uri": f.uri, "etag": f.etag, "sha256": sha, "size": f.size, "mtime_ns": f.mtime_ns, "at": _now()}
    try:
        report = validate(str(path), fmt, **options)
    except Unreadable as e:  # what `midpo data validate --json` prints when nothing is readable (exit 2)
        doc = {"uri": f.uri, "exit_code": 2, "error": str(e).replace(str(path), f.uri)}
        return {**entry, **_quarantine(store, path, sha, doc, "nothing readable")}
    doc = {**report.to_dict(), "uri": f.uri}
    if report.n_errors:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(Counter(p.reason.value for p in report.problems if p.severity is Severity.ERROR).items()))
        return {**entry, **_quarantine(store, path, sha, doc, f"{report.n_errors} error(s): {reasons}")}
    if report.format not in PAIR_FORMATS:
        return {**entry, **_quarantine(store, path, sha, doc, f"format {report.format!r} holds no preference pairs")}
    # Valid: read the records (the validator reports, it does not return them). The same copy, format and
    # limits, so the same records; a read error now would still quarantine nothing half-way: the pool is
    # only published after every file is done.
    records = [r for r in read_source(str(path), report.format, max_chars=options["max_chars"]).records if isinstance(r, PreferencePair)]
    added = 0
    for record in records:
        if record.pair_id in pool:
            result.duplicates_dropped += 1
            continue
        pool[record.pair_id] = dataclasses.replace(record, source="")
        added += 1
    result.records_added += added
    status = MERGED if added else (DUPLICATE if records else EMPTY)
    return {**entry, "status": status, "format": report.format, "records": len(records), "added": added,
            "duplicates": len(records) - added, "warnings": report.n_warnings, "exclusions": report.exclusions}  # fmt: skip


def _quarantine(store: ArtifactStore, path: Path, sha: str, report: dict[str, Any], why: str) -> dict[str, Any]:
    """The file and its validation report under ``quarantine/<sha256>/`` (write-once: the same bytes again
    find the same folder)."""
    key = f"{QUARANTINE}/{sha}"
    doc = {**report, "quarantined_because": why, "sha256": sha}
    with tempfile.TemporaryDirectory(prefix="midpo-quarantine-") as tmp:
        out = Path(tmp)
        shutil.copyfile(path, out / path.name)
        (out / REPORT_FILE).write_text(json.dumps(doc, indent=2, ensure_ascii=False))
        meta = {"uri": report.get("uri"), "file": path.name, "why": why, "exit_code": report.get("exit_code")}
        ref = store.publish(out, key, metadata=meta)
    log.warning("quarantined %s (%s): report at %s/%s", report.get("uri"), why, ref.uri, REPORT_FILE)
    return {"status": QUARANTINED, "quarantine": ref.uri, "report": f"{ref.uri}/{REPORT_FILE}", "why": why}


# --------------------------------------------------------------------------------------------------
# The pool


def pool_row(pair: PreferencePair) -> dict[str, Any]:
    """A pool line: the pku schema of the canonical record (``source`` is provenance, ``pair_id`` derived)."""
    return {k: v for k, v in dataclasses.asdict(pair).items() if k != "source"}


def pool_version(pairs: Any) -> str:
    """Content hash of the pool's records sorted by ``pair_id`` (``extras`` included, as in dataset versions)."""
    return content_hash([pool_row(p) for p in sorted(pairs, key=lambda p: p.pair_id)])[:16]


def _load_pool(store: ArtifactStore, pool: dict[str, Any] | None) -> dict[str, PreferencePair]:
    if not pool:
        return {}
    folder = store.fetch(f"{POOLS}/{pool['version']}")
    out = {}
    with (folder / POOL_FILE).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                pair = PreferencePair(**json.loads(line))
                out[pair.pair_id] = pair
    return out


def _publish_pool(store: ArtifactStore, pool: dict[str, PreferencePair], version: str, metadata: dict[str, Any]) -> ArtifactRef:
    with tempfile.TemporaryDirectory(prefix="midpo-pool-") as tmp:
        out = Path(tmp)
        rows = [pool_row(pool[k]) for k in sorted(pool)]
        (out / POOL_FILE).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        ref = store.publish(out, f"{POOLS}/{version}", metadata={**metadata, "version": version, "records": len(rows)})
    log.info("published pool %s (%d records) at %s", version, len(pool), ref.uri)
    return ref


# --------------------------------------------------------------------------------------------------
# Plan and record


@dataclass
class RetrainPlan:
    """Whether to run the pipeline, on which config (``overrides`` on top of ``profile``), and why."""

    prefix: str
    profile: str
    profile_key: str
    overrides: list[str]  # the user's overrides + the data sources with the pool
    pool: str | None
    pool_version: str | None
    dataset_version: str | None  # the dry run's (None: an upstream output, e.g. the world, is not built yet)
    previous: str | None  # the dataset version the last retraining of this profile trained on
    run: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def profile_key(profile: str, overrides: Sequence[str] = ()) -> str:
    """Which retraining a ledger record belongs to: the profile and the user's overrides."""
    return profile if not overrides else f"{profile}+{content_hash(list(overrides))[:12]}"


def pool_overrides(profile: str, overrides: Sequence[str], pool: str | None) -> list[str]:
    """``overrides`` plus ``data.sources`` = the profile's own sources and the pool file (format pku)."""
    from midpo.config import SourceConfig, load_config

    if pool is None:
        return list(overrides)
    sources = [dataclasses.asdict(s) for s in [*load_config(profile, list(overrides)).data.sources, SourceConfig(uri=pool, format="pku")]]
    return [*overrides, f"data.sources={json.dumps(sources)}"]


def dry_run_dataset_version(profile: str, overrides: Sequence[str]) -> str | None:
    """The dataset version the data stage would produce (a dry run: nothing written, nothing trained);
    None while an upstream output it reads (the world of a tiny profile) does not exist yet."""
    from midpo.config import load_config
    from midpo.pipeline import run_pipeline

    cfg = load_config(profile, list(overrides))
    try:
        return run_pipeline(cfg, dry_run=True, until="data").outputs["dataset"].version
    except (NotFound, Unreadable) as e:
        log.info("dataset version not known before the upstream stages run: %s", e)
        return None


def plan(prefix: str, profile: str = "tiny", overrides: Sequence[str] = (), *, store: ArtifactStore | None = None, force: bool = False) -> RetrainPlan:
    """Decide whether the pool changes the profile's dataset version since its last retraining."""
    ledger = Ledger(prefix, store)
    state, _ = ledger.load()
    key = profile_key(profile, overrides)
    pool = state["pool"]
    previous = state["trained"].get(key, {}).get("dataset_version")
    base = dict(prefix=ledger.prefix, profile=profile, profile_key=key, pool=pool and pool["uri"], pool_version=pool and pool["version"], previous=previous)
    if pool is None:
        return RetrainPlan(**base, overrides=list(overrides), dataset_version=None, run=force, reason="no incoming data yet" + (" (forced)" if force else ""))
    merged = pool_overrides(profile, overrides, pool["uri"])
    version = dry_run_dataset_version(profile, merged)

    def decide(run: bool, reason: str) -> RetrainPlan:
        if force and not run:
            run, reason = True, f"{reason} (forced)"
        log.info("retrain %s on %s: %s", key, ledger.prefix, reason)
        return RetrainPlan(**base, overrides=merged, dataset_version=version, run=run, reason=reason)

    if version is None:
        return decide(True, "the dataset version is not known yet (upstream stages not built): running")
    if previous is None:
        own = dry_run_dataset_version(profile, overrides)
        if own == version:
            return decide(False, f"the incoming data adds nothing to the profile's dataset {version}")
        return decide(True, f"first retraining: dataset {version} (the profile's own: {own})")
    if version == previous:
        return decide(False, f"dataset {version} unchanged since the last retraining")
    return decide(True, f"dataset changed: {previous} -> {version}")


def record(prefix: str, plan_: RetrainPlan, summary: dict[str, Any], *, store: ArtifactStore | None = None, attempts: int = 5) -> dict[str, Any]:
    """After a successful pipeline run: what this profile trained on goes into the ledger (retried on a
    concurrent update: a record touches its own entry only). Returns the entry."""
    run = summary.get("run", {})
    entry = {
        "profile": plan_.profile,
        "overrides": [o for o in plan_.overrides if not o.startswith("data.sources=")],
        "dataset_version": run.get("dataset_version") or plan_.dataset_version,
        "pool_version": plan_.pool_version,
        "model_version": _version_of(summary.get("outputs", {}).get("midpo")),
        "report_dir": summary.get("report_dir"),
        "cache_hits": run.get("cache_hits", []),
        "at": _now(),
    }
    ledger = Ledger(prefix, store)
    for attempt in range(attempts):
        state, token = ledger.load()
        state["trained"][plan_.profile_key] = entry
        try:
            ledger.save(state, token)
            break
        except LedgerConflict:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    return entry


def _version_of(uri: str | None) -> str | None:
    return uri.rstrip("/").rsplit("/", 1)[-1] if uri else None


def registered_version(model_version: str | None, model_name: str = "midpo") -> int | None:
    """The registry version holding the MoE ``model_version`` (tag ``midpo.model_version``), if any."""
    if not model_version:
        return None
    import mlflow

    from midpo.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri())
    try:
        found = client.search_model_versions(f"name = '{model_name}' and tags.`midpo.model_version` = '{model_version}'")
    except mlflow.exceptions.MlflowException:
        return None
    return max((int(v.version) for v in found), default=None)


# --------------------------------------------------------------------------------------------------
# The summary


def summarize(ingested: dict[str, Any], plan_: dict[str, Any], summary: dict[str, Any] | None, model_name: str = "midpo") -> dict[str, Any]:
    """The small result of a retraining (what the flow returns and ``midpo retrain`` prints)."""
    out = {
        "prefix": ingested["prefix"],
        "new_files": len(ingested["files"]),
        "merged": ingested["merged"],
        "quarantined": ingested["quarantined"],
        "records_added": ingested["records_added"],
        "duplicates_dropped": ingested["duplicates_dropped"],
        "pool_version": ingested["pool_version"],
        "pool_changed": ingested["changed"],
        "dataset_version": plan_["dataset_version"],
        "previous_dataset_version": plan_["previous"],
        "ran": summary is not None,
        "reason": plan_["reason"],
    }
    if summary is not None:
        model = _version_of(summary.get("outputs", {}).get("midpo"))
        out.update(
            dataset_version=summary["run"].get("dataset_version") or plan_["dataset_version"],
            cache_hits=summary["run"].get("cache_hits", []),
            model_version=model,
            registered_version=registered_version(model, model_name),
            report_dir=summary.get("report_dir"),
        )
    return out


def format_summary(out: dict[str, Any]) -> str:
    """``midpo retrain``'s human report of :func:`summarize`'s summary."""
    lines = [f"{out['prefix']}: {out['new_files']} new file(s), {len(out['merged'])} merged, {len(out['quarantined'])} quarantined"]
    lines += [f"  quarantined: {q}/{REPORT_FILE}" for q in out["quarantined"]]
    lines.append(f"records added: {out['records_added']}, duplicates dropped: {out['duplicates_dropped']}")
    lines.append(f"pool: {out['pool_version'] or 'none'}{' (new version)' if out['pool_changed'] else ''}")
    lines.append(f"dataset: {out['dataset_version'] or 'unknown'} (last retraining: {out['previous_dataset_version'] or 'none'})")
    lines.append(f"pipeline: {'ran' if out['ran'] else 'not run'}: {out['reason']}")
    if out["ran"]:
        lines.append(f"cache hits: {', '.join(out['cache_hits']) or 'none'}")
        lines.append(f"registered: version {out['registered_version']} (model {out['model_version']})")
        if out.get("report_dir"):
            lines.append(f"report: {Path(out['report_dir']) / 'report.md'}")
    return "\n".join(lines)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
