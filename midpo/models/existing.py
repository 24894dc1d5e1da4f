"""An existing model as the pipeline's base: resolved once, published once as ``bases/<version>``.

``base.model`` (a hub id, local folder, ``file://``, ``s3://`` folder or ``.gguf``, ``smollm2``) goes
through :func:`midpo.models.provision.resolve_model` and its model files are published to the artifact
store with a ``midpo_base.json`` (template family, source, identity, metrics), the same metadata file the
tiny base writes. Every later stage then loads the published folder with
:func:`midpo.models.load.load_model`, as it does the tiny base.

The version is a hash of the *source identity*, computed before anything is converted or copied:

- a GGUF source (a ``.gguf`` path or ``s3://`` object, ``smollm2``, ``package:NAME``, or a folder that
  :func:`~midpo.models.provision.convert_gguf` wrote): the file's sha256 and ``CONVERT_VERSION``. A rerun
  costs the hash of the file (~0.2 s for SmolLM2's 98 MB), and no conversion when the version exists;
- a folder (local, hub snapshot, downloaded s3 prefix): the sha256 of every model file in it (top-level
  files: config, weights, tokenizer, generation config; not ``*.gguf``/ONNX/TF/Flax files, hidden files,
  sub-folders or midpo's own ``_MANIFEST.json``/``midpo_base.json``).

Bump :data:`PUBLISH_VERSION` when what is published for the same source changes.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from midpo.data.schema import content_hash
from midpo.models.provision import (
    CONVERT_VERSION,
    PACKAGE_ALIASES,
    SOURCE_META,
    package_model_path,
    resolve_model,
)
from midpo.models.tiny import BASE_META
from midpo.storage import MANIFEST, ArtifactRef, ArtifactStore, local_copy, sha256_file

log = logging.getLogger(__name__)

# Bump when publish_base changes what it publishes for the same source (part of the version).
PUBLISH_VERSION = 1
SKIP_SUFFIXES = (".gguf", ".onnx", ".h5", ".msgpack", ".ot", ".tflite", ".pth", ".partial")
SKIP_NAMES = {MANIFEST, BASE_META}


def gguf_source(spec: str | os.PathLike[str]) -> Path | None:
    """The GGUF file behind ``spec`` without converting it (an s3 object is downloaded into the cache),
    or None when ``spec`` names a folder or a hub id."""
    text = os.fspath(spec)
    if text in PACKAGE_ALIASES or text.startswith("package:"):
        found = package_model_path(PACKAGE_ALIASES.get(text) or text[len("package:") :])
        return None if found.is_dir() else found
    if text.startswith("s3://"):
        return local_copy(text) if text.endswith(".gguf") else None
    path = Path(urlparse(text).path) if text.startswith("file://") else Path(text).expanduser()
    return path.resolve() if path.suffix == ".gguf" and path.is_file() else None


def model_files(folder: Path) -> list[Path]:
    """The files of ``folder`` that make up the model (see the module docstring), sorted by name."""
    return sorted(
        p for p in Path(folder).iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name not in SKIP_NAMES and not p.name.endswith(SKIP_SUFFIXES)
    )  # fmt: skip


def folder_identity(folder: Path) -> dict[str, Any]:
    """The identity of a resolved model folder: its GGUF origin when convert_gguf wrote it, else the
    sha256 of every model file (the conversion's provenance file, which records timings, excluded)."""
    folder = Path(folder)
    source_meta = folder / SOURCE_META
    if source_meta.is_file():
        meta = json.loads(source_meta.read_text())
        if meta.get("sha256"):
            return {"gguf_sha256": meta["sha256"], "convert_version": meta.get("convert_version", 1)}
    identity: dict[str, Any] = {"files": {p.name: sha256_file(p) for p in model_files(folder) if p.name != SOURCE_META}}
    family = _recorded_family(folder)
    if family:  # a folder midpo published before: its template family is part of what it is
        identity["template"] = family
    return identity


def source_identity(spec: str | os.PathLike[str]) -> tuple[dict[str, Any], Path | None]:
    """``(identity, resolved folder or None)``: a GGUF source is hashed without converting it."""
    gguf = gguf_source(spec)
    if gguf is not None:
        return {"gguf_sha256": sha256_file(gguf), "convert_version": CONVERT_VERSION}, None
    folder = resolve_model(spec)
    return folder_identity(folder), folder


def existing_base_key(identity: dict[str, Any]) -> str:
    """``bases/<16 hex of hash(source identity, PUBLISH_VERSION)>``."""
    return "bases/" + content_hash({"source": identity, "publish_version": PUBLISH_VERSION})[:16]


def _recorded_family(folder: Path) -> str | None:
    meta = folder / BASE_META
    return json.loads(meta.read_text()).get("template") if meta.is_file() else None


def _template_family(folder: Path) -> str:
    """The folder's template family: the one midpo recorded, else the tokenizer's (a chat model needs a chat template)."""
    from transformers import AutoTokenizer

    from midpo.models.template import template_for
    from midpo.models.tokenizer import prepare_tokenizer

    recorded = _recorded_family(folder)
    return template_for(prepare_tokenizer(AutoTokenizer.from_pretrained(folder)), recorded).family


def _param_count(files: list[Path]) -> float | None:
    """Parameters stored in the safetensors files (headers only), or None without safetensors weights."""
    from safetensors import safe_open

    shards = [p for p in files if p.suffix == ".safetensors"]
    if not shards:
        return None
    total = 0
    for path in shards:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                n = 1
                for d in f.get_slice(name).get_shape():
                    n *= d
                total += n
    return float(total)


def publish_base(spec: str | os.PathLike[str], store: ArtifactStore | None = None, dry_run: bool = False) -> tuple[ArtifactRef, dict[str, float], bool]:
    """Publish the model ``spec`` names as ``bases/<version>`` once: ``(ref, metrics, cache_hit)``.

    A complete version is a cache hit (metrics read back from its manifest; nothing resolved, converted
    or copied beyond hashing the source). ``dry_run`` returns the reference without converting or copying
    (a folder source is still resolved to be hashed: a hub id or s3 prefix is downloaded into its cache).
    """
    store = store or ArtifactStore()
    t0 = time.perf_counter()
    identity, folder = source_identity(spec)
    key = existing_base_key(identity)
    ref = store.ref(key)
    if store.is_complete(key):
        log.info("base %s (%s) exists: cache hit", ref.uri, spec)
        return ref, store.manifest(key).get("metadata", {}).get("metrics", {}), True
    if dry_run:
        return ref, {}, False
    folder = folder or resolve_model(spec)  # a GGUF source is converted here (once per file, cached)
    resolve_s = time.perf_counter() - t0
    files = model_files(folder)
    family = _template_family(folder)
    params = _param_count(files)
    metrics = {
        "model_bytes": float(sum(p.stat().st_size for p in files)),
        **({"params": params} if params is not None else {}),
        "resolve_seconds": round(resolve_s, 2),
    }
    meta = {"template": family, "build_version": PUBLISH_VERSION, "source": os.fspath(spec), "identity": identity, "resolved_folder": str(folder)}
    with tempfile.TemporaryDirectory(prefix="midpo-base-") as tmp:
        staging = Path(tmp)
        for p in files:  # links: the store copies (or uploads) each file once, straight from the source
            os.symlink(p.resolve(), staging / p.name)
        (staging / BASE_META).write_text(json.dumps({**meta, "metrics": metrics}, indent=2))
        ref = store.publish(staging, key, metadata={"metrics": metrics, **meta})
    log.info("base %s published from %s (%s template, %.1f MB) in %.1f s", ref.uri, spec, family, metrics["model_bytes"] / 1e6, time.perf_counter() - t0)
    return ref, metrics, False
