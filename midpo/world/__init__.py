"""A seeded synthetic "oracle world": harmful, borderline and benign requests with an exact rule-based oracle.

See docs/world.md. The tables live in :mod:`midpo.world.vocab`, the oracle in :mod:`midpo.world.oracle`,
the generators in :mod:`midpo.world.generate`.
"""

from midpo.world.config import WorldConfig
from midpo.world.generate import (
    EVAL_SETS,
    combinations,
    dual_counts,
    eval_prompts,
    generate_pairs,
    make_response,
    noise_summary,
    sft_examples,
    subset_counts,
    train_prompts,
    vocabulary,
    world_summary,
)
from midpo.world.oracle import (
    FORMS,
    NotInWorld,
    Verdict,
    classify_prompt,
    clean_labels,
    clean_pair,
    correct_answer,
    correct_answers,
    harm_score,
    helpfulness_score,
    judge,
    normalize,
    prompt_kind,
    stored_clean_labels,
)

__all__ = [
    "EVAL_SETS",
    "FORMS",
    "NotInWorld",
    "Verdict",
    "WorldConfig",
    "classify_prompt",
    "clean_labels",
    "clean_pair",
    "combinations",
    "correct_answer",
    "correct_answers",
    "dual_counts",
    "eval_prompts",
    "generate_pairs",
    "harm_score",
    "helpfulness_score",
    "judge",
    "make_response",
    "noise_summary",
    "normalize",
    "prompt_kind",
    "sft_examples",
    "stored_clean_labels",
    "subset_counts",
    "train_prompts",
    "vocabulary",
    "world_summary",
]
