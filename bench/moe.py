"""``midpo bench moe``: generation with the MidPO mixture against the base with one merged adapter, in one process.

Sides (the same base weights, prompts, batch and generated length; greedy, KV cache on):

- **merged**: the base with ONE expert (the safety adapter) merged into its weights by PEFT's
  ``merge_and_unload()`` (:func:`midpo.models.load.load_with_adapter`): the plain base architecture, what a
  single-adapter model costs at inference;
- **moe (linear)**: the base with both experts attached by :func:`midpo.moe.core.attach_experts` and the
  default ``linear`` gate (``GateConfig()``): every ``down_proj`` becomes ``down_proj(u) + alpha(u) dS(u) +
  beta(u) dH(u)``, two gates and two LoRA branches per layer and token;
- **moe (official)**: the same with the ``official`` gate (reported for comparison, no target);
- prototypes (``--no-prototypes`` skips them): the linear MoE with its ``MoEDownProj`` modules replaced by
  :class:`FusedGatesDownProj` / :class:`FusedMoEDownProj` / :class:`FusedDownMoEDownProj` below, and the
  official MoE with its gates collapsed (:func:`collapse_layer_gates`): the same functions with fewer and
  larger ops, to measure what a change of ``midpo/moe/core.py`` would gain. They live in this file only:
  the library is unchanged.

The gates are freshly initialised (``N(0, 0.02)``, i.e. about 0.5 everywhere): a trained gate costs the
same, since no branch is ever skipped. Figures:

1. **Throughput**: generated tokens per second of ``model.generate`` (prefill + ``new_tokens`` decode steps,
   ``min_new_tokens = max_new_tokens``, so every side generates exactly ``batch x new_tokens`` tokens; checked).
   One untimed warm-up generation per side, then ``rounds`` rounds, each running every side once in an order
   that alternates (forward, reversed); the ratio is the median over rounds of the within-round ratio.
2. **Peak memory** of one generation. On CUDA: ``torch.cuda.max_memory_allocated`` during the generation
   minus what was allocated before it, plus the model's parameter and buffer bytes. On CPU (no allocator
   statistics): parameter + buffer bytes + the peak of the running sum of the CPU allocations and frees
   that ``torch.profiler`` records during the generation (:func:`cpu_peak_allocated`): the KV cache,
   activations, gates, logits, op-internal buffers. Deterministic for given shapes; it leaves out the
   allocator's own rounding and the Python heap (RSS would be too noisy on a shared machine).

``run(...)`` returns every figure as a dict (``--json`` writes it); the printed report ends with
``RESULT moe_vs_merged_throughput=<x> moe_vs_merged_memory=<y>`` (default gate).
"""

from __future__ import annotations

import argparse
import csv
import functools
import gc
import io
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

try:
    from midpo_bench.experts import _load, machine_info
except ModuleNotFoundError:  # run from the repository root as `python -m bench.moe`
    from bench.experts import _load, machine_info

log = logging.getLogger(__name__)

TARGET_THROUGHPUT = 0.8  # moe / merged generated tokens per second, at least (default gate)
TARGET_MEMORY = 1.15  # moe / merged peak memory, at most (default gate)
SHAPES = {"tiny": (32, 48, 20), "smollm2": (8, 64, 5)}  # profile -> (batch, new tokens, timed rounds)
DEFAULT_SHAPE = (8, 16, 5)  # other profiles (tiny-ci)
MAX_PROMPT_TOKENS = 64  # prompts keep their end (the tokenizer truncates on the left)
RANDOM_SEEDS = {"safety": 1, "helpfulness": 2}  # the random experts (profiles without a pipeline run here)

MERGED, MOE, OFFICIAL = "merged", "moe", "moe-official"
PROTOTYPES = ("proto-fused-gates", "proto-fused", "proto-fused-down", "proto-official-collapsed")


# --------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class MoEInputs:
    base: Path
    safety: Path  # PEFT LoRA adapter folders (down_proj)
    helpfulness: Path
    experts_source: str  # "pipeline" (trained experts) or "random" (PEFT init_lora_weights=False)
    prompts: list[tuple[str, list[dict[str, str]]]]  # (prompt, context)


def pipeline_inputs(cfg: Any) -> MoEInputs:
    """The base and both trained experts from the pipeline (run, or cached under MIDPO_HOME, up to the
    expert stages); prompts from the safety subset's eval split, then its train split."""
    from midpo.config import ConfigError
    from midpo.data.prepare import load_subset
    from midpo.pipeline import run_pipeline, stages_for
    from midpo.storage import ArtifactStore

    experts = ["safety-expert", "helpfulness-expert"]
    try:  # all cached: the plan's outputs, and no stage runs
        planned = run_pipeline(cfg, until=experts, dry_run=True)
        complete = len(planned.cache_hits) == len(stages_for(cfg, experts))
    except Exception as e:  # noqa: BLE001 - a plan past a missing artifact cannot resolve; the real run can
        log.debug("no complete cached plan (%s): running the pipeline", e)
        complete = False
    outputs = planned.outputs if complete else run_pipeline(cfg, until=experts).outputs
    if "safety-expert" not in outputs:
        raise ConfigError(f"profile {cfg.profile} trains no experts (no training section): pass --experts random")
    store = ArtifactStore()
    folder = {name: store.fetch(store.key_of(outputs[name].uri)) for name in ("base", "safety-expert", "helpfulness-expert")}
    prompts = []
    for split in ("eval", "train"):
        prompts += [(r["prompt"], list(r.get("context") or [])) for r in load_subset(outputs["dataset"], "safety", split)]
    return MoEInputs(folder["base"], folder["safety-expert"], folder["helpfulness-expert"], "pipeline", prompts)


def random_lora(base: Path, out: Path, lora: Any, seed: int) -> Path:
    """A PEFT LoRA adapter on the base with random A and B (``init_lora_weights=False``), saved to ``out``."""
    from peft import LoraConfig, get_peft_model

    from midpo.models.load import load_model

    model, _, _ = load_model(base)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=["down_proj"], bias="none", task_type="CAUSAL_LM", init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(str(out))
    return out


def xstest_prompts() -> list[tuple[str, list[dict[str, str]]]]:
    text = resources.files("midpo.resources").joinpath("data/xstest_prompts.csv").read_text(encoding="utf-8")
    return [(row["prompt"], []) for row in csv.DictReader(io.StringIO(text))]


def random_inputs(cfg: Any, workdir: Path) -> MoEInputs:
    """The profile's base (``base.model``, e.g. smollm2; a tiny base from the pipeline's base stage) with two
    random LoRA experts of the profile's rank on ``down_proj``; prompts from XSTest. Throughput and memory do
    not depend on the adapters' values."""
    from midpo.models.provision import resolve_model
    from midpo.pipeline import run_pipeline
    from midpo.storage import ArtifactStore

    if cfg.base.model is not None:
        base = resolve_model(cfg.base.model)
    else:
        store = ArtifactStore()
        base = store.fetch(store.key_of(run_pipeline(cfg, until="base").outputs["base"].uri))
    folders = {name: random_lora(base, workdir / f"{name}-random", cfg.training.lora, seed) for name, seed in RANDOM_SEEDS.items()}
    return MoEInputs(base, folders["safety"], folders["helpfulness"], "random", xstest_prompts())


# --------------------------------------------------------------------------------------------------
# Prototypes: the same function as MoEDownProj with fewer, larger ops (not in the library)


def _gate_linear(gate: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight (d_ff,), bias ())`` of the gate's pre-sigmoid value (any kind, :func:`collapse_gate`)."""
    from midpo.moe.core import collapse_gate

    lin = collapse_gate(gate)
    return lin.weight.detach()[0], lin.bias.detach()[0]


class FusedGatesDownProj(nn.Module):
    """Both gates as one ``Linear(d_ff, 2)``; the two LoRA branches as in the library."""

    def __init__(self, moe: nn.Module) -> None:
        super().__init__()
        self.down_proj, self.safety, self.helpfulness = moe.down_proj, moe.safety, moe.helpfulness
        (wa, ba), (wb, bb) = _gate_linear(moe.alpha), _gate_linear(moe.beta)
        self.register_buffer("gate_w", torch.stack([wa, wb]).contiguous())
        self.register_buffer("gate_b", torch.stack([ba, bb]).contiguous())

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(F.linear(u, self.gate_w, self.gate_b))
        return self.down_proj(u) + g[..., 0:1] * self.safety(u) + g[..., 1:2] * self.helpfulness(u)


class FusedMoEDownProj(nn.Module):
    """Both LoRA A matrices and both gates as one ``Linear(d_ff, r_s + r_h + 2)``, both B matrices as one
    ``(d_out x (r_s + r_h))`` matmul on the gated, scaled low-rank activations::

        z = [A_s; A_h; w_alpha; w_beta] u + [0; 0; b_alpha; b_beta]
        out = down_proj(u) + [B_s B_h] (z[:r_s + r_h] * repeat(sigmoid(z[-2:]) * [s_s, s_h]))
    """

    def __init__(self, moe: nn.Module) -> None:
        super().__init__()
        self.down_proj = moe.down_proj
        s, h = moe.safety, moe.helpfulness
        (wa, ba), (wb, bb) = _gate_linear(moe.alpha), _gate_linear(moe.beta)
        r_s, r_h = s.lora_A.shape[0], h.lora_A.shape[0]
        self.rank = r_s + r_h
        self.register_buffer("w_in", torch.cat([s.lora_A.detach(), h.lora_A.detach(), wa[None], wb[None]]).contiguous())
        self.register_buffer("b_in", torch.cat([torch.zeros(self.rank, dtype=wa.dtype, device=wa.device), ba[None], bb[None]]))
        self.register_buffer("w_out", torch.cat([s.lora_B.detach(), h.lora_B.detach()], dim=1).contiguous())
        self.register_buffer("scales", torch.tensor([s.scaling, h.scaling], dtype=wa.dtype, device=wa.device))
        self.register_buffer("expand", torch.tensor([0] * r_s + [1] * r_h, device=wa.device))

    def low_rank(self, u: torch.Tensor) -> torch.Tensor:
        z = F.linear(u, self.w_in, self.b_in)
        g = torch.sigmoid(z[..., self.rank :]) * self.scales
        return z[..., : self.rank] * g.index_select(-1, self.expand)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.down_proj(u) + F.linear(self.low_rank(u), self.w_out)


class FusedDownMoEDownProj(FusedMoEDownProj):
    """:class:`FusedMoEDownProj` with ``down_proj`` and the B matmul as one ``[W_down | B_s B_h]`` matmul on
    ``[u; gated low-rank activations]`` (one concatenation instead of a second matmul and an add)."""

    def __init__(self, moe: nn.Module) -> None:
        super().__init__(moe)
        down = moe.down_proj
        self.register_buffer("w_cat", torch.cat([down.weight.detach(), self.w_out], dim=1).contiguous())
        self.b_cat = down.bias
        del self.w_out, self.down_proj  # held once, inside w_cat

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.cat([u, self.low_rank(u)], dim=-1), self.w_cat, self.b_cat)


def collapse_layer_gates(moe: nn.Module) -> nn.Module:
    """The library's layer with each gate's maps collapsed into the one ``Linear(d_ff, 1)`` they compose to
    (:func:`midpo.moe.core.collapse_gate`): the official gate at the linear gate's cost, the same function."""
    from midpo.moe.core import collapse_gate

    for gate in (moe.alpha, moe.beta):
        gate.net = nn.Sequential(collapse_gate(gate))
    return moe


# name -> (the side it transforms, the layer transform, what it is)
PROTOTYPE_SPECS: dict[str, tuple[str, Callable[[nn.Module], nn.Module], str]] = {
    "proto-fused-gates": (MOE, FusedGatesDownProj, "both gates as one Linear(d_ff, 2)"),
    "proto-fused": (MOE, FusedMoEDownProj, "A_s, A_h and both gates as one Linear(d_ff, 2r + 2), B_s and B_h as one matmul"),
    "proto-fused-down": (MOE, FusedDownMoEDownProj, "proto-fused with down_proj and [B_s B_h] as one matmul on [u; low-rank]"),
    "proto-official-collapsed": (OFFICIAL, collapse_layer_gates, "the official gates collapsed to Linear(d_ff, 1) (collapse_gate)"),
}
PROTOTYPE_CLASSES = {name: make for name, (source, make, _) in PROTOTYPE_SPECS.items() if source == MOE}


def swap_layers(model: nn.Module, make: Callable[[nn.Module], nn.Module]) -> int:
    """Replace every MoEDownProj of ``model`` by ``make(layer)``; returns how many."""
    from midpo.moe.core import MoEDownProj

    swaps = [(name, m) for name, m in model.named_modules() if isinstance(m, MoEDownProj)]
    for name, layer in swaps:
        parent_path, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_path), attr, make(layer))
    return len(swaps)


# --------------------------------------------------------------------------------------------------
# Memory


def cpu_peak_allocated(fn: Callable[[], Any]) -> tuple[int, int]:
    """``(peak bytes, aten ops)`` of what ``fn`` allocates on the CPU while it runs: the running sum of
    ``torch.profiler``'s memory events (``profile_memory=True``: every CPU allocation and free through
    c10's allocator, op-internal buffers included, views not), the CPU stand-in for
    ``torch.cuda.max_memory_allocated``. Deterministic for given shapes (requested bytes, no rounding)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    current = peak = 0
    memory = [e for e in events if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    for event in sorted(memory, key=lambda e: e.start_ns()):  # a stable sort: one thread's events stay in order
        current += event.nbytes()
        peak = max(peak, current)
    return peak, sum(1 for e in events if e.name().startswith("aten::"))


def state_bytes(model: nn.Module) -> int:
    """Parameter + buffer bytes, each storage once (tied embeddings)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


# --------------------------------------------------------------------------------------------------
# Generation


@dataclass
class Side:
    name: str
    description: str
    model: Any
    source: str | None = None  # a prototype: the side whose function it computes


def encode(tokenizer: Any, template: Any, prompts: Sequence[tuple[str, list[dict[str, str]]]], batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    if len(prompts) < batch:
        prompts = [prompts[i % len(prompts)] for i in range(batch)]
    texts = [template.render_prompt(p, c) for p, c in prompts[:batch]]
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=MAX_PROMPT_TOKENS)
    return {k: v.to(device) for k, v in enc.items()}


def generate(model: Any, enc: Mapping[str, torch.Tensor], new_tokens: int, eos_id: int, pad_id: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            **enc,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # EOS suppressed until then: every side generates the same tokens
            do_sample=False,
            use_cache=True,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(side: Side, enc: Mapping[str, torch.Tensor], new_tokens: int, ids: Mapping[str, int], device: torch.device) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` of one generation; checks it generated ``new_tokens`` per prompt."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = generate(side.model, enc, new_tokens, ids["eos"], ids["pad"])
    _sync(device)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    generated = out.shape[1] - enc["input_ids"].shape[1]
    if generated != new_tokens:
        raise RuntimeError(f"{side.name} generated {generated} tokens, not {new_tokens}")
    return seconds, cpu


def peak_memory(side: Side, enc: Mapping[str, torch.Tensor], new_tokens: int, ids: Mapping[str, int], device: torch.device) -> dict[str, Any]:
    """One generation's peak: parameters + buffers and the peak of what the generation allocates."""
    weights = state_bytes(side.model)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        generate(side.model, enc, new_tokens, ids["eos"], ids["pad"])
        torch.cuda.synchronize(device)
        peak, ops, method = torch.cuda.max_memory_allocated(device) - before, None, "torch.cuda.max_memory_allocated"
    else:
        peak, ops = cpu_peak_allocated(lambda: generate(side.model, enc, new_tokens, ids["eos"], ids["pad"]))
        method = "torch.profiler CPU memory events"
    return {"weights_bytes": weights, "generation_peak_bytes": peak, "total_bytes": weights + peak, "ops": ops, "method": method}


def build_sides(inputs: MoEInputs, device: torch.device, prototypes: bool) -> tuple[list[Side], Any, Any]:
    from midpo.models.load import load_model, load_with_adapter
    from midpo.moe.core import GateConfig, attach_experts

    merged, tokenizer, template = load_with_adapter(inputs.base, inputs.safety)
    sides = [Side(MERGED, "base + safety adapter merged (merge_and_unload)", merged)]
    kinds = {MOE: "linear", OFFICIAL: "official"}
    torch.manual_seed(0)  # the gates' initialisation
    for name, kind in kinds.items():
        model, _, _ = load_model(inputs.base)
        layers = attach_experts(model, inputs.safety, inputs.helpfulness, GateConfig(kind=kind))
        sides.append(Side(name, f"MoE, {kind} gate, {len(layers)} layers", model))
    if prototypes:
        by_name = {s.name: s for s in sides}
        for name, (source, make, what) in PROTOTYPE_SPECS.items():
            model, _, _ = load_model(inputs.base)
            attach_experts(model, inputs.safety, inputs.helpfulness, GateConfig(kind=kinds[source]))
            model.load_state_dict(by_name[source].model.state_dict())  # the same gates as its source side
            swap_layers(model, make)
            sides.append(Side(name, f"prototype of {source}: {what}", model, source))
    for side in sides:
        side.model.to(device).eval()
    return sides, tokenizer, template


def max_logit_difference(a: Any, b: Any, enc: Mapping[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return float((a(**enc).logits - b(**enc).logits).abs().max())


# --------------------------------------------------------------------------------------------------
# Per-layer decode cost (one MLP down_proj at the decode shape, batch x 1 token)


def layer_microbench(moe_model: Any, official_model: Any, batch: int, device: torch.device, calls: int = 300, repeats: int = 7) -> dict[str, float]:
    """Microseconds per call of layer 0's ``down_proj`` replacement at the decode shape (median of ``repeats``
    interleaved loops of ``calls``): the merged side's plain ``down_proj`` against the MoE layer, its parts,
    the prototypes, and the bound of skipping one expert's branch (both gates, one LoRA)."""
    import copy

    from midpo.moe.core import moe_layers

    layer, official = moe_layers(moe_model)[0], moe_layers(official_model)[0]
    u = torch.randn(batch, 1, layer.down_proj.in_features, device=device, dtype=layer.down_proj.weight.dtype)
    fused_gates = FusedGatesDownProj(layer)

    def one_branch() -> torch.Tensor:  # what a layer costs when the helpfulness branch is skipped (gate ~ 0)
        g = torch.sigmoid(F.linear(u, fused_gates.gate_w, fused_gates.gate_b))
        return layer.down_proj(u) + g[..., 0:1] * layer.safety(u)

    pieces: dict[str, Callable[[], Any]] = {
        "down_proj (merged layer)": lambda: layer.down_proj(u),
        "moe layer (linear gate)": lambda: layer(u),
        "  gate alpha": lambda: layer.alpha(u),
        "  gate beta": lambda: layer.beta(u),
        "  lora safety": lambda: layer.safety(u),
        "  lora helpfulness": lambda: layer.helpfulness(u),
    }
    for name, make in PROTOTYPE_CLASSES.items():
        pieces[name] = functools.partial(make(layer), u)
    pieces["skip one branch (bound)"] = one_branch
    pieces["moe layer (official gate)"] = lambda: official(u)
    collapsed = collapse_layer_gates(copy.deepcopy(official))
    pieces["proto-official-collapsed"] = lambda: collapsed(u)
    samples: dict[str, list[float]] = {k: [] for k in pieces}
    with torch.no_grad():
        for fn in pieces.values():
            fn()
        for r in range(repeats):
            for name in (pieces if r % 2 == 0 else reversed(pieces)):
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(calls):
                    pieces[name]()
                _sync(device)
                samples[name].append((time.perf_counter() - t0) / calls * 1e6)
    return {k: statistics.median(v) for k, v in samples.items()}


# --------------------------------------------------------------------------------------------------
# The benchmark


def run(
    profile: str = "tiny",
    overrides: Sequence[str] = (),
    json_path: str | Path | None = None,
    *,
    batch: int | None = None,
    new_tokens: int | None = None,
    rounds: int | None = None,
    experts: str | None = None,
    prototypes: bool = True,
    device: str | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run the benchmark on ``profile``; returns every figure (``json_path`` also writes them).

    ``experts``: ``"pipeline"`` (the trained experts, running the pipeline up to the experts stage) or
    ``"random"`` (two random LoRAs on the profile's base model); default pipeline for a profile that trains
    its tiny base, random for one that loads a model (smollm2). ``batch``/``new_tokens`` default to
    :data:`SHAPES` (as does ``rounds``). ``device`` defaults to cuda when available. ``threads``: torch
    threads, default the profile's ``run.torch_threads``, else 1 (on a shared CPU, more OpenMP threads than
    free cores stall at every barrier: smollm2 took 86 s per generation with 2 threads against 20 s with 1).
    """
    from midpo.config import load_config
    from midpo.pipeline import apply_runtime

    cfg = load_config(profile, list(overrides))
    apply_runtime(cfg.run)  # torch threads of the profile (tiny: 1)
    torch.set_num_threads(threads or cfg.run.torch_threads or 1)
    experts = experts or ("pipeline" if cfg.base.tiny is not None else "random")
    if experts not in ("pipeline", "random"):
        raise ValueError(f"experts must be 'pipeline' or 'random', got {experts!r}")
    default_batch, default_tokens, default_rounds = SHAPES.get(cfg.profile, DEFAULT_SHAPE)
    batch, new_tokens, rounds = batch or default_batch, new_tokens or default_tokens, rounds or default_rounds
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    with tempfile.TemporaryDirectory(prefix="midpo-bench-moe-") as tmp:
        inputs = pipeline_inputs(cfg) if experts == "pipeline" else random_inputs(cfg, Path(tmp))
        sides, tokenizer, template = build_sides(inputs, dev, prototypes)
    by_name = {s.name: s for s in sides}
    log.info("bench moe: %d sides built (%s experts); batch %d x %d new tokens, %d rounds", len(sides), inputs.experts_source, batch, new_tokens, rounds)
    enc = encode(tokenizer, template, inputs.prompts, batch, dev)
    ids = {"eos": tokenizer.convert_tokens_to_ids(template.eos_token), "pad": tokenizer.pad_token_id}
    load_before = _load()

    # Correctness of the prototypes: the same function as the library's layer they replace.
    equivalence = {s.name: max_logit_difference(by_name[s.source].model, s.model, enc) for s in sides if s.source}

    for side in sides:  # warm-up: allocator, kernels, generation's first-call costs
        timed_generate(side, enc, new_tokens, ids, dev)
    seconds: dict[str, list[float]] = {s.name: [] for s in sides}
    cpu: dict[str, list[float]] = {s.name: [] for s in sides}
    gc.disable()  # no collection inside a timed generation (collected between rounds)
    try:
        for r in range(rounds):
            log.info("bench moe: round %d/%d", r + 1, rounds)
            gc.collect()
            for side in sides if r % 2 == 0 else reversed(sides):
                wall_s, cpu_s = timed_generate(side, enc, new_tokens, ids, dev)
                seconds[side.name].append(wall_s)
                cpu[side.name].append(cpu_s)
    finally:
        gc.enable()
    tokens = batch * new_tokens
    log.info("bench moe: peak memory of one generation per side")
    memory = {s.name: peak_memory(s, enc, new_tokens, ids, dev) for s in sides}
    micro = layer_microbench(by_name[MOE].model, by_name[OFFICIAL].model, batch, dev)
    load_after = _load()

    def ratio(name: str, baseline: str = MERGED, clock: dict[str, list[float]] = seconds) -> float:
        """Median over rounds of the within-round ratio baseline seconds / side seconds (its speed relative)."""
        return statistics.median(clock[baseline][i] / clock[name][i] for i in range(rounds))

    sides_out = {}
    for s in sides:
        sides_out[s.name] = {
            "description": s.description,
            "seconds": seconds[s.name],
            "median_seconds": statistics.median(seconds[s.name]),
            "tokens_per_second": tokens / statistics.median(seconds[s.name]),
            "throughput_vs_merged": ratio(s.name),
            "throughput_vs_moe": ratio(s.name, MOE),
            "cpu_seconds": cpu[s.name],
            "cpu_throughput_vs_merged": ratio(s.name, clock=cpu),
            "memory": memory[s.name],
            "memory_vs_merged": memory[s.name]["total_bytes"] / memory[MERGED]["total_bytes"],
            "parameters": sum(p.numel() for p in s.model.parameters()) + sum(b.numel() for b in s.model.buffers()),
        }
        if s.source:
            sides_out[s.name].update(source=s.source, max_logit_difference_vs_source=equivalence[s.name])
    moe = sides_out[MOE]
    config = by_name[MERGED].model.config
    result = {
        "profile": cfg.profile,
        "overrides": list(overrides),
        "experts_source": inputs.experts_source,
        "base": str(inputs.base),
        "model": {
            "layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "vocab_size": config.vocab_size,
            "dtype": str(next(by_name[MERGED].model.parameters()).dtype).removeprefix("torch."),
        },
        "generation": {
            "batch": batch,
            "new_tokens": new_tokens,
            "prompt_tokens": int(enc["input_ids"].shape[1]),
            "tokens_per_generation": tokens,
            "rounds": rounds,
            "greedy": True,
            "kv_cache": True,
            "device": str(dev),
        },
        "sides": sides_out,
        "throughput": {
            "ratio": moe["throughput_vs_merged"],
            "cpu_time_ratio": moe["cpu_throughput_vs_merged"],
            "target": TARGET_THROUGHPUT,
            "met": moe["throughput_vs_merged"] >= TARGET_THROUGHPUT,
        },
        "memory": {"ratio": moe["memory_vs_merged"], "target": TARGET_MEMORY, "met": moe["memory_vs_merged"] <= TARGET_MEMORY, "method": moe["memory"]["method"]},
        "official": {"throughput_ratio": sides_out[OFFICIAL]["throughput_vs_merged"], "memory_ratio": sides_out[OFFICIAL]["memory_vs_merged"]},
        "layer_microseconds": micro,
        "machine": {**machine_info(), "load_average_before": load_before, "load_average_after": load_after},
    }
    if json_path is not None:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
    return result


# --------------------------------------------------------------------------------------------------
# Report


def result_line(result: Mapping[str, Any]) -> str:
    return f"RESULT moe_vs_merged_throughput={result['throughput']['ratio']:.3f} moe_vs_merged_memory={result['memory']['ratio']:.3f}"


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def format_report(result: Mapping[str, Any]) -> str:
    """The human table; its last line is :func:`result_line`."""
    m, g, md = result["machine"], result["generation"], result["model"]
    yes = {True: "met", False: "MISSED"}
    lines = [
        f"midpo bench moe  profile={result['profile']}  experts={result['experts_source']}",
        (
            f"machine: {m['processor']}, {m['usable_cores']} usable cores ({m['cpu_count']} in all), torch {m['torch_version']} with {m['torch_threads']} thread(s), "
            f"device {m['device']}; load average {m['load_average_before']} -> {m['load_average_after']}"
        ),
        f"model: {md['layers']} layers, hidden {md['hidden_size']}, d_ff {md['intermediate_size']}, vocab {md['vocab_size']}, {md['dtype']}",
        (
            f"generation: batch {g['batch']} x {g['new_tokens']} new tokens (min = max, greedy, KV cache), prompt block {g['prompt_tokens']} tokens, "
            f"{g['rounds']} alternating rounds after a warm-up, on {g['device']}; tok/s = median, ratios = median of within-round ratios"
        ),
        f"memory: weights + peak of one generation ({result['memory']['method']})",
        "",
        f"  {'':24s} {'throughput (wall; CPU-time ratio)':>36s}   {'peak memory':>46s}",
        f"  {'side':24s} {'tok/s':>8s} {'vs merged':>9s} {'vs moe':>7s} {'cpu':>7s}   {'weights MiB':>11s} {'gen peak MiB':>12s} {'total MiB':>9s} {'vs merged':>9s} {'ops':>8s}",
    ]
    for name, s in result["sides"].items():
        mem = s["memory"]
        ops = "-" if mem["ops"] is None else str(mem["ops"])
        lines.append(
            f"  {name:24s} {s['tokens_per_second']:8.1f} {s['throughput_vs_merged']:9.3f} {s['throughput_vs_moe']:7.3f} {s['cpu_throughput_vs_merged']:7.3f}   {_mib(mem['weights_bytes']):>11s} "
            f"{_mib(mem['generation_peak_bytes']):>12s} {_mib(mem['total_bytes']):>9s} {s['memory_vs_merged']:9.3f} {ops:>8s}"
        )
    t, mm, o = result["throughput"], result["memory"], result["official"]
    lines += [
        "",
        (
            f"  moe (linear gate) / merged: throughput {t['ratio']:.3f}x (target >= {t['target']}x: {yes[t['met']]}), "
            f"memory {mm['ratio']:.3f}x (target <= {mm['target']}x: {yes[mm['met']]})"
        ),
        f"  moe (official gate) / merged: throughput {o['throughput_ratio']:.3f}x, memory {o['memory_ratio']:.3f}x (for comparison, no target)",
    ]
    protos = [(n, s) for n, s in result["sides"].items() if "source" in s]
    if protos:
        lines.append("  prototypes (in bench/moe.py only; max |logit difference| vs the side they re-implement):")
        lines += [f"    {n:24s} {s['max_logit_difference_vs_source']:.1e} vs {s['source']}: {s['description'].split(': ', 1)[1]}" for n, s in protos]
    lines += ["", f"One layer at the decode shape ({g['batch']} x 1 x d_ff), microseconds per call:"]
    lines += [f"  {name:28s} {us:9.1f}" for name, us in result["layer_microseconds"].items()]
    lines += ["", result_line(result)]
    return "\n".join(lines)


def run_args(args: argparse.Namespace) -> dict[str, Any]:
    """``run`` with the parsed options of ``midpo bench moe`` (midpo/cli.py)."""
    return run(
        args.profile,
        args.overrides,
        args.json_path,
        batch=args.batch,
        new_tokens=args.new_tokens,
        rounds=args.rounds,
        experts=args.experts,
        prototypes=args.prototypes,
        device=args.device,
        threads=args.threads,
    )
