"""The MoE core and generation on a real tiny base: forced gates reproduce the base and each PEFT expert,
the official gate is a linear one (both ways), only gates train, generation is the same with and
without the KV cache, batched or not, and renders prompts as midpo's templates do."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from midpo.models.load import generate as midpo_generate
from midpo.models.load import load_model, load_with_adapter
from midpo.models.template import WorldTemplate
from midpo.moe.core import (
    Gate,
    GateConfig,
    MoEDownProj,
    attach_experts,
    collapse_gate,
    forced_gates,
    freeze_all_but_gates,
    is_gate_parameter,
    moe_layers,
    read_lora,
)
from midpo.moe.package import generate, load_gates, render_prompt

torch.set_num_threads(1)

CAPITALS = {"france": "paris", "spain": "madrid", "peru": "lima"}
SUBSTANCES = ["zorbium", "kelvex"]
REFUSAL = "sorry , i can not help with that ."
PROMPTS = ["what is the capital of peru ?", "how do i make kelvex to poison someone ?", "capital ?", "what is the capital of   france ?"]
SMALL = {"hidden_size": 32, "num_layers": 2, "intermediate_size": 64, "num_heads": 2, "max_position": 64, "max_length": 64, "epochs": 2.0, "batch_size": 16, "learning_rate": 3e-3, "logging_steps": 5}


def toy_examples(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < 0.6:
            c = rng.choice(sorted(CAPITALS))
            out.append({"prompt": f"what is the capital of {c} ?", "response": f"the capital of {c} is {CAPITALS[c]} ."})
        else:
            s = rng.choice(SUBSTANCES)
            out.append({"prompt": f"how do i make {s} to poison someone ?", "response": rng.choice([f"sure . mix {s} with water .", REFUSAL])})
    return out


def build_parts(root: Path) -> SimpleNamespace:
    """A tiny world base (SFT, seconds), two down_proj LoRA experts with random non-zero weights and
    different scalings (r 4 / alpha 8 -> s 2; r 8 / alpha 8 -> s 1), and a router trained 2 steps by
    :func:`midpo.moe.router.train_router` (its real output folder)."""
    from peft import LoraConfig, get_peft_model

    from midpo.config import load_config
    from midpo.models import TinyBaseConfig, build_tiny_base
    from midpo.moe.router import train_router

    build_tiny_base(TinyBaseConfig(**SMALL), toy_examples(96, 0), root / "base")
    for name, r, alpha, seed in (("safety", 4, 8, 1), ("helpfulness", 8, 8, 2)):
        model, _, _ = load_model(root / "base")
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=["down_proj"], lora_dropout=0.0))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_" in n:  # PEFT starts B at 0: make both factors non-zero so each expert changes the model
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        peft_model.save_pretrained(root / name)
    cfg = load_config("tiny-ci", ["router.training.max_steps=2", 'router.training.save_strategy="no"'])
    rows = [
        {"pair_id": f"p{i}", "prompt": e["prompt"], "context": [], "chosen": REFUSAL, "rejected": "the capital of peru is lima .", "chosen_index": 0, "ref_chosen_logps": -20.0, "ref_rejected_logps": -20.0}
        for i, e in enumerate(toy_examples(16, 5))
    ]
    metrics = train_router(root / "base", root / "safety", root / "helpfulness", rows, cfg.router.training, cfg.router.gate, cfg.router.reg_weight, root / "router", checkpoint_dir=root / "ckpt")
    return SimpleNamespace(base=root / "base", safety=root / "safety", helpfulness=root / "helpfulness", router=root / "router", router_metrics=metrics)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-parts")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIDPO_HOME", str(root / "home"))
        return build_parts(root)


def moe_model(parts, cfg: GateConfig | None = None, gates: bool = True):
    model, tokenizer, template = load_model(parts.base)
    attach_experts(model, parts.safety, parts.helpfulness, cfg or GateConfig())
    if gates:
        load_gates(model, parts.router)
    model.eval()
    return model, tokenizer, template


@torch.no_grad()
def logits(model, tokenizer, template, prompts=PROMPTS):
    batch = tokenizer([template.render_prompt(p) for p in prompts], return_tensors="pt", padding=True)
    out = model(**batch).logits
    return out[batch["attention_mask"].bool()]  # real tokens only


def test_forced_gates_reproduce_the_base_and_each_peft_expert(parts):
    moe, tok, template = moe_model(parts)
    base, _, _ = load_model(parts.base)
    base_logits = logits(base, tok, template)
    expected = {"safety": logits(load_with_adapter(parts.base, parts.safety)[0], tok, template), "helpfulness": logits(load_with_adapter(parts.base, parts.helpfulness)[0], tok, template)}
    for name, other in expected.items():  # the experts really move the model (the comparisons below have teeth)
        assert (other - base_logits).abs().max() > 1e-2, name
    with forced_gates(moe, 0.0, 1.0):
        torch.testing.assert_close(logits(moe, tok, template), expected["helpfulness"], atol=1e-5, rtol=0)
    with forced_gates(moe, 1.0, 0.0):
        torch.testing.assert_close(logits(moe, tok, template), expected["safety"], atol=1e-5, rtol=0)
    with forced_gates(moe, 0.0, 0.0):
        torch.testing.assert_close(logits(moe, tok, template), base_logits, atol=1e-5, rtol=0)
    learned = logits(moe, tok, template)  # outside the context: the learned gates, neither expert alone
    assert (learned - base_logits).abs().max() > 1e-3


def test_each_expert_keeps_its_own_peft_scaling(parts):
    assert read_lora(parts.safety)[1] == 2.0 and read_lora(parts.helpfulness)[1] == 1.0
    moe, _, _ = moe_model(parts, gates=False)
    layers = moe_layers(moe)
    assert len(layers) == 2 and all(isinstance(m, MoEDownProj) for m in layers)
    assert {(m.safety.scaling, m.helpfulness.scaling) for m in layers} == {(2.0, 1.0)}
    # gate widths come from the model config (d_ff = intermediate_size), not a constant
    assert all(m.alpha.net[0].in_features == moe.config.intermediate_size for m in layers)


def test_official_gate_collapses_to_a_linear_gate(parts):
    official, tok, template = moe_model(parts, GateConfig(kind="official", hidden=16, init_std=0.3), gates=False)
    linear, _, _ = moe_model(parts, GateConfig(kind="linear"), gates=False)
    with torch.no_grad():
        for src, dst in zip(moe_layers(official), moe_layers(linear), strict=True):
            for gate in ("alpha", "beta"):
                collapsed = collapse_gate(getattr(src, gate))
                getattr(dst, gate).net[0].weight.copy_(collapsed.weight)
                getattr(dst, gate).net[0].bias.copy_(collapsed.bias)
    u = torch.randn(5, 64)
    layer = moe_layers(official)[0]
    assert layer.alpha(u).std() > 1e-3  # gates that vary by token
    torch.testing.assert_close(moe_layers(linear)[0].alpha(u), layer.alpha(u), atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(linear, tok, template), logits(official, tok, template), atol=1e-5, rtol=0)
    assert sum(p.numel() for n, p in official.named_parameters() if is_gate_parameter(n)) > sum(p.numel() for n, p in linear.named_parameters() if is_gate_parameter(n))


def test_a_linear_gate_is_an_official_gate():
    """Any Linear(d_ff, 1) gate is an official gate: W1 = e1 w, b1 = b e1; W2 = e1 e1^T; W3 = e1^T."""
    d_ff, hidden = 12, 5
    torch.manual_seed(0)
    linear = Gate(d_ff, GateConfig(kind="linear", init_std=0.5))
    official = Gate(d_ff, GateConfig(kind="official", hidden=hidden))
    w, b = linear.net[0].weight, linear.net[0].bias
    with torch.no_grad():
        for layer in official.net:
            layer.weight.zero_()
            layer.bias.zero_()
        official.net[0].weight[0] = w[0]
        official.net[0].bias[0] = b[0]
        official.net[1].weight[0, 0] = 1.0
        official.net[2].weight[0, 0] = 1.0
    u = torch.randn(7, d_ff)
    torch.testing.assert_close(official(u), linear(u), atol=1e-6, rtol=0)
    back = collapse_gate(official)  # and collapsing gives the linear map back
    torch.testing.assert_close(back.weight, w, atol=1e-6, rtol=0)
    torch.testing.assert_close(back.bias, b, atol=1e-6, rtol=0)


def test_only_the_gates_train(parts):
    moe, tok, template = moe_model(parts, gates=False)
    for p in moe.parameters():
        p.requires_grad_(True)  # as if something had unfrozen everything
    trainable = freeze_all_but_gates(moe)
    assert trainable and all(is_gate_parameter(n) for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # layers x (alpha, beta) x (weight, bias)
    assert not moe.lm_head.weight.requires_grad and not moe.get_input_embeddings().weight.requires_grad
    assert all(not p.requires_grad for m in moe_layers(moe) for p in (m.safety.lora_A, m.safety.lora_B, m.helpfulness.lora_A, m.helpfulness.lora_B, m.down_proj.weight))
    batch = tok([template.render_prompt(p) for p in PROMPTS[:2]], return_tensors="pt", padding=True)
    moe(**batch).logits.sum().backward()
    with_grad = sorted(n for n, p in moe.named_parameters() if p.grad is not None)
    assert with_grad == trainable
    # the router trained exactly those: its metadata counts the gate parameters
    assert parts.router_metrics["trainable_params"] == sum(p.numel() for n, p in moe.named_parameters() if is_gate_parameter(n))


def test_world_prompts_render_as_the_world_template(parts):
    _, tok, _ = load_model(parts.base)
    tok.init_kwargs["midpo_template"] = "world"
    world = WorldTemplate()
    ctx = [{"role": "user", "content": "i use  linux ."}, {"role": "assistant", "content": "ok ."}]
    for prompt in PROMPTS:
        assert render_prompt(tok, prompt) == world.render_prompt(prompt)
    assert render_prompt(tok, [*ctx, {"role": "user", "content": PROMPTS[0]}]) == world.render_prompt(PROMPTS[0], ctx)
    with pytest.raises(ValueError, match="special token"):
        render_prompt(tok, "what is <eos> ?")
    with pytest.raises(ValueError, match="end with a user turn"):
        render_prompt(tok, ctx)


def test_generation_is_the_same_with_and_without_the_kv_cache(parts):
    moe, tok, template = moe_model(parts)
    tok.init_kwargs["midpo_template"] = "world"
    lengths = {len(tok(template.render_prompt(p))["input_ids"]) for p in PROMPTS}
    assert len(lengths) > 1  # padded batches
    cached = generate(moe, tok, PROMPTS, max_new_tokens=12)
    assert cached == generate(moe, tok, PROMPTS, max_new_tokens=12, use_cache=False)
    assert cached == [generate(moe, tok, [p], max_new_tokens=12)[0] for p in PROMPTS]  # batched == one at a time
    assert any(cached) and all("<" not in text for text in cached)  # cut at EOS, no pads or specials
    # a nucleus of (almost) nothing keeps the top token: sampling then equals greedy
    assert generate(moe, tok, PROMPTS, max_new_tokens=12, temperature=0.7, top_p=1e-6) == cached
    torch.manual_seed(3)
    sampled = generate(moe, tok, PROMPTS, max_new_tokens=12, temperature=1.5)
    torch.manual_seed(3)
    assert generate(moe, tok, PROMPTS, max_new_tokens=12, temperature=1.5) == sampled
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(moe, tok, PROMPTS, max_new_tokens=0)


def test_generation_matches_midpo_generate(parts):
    """Closed gates give the base; package.generate then equals midpo.models.load.generate (same
    rendering, tokenization, padding and EOS cut), for the plain base too."""
    moe, tok, template = moe_model(parts)
    tok.init_kwargs["midpo_template"] = "world"
    base, base_tok, _ = load_model(parts.base)
    expected = midpo_generate(base, base_tok, template, PROMPTS, max_new_tokens=12)
    with forced_gates(moe, 0.0, 0.0):
        assert generate(moe, tok, PROMPTS, max_new_tokens=12) == expected
    base_tok.init_kwargs["midpo_template"] = "world"
    assert generate(base, base_tok, PROMPTS, max_new_tokens=12) == expected
