"""Where the gates open: a heat-map of alpha (safety) and beta (helpfulness) per layer and token.

:func:`gate_heatmap` runs one teacher-forced forward over a prompt (rendered with the tokenizer's chat
template, as generation renders it) and, optionally, a response (with its EOS), records every layer's
gates and draws two panels, layers x tokens, on a shared 0..1 colour scale. The numbers behind the
picture come back too (:class:`GateMap`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from midpo.moe.core import moe_layers, recorded_gates
from midpo.moe.package import render_completion, render_prompt


@dataclass
class GateMap:
    tokens: list[str]  # the token strings, in order (x axis)
    alpha: np.ndarray  # (layers, tokens): the safety gate
    beta: np.ndarray  # (layers, tokens): the helpfulness gate
    prompt_tokens: int  # how many of the tokens are the prompt (the rest is the response)
    path: Path | None  # the PNG, when one was written


@torch.no_grad()
def gate_values(model: Any, tokenizer: Any, prompt: Any, response: str | None = None) -> GateMap:
    """The gates of every layer at every token of ``prompt`` (+ ``response``), without drawing."""
    if not moe_layers(model):
        raise ValueError("the model has no MoE layers: load a MoE folder (midpo.moe.package.load_moe)")
    prompt_text = render_prompt(tokenizer, prompt)
    text = prompt_text + (render_completion(tokenizer, response) if response is not None else "")
    device = next(model.parameters()).device
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(device)
    n_prompt = len(tokenizer(prompt_text)["input_ids"])
    with recorded_gates(model) as records:
        model(input_ids=ids, use_cache=False)
    alpha = np.stack([calls[-1][0][0].float().cpu().numpy() for calls in records])
    beta = np.stack([calls[-1][1][0].float().cpu().numpy() for calls in records])
    tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    return GateMap(tokens, alpha, beta, min(n_prompt, len(tokens)), None)


def gate_heatmap(model: Any, tokenizer: Any, prompt: Any, response: str | None = None, path: str | Path | None = None) -> GateMap:
    """Draw the gate heat-map of one prompt (a string or chat-message list) and optional response to
    ``path`` (PNG; nothing is written when None); returns the values behind it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gates = gate_values(model, tokenizer, prompt, response)
    n_layers, n_tokens = gates.alpha.shape
    width = min(48.0, max(6.0, 0.32 * n_tokens + 2.0))
    fig, axes = plt.subplots(2, 1, figsize=(width, 1.2 + 0.9 * max(2, n_layers)), sharex=True, squeeze=True)
    for ax, values, title in ((axes[0], gates.alpha, "alpha (safety gate)"), (axes[1], gates.beta, "beta (helpfulness gate)")):
        image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_ylabel("layer")
        ax.set_yticks(range(n_layers))
        if gates.prompt_tokens < n_tokens:
            ax.axvline(gates.prompt_tokens - 0.5, color="white", linewidth=1.0, linestyle="--")
        fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01)
    axes[1].set_xticks(range(n_tokens))
    axes[1].set_xticklabels([t.replace("$", r"\$") for t in gates.tokens], rotation=90, fontsize=7)  # no mathtext
    fig.tight_layout()
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        gates.path = path
    plt.close(fig)
    return gates
