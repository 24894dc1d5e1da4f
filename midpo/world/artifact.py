"""The world as a versioned artifact: what the data, base and eval stages read, written once per config."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

from midpo.data.schema import content_hash
from midpo.storage import ArtifactRef, ArtifactStore
from midpo.world.config import WorldConfig
from midpo.world.generate import (
    EVAL_SETS,
    dual_counts,
    eval_prompts,
    generate_pairs,
    noise_summary,
    sft_examples,
    world_summary,
)

PAIRS = "pairs.jsonl"  # PKU schema (+ context, prompt_kind, extras with the clean labels)
SFT = "sft.jsonl"  # {prompt, response} dialogues for the base model
EVAL_DIR = "eval"  # eval/<set>.jsonl: {prompt, kind, category, id}


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def build_world(cfg: WorldConfig, store: ArtifactStore, dry_run: bool = False) -> tuple[ArtifactRef, dict[str, Any], bool]:
    """Write pairs, SFT dialogues and eval prompts under ``worlds/<config hash>``; no work when it exists."""
    version = content_hash(dataclasses.asdict(cfg))[:16]
    key = f"worlds/{version}"
    if store.is_complete(key):
        return store.ref(key), store.manifest(key)["metadata"], True
    if dry_run:
        return store.ref(key), {}, False
    pairs = generate_pairs(cfg)
    summary = {**world_summary(cfg), "dual": dual_counts(pairs), "noise": noise_summary(pairs)}
    with tempfile.TemporaryDirectory(prefix="midpo-world-") as tmp:
        out = Path(tmp)
        _jsonl(out / PAIRS, [dataclasses.asdict(p) for p in pairs])
        _jsonl(out / SFT, sft_examples(cfg))
        for name in EVAL_SETS:
            _jsonl(out / EVAL_DIR / f"{name}.jsonl", [p.to_row() for p in eval_prompts(cfg, name)])
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        ref = store.publish(out, key, metadata=summary)
    return ref, summary, False
