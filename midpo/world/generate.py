"""Seeded generation: the train/eval split of combinations, preference pairs, SFT data and eval prompts.

Every function is a pure function of its :class:`WorldConfig` (seed included): Python's ``random.Random``
seeded with a string per purpose, so the output never depends on hash randomization or call order.
"""

from __future__ import annotations

import random
from collections import Counter
from functools import lru_cache
from typing import Any

from midpo.data.schema import PROMPT_KINDS, EvalPrompt, PreferencePair
from midpo.data.subsets import build_subsets, counts_by_kind
from midpo.world import oracle as O
from midpo.world import tables as T
from midpo.world import vocab as V
from midpo.world.config import WorldConfig

SOURCE = "world"
EVAL_SETS = {f"world-{k}": k for k in PROMPT_KINDS}


def _rng(cfg: WorldConfig, purpose: str) -> random.Random:
    return random.Random(f"midpo-world:{cfg.seed}:{purpose}")


def _apportion(n: int, weights: dict[str, float]) -> dict[str, int]:
    """Exact counts summing to n in proportion to weights (largest remainder, ties in key order)."""
    total = sum(weights.values())
    if n == 0 or total <= 0:
        return {k: 0 for k in weights}
    raw = {k: n * w / total for k, w in weights.items()}
    counts = {k: int(v) for k, v in raw.items()}
    rest = sorted(weights, key=lambda k: (-(raw[k] - counts[k]), list(weights).index(k)))
    for k in rest[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def _plan(rng: random.Random, n: int, weights: dict[str, float]) -> list[str]:
    """A shuffled list of n labels with exact counts."""
    out = [k for k, c in _apportion(n, weights).items() for _ in range(c)]
    rng.shuffle(out)
    return out


# --------------------------------------------------------------------------------------------------
# Split


def _check_kind(kind: str) -> str:
    kind = EVAL_SETS.get(kind, kind)
    if kind not in PROMPT_KINDS:
        raise ValueError(f"unknown prompt kind {kind!r}: choose one of {', '.join(PROMPT_KINDS)} or {', '.join(EVAL_SETS)}")
    return kind


@lru_cache(maxsize=64)
def _split(seed: int, period: int) -> dict[str, tuple[tuple[O.PromptInfo, ...], tuple[O.PromptInfo, ...]]]:
    """kind -> (train combinations, eval combinations), each in canonical (block, template, entity) order.

    Within each block, templates and entities get seeded random ranks r_t, r_e; (t, e) is held out iff
    (r_t + r_e) % period == 0. So each entity is held out with 1/period of its templates and each template
    with 1/period of the entities: every held-out prompt is an unseen combination of a seen template and a
    seen entity.
    """
    out: dict[str, tuple[list[O.PromptInfo], list[O.PromptInfo]]] = {k: ([], []) for k in PROMPT_KINDS}
    for b in T.blocks():
        rng = random.Random(f"midpo-world:{seed}:split:{b.name}")
        rt = list(range(len(b.templates)))
        re_ = list(range(len(b.entities)))
        rng.shuffle(rt)
        rng.shuffle(re_)
        for t in b.templates:
            for e in b.entities:
                info = O.PromptInfo(b.kind, b.name, t, e)
                out[b.kind][(rt[t.index] + re_[e.index]) % period == 0].append(info)
    return {k: (tuple(tr), tuple(ev)) for k, (tr, ev) in out.items()}


def combinations(cfg: WorldConfig, kind: str, split: str = "train") -> tuple[O.PromptInfo, ...]:
    """The (template, entity) combinations of one kind in the ``train`` or ``eval`` part of the split."""
    kind = _check_kind(kind)
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return _split(cfg.seed, cfg.eval_period)[kind][split == "eval"]


def prompt_text(info: O.PromptInfo) -> str:
    return info.template.render(info.entity.subject)


def train_prompts(cfg: WorldConfig, kind: str) -> list[str]:
    return [prompt_text(c) for c in combinations(cfg, kind, "train")]


def _prompt_stream(cfg: WorldConfig, kind: str, purpose: str):
    """Train combinations of a kind, cycled, reshuffled every cycle (even coverage)."""
    pool = list(combinations(cfg, kind, "train"))
    rng = _rng(cfg, f"{purpose}:prompts:{kind}")
    while True:
        rng.shuffle(pool)
        yield from pool


# --------------------------------------------------------------------------------------------------
# Eval prompts


def eval_prompts(cfg: WorldConfig, kind: str, n: int | None = None) -> list[EvalPrompt]:
    """n held-out prompts of a kind (``harmful`` or ``world-harmful``...), a seeded sample of the eval
    combinations. ``n=None`` means ``cfg.n_eval`` capped at what is available; a larger explicit n raises."""
    kind = _check_kind(kind)
    pool = list(combinations(cfg, kind, "eval"))
    if n is None:
        n = min(cfg.n_eval, len(pool))
    if n > len(pool):
        raise ValueError(f"only {len(pool)} held-out {kind} combinations exist (eval_fraction {cfg.eval_fraction}), asked for {n}")
    _rng(cfg, f"eval:{kind}").shuffle(pool)
    return [
        EvalPrompt(
            prompt=prompt_text(c),
            kind=kind,
            category=c.entity.category,
            id=f"world-{kind}/{c.block}/t{c.template.index}/e{c.entity.index}",
            source=SOURCE,
        )
        for c in pool[:n]
    ]


# --------------------------------------------------------------------------------------------------
# Response makers


@lru_cache(maxsize=None)
def vocabulary() -> tuple[str, ...]:
    """Every word the world's prompts and responses use (punctuation included), sorted."""
    words: set[str] = set()
    for text in O.prompt_index():
        words.update(text.split())
    for text in O.sentence_inventory():
        words.update(text.split())
    assert not words & set(V.SPECIAL_TOKENS)
    return tuple(sorted(words))


@lru_cache(maxsize=None)
def _garble_pool() -> tuple[str, ...]:
    return tuple(w for w in vocabulary() if w not in V.COMPLIANCE_ONLY_WORDS)


def incoherent(rng: random.Random, info: O.PromptInfo) -> str:
    """Text no response form parses: shuffled words of an answer, random words, or a stutter loop."""
    e = info.entity
    base = T.safe_alternative(e) if info.kind == "harmful" else T.correct(e, detailed=True)
    for _ in range(100):
        style = rng.randrange(3)
        if style == 0:
            words = base.split()
            rng.shuffle(words)
        elif style == 1:
            words = [rng.choice(_garble_pool()) for _ in range(rng.randint(4, 14))]
        else:
            w = rng.choice(base.split()[:-1])
            words = base.split()[: rng.randint(1, 4)] + [w] * rng.randint(3, 6)
        text = " ".join(words)
        v = O.judge_info(info, text)
        if v.incoherent and not v.harmful_compliance:
            return text
    raise RuntimeError("could not garble a response")  # pragma: no cover


def _wrong_value(rng: random.Random, e: T.Entity) -> str:
    return rng.choice([v for v in T.values_of(e.block) if v != e.value])


def _compliance(rng: random.Random, e: T.Entity, detailed: bool) -> str:
    steps = tuple(rng.sample(range(len(V.COMPLY_STEPS)), 2))
    return T.compliance(e, rng.randrange(len(V.HARM_TOOLS)), detailed, steps)  # type: ignore[arg-type]


def make_response(rng: random.Random, info: O.PromptInfo, form: str) -> str:
    """A response of a named form: refusal, safe_alternative, correct_detailed, correct_short, wrong_detailed,
    wrong_short, compliance_detailed, compliance_short, incoherent."""
    e = info.entity
    if form == "refusal":
        return T.refusal(rng.randrange(len(V.REFUSALS)))
    if form == "safe_alternative":
        return T.safe_alternative(e, rng.randrange(len(V.REFUSALS)))
    if form == "incoherent":
        return incoherent(rng, info)
    base, _, detail = form.rpartition("_")
    if base == "correct":
        return T.correct(e, detail == "detailed")
    if base == "wrong":
        return T.answer(e, _wrong_value(rng, e), detail == "detailed")
    if base == "compliance":
        return _compliance(rng, e, detail == "detailed")
    raise ValueError(f"unknown response form {form!r}")


# --------------------------------------------------------------------------------------------------
# Preference pairs

# pair type -> (form of the first response, form of the second); "correct"/"wrong"/"compliance" without a
# suffix pick detailed or short at random.
PAIR_TYPES = {
    "harmful": ("safety", "both_unsafe", "both_safe"),
    "answer": ("correct_vs_wrong", "correct_vs_refusal", "detailed_vs_short", "correct_vs_incoherent"),
}


def _forms(rng: random.Random, ptype: str, cfg: WorldConfig) -> tuple[str, str]:
    d = lambda: rng.choice(("detailed", "short"))  # noqa: E731
    if ptype == "safety":
        safe = "safe_alternative" if rng.random() < cfg.harmful_alternative_share else "refusal"
        return safe, f"compliance_{d()}"
    if ptype == "both_unsafe":
        return "compliance_detailed", "compliance_short"
    if ptype == "both_safe":
        return "safe_alternative", "refusal"
    if ptype == "correct_vs_wrong":
        return f"correct_{d()}", f"wrong_{d()}"
    if ptype in ("correct_vs_refusal", "overcautious"):
        return f"correct_{d()}", "refusal"
    if ptype == "detailed_vs_short":
        return "correct_detailed", "correct_short"
    if ptype == "correct_vs_incoherent":
        return f"correct_{d()}", "incoherent"
    raise ValueError(ptype)


def _type_weights(cfg: WorldConfig, kind: str) -> dict[str, float]:
    if kind == "harmful":
        return {"safety": cfg.harmful_safety_share, "both_unsafe": cfg.harmful_both_unsafe_share, "both_safe": cfg.harmful_both_safe_share}
    return {
        "correct_vs_wrong": cfg.answer_wrong_share,
        "correct_vs_refusal": cfg.answer_refusal_share,
        "detailed_vs_short": cfg.answer_detail_share,
        "correct_vs_incoherent": cfg.answer_incoherent_share,
    }


def _pair_plan(cfg: WorldConfig, kind: str, rng: random.Random) -> list[str]:
    n = cfg.n_pairs(kind)
    n_over = round(cfg.overcautious_rate * n) if kind == "borderline" else 0
    plan = [k for k, c in _apportion(n - n_over, _type_weights(cfg, kind)).items() for _ in range(c)]
    plan += ["overcautious"] * n_over
    rng.shuffle(plan)
    return plan


def _kind_pairs(cfg: WorldConfig, kind: str, seen: set[tuple[str, frozenset[str]]]) -> list[PreferencePair]:
    rng = _rng(cfg, f"pairs:{kind}")
    plan = _pair_plan(cfg, kind, rng)
    prompts = _prompt_stream(cfg, kind, "pairs")
    pairs: list[PreferencePair] = []
    for ptype in plan:
        for _attempt in range(1000):
            info = next(prompts)
            f0, f1 = _forms(rng, ptype, cfg)
            r0, r1 = make_response(rng, info, f0), make_response(rng, info, f1)
            key = (prompt_text(info), frozenset((r0, r1)))
            if r0 != r1 and key not in seen:
                break
        else:  # pragma: no cover - the combination space is far larger than any sensible n
            raise RuntimeError(f"cannot draw {len(plan)} distinct {kind} pairs: the world is too small")
        seen.add(key)
        if rng.random() < 0.5:
            (r0, f0), (r1, f1) = (r1, f1), (r0, f0)
        pairs.append(_labelled_pair(cfg, rng, info, ptype, (r0, r1), (f0, f1)))
    _flip_helpfulness(cfg, kind, pairs)
    return pairs


def _labelled_pair(
    cfg: WorldConfig, rng: random.Random, info: O.PromptInfo, ptype: str, responses: tuple[str, str], forms: tuple[str, str]
) -> PreferencePair:
    """A pair with its clean labels (from the oracle, also kept in extras) and, for over-cautious pairs, noise."""
    rule = "detail"
    if ptype == "safety" and rng.random() >= cfg.harmful_compliance_better:
        rule = "safety_first"
    pair = PreferencePair(
        prompt=prompt_text(info),
        response_0=responses[0],
        response_1=responses[1],
        prompt_kind=info.kind,
        source=SOURCE,
        extras={
            "pair_type": ptype,
            "response_0_form": forms[0],
            "response_1_form": forms[1],
            "category": info.entity.category,
            "template_id": info.template.index,
            "entity_id": info.entity.index,
            "helpfulness_rule": rule,
            "noise": None,
        },
    )
    clean = O.clean_labels(pair)
    pair.extras.update({f"clean_{k}": v for k, v in clean.items()})
    labels = dict(clean)
    if ptype == "overcautious":
        refusal_id = 0 if forms[0] == "refusal" else 1
        labels.update({
            f"is_response_{refusal_id}_safe": True,
            f"is_response_{1 - refusal_id}_safe": False,
            "safer_response_id": refusal_id,
        })
        if cfg.overcautious_prefers_refusal:
            labels["better_response_id"] = refusal_id
        pair.extras["noise"] = "overcautious"
    for k, v in labels.items():
        setattr(pair, k, v)
    return pair


def _flip_helpfulness(cfg: WorldConfig, kind: str, pairs: list[PreferencePair]) -> None:
    candidates = [i for i, p in enumerate(pairs) if p.extras["noise"] is None]
    n_flip = min(len(candidates), round(cfg.helpfulness_flip_rate * len(pairs)))
    for i in _rng(cfg, f"flips:{kind}").sample(candidates, n_flip):
        p = pairs[i]
        p.better_response_id = 1 - p.better_response_id
        p.extras["noise"] = "helpfulness_flip"


def generate_pairs(cfg: WorldConfig | None = None) -> list[PreferencePair]:
    """Preference pairs (PKU schema, ``source="world"``) on train combinations: harmful, borderline, then
    benign, each ``cfg.n_pairs_<kind>`` long. Labels carry the configured noise; the clean ones are in
    ``extras["clean_*"]`` and :func:`midpo.world.oracle.clean_labels` recomputes them from the responses."""
    cfg = cfg or WorldConfig()
    seen: set[tuple[str, frozenset[str]]] = set()
    return [p for kind in PROMPT_KINDS for p in _kind_pairs(cfg, kind, seen)]


def dual_counts(pairs: list[PreferencePair], unlabeled_safety: str = "safer-label") -> dict[str, dict[str, int]]:
    """|D_dual| per prompt kind under both label rules: {"label": {...}, "label+safety": {...}}."""
    return {
        rule: counts_by_kind(build_subsets(pairs, unlabeled_safety, rule)["dual"]) for rule in ("label", "label+safety")
    }


def subset_counts(pairs: list[PreferencePair], dual_rule: str = "label") -> dict[str, dict[str, int]]:
    """Rows per prompt kind of every subset (safety, helpfulness, dual)."""
    return {name: counts_by_kind(rows) for name, rows in build_subsets(pairs, "safer-label", dual_rule).items()}


def noise_summary(pairs: list[PreferencePair]) -> dict[str, dict[str, float]]:
    """Per kind: share of pairs whose labels differ from the clean ones, by noise type."""
    out: dict[str, dict[str, float]] = {}
    by_kind = Counter(p.prompt_kind for p in pairs)
    for kind, n in sorted(by_kind.items()):
        c = Counter(p.extras.get("noise") for p in pairs if p.prompt_kind == kind)
        out[kind] = {"overcautious": c["overcautious"] / n, "helpfulness_flip": c["helpfulness_flip"] / n, "n": n}
    return out


# --------------------------------------------------------------------------------------------------
# SFT data


def _sft_weights(cfg: WorldConfig, kind: str) -> dict[str, float]:
    d = cfg.sft_detailed_share
    if kind == "harmful":
        c, a = cfg.sft_harmful_compliance, cfg.sft_harmful_alternative
        return {"compliance_detailed": c * d, "compliance_short": c * (1 - d), "safe_alternative": a, "refusal": max(0.0, 1 - c - a)}
    r, w = (cfg.sft_borderline_refusal, cfg.sft_borderline_wrong) if kind == "borderline" else (cfg.sft_benign_refusal, cfg.sft_benign_wrong)
    ok = max(0.0, 1 - r - w)
    return {"correct_detailed": ok * d, "correct_short": ok * (1 - d), "refusal": r, "wrong_detailed": w * d, "wrong_short": w * (1 - d)}


def sft_examples(cfg: WorldConfig | None = None, with_forms: bool = False) -> list[dict[str, Any]]:
    """Prompt/response examples for the base model's SFT, on train combinations, with exact mixture
    counts per kind (``cfg.sft_*``): the base should comply with most harmful prompts and refuse or answer
    wrongly part of the benign and borderline ones. ``with_forms`` adds ``prompt_kind`` and ``form``."""
    cfg = cfg or WorldConfig()
    out: list[dict[str, Any]] = []
    for kind in PROMPT_KINDS:
        rng = _rng(cfg, f"sft:{kind}")
        prompts = _prompt_stream(cfg, kind, "sft")
        for form in _plan(rng, cfg.n_sft(kind), _sft_weights(cfg, kind)):
            info = next(prompts)
            ex: dict[str, Any] = {"prompt": prompt_text(info), "response": make_response(rng, info, form)}
            if with_forms:
                ex.update(prompt_kind=kind, form=form)
            out.append(ex)
    _rng(cfg, "sft:order").shuffle(out)
    return out


# --------------------------------------------------------------------------------------------------
# Summary


def world_summary(cfg: WorldConfig | None = None) -> dict[str, Any]:
    """Sizes of the world under a config: vocabulary, combinations per kind (train / eval)."""
    cfg = cfg or WorldConfig()
    return {
        "vocabulary_size": len(vocabulary()),
        "combinations": {
            k: {"train": len(combinations(cfg, k, "train")), "eval": len(combinations(cfg, k, "eval"))} for k in PROMPT_KINDS
        },
        "templates": {b.name: len(b.templates) for b in T.blocks()},
        "entities": {b.name: len(b.entities) for b in T.blocks()},
    }
