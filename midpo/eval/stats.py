"""Means with 95% bootstrap confidence intervals, resampling prompts (not samples) as the unit."""

from __future__ import annotations

import numpy as np


def mean_ci(per_prompt: list[list[float]], n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, list[float]]:
    """Mean over all samples and a percentile bootstrap CI over prompts.

    ``per_prompt[i]`` holds the values of prompt i's samples; samples of one prompt are correlated, so the
    bootstrap draws whole prompts.
    """
    if not per_prompt:
        raise ValueError("no values to average")
    sums = np.array([sum(v) for v in per_prompt], dtype=float)  # (P,)
    counts = np.array([len(v) for v in per_prompt], dtype=float)  # (P,)
    mean = float(sums.sum() / counts.sum())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(per_prompt), size=(n_boot, len(per_prompt)))  # (B, P)
    boot = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)  # (B,)
    alpha = (1 - level) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha])
    return mean, [float(low), float(high)]
