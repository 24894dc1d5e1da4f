"""Router training: DPO against the base on D_dual plus the gate regularizer; only the gates train.

The reference is "the same model with both expert branches off", i.e. the base: its log-probs are the
shared reference columns (:mod:`midpo.train.passes`), computed once for every method. The loss is

    L = -log σ(β h) + w (mean α + mean (1 - β_gate))

with the gate means taken from the same forward pass over real tokens (:func:`midpo.moe.core.gate_regularizer`).
:class:`RouterTrainer` is a member of the one trainer family (:class:`midpo.train.trainer.MidpoDPOTrainer`):
only the allowlist, the added term and what it saves differ; :func:`train_router` goes through
:func:`midpo.train.trainer.train_adapter` (resume, checkpoints, claim, metadata).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from midpo.config import TrainingConfig
from midpo.moe.core import (
    GateConfig,
    attach_experts,
    gate_regularizer,
    is_gate_parameter,
    moe_layers,
    recorded_gates,
)
from midpo.train.trainer import MidpoDPOTrainer, train_adapter

GATES_FILE = "gates.safetensors"
ROUTER_META = "midpo_router.json"


class RouterTrainer(MidpoDPOTrainer):
    """DPO on the MoE with only the gates trainable, plus ``reg_weight`` times the gate regularizer.

    Logs ``router/regularizer`` and, per layer i, ``gates/alpha_i`` and ``gates/beta_i`` (mean over real
    tokens): the curves that show where each gate settles.
    """

    is_trainable = staticmethod(is_gate_parameter)
    uses_lora = False
    policy_chunks = 1  # one forward per batch: each layer's gates pair with the batch's attention mask

    def __init__(self, *args: Any, reg_weight: float = 1.0, gate: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.reg_weight = float(reg_weight)
        self.gate_config = dict(gate or {})
        super().__init__(*args, **kwargs)

    @staticmethod
    def _check_model(model: Any, peft_config: Any) -> None:
        if peft_config is not None:
            raise ValueError("the router trains gates over frozen experts: pass no peft_config")
        if not moe_layers(model):
            raise ValueError("the model has no MoE layers: attach the experts first (midpo.moe.core.attach_experts)")

    def loss_and_metrics(self, model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with recorded_gates(model) as records:
            loss, metrics = super().loss_and_metrics(model, inputs)
        reg, alphas, betas = gate_regularizer(records, inputs["attention_mask"])
        metrics["router/regularizer"] = reg.detach()
        for i, (a, b) in enumerate(zip(alphas, betas)):
            metrics[f"gates/alpha_{i}"] = a.detach()
            metrics[f"gates/beta_{i}"] = b.detach()
        return loss + self.reg_weight * reg, metrics

    def save_trained(self, out_dir: Path) -> None:
        """The gates (safetensors, names relative to the model) and the gate config."""
        from safetensors.torch import save_file

        state_dict = self.gathered_state_dict()
        if not self.accelerator.is_main_process:  # ZeRO-3 gathers onto the main process only
            return
        save_file({n: t.contiguous() for n, t in state_dict.items() if is_gate_parameter(n)}, str(Path(out_dir) / GATES_FILE))
        (Path(out_dir) / ROUTER_META).write_text(json.dumps({"gate": self.gate_config, "reg_weight": self.reg_weight}, indent=2))


def train_router(
    base_folder: str | Path,
    safety: str | Path,
    helpfulness: str | Path,
    rows: list[dict[str, Any]],
    cfg: TrainingConfig,
    gate: GateConfig,
    reg_weight: float,
    out_dir: str | Path,
    *,
    checkpoint_dir: str | Path,
    experts: dict[str, str] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """Train the gates over the two expert folders on D_dual ``rows`` (with reference columns); writes
    ``gates.safetensors``, ``midpo_router.json``, ``midpo_adapter.json`` and ``log_history.json`` to
    ``out_dir``. ``experts`` (their versions) go into the run claim; ``kwargs`` go to ``train_adapter``."""
    gate_dict = dataclasses.asdict(gate)
    return train_adapter(
        base_folder, rows, "dpo", cfg, out_dir,
        checkpoint_dir=checkpoint_dir,
        trainer_cls=RouterTrainer,
        trainer_kwargs={"reg_weight": reg_weight, "gate": gate_dict},
        prepare_model=lambda model: attach_experts(model, safety, helpfulness, gate),
        run_meta={"experts": dict(experts or {"safety": str(safety), "helpfulness": str(helpfulness)})},
        **kwargs,
    )


def load_gates(model: Any, router_folder: str | Path) -> None:
    """Load trained gates into a model whose experts are attached (strict: every gate, nothing else)."""
    from safetensors.torch import load_file

    state = load_file(str(Path(router_folder) / GATES_FILE))
    params = dict(model.named_parameters())
    expected = {n for n in params if is_gate_parameter(n)}
    if set(state) != expected:
        raise ValueError(f"{router_folder}: gate tensors do not match the model's gates (missing {sorted(expected - set(state))[:3]}, extra {sorted(set(state) - expected)[:3]})")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
