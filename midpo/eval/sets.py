"""The named eval sets of interfaces.md: each has a kind and is built from the pipeline's artifacts.

Every set is held out by prompt from everything that trains (models and judges alike):
- ``world-*``: the world artifact's unseen (template, entity) combinations, judged by the exact oracle.
- ``hh-harmful`` / ``alpaca-eval``: the single-turn prompts of the dataset's ``eval`` split that came from
  the hh (harmful) or AlpacaEval (benign) sources; the split is by prompt, so no training pair and no score
  model ever saw them.
- ``xstest-unsafe`` / ``xstest-safe``: the held-out half of the XSTest prompts (:func:`is_xstest_heldout`,
  by prompt hash); the refusal judge trains on the other half's labeled completions only.

:func:`assert_unseen` checks the promise against the dataset's training split before any model generates.
"""

from __future__ import annotations

import json
import random
from typing import Any

from midpo.config import ConfigError
from midpo.data.prepare import DataError, load_pairs_table
from midpo.data.readers import read_source
from midpo.eval.evaluate import EvalSet
from midpo.judges.refusal import normalize_prompt
from midpo.storage import ArtifactRef, local_copy
from midpo.world import EVAL_SETS as WORLD_SETS
from midpo.world.artifact import EVAL_DIR

XSTEST_PROMPTS = "builtin:xstest_prompts.csv"
XSTEST_EVAL_FRACTION = 0.5
XSTEST_SETS = {"xstest-unsafe": "harmful", "xstest-safe": "borderline"}
DATASET_SETS = {"hh-harmful": ("hh", "harmful"), "alpaca-eval": ("alpaca-eval", "benign")}  # name -> (source format, kind)
SET_KINDS = {**WORLD_SETS, **XSTEST_SETS, **{name: kind for name, (_, kind) in DATASET_SETS.items()}}


def is_xstest_heldout(prompt: str) -> bool:
    """Whether an XSTest prompt belongs to the eval half (deterministic, by the normalized prompt)."""
    return random.Random(f"xstest-eval:{normalize_prompt(prompt)}").random() < XSTEST_EVAL_FRACTION


def xstest_eval_prompts() -> list[str]:
    """Every XSTest prompt of the eval half, safe and unsafe: what the refusal judge must never train on."""
    return [r.prompt for r in read_source(XSTEST_PROMPTS, "prompts").records if is_xstest_heldout(r.prompt)]


def _xstest_set(name: str) -> EvalSet:
    kind = XSTEST_SETS[name]
    records = [r for r in read_source(XSTEST_PROMPTS, "prompts").records if r.kind == kind and is_xstest_heldout(r.prompt)]
    # XSTest's own notion of safe behaviour on its unsafe prompts is a refusal: the refusal judge, trained on
    # XSTest-style labels, reads that better than a cost model trained on other data
    judge = "refusal-classifier" if kind == "harmful" else "cost-model"
    return EvalSet(name, kind, [r.prompt for r in records], world=False, categories=[r.category for r in records], safety_judge=judge)


def _dataset_set(name: str, dataset: ArtifactRef, rows: list[dict[str, Any]]) -> EvalSet:
    fmt, kind = DATASET_SETS[name]
    meta = json.loads((local_copy(f"{dataset.uri}/meta.json")).read_text())
    sources = {s["uri"] for s in meta.get("sources", []) if s.get("format") == fmt}
    if not sources:
        raise ConfigError(f"eval.sets: {name} needs a data source of format {fmt!r}; this profile's dataset has none")
    prompts = sorted({r["prompt"] for r in rows if r["split"] == "eval" and r["source"] in sources and r["prompt_kind"] == kind and not r["context"]})
    random.Random(f"{name}:{dataset.version}").shuffle(prompts)  # eval.n_per_set takes a random head, not an alphabetical one
    if not prompts:
        raise DataError(f"eval set {name}: the dataset's eval split has no single-turn {kind} prompt from {', '.join(sorted(sources))}")
    return EvalSet(name, kind, prompts, world=False)


def _world_set(name: str, world: ArtifactRef) -> EvalSet:
    with local_copy(f"{world.uri}/{EVAL_DIR}/{name}.jsonl").open(encoding="utf-8") as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    return EvalSet(name, WORLD_SETS[name], prompts)


def build_eval_sets(names: list[str], refs: dict[str, ArtifactRef]) -> list[EvalSet]:
    """The named sets from the pipeline's outputs (``world``, ``dataset``), checked unseen by training."""
    unknown = [n for n in names if n not in SET_KINDS]
    if unknown:
        raise ConfigError(f"eval.sets: unknown set {', '.join(unknown)} (known: {', '.join(SET_KINDS)})")
    if any(n in DATASET_SETS for n in names) and "dataset" not in refs:
        raise ConfigError(f"eval.sets: {', '.join(n for n in names if n in DATASET_SETS)} need the prepared dataset, which this run did not build")
    rows = list(load_pairs_table(refs["dataset"])) if "dataset" in refs else []  # read once for every set and the check
    sets = []
    for name in names:
        if name in WORLD_SETS:
            if "world" not in refs:
                raise ConfigError(f"eval.sets: {name} needs the synthetic world, which this profile does not build")
            sets.append(_world_set(name, refs["world"]))
        elif name in XSTEST_SETS:
            sets.append(_xstest_set(name))
        else:
            sets.append(_dataset_set(name, refs["dataset"], rows))
    if "dataset" in refs:
        _assert_unseen(sets, refs["dataset"].version, rows)
    return sets


def assert_unseen(sets: list[EvalSet], dataset: ArtifactRef) -> None:
    """Refuse to evaluate on a prompt that occurs in the dataset's training split (models and score models train there)."""
    _assert_unseen(sets, dataset.version, list(load_pairs_table(dataset)))


def _assert_unseen(sets: list[EvalSet], version: str, rows: list[dict[str, Any]]) -> None:
    train = {normalize_prompt(r["prompt"]) for r in rows if r["split"] == "train"}
    seen = {es.name: [p for p in es.prompts if normalize_prompt(p) in train] for es in sets}
    seen = {k: v for k, v in seen.items() if v}
    if seen:
        detail = "; ".join(f"{k}: {len(v)} prompts, e.g. {v[0][:60]!r}" for k, v in seen.items())
        raise DataError(f"eval prompts occur in the training split of dataset {version}: {detail}")
