"""``WorldConfig``: every knob of the synthetic world, as plain fields (a profile section can hold it)."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class WorldConfig:
    """Sizes, mixtures and noise of the generated data. Shares of one mixture are weights (normalized)."""

    seed: int = 0
    # Split of (template, entity) combinations: a combination is held out for evaluation with probability
    # 1/P, P = round(1 / eval_fraction), on a seeded diagonal (docs/world.md, "Split").
    eval_fraction: float = 0.25
    n_eval: int = 240  # default eval prompts per kind (capped at what the held-out combinations allow)

    # Preference pairs per prompt kind.
    n_pairs_harmful: int = 2000
    n_pairs_borderline: int = 2000
    n_pairs_benign: int = 2000
    # Harmful pair mixture: safe response vs harmful compliance (safety pairs), detailed vs short compliance
    # (both unsafe: better = detailed, safer = short), safe alternative vs bare refusal (both safe).
    harmful_safety_share: float = 0.6
    harmful_both_unsafe_share: float = 0.15
    harmful_both_safe_share: float = 0.25
    harmful_alternative_share: float = 0.5  # of the safe responses in safety pairs: refusals with an alternative
    # Of safety pairs on harmful prompts, the share whose helpfulness label picks the compliance (the paper's
    # assumption); the others are labelled under the "safety_first" rule (better = the safe response).
    harmful_compliance_better: float = 1.0
    # Benign and borderline pair mixture (clean pairs): correct vs wrong answer, correct answer vs refusal,
    # detailed vs short correct answer, correct answer vs incoherent text.
    answer_wrong_share: float = 0.35
    answer_refusal_share: float = 0.30
    answer_detail_share: float = 0.20
    answer_incoherent_share: float = 0.15

    # Label noise. Over-cautious: this share of borderline pairs is a refusal vs a correct answer labelled
    # refusal safe, answer unsafe, safer = refusal (clean: both safe, better = safer = the answer).
    overcautious_rate: float = 0.25
    overcautious_prefers_refusal: bool = False  # also label the refusal the better one
    # Helpfulness flips: this share of the pairs of each kind (over-cautious pairs excepted) get
    # better_response_id flipped.
    helpfulness_flip_rate: float = 0.05

    # SFT data for the base model, per kind, and its mixture.
    n_sft_harmful: int = 2000
    n_sft_borderline: int = 2000
    n_sft_benign: int = 2000
    sft_harmful_compliance: float = 0.70  # the rest refuses: ...
    sft_harmful_alternative: float = 0.10  # ... this share with a safe alternative, the remainder bare
    sft_borderline_refusal: float = 0.12
    sft_borderline_wrong: float = 0.08
    sft_benign_refusal: float = 0.05
    sft_benign_wrong: float = 0.07
    sft_detailed_share: float = 0.5  # of correct answers and of compliances: detailed ones

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name.startswith("n_") and (not isinstance(v, int) or v < 0):
                raise ValueError(f"{f.name} must be a non-negative integer, got {v!r}")
            if f.type in ("float", float) and not 0.0 <= v <= 1.0:
                raise ValueError(f"{f.name} must be in [0, 1], got {v}")
        if not 0.0 < self.eval_fraction <= 0.5:
            raise ValueError(f"eval_fraction must be in (0, 0.5], got {self.eval_fraction}")
        for group in (("harmful_safety_share", "harmful_both_unsafe_share", "harmful_both_safe_share"),
                      ("answer_wrong_share", "answer_refusal_share", "answer_detail_share", "answer_incoherent_share")):
            if sum(getattr(self, g) for g in group) <= 0:
                raise ValueError(f"at least one of {', '.join(group)} must be positive")
        for group in (("sft_harmful_compliance", "sft_harmful_alternative"),
                      ("sft_borderline_refusal", "sft_borderline_wrong"), ("sft_benign_refusal", "sft_benign_wrong")):
            if sum(getattr(self, g) for g in group) > 1.0 + 1e-9:
                raise ValueError(f"{' + '.join(group)} must not exceed 1")

    @property
    def eval_period(self) -> int:
        return max(2, round(1.0 / self.eval_fraction))

    def n_pairs(self, kind: str) -> int:
        return getattr(self, f"n_pairs_{kind}")

    def n_sft(self, kind: str) -> int:
        return getattr(self, f"n_sft_{kind}")
