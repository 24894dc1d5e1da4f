"""The data-preparation stage: sources -> canonical pairs -> subsets -> prompt-disjoint splits -> a dataset version.

The version is a content hash of the canonical records and the builder config, so the same data and
rules always give the same version, and ``prepare`` does no work when that version is already complete
under the artifact root.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq
from datasets.table import InMemoryTable

datasets.disable_progress_bars()  # one-shot Parquet writes of small tables; our stages report progress

from midpo.config import DataConfig
from midpo.data.readers import read_source
from midpo.data.schema import PreferencePair, Problem, Reason, Severity, content_hash
from midpo.data.subsets import SUBSETS, build_subsets, counts_by_kind
from midpo.storage import ArtifactRef, ArtifactStore

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")

_CONTEXT = [{"role": datasets.Value("string"), "content": datasets.Value("string")}]
PAIR_FEATURES = datasets.Features(
    {
        "pair_id": datasets.Value("string"),
        "prompt": datasets.Value("string"),
        "response_0": datasets.Value("string"),
        "response_1": datasets.Value("string"),
        "is_response_0_safe": datasets.Value("bool"),
        "is_response_1_safe": datasets.Value("bool"),
        "better_response_id": datasets.Value("int8"),
        "safer_response_id": datasets.Value("int8"),
        "context": _CONTEXT,
        "prompt_kind": datasets.Value("string"),
        "source": datasets.Value("string"),
        "extras": datasets.Value("string"),
        "split": datasets.Value("string"),
    }
)
SUBSET_FEATURES = datasets.Features(
    {
        "pair_id": datasets.Value("string"),
        "prompt": datasets.Value("string"),
        "context": _CONTEXT,
        "chosen": datasets.Value("string"),
        "rejected": datasets.Value("string"),
        "chosen_index": datasets.Value("int8"),
        "prompt_kind": datasets.Value("string"),
        "source": datasets.Value("string"),
    }
)


class DataError(ValueError):
    """Sources that cannot be prepared (read errors); the message lists the problems and where."""


@dataclass
class PreparedData:
    """What ``prepare`` returns: the dataset reference and the small metadata written beside it."""

    ref: ArtifactRef
    meta: dict[str, Any]
    cache_hit: bool
    problems: list[Problem] = field(default_factory=list)


def load_pairs(cfg: DataConfig) -> tuple[list[PreferencePair], list[Problem], list[dict[str, Any]]]:
    """Read every source; returns unique pairs sorted by id, all problems, and per-source summaries.

    Read errors abort with :class:`DataError`; warnings (exclusions) are returned, never dropped silently.
    A pair that occurs in two sources is kept once and the second counted as ``duplicate``. A source with
    a ``limit`` contributes its first ``limit`` usable pairs (file order); it is still read and validated
    in full, so its exclusions describe the whole source.
    """
    pairs: dict[str, PreferencePair] = {}
    problems: list[Problem] = []
    summaries = []
    for src in cfg.sources:
        result = read_source(src.uri, src.format, max_chars=cfg.max_chars, prompt_kind=src.prompt_kind)
        errors = [p for p in result.problems if p.severity is Severity.ERROR]
        if errors:
            shown = "\n".join(f"  {src.uri}: {p}" for p in errors[:20])
            more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
            raise DataError(f"{len(errors)} error(s) in {src.uri}:\n{shown}{more}\nrun `midpo data validate {src.uri}` for the full report")
        problems += [Problem(f"{src.uri} {p.place}", p.reason, p.detail) for p in result.problems]
        kept = 0
        for record in result.records:
            if src.limit is not None and kept >= src.limit:  # a slice: the first `limit` usable pairs
                break
            if not isinstance(record, PreferencePair):
                raise DataError(f"{src.uri}: format {result.format!r} holds no preference pairs (use it as an eval or judge set)")
            if record.pair_id in pairs:
                problems.append(Problem(f"{src.uri} pair {record.pair_id[:12]}", Reason.DUPLICATE, "the same pair is in an earlier source"))
                continue
            pairs[record.pair_id] = record
            kept += 1
        summaries.append({"uri": src.uri, "format": result.format, "seen": result.n_seen, "kept": kept, **({"limit": src.limit} if src.limit is not None else {})})
    return [pairs[k] for k in sorted(pairs)], problems, summaries


def dataset_version(pairs: list[PreferencePair], cfg: DataConfig) -> str:
    """Content hash of the canonical records plus the builder config; where a record was read from
    (``source``) is provenance, not content, so moving a file does not change the version."""
    records = [{k: v for k, v in p.to_row().items() if k != "source"} for p in pairs]
    return content_hash({"records": records, "builder": cfg.builder_dict()})[:16]


def split_of(pair: PreferencePair, eval_fraction: float, seed: int) -> str:
    """Deterministic split by prompt: every pair with the same dialogue prompt lands on the same side."""
    u = random.Random(f"{seed}:{pair.prompt_key()}").random()
    return "eval" if u < eval_fraction else "train"


def prepare(cfg: DataConfig, store: ArtifactStore | None = None, dry_run: bool = False) -> PreparedData:
    """Build (or find) the dataset version for ``cfg`` under the artifact root; ``dry_run`` writes nothing."""
    store = store or ArtifactStore()
    pairs, problems, summaries = load_pairs(cfg)
    if not pairs:
        raise DataError("no usable preference pairs in " + ", ".join(s.uri for s in cfg.sources))
    version = dataset_version(pairs, cfg)
    key = f"datasets/{version}"
    if store.is_complete(key):
        log.info("dataset %s already prepared at %s: nothing to do", version, store.uri(key))
        return PreparedData(store.ref(key), store.manifest(key)["metadata"], True, problems)
    if dry_run:
        return PreparedData(store.ref(key), {"version": version}, False, problems)

    splits = {p.pair_id: split_of(p, cfg.eval_fraction, cfg.split_seed) for p in pairs}
    by_split = {s: [p for p in pairs if splits[p.pair_id] == s] for s in SPLITS}
    subsets = {s: build_subsets(by_split[s], cfg.unlabeled_safety, cfg.dual_rule) for s in SPLITS}
    meta = {
        "version": version,
        "builder": cfg.builder_dict(),
        "sources": summaries,
        "pairs": {s: counts_by_kind([p.to_row() for p in by_split[s]]) for s in SPLITS},
        "subsets": {name: {s: counts_by_kind(subsets[s][name]) for s in SPLITS} for name in SUBSETS},
        "exclusions": dict(sorted(Counter(p.reason.value for p in problems).items())),
    }
    with tempfile.TemporaryDirectory(prefix="midpo-prepare-") as tmp:
        out = Path(tmp)
        rows = [{**p.to_row(), "split": splits[p.pair_id]} for p in pairs]
        _table(rows, PAIR_FEATURES).to_parquet(str(out / "pairs.parquet"))
        for name in SUBSETS:
            for s in SPLITS:
                (out / name).mkdir(exist_ok=True)
                _table(subsets[s][name], SUBSET_FEATURES).to_parquet(str(out / name / f"{s}.parquet"))
        (out / "meta.json").write_text(json.dumps(meta, indent=2))
        (out / "exclusions.jsonl").write_text("".join(json.dumps({"place": p.place, "reason": p.reason.value, "detail": p.detail}) + "\n" for p in problems))
        ref = store.publish(out, key, metadata=meta)
    log.info("prepared dataset %s at %s", version, ref.uri)
    return PreparedData(ref, meta, False, problems)


def _table(rows: list[dict[str, Any]], features: datasets.Features) -> datasets.Dataset:
    """Column-wise, so an empty subset still carries its schema (``from_list([])`` has no columns)."""
    return datasets.Dataset.from_dict({name: [r[name] for r in rows] for name in features}, features=features)


def load_subset(ref: ArtifactRef, subset: str, split: str = "train", store: ArtifactStore | None = None) -> datasets.Dataset:
    """One subset split of a prepared dataset as a ``datasets.Dataset`` (downloaded once from s3)."""
    if subset not in SUBSETS or split not in SPLITS:
        raise ValueError(f"subset must be one of {SUBSETS} and split one of {SPLITS}")
    return _read(_folder(ref, store) / subset / f"{split}.parquet", SUBSET_FEATURES)


def load_pairs_table(ref: ArtifactRef, store: ArtifactStore | None = None) -> datasets.Dataset:
    """The canonical pairs (with their ``split``) of a prepared dataset."""
    return _read(_folder(ref, store) / "pairs.parquet", PAIR_FEATURES)


def _read(path: Path, features: datasets.Features) -> datasets.Dataset:
    # In memory (the tables are small), and unlike ``Dataset.from_parquet`` it accepts an empty split.
    return datasets.Dataset(InMemoryTable(pq.read_table(path)), info=datasets.DatasetInfo(features=features))


def _folder(ref: ArtifactRef, store: ArtifactStore | None) -> Path:
    store = store or ArtifactStore()
    return store.fetch(store.key_of(ref.uri))
