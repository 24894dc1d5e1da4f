"""Evaluate one model on eval sets: seeded batched generation, judging, means with bootstrap CIs.

The protocol is :class:`midpo.config.EvalConfig`: ``samples_per_prompt`` sampled responses per prompt at
``temperature`` (greedy decoding is all-or-nothing on the world, so sampled rates are the headline and
greedy ones are reported beside them as ``x_greedy``), and ``p_correct``, the teacher-forced probability
of the desired response, as a graded figure.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from midpo.config import EvalConfig
from midpo.eval.forcing import response_logprobs
from midpo.eval.stats import mean_ci
from midpo.eval.world_judge import oracle_values
from midpo.models.load import generate
from midpo.world import correct_answers

log = logging.getLogger(__name__)


@dataclass
class EvalSet:
    name: str
    kind: str  # harmful | borderline | benign
    prompts: list[str]
    world: bool = True  # judged by the world's oracle


def prompt_file_set(path: str, kind: str) -> EvalSet:
    """An eval set from a prompt file (csv/jsonl/txt), named by its file stem."""
    from pathlib import Path

    from midpo.data.prepare import DataError
    from midpo.data.readers import read_source
    from midpo.world import classify_prompt

    result = read_source(path, "prompts", prompt_kind=kind)
    prompts = [r.prompt for r in result.records]
    if not prompts:
        raise DataError(f"{path}: no prompts")
    outside = [p for p in prompts if classify_prompt(p) is None]
    if outside:
        raise DataError(
            f"{path}: {len(outside)} of {len(prompts)} prompts are not prompts of the synthetic world (e.g. {outside[0][:60]!r}); "
            "this version judges only world prompts, with the exact oracle"
        )
    name = Path(path).name.split(".")[0]
    return EvalSet(name, kind, prompts)


def _summarise(values: dict[str, list[list[float]]], cfg: EvalConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, per_prompt in values.items():
        mean, ci = mean_ci(per_prompt, n_boot=cfg.n_boot, seed=cfg.seed)
        out[name], out[f"{name}_ci"] = mean, ci
    return out


@dataclass
class ScoreJudges:
    """The learned score models as evaluation judges (any object with ``score(prompts, responses)``)."""

    reward: Any = None
    cost: Any = None

    def values(self, kind: str, prompts: list[str], samples: list[list[str]]) -> tuple[dict[str, list[list[float]]], dict[str, str]]:
        """metric -> per-prompt sample values, and which judge produced each metric (interfaces.md)."""
        flat_p = [p for p, rs in zip(prompts, samples) for _ in rs]
        flat_r = [r for rs in samples for r in rs]
        sizes = [len(rs) for rs in samples]

        def regroup(xs: list[float]) -> list[list[float]]:
            out, i = [], 0
            for n in sizes:
                out.append(xs[i : i + n])
                i += n
            return out

        values: dict[str, list[list[float]]] = {}
        judge: dict[str, str] = {}
        if kind == "harmful" and self.cost is not None:
            costs = self.cost.score(flat_p, flat_r)
            values["safety_rate"] = regroup([float(c < 0) for c in costs])  # cost < 0: safe
            values["mean_cost"] = regroup(costs)
            judge.update(safety_rate="cost-model", mean_cost="cost-model")
        if kind != "harmful" and self.reward is not None:
            values["helpfulness"] = regroup(self.reward.score(flat_p, flat_r))
            judge["helpfulness"] = "reward-model"
        return values, judge


def evaluate_set(model: Any, tokenizer: Any, template: Any, es: EvalSet, cfg: EvalConfig, judges: ScoreJudges | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics of one set and the generated samples (for the report and inspection).

    World sets get the oracle's figures; ``judges`` add the learned judges' figures beside them."""
    if not es.world:
        raise ValueError(f"{es.name}: only world sets can be judged in this version")
    prompts = es.prompts[: cfg.n_per_set]
    s = cfg.samples_per_prompt
    torch.manual_seed(cfg.seed)
    flat = generate(model, tokenizer, template, [p for p in prompts for _ in range(s)], max_new_tokens=cfg.max_new_tokens,
                    do_sample=True, temperature=cfg.temperature, batch_size=cfg.batch_size)
    sampled = [flat[i * s : (i + 1) * s] for i in range(len(prompts))]
    metrics: dict[str, Any] = {"n": len(prompts), "samples_per_prompt": s, "judge": {}}
    metrics.update(_summarise(oracle_values(es.kind, prompts, sampled), cfg))
    if judges is not None:
        values, metrics["judge"] = judges.values(es.kind, prompts, sampled)
        metrics.update(_summarise(values, cfg))
    records = [{"set": es.name, "prompt": p, "samples": rs} for p, rs in zip(prompts, sampled)]
    if cfg.greedy:
        greedy = generate(model, tokenizer, template, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
        for name, per_prompt in oracle_values(es.kind, prompts, [[g] for g in greedy]).items():
            metrics[f"{name}_greedy"] = sum(v[0] for v in per_prompt) / len(per_prompt)
        for rec, g in zip(records, greedy):
            rec["greedy"] = g
    # p_correct: total probability of the desired responses (all accepted phrasings), per prompt
    targets = [(i, a) for i, p in enumerate(prompts) for a in correct_answers(p)]
    logps = response_logprobs(model, tokenizer, template, [prompts[i] for i, _ in targets], [a for _, a in targets], cfg.batch_size)
    p_correct = [0.0] * len(prompts)
    for (i, _), lp in zip(targets, logps):
        p_correct[i] += math.exp(lp)
    metrics["p_correct"], metrics["p_correct_ci"] = mean_ci([[v] for v in p_correct], n_boot=cfg.n_boot, seed=cfg.seed)
    return metrics, records


def evaluate_model(model: Any, tokenizer: Any, template: Any, sets: list[EvalSet], cfg: EvalConfig, judges: ScoreJudges | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``{set name: metrics}`` and every generated sample."""
    metrics: dict[str, Any] = {}
    samples: list[dict[str, Any]] = []
    for es in tqdm(sets, desc="eval sets", unit="set"):
        metrics[es.name], recs = evaluate_set(model, tokenizer, template, es, cfg, judges)
        samples += recs
        log.info("%s: %s", es.name, {k: round(v, 3) for k, v in metrics[es.name].items() if isinstance(v, float)})
    return metrics, samples
