"""The MidPO mixture of experts: two frozen LoRA experts in every MLP ``down_proj``, mixed by token-wise gates.

For the MLP input of ``down_proj``, u = act(gate_proj(x)) * up_proj(x) (per token, per layer)::

    out = down_proj(u) + alpha(u) * s_safety B_s A_s u + beta(u) * s_help B_h A_h u

``alpha`` and ``beta`` are independent sigmoid gates on u. s is the scaling PEFT gave each expert
(``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA), the same in training and inference (the official code
trains at scale 1 and runs at scale 2). Gate kinds (midpo-method.md):

- ``linear`` (default): ``sigmoid(Linear(d_ff, 1)(u))``.
- ``official``: ``Linear(d_ff, h) -> Linear(h, d_ff) -> Linear(d_ff, 1) -> sigmoid`` with nothing between
  the maps: the same function class as ``linear`` (three affine maps compose to one; :func:`collapse_gate`),
  at ``2 h d_ff`` more parameters. ``d_ff`` comes from each ``down_proj`` (``in_features``), never a constant.

The wrapper replaces ``down_proj`` modules in place (any model whose MLP has one: Llama, Qwen2, Mistral,
SmolLM), so generation, the KV cache and ``save_pretrained`` of the base work unchanged; gates are computed
per token, so a cached decode step recomputes them for the new token only. This module depends on torch,
transformers and safetensors alone: the MLflow model ships it as code (:mod:`midpo.moe.serving`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

GATE_KINDS = ("linear", "official")
EXPERT_NAMES = ("safety", "helpfulness")  # the order of the gates: alpha (safety), beta (helpfulness)


@dataclass
class GateConfig:
    kind: Literal["linear", "official"] = "linear"
    hidden: int = 512  # the official gate's inner width
    init_std: float = 0.02  # N(0, std) weights, zero biases: gates start near 0.5

    def __post_init__(self) -> None:
        if self.kind not in GATE_KINDS:
            raise ValueError(f"gate kind must be one of {GATE_KINDS}, got {self.kind!r}")
        if self.hidden < 1 or self.init_std < 0:
            raise ValueError("gate hidden must be >= 1 and init_std >= 0")


class Gate(nn.Module):
    """A per-token sigmoid gate: (..., d_ff) -> (...)."""

    def __init__(self, d_ff: int, cfg: GateConfig) -> None:
        super().__init__()
        if cfg.kind == "linear":
            self.net = nn.Sequential(nn.Linear(d_ff, 1))
        else:
            self.net = nn.Sequential(nn.Linear(d_ff, cfg.hidden), nn.Linear(cfg.hidden, d_ff), nn.Linear(d_ff, 1))
        for layer in self.net:
            nn.init.normal_(layer.weight, std=cfg.init_std)
            nn.init.zeros_(layer.bias)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(u)).squeeze(-1)


def collapse_gate(gate: Gate) -> nn.Linear:
    """The single ``Linear(d_ff, 1)`` computing the same pre-sigmoid value as ``gate`` (any kind):
    W = W3 W2 W1, b = W3 (W2 b1 + b2) + b3. Shows the official gate adds no expressiveness."""
    weight, bias = None, None
    for layer in gate.net:
        w, b = layer.weight.detach(), layer.bias.detach()
        weight, bias = (w, b) if weight is None else (w @ weight, w @ bias + b)
    out = nn.Linear(weight.shape[1], 1)
    with torch.no_grad():
        out.weight.copy_(weight)
        out.bias.copy_(bias)
    return out


class LoraDelta(nn.Module):
    """A frozen LoRA update ``scaling * B A u`` (A: r x d_in, B: d_out x r)."""

    def __init__(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(lora_a.clone(), requires_grad=False)
        self.lora_B = nn.Parameter(lora_b.clone(), requires_grad=False)
        self.scaling = float(scaling)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return (u @ self.lora_A.T.to(u.dtype)) @ self.lora_B.T.to(u.dtype) * self.scaling


class MoEDownProj(nn.Module):
    """``down_proj(u) + alpha(u) * delta_safety(u) + beta(u) * delta_help(u)``, recording its gates on demand."""

    def __init__(self, down_proj: nn.Linear, safety: LoraDelta, helpfulness: LoraDelta, cfg: GateConfig) -> None:
        super().__init__()
        self.down_proj = down_proj
        self.safety, self.helpfulness = safety, helpfulness
        self.alpha, self.beta = Gate(down_proj.in_features, cfg), Gate(down_proj.in_features, cfg)
        self.alpha.to(down_proj.weight.device), self.beta.to(down_proj.weight.device)
        self.forced: tuple[float | None, float | None] = (None, None)  # constant gates (tests, ablations)
        self.records: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (alpha, beta) per forward call

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        alpha, beta = self.alpha(u.to(self.alpha.net[0].weight.dtype)), self.beta(u.to(self.beta.net[0].weight.dtype))
        if self.forced[0] is not None:
            alpha = torch.full_like(alpha, self.forced[0])
        if self.forced[1] is not None:
            beta = torch.full_like(beta, self.forced[1])
        if self.records is not None:
            self.records.append((alpha, beta))
        alpha, beta = alpha.to(u.dtype).unsqueeze(-1), beta.to(u.dtype).unsqueeze(-1)
        return self.down_proj(u) + alpha * self.safety(u) + beta * self.helpfulness(u)


# --------------------------------------------------------------------------------------------------
# Building the MoE from a base model and two PEFT adapter folders


def read_lora(adapter_folder: str | Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """``({module path: (A, B)}, scaling)`` of a PEFT LoRA adapter folder; only ``down_proj`` targets."""
    from safetensors.torch import load_file

    folder = Path(adapter_folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{folder} is not a LoRA adapter (peft_type {cfg.get('peft_type')!r})")
    r, lora_alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scaling = lora_alpha / (r**0.5) if cfg.get("use_rslora") else lora_alpha / r
    weights = load_file(str(folder / "adapter_model.safetensors"))
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if key.endswith(suffix):
                path = key[: -len(suffix)].removeprefix("base_model.model.")
                modules.setdefault(path, {})[part] = tensor
    others = sorted(p for p in modules if not p.endswith(".down_proj"))
    if others or not modules:
        raise ValueError(f"{folder}: the MoE mixes down_proj LoRAs only; this adapter targets {others or 'nothing'}")
    return {p: (m["lora_A"], m["lora_B"]) for p, m in modules.items()}, scaling


def attach_experts(model: nn.Module, safety: str | Path, helpfulness: str | Path, cfg: GateConfig) -> list[MoEDownProj]:
    """Replace every ``down_proj`` that both adapters adapt by a :class:`MoEDownProj`; returns them in order."""
    loras = {name: read_lora(folder) for name, folder in zip(EXPERT_NAMES, (safety, helpfulness))}
    paths = sorted(loras["safety"][0], key=_layer_order)
    if set(paths) != set(loras["helpfulness"][0]):
        raise ValueError("the two experts adapt different down_proj modules; train both with the same LoRA target_modules")
    layers = []
    for path in paths:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        down = getattr(parent, attr)
        if not isinstance(down, nn.Linear):
            raise ValueError(f"{path} is a {type(down).__name__}, not the plain nn.Linear an MoE wraps (already wrapped?)")
        deltas = []
        for name in EXPERT_NAMES:
            (a, b), scaling = loras[name][0][path], loras[name][1]
            if a.shape[1] != down.in_features or b.shape[0] != down.out_features:
                raise ValueError(f"{name} expert's {path} is {tuple(b.shape)}x{tuple(a.shape)}; the base's down_proj is {down.out_features}x{down.in_features}")
            deltas.append(LoraDelta(a.to(down.weight.device, down.weight.dtype), b.to(down.weight.device, down.weight.dtype), scaling))
        layer = MoEDownProj(down, *deltas, cfg)
        setattr(parent, attr, layer)
        layers.append(layer)
    return layers


def _layer_order(path: str) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in path.split("."))


def moe_layers(model: nn.Module) -> list[MoEDownProj]:
    return [m for m in model.modules() if isinstance(m, MoEDownProj)]


def is_gate_parameter(name: str) -> bool:
    return ".alpha.net." in name or ".beta.net." in name


def freeze_all_but_gates(model: nn.Module) -> list[str]:
    """Only the gates train (base, both experts, embeddings and lm_head frozen); asserted, names returned."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_gate_parameter(name))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(is_gate_parameter(n) for n in trainable), f"trainable outside the gate allowlist: {trainable}"
    return trainable


# --------------------------------------------------------------------------------------------------
# Gates during a forward pass


@contextmanager
def forced_gates(model: nn.Module, alpha: float | None = None, beta: float | None = None) -> Iterator[None]:
    """Constant gates in every layer while the context lasts (None = the learned gate)."""
    layers = moe_layers(model)
    saved = [layer.forced for layer in layers]
    for layer in layers:
        layer.forced = (alpha, beta)
    try:
        yield
    finally:
        for layer, f in zip(layers, saved):
            layer.forced = f


@contextmanager
def recorded_gates(model: nn.Module) -> Iterator[list[list[tuple[torch.Tensor, torch.Tensor]]]]:
    """Collect every layer's (alpha, beta) of each forward call: ``records[layer][call] = (alpha, beta)``."""
    layers = moe_layers(model)
    records: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in layers]
    for layer, r in zip(layers, records):
        layer.records = r
    try:
        yield records
    finally:
        for layer in layers:
            layer.records = None


def gate_regularizer(records: list[list[tuple[torch.Tensor, torch.Tensor]]], attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean alpha + mean (1 - beta), mean alpha, mean beta)`` over layers and real tokens of one forward.

    ``records`` are one forward call's gates per layer, each (B, T) like ``attention_mask``; padding is
    masked out (the official code took the gates of a second MLP call on the wrong input).
    """
    mask = attention_mask.to(torch.float32)
    n = mask.sum().clamp(min=1.0)
    alphas = torch.stack([(calls[-1][0].float() * mask).sum() / n for calls in records])
    betas = torch.stack([(calls[-1][1].float() * mask).sum() / n for calls in records])
    return alphas.mean() + (1.0 - betas).mean(), alphas, betas
