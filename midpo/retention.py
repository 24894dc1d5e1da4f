"""Retention (``midpo prune``, docs/lifecycle.md): which registered model versions and artifact versions to
keep, and deleting the others. No Prefect here.

Registry (MLflow), for the pruned registered models (default ``midpo``): a version is **kept** when it has
an alias (``champion``, ``challenger``, any), is named in the model's champion history (the rollback chain
of ``midpo promote --rollback``, registered-model tag ``midpo.champion_history``), is among the newest
``keep_versions`` version numbers, or is younger than ``older_than_days``. The others are **deleted**
(``MlflowClient.delete_model_version``; their logged model is marked deleted too, for ``mlflow gc``).
Versions of other registered models are never touched, and their lineage protects artifacts as well.

Artifacts (the artifact root, file:// or s3://): a version is a folder with a ``_MANIFEST.json``; its
*family* is its key without the last part (``adapters/safety-expert``, ``models/midpo``, ``judges/cost``).
A complete version is **kept** when

- a kept model version references it: any tag value that is one of its URIs (the lineage tags
  ``midpo.<part>_uri``) or its version (``midpo.<part>_version``, ``midpo.model_version``);
- a retraining ledger (``retrain/<id>/ledger.json``) references it (the current pool, quarantine reports,
  what each profile last trained on);
- it is among the newest ``keep_artifacts`` of its family (by the manifest's ``created``), or younger than
  ``older_than_days``;
- a kept artifact's manifest metadata references it, transitively: kept for any reason above, a version
  never loses an input it names (a router names its dual data, reference log-probs and experts; an adapter
  its base; scores their judges), so its whole upstream graph stays and a rerun of its pipeline is cached.
  A pool's ``previous`` (history, not an input) is not followed.

A manifest that cannot be read (other than gone meanwhile) fails the plan: its inputs are unknown.

Everything else is deleted with :meth:`ArtifactStore.delete` (manifest first: never a version that looks
complete with files missing). Mirrored training checkpoints (``checkpoints/<artifact key>/...``) go as soon
as their artifact is complete, and after ``older_than_days`` when it never was (an abandoned training).
Folders without a manifest beside complete versions (a crashed upload) go once their newest file is older
than ``older_than_days`` (never sooner: an upload may be under way). ``mlflow/`` (the embedded MLflow
store's artifacts) and ``retrain/`` (ledgers) are never touched.

:func:`apply` re-checks before deleting: each model version right before its deletion (one that got an
alias or entered the champion history meanwhile is skipped), then the registry and the artifact root again
before the artifacts (whatever is referenced by then is skipped). Still, do not run prune beside ``midpo
promote``: a promotion landing between that check and the deletion loses its version.
"""

from __future__ import annotations

import json
import logging
import os
import time
from calendar import timegm
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from midpo.promote import HISTORY_TAG
from midpo.storage import MANIFEST, ArtifactStore, s3_client, split_s3

log = logging.getLogger(__name__)

DEFAULT_KEEP_VERSIONS = 5  # newest registered versions kept whatever their age
DEFAULT_OLDER_THAN_DAYS = 30.0  # nothing younger is deleted (checkpoints of finished artifacts excepted)
DEFAULT_KEEP_ARTIFACTS = 1  # newest complete versions kept per artifact family whatever their age
DEFAULT_MODELS = ("midpo",)

CHECKPOINTS = "checkpoints"
UNMANAGED = ("mlflow", "retrain")  # top-level folders prune never deletes from
LEDGER_FILE = "ledger.json"
NOT_INPUTS = frozenset({"previous"})  # metadata keys that name history, not inputs: not followed
DAY = 86400.0


class RetentionError(RuntimeError):
    """Pruning refused (a registry that does not match the artifact root, a missing registered model, a
    manifest or ledger that cannot be read)."""


# --------------------------------------------------------------------------------------------------
# What is there


@dataclass
class ArtifactVersion:
    key: str
    family: str
    bytes: int
    created: float  # epoch seconds: the manifest's "created", else the newest file's mtime
    complete: bool
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def is_checkpoint(self) -> bool:
        return self.key.startswith(CHECKPOINTS + "/")


@dataclass
class ModelVersion:
    model: str
    version: int
    created: float  # epoch seconds
    aliases: list[str]
    tags: dict[str, str]
    model_id: str | None = None


@dataclass
class Item:
    """One decision: keep or delete, and why."""

    kind: str  # "model-version" | "artifact" | "checkpoint" | "incomplete"
    name: str  # "midpo/3" or an artifact key
    action: str  # "keep" | "delete"
    reasons: list[str]
    bytes: int = 0
    created: float = 0.0
    uri: str = ""
    model_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "action": self.action, "reasons": self.reasons, "bytes": self.bytes,
                "created": _iso(self.created), "uri": self.uri}  # fmt: skip


@dataclass
class Plan:
    root: str
    registry: str
    models: list[str]
    keep_versions: int
    older_than_days: float
    keep_artifacts: int
    items: list[Item]
    now: float

    def deletions(self, kind: str | None = None) -> list[Item]:
        return [i for i in self.items if i.action == "delete" and (kind is None or i.kind == kind)]

    def keeps(self, kind: str | None = None) -> list[Item]:
        return [i for i in self.items if i.action == "keep" and (kind is None or i.kind == kind)]

    @property
    def bytes_freed(self) -> int:
        return sum(i.bytes for i in self.deletions())

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root, "registry": self.registry, "models": self.models, "keep_versions": self.keep_versions,
            "older_than_days": self.older_than_days, "keep_artifacts": self.keep_artifacts,
            "delete": [i.to_dict() for i in self.deletions()], "keep": [i.to_dict() for i in self.keeps()],
            "bytes_freed": self.bytes_freed,
        }  # fmt: skip

    def format(self, verbose: bool = False) -> str:
        lines = [
            f"retention plan: artifact root {self.root}, registry {self.registry}",
            (
                f"  policy: keep every aliased version of {', '.join(self.models)}, its champion history, the newest "
                f"{self.keep_versions} versions and everything younger than {self.older_than_days:g} days; the newest "
                f"{self.keep_artifacts} artifact version(s) per family; everything a kept version references"
            ),
        ]
        for kind, title in (("model-version", "model versions"), ("artifact", "artifact versions"), ("checkpoint", "checkpoints"), ("incomplete", "incomplete folders")):
            keep, delete = self.keeps(kind), self.deletions(kind)
            if not keep and not delete:
                continue
            freed = sum(i.bytes for i in delete)
            lines.append(f"{title}: keep {len(keep)}, delete {len(delete)}" + (f" ({human_bytes(freed)})" if kind != "model-version" else ""))
            for i in delete:
                size = f"  {human_bytes(i.bytes):>9}" if kind != "model-version" else ""
                lines.append(f"  delete {i.name}{size}  created {_iso(i.created)}  ({'; '.join(i.reasons)})")
            for i in keep if verbose else [i for i in keep if kind == "model-version"]:
                lines.append(f"  keep   {i.name}  created {_iso(i.created)}  ({'; '.join(i.reasons)})")
        lines.append(f"frees {human_bytes(self.bytes_freed)} of artifacts; deletes {len(self.deletions('model-version'))} model version(s)")
        return "\n".join(lines)


def human_bytes(n: float) -> str:
    units = ("B", "KB", "MB", "GB", "TB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else "-"


def _parse_created(value: Any) -> float | None:
    try:
        return float(timegm(time.strptime(str(value), "%Y-%m-%dT%H:%M:%SZ")))
    except (TypeError, ValueError):
        return None


@dataclass
class _Obj:
    key: str  # relative to the root
    size: int
    mtime: float


def _list_objects(store: ArtifactStore) -> Iterator[_Obj]:
    """Every file under the root (file://: staging folders, whose names start with '.', skipped)."""
    if not store.is_s3:
        base = Path(urlparse(store.root).path)
        for folder, dirs, files in os.walk(base):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                path = Path(folder) / name
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                yield _Obj(path.relative_to(base).as_posix(), st.st_size, st.st_mtime)
        return
    bucket, prefix = split_s3(store.root)
    start = f"{prefix}/" if prefix else ""
    for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=start):
        for o in page.get("Contents", []):
            yield _Obj(o["Key"][len(start) :], int(o["Size"]), o["LastModified"].timestamp())


def _read_ledger(store: ArtifactStore, key: str) -> Any:
    if not store.is_s3:
        return json.loads(Path(urlparse(store.uri(key)).path).read_text())
    bucket, k = split_s3(store.uri(key))
    return json.loads(s3_client().get_object(Bucket=bucket, Key=k)["Body"].read())


@dataclass
class Inventory:
    """What the artifact root holds: complete versions, incomplete leftovers and retraining ledgers."""

    versions: dict[str, ArtifactVersion]
    incomplete: dict[str, ArtifactVersion]
    ledgers: list[str]


def scan(store: ArtifactStore) -> Inventory:
    """One listing of the root, and every manifest read: the policy needs each version's age and inputs, and
    deciding from one snapshot keeps the plan consistent (:func:`apply` scans again before deleting).

    A file belongs to the outermost complete version above it (its subfolders are part of it, and go with
    it). Files that belong to none are *incomplete* only inside a family of complete versions: there the
    folder beside them is a version whose manifest never came (a crashed upload); anywhere else prune does
    not know the layout and leaves them alone."""
    objects = list(_list_objects(store))
    ledgers = [o.key for o in objects if o.key.startswith("retrain/") and o.key.endswith("/" + LEDGER_FILE)]
    objects = [o for o in objects if o.key.split("/", 1)[0] not in UNMANAGED]
    keys = {o.key[: -len(MANIFEST) - 1] for o in objects if o.key.endswith("/" + MANIFEST)}
    sizes: dict[str, int] = dict.fromkeys(keys, 0)
    mtimes: dict[str, float] = dict.fromkeys(keys, 0.0)
    loose: list[_Obj] = []
    for o in objects:
        parts = o.key.split("/")
        owner = next(("/".join(parts[:i]) for i in range(1, len(parts)) if "/".join(parts[:i]) in keys), None)
        if owner is None:
            loose.append(o)
        else:
            sizes[owner] += o.size
            mtimes[owner] = max(mtimes[owner], o.mtime)
    with ThreadPoolExecutor(8) as pool:  # s3: one GET per manifest
        manifests = dict(zip(sorted(keys), pool.map(lambda k: _manifest(store, k), sorted(keys)), strict=True))
    versions = {}
    for key, manifest in manifests.items():
        if manifest is None:  # deleted since the listing: no longer a version
            continue
        created = _parse_created(manifest.get("created")) or mtimes[key]
        versions[key] = ArtifactVersion(key, key.rsplit("/", 1)[0] if "/" in key else "", sizes[key], created, True, manifest.get("metadata") or {})
    families = {v.family for v in versions.values() if v.family}
    incomplete: dict[str, ArtifactVersion] = {}
    for o in loose:
        parts = o.key.split("/")
        for i in range(1, len(parts) - 1):
            if "/".join(parts[:i]) in families:
                key = "/".join(parts[: i + 1])
                entry = incomplete.setdefault(key, ArtifactVersion(key, "/".join(parts[:i]), 0, 0.0, False))
                entry.bytes += o.size
                entry.created = max(entry.created, o.mtime)
                break
    return Inventory(versions, incomplete, ledgers)


def _manifest(store: ArtifactStore, key: str) -> dict[str, Any] | None:
    """The manifest of version ``key``; None only when it is gone (deleted since the listing). Any other
    failure (an S3 5xx, denied access, a corrupt file) fails the plan: a version whose inputs are unknown
    could leave them unprotected."""
    try:
        return store.manifest(key)
    except Exception as e:
        code = getattr(e, "response", {}).get("Error", {}).get("Code")  # botocore's ClientError
        if isinstance(e, FileNotFoundError) or code in ("404", "NoSuchKey"):
            log.info("prune: %s was deleted meanwhile", store.uri(key))
            return None
        raise RetentionError(f"cannot read the manifest of {store.uri(key)}: {e}") from e


def read_registry(client: Any, models: Iterable[str]) -> tuple[list[ModelVersion], dict[str, set[int]]]:
    """Every version of every registered model, and per model the versions its champion history names."""
    versions: list[ModelVersion] = []
    history: dict[str, set[int]] = {}
    token = None
    registered = []
    while True:
        page = client.search_registered_models(max_results=100, page_token=token)
        registered.extend(page)
        token = page.token
        if not token:
            break
    for rm in registered:
        aliases: dict[int, list[str]] = {}
        for alias, v in (rm.aliases or {}).items():
            aliases.setdefault(int(v), []).append(alias)
        history[rm.name] = _champion_history(rm.tags)
        token = None
        while True:
            page = client.search_model_versions(f"name = '{rm.name}'", page_token=token)
            for mv in page:
                v = int(mv.version)
                model_id = getattr(mv, "model_id", None) or _logged_model_id(mv.source or "")
                versions.append(ModelVersion(rm.name, v, (mv.creation_timestamp or 0) / 1000, sorted(aliases.get(v, [])), dict(mv.tags or {}), model_id))
            token = page.token
            if not token:
                break
    missing = [m for m in models if m not in {rm.name for rm in registered}]
    if missing:
        raise RetentionError(f"the registry has no registered model {', '.join(map(repr, missing))}")
    return versions, history


def _champion_history(tags: dict[str, str] | None) -> set[int]:
    """The versions a registered model's champion history (tag of midpo.promote) names."""
    try:
        return {int(v) for v in json.loads((tags or {}).get(HISTORY_TAG, "[]"))}
    except (TypeError, ValueError):
        return set()


def _logged_model_id(source: str) -> str | None:
    """``m-<id>`` of a version whose source is a logged model (``models:/m-<id>``, MLflow 3's ``log_model``)."""
    if source.startswith("models:/m-"):
        return source[len("models:/") :].split("/", 1)[0]
    return None


# --------------------------------------------------------------------------------------------------
# The plan


def _strings(obj: Any, skip: frozenset[str] = frozenset()) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if k not in skip:
                yield from _strings(v, skip)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _strings(v, skip)


class _Resolver:
    """Which artifact versions a string names: a URI under the root (or inside a version), or a version."""

    def __init__(self, store: ArtifactStore, versions: dict[str, ArtifactVersion]) -> None:
        self.root = store.root + "/"
        self.keys = {k for k, v in versions.items() if not v.is_checkpoint}
        self.by_name: dict[str, set[str]] = {}
        for k in self.keys:
            self.by_name.setdefault(k.rsplit("/", 1)[-1], set()).add(k)

    def __call__(self, s: str) -> set[str]:
        if s.startswith(self.root):
            parts = s[len(self.root) :].strip("/").split("/")
            return {k for i in range(1, len(parts) + 1) if (k := "/".join(parts[:i])) in self.keys}
        return set(self.by_name.get(s, ()))


def protected(store: ArtifactStore, inventory: Inventory, kept: list[ModelVersion], kept_artifacts: Iterable[str] = ()) -> dict[str, list[str]]:
    """Artifact keys that something kept references, with the reasons: the kept model versions (their tags),
    the ledgers, and transitively every input named in the manifest of a version so protected or in
    ``kept_artifacts`` (kept for their own sake: newest, young), so no kept artifact loses an input."""
    resolve = _Resolver(store, inventory.versions)
    why: dict[str, list[str]] = {}
    queue: deque[str] = deque(kept_artifacts)

    def mark(keys: set[str], reason: str) -> None:
        for k in sorted(keys):
            if k not in why:
                why[k] = [reason]
                queue.append(k)
            elif reason not in why[k] and len(why[k]) < 3:
                why[k].append(reason)

    for mv in sorted(kept, key=lambda m: (m.model, -m.version)):
        label = f"lineage of {mv.model} v{mv.version}" + (f" @{','.join(mv.aliases)}" if mv.aliases else "")
        for value in mv.tags.values():
            mark(resolve(value), label)
    for ledger in inventory.ledgers:
        try:
            doc = _read_ledger(store, ledger)
        except Exception as e:
            raise RetentionError(f"cannot read the retraining ledger {store.uri(ledger)}: {e}") from e
        mark({k for s in _strings(doc) for k in resolve(s)}, f"named by {ledger}")
    followed: set[str] = set()
    while queue:
        key = queue.popleft()
        if key not in followed:
            followed.add(key)
            for s in _strings(inventory.versions[key].metadata, NOT_INPUTS):
                mark(resolve(s) - {key}, f"input of {key}")
    return why


def _check_registry_matches(store: ArtifactStore, versions: list[ModelVersion], models: list[str]) -> None:
    uris = [v for mv in versions if mv.model in models for k, v in mv.tags.items() if k.startswith("midpo.") and k.endswith("_uri")]
    if uris and not any(u.startswith(store.root + "/") for u in uris):
        raise RetentionError(
            f"no version of {', '.join(models)} in this registry references the artifact root {store.root} "
            f"(they name e.g. {uris[0]}): is MLFLOW_TRACKING_URI the registry of this root?"
        )


@dataclass
class _Policy:
    keep_versions: int
    older_than_days: float
    keep_artifacts: int
    cutoff: float  # epoch seconds: anything created after it is young


def make_plan(
    store: ArtifactStore | None = None,
    client: Any = None,
    *,
    registry_uri: str | None = None,
    models: Iterable[str] = DEFAULT_MODELS,
    keep_versions: int = DEFAULT_KEEP_VERSIONS,
    older_than_days: float = DEFAULT_OLDER_THAN_DAYS,
    keep_artifacts: int = DEFAULT_KEEP_ARTIFACTS,
    now: float | None = None,
    check_registry: bool = True,
) -> Plan:
    """What :func:`apply` would delete and keep, and why. Reads only. ``registry_uri`` is the registry
    ``client`` talks to (default: midpo's tracking URI, which the default client uses)."""
    if keep_versions < 0 or keep_artifacts < 0 or older_than_days < 0:
        raise ValueError("keep_versions, keep_artifacts and older_than_days must be >= 0")
    from midpo.tracking import tracking_uri

    store = store or ArtifactStore()
    registry_uri = registry_uri or tracking_uri()
    client = client or default_client(registry_uri)
    models = list(models)
    now = time.time() if now is None else now
    versions, history = read_registry(client, models if check_registry else [])
    if check_registry:
        _check_registry_matches(store, versions, models)
    policy = _Policy(keep_versions, older_than_days, keep_artifacts, now - older_than_days * DAY)
    version_items, kept = _plan_model_versions(versions, history, models, policy)
    artifact_items = _plan_artifacts(store, scan(store), kept, policy)
    return Plan(store.root, registry_uri, models, keep_versions, older_than_days, keep_artifacts, version_items + artifact_items, now)


def _plan_model_versions(versions: list[ModelVersion], history: dict[str, set[int]], models: list[str], policy: _Policy) -> tuple[list[Item], list[ModelVersion]]:
    """The decision on each version of the pruned models, and every kept version (those of other registered
    models included: they are never pruned and protect what they reference)."""
    items: list[Item] = []
    kept: list[ModelVersion] = []
    days = f"{policy.older_than_days:g} days"
    for model in sorted({mv.model for mv in versions}):
        mine = sorted((mv for mv in versions if mv.model == model), key=lambda m: -m.version)
        if model not in models:
            kept.extend(mine)
            continue
        newest = {mv.version for mv in mine[: policy.keep_versions]}
        for mv in mine:
            reasons = []
            if mv.aliases:
                reasons.append("alias " + ", ".join(f"@{a}" for a in mv.aliases))
            if mv.version in history.get(model, set()):
                reasons.append("in the champion history (rollback target)")
            if mv.version in newest:
                reasons.append(f"among the newest {policy.keep_versions}")
            if mv.created > policy.cutoff:
                reasons.append(f"younger than {days}")
            action = "keep" if reasons else "delete"
            if action == "keep":
                kept.append(mv)
            else:
                reasons = [f"no alias, not among the newest {policy.keep_versions}, older than {days}"]
            items.append(Item("model-version", f"{model}/{mv.version}", action, reasons, 0, mv.created, model_id=mv.model_id))
    return items, kept


def _plan_artifacts(store: ArtifactStore, inventory: Inventory, kept: list[ModelVersion], policy: _Policy) -> list[Item]:
    """The decision on each artifact version, checkpoint and incomplete folder."""
    items: list[Item] = []
    days = f"{policy.older_than_days:g} days"

    def item(kind: str, v: ArtifactVersion, action: str, reasons: list[str]) -> Item:
        return Item(kind, v.key, action, reasons, v.bytes, v.created, store.uri(v.key))

    artifacts = sorted((v for v in inventory.versions.values() if not v.is_checkpoint), key=lambda v: v.key)
    checkpoints = sorted((v for v in inventory.versions.values() if v.is_checkpoint), key=lambda v: v.key)
    by_family: dict[str, list[ArtifactVersion]] = {}
    for v in artifacts:
        by_family.setdefault(v.family, []).append(v)
    newest = {v.key for vs in by_family.values() for v in sorted(vs, key=lambda v: (-v.created, v.key))[: policy.keep_artifacts]}
    own: dict[str, list[str]] = {}  # why an artifact is kept for its own sake (newest of its family, young)
    for v in artifacts:
        own[v.key] = [f"among the newest {policy.keep_artifacts} of {v.family or 'its family'}"] if v.key in newest else []
        own[v.key] += [f"younger than {days}"] if v.created > policy.cutoff else []
    # Checkpoints: of a complete artifact, useless; of an unfinished training, kept while it may resume.
    last_checkpoint: dict[str, float] = {}
    for v in checkpoints:
        last_checkpoint[v.family] = max(last_checkpoint.get(v.family, 0.0), v.created)
    for v in checkpoints:
        of = v.family[len(CHECKPOINTS) + 1 :]
        if of in inventory.versions:
            items.append(item("checkpoint", v, "delete", [f"its artifact {of} is complete"]))
        elif last_checkpoint[v.family] > policy.cutoff:
            items.append(item("checkpoint", v, "keep", ["of an unfinished training (resume)"]))
        else:
            items.append(item("checkpoint", v, "delete", [f"its training has not finished for {days}"]))
    kept_checkpoints = [i.name for i in items if i.action == "keep"]
    why = protected(store, inventory, kept, [k for k, reasons in own.items() if reasons] + kept_checkpoints)
    for v in artifacts:
        reasons = why.get(v.key, []) + own[v.key]
        items.append(item("artifact", v, "keep", reasons) if reasons else item("artifact", v, "delete", [f"referenced by no kept version, not the newest of {v.family}, older than {days}"]))
    for v in sorted(inventory.incomplete.values(), key=lambda v: v.key):
        if v.created > policy.cutoff:
            items.append(item("incomplete", v, "keep", ["no manifest yet: an upload may be under way"]))
        else:
            items.append(item("incomplete", v, "delete", [f"no manifest, untouched for {days} (a crashed upload)"]))
    return items


# --------------------------------------------------------------------------------------------------
# Applying it


@dataclass
class Outcome:
    deleted: list[Item] = field(default_factory=list)
    skipped: list[tuple[Item, str]] = field(default_factory=list)
    failed: list[tuple[Item, str]] = field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        return sum(i.bytes for i in self.deleted if i.kind != "model-version")


def apply(plan: Plan, store: ArtifactStore | None = None, client: Any = None, *, delete_logged_models: bool = True) -> Outcome:
    """Delete what ``plan`` deletes: model versions first (each re-checked right before), then artifacts
    (after scanning the root and re-reading the registry: whatever is referenced by then stays). Every
    deletion is logged; a failure is logged and the rest goes on. Do not run it beside ``midpo promote``:
    a promotion between a version's check and its deletion loses its alias (MLflow deletes them with it)."""
    store = store or ArtifactStore(plan.root)
    if store.root != plan.root:
        raise ValueError(f"the plan is for {plan.root}, the store is {store.root}")
    client = client or default_client(plan.registry)
    out = Outcome()
    doomed = plan.deletions("model-version")
    for item in doomed:
        model, version = item.name.rsplit("/", 1)
        try:
            if why := _protected_now(client, model, version):
                out.skipped.append((item, why))
                log.warning("prune: keeping model version %s: %s since the plan was made", item.name, why)
                continue
            client.delete_model_version(model, version)
        except Exception as e:  # noqa: BLE001
            out.failed.append((item, str(e)))
            log.error("prune: could not delete model version %s: %s", item.name, e)
            continue
        out.deleted.append(item)
        log.info("prune: deleted model version %s (created %s; %s)", item.name, _iso(item.created), "; ".join(item.reasons))
    if doomed and delete_logged_models:
        _delete_logged_models(client, out.deleted)
    artifacts = [i for i in plan.deletions() if i.kind != "model-version"]
    if artifacts:
        fresh, _ = read_registry(client, [])  # every version still registered: the kept ones, new ones, failed deletions
        inventory = scan(store)
        doomed_keys = {i.name for i in artifacts}
        now_protected = protected(store, inventory, fresh, [k for k in inventory.versions if k not in doomed_keys])  # what stays keeps its inputs
        for item in artifacts:
            if item.name in now_protected:
                out.skipped.append((item, now_protected[item.name][0]))
                log.warning("prune: keeping %s: %s (since the plan was made)", item.uri, now_protected[item.name][0])
                continue
            try:
                store.delete(item.name)
            except Exception as e:  # noqa: BLE001
                out.failed.append((item, str(e)))
                log.error("prune: could not delete %s: %s", item.uri, e)
                continue
            out.deleted.append(item)
            log.info("prune: deleted %s %s (%s, created %s; %s)", item.kind, item.uri, human_bytes(item.bytes), _iso(item.created), "; ".join(item.reasons))
    return out


def _protected_now(client: Any, model: str, version: str) -> str | None:
    """Why version ``model/version`` must stay after all (an alias, or the champion history, gained since
    the plan), read right before deleting it; None when it may go."""
    if aliases := client.get_model_version(model, version).aliases:
        return "alias " + ", ".join(f"@{a}" for a in aliases)
    if int(version) in _champion_history(client.get_registered_model(model).tags):
        return "in the champion history"
    return None


def _delete_logged_models(client: Any, deleted: list[Item]) -> None:
    """Mark the logged models of deleted versions deleted (``mlflow gc`` then frees their artifacts), unless
    a remaining version of any registered model still points at one."""
    ids = {i.model_id for i in deleted if i.model_id}
    if not ids:
        return
    remaining, _ = read_registry(client, [])
    ids -= {mv.model_id for mv in remaining if mv.model_id}
    for model_id in sorted(ids):
        try:
            client.delete_logged_model(model_id)
            log.info("prune: marked logged model %s deleted (its artifacts go with `mlflow gc`)", model_id)
        except Exception as e:  # noqa: BLE001 - the version is gone; the logged model is only space
            log.warning("prune: could not mark logged model %s deleted: %s", model_id, e)


def default_client(uri: str | None = None) -> Any:
    """The MLflow client of ``uri``, default midpo's tracking URI (``MLFLOW_TRACKING_URI``, else the embedded
    SQLite store)."""
    from mlflow import MlflowClient

    from midpo.tracking import tracking_uri

    return MlflowClient(tracking_uri=uri or tracking_uri())


__all__ = ["Plan", "RetentionError", "apply", "make_plan", "protected", "scan"]
