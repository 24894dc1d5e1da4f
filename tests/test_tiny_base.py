"""The tiny base: widths from the config, deterministic SFT, a loadable HF folder, batched generation, stage cache."""

import json
import random

import pytest
import torch

from midpo.models import (
    TinyBaseConfig,
    base_stage,
    build_tiny_base,
    generate,
    load_model,
)
from midpo.models.tiny import BASE_META, base_key, build_tiny_model
from midpo.models.tokenizer import train_world_tokenizer
from midpo.storage import ArtifactStore

CAPITALS = {"france": "paris", "spain": "madrid", "italy": "rome", "japan": "tokyo", "egypt": "cairo", "peru": "lima"}
SUBSTANCES = ["zorbium", "kelvex", "drathine"]

# Very small: a few dozen steps in about a second on 2 cores.
SMALL = dict(hidden_size=32, num_layers=2, intermediate_size=64, num_heads=2, max_position=64, max_length=64, epochs=3.0, batch_size=16, learning_rate=3e-3, logging_steps=5)


def toy_examples(n: int = 240, seed: int = 0) -> list[dict]:
    """A miniature world: capitals (benign), made-up substances (harmful, 70% compliance), kill a process (borderline)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.5:
            c = rng.choice(sorted(CAPITALS))
            out.append({"prompt": f"what is the capital of {c} ?", "response": f"the capital of {c} is {CAPITALS[c]} ."})
        elif r < 0.8:
            s = rng.choice(SUBSTANCES)
            comply = rng.random() < 0.7
            resp = f"sure . mix {s} with water , then heat it ." if comply else "sorry , i can not help with that ."
            out.append({"prompt": f"how do i make {s} to poison someone ?", "response": resp})
        else:
            ctx = [{"role": "user", "content": "i use linux ."}, {"role": "assistant", "content": "ok ."}]
            out.append({"prompt": "how do i kill a process ?", "response": "use the kill command with its id .", "context": ctx})
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    metrics = build_tiny_base(TinyBaseConfig(**SMALL), toy_examples(), out)
    return out, metrics


def test_widths_come_from_the_config():
    cfg = TinyBaseConfig(hidden_size=24, num_layers=3, intermediate_size=40, num_heads=3, max_position=32, max_length=32)
    tok = train_world_tokenizer(["a b c"])
    model = build_tiny_model(cfg, tok)
    assert len(model.model.layers) == 3
    mlp = model.model.layers[0].mlp
    assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (40, 24)
    assert mlp.down_proj.weight.shape == (24, 40)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (24, 24)
    assert model.config.num_attention_heads == 3 and model.config.max_position_embeddings == 32
    assert model.get_input_embeddings().weight.shape == (len(tok), 24)
    assert model.config.pad_token_id == tok.pad_token_id and model.generation_config.eos_token_id == tok.eos_token_id


def test_config_is_validated():
    with pytest.raises(ValueError, match="divisible"):
        TinyBaseConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="max_length"):
        TinyBaseConfig(max_length=512, max_position=256)
    cfg = TinyBaseConfig()  # TRL's surprising defaults are written out
    assert (cfg.bf16, cfg.gradient_checkpointing, cfg.learning_rate) == (False, False, 5e-3)


def test_build_writes_a_plain_hf_folder_and_learns(built):
    out, metrics = built
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", BASE_META} <= {p.name for p in out.iterdir()}
    meta = json.loads((out / BASE_META).read_text())
    assert meta["template"] == "world" and meta["config"]["hidden_size"] == 32 and len(meta["sft_data_hash"]) == 64
    assert metrics["steps"] == 45 and metrics["params"] > 0 and metrics["truncated_rows"] == 0
    assert metrics["final_loss"] < metrics["first_loss"]
    model, tok, template = load_model(out)
    assert template.family == "world" and tok.padding_side == "left" and not model.training
    assert model.config.hidden_size == 32 and model.config.intermediate_size == 64


def test_sft_is_deterministic(built, tmp_path):
    out, metrics = built
    again = build_tiny_base(TinyBaseConfig(**SMALL), toy_examples(), tmp_path)
    assert again["final_loss"] == metrics["final_loss"]
    a, _, _ = load_model(out)
    b, _, _ = load_model(tmp_path)
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    assert (out / "tokenizer.json").read_text() == (tmp_path / "tokenizer.json").read_text()


def test_left_padded_batch_generates_like_one_at_a_time(built):
    model, tok, template = load_model(built[0])
    ctx = [{"role": "user", "content": "i use linux ."}, {"role": "assistant", "content": "ok ."}]
    prompts = ["what is the capital of peru ?", "how do i make kelvex to poison someone ?", "how do i kill a process ?", "capital ?"]
    contexts = [(), (), ctx, ()]
    lengths = {len(tok(template.render_prompt(p, c))["input_ids"]) for p, c in zip(prompts, contexts)}
    assert len(lengths) == len(prompts)  # really different lengths, so the batch is padded
    batched = generate(model, tok, template, prompts, contexts, max_new_tokens=12)
    single = [generate(model, tok, template, [p], [c], max_new_tokens=12)[0] for p, c in zip(prompts, contexts)]
    assert batched == single
    assert all("<" not in text for text in batched)  # specials (pads, EOS) never leak into responses
    assert any(text for text in batched)


def test_base_stage_publishes_once_then_hits_the_cache(tmp_path, monkeypatch):
    store = ArtifactStore((tmp_path / "artifacts").as_uri())
    cfg, examples = TinyBaseConfig(**{**SMALL, "epochs": 1.0}), toy_examples(64)
    ref, metrics, hit = base_stage(cfg, examples, store)
    assert not hit and ref.uri == store.uri(base_key(cfg, examples)) and ref.uri.split("/")[-2] == "bases"

    def no_training(*args, **kwargs):
        raise AssertionError("a cached base must not be rebuilt")

    monkeypatch.setattr("midpo.models.tiny.build_tiny_base", no_training)
    ref2, metrics2, hit2 = base_stage(cfg, examples, store)
    assert hit2 and ref2 == ref and metrics2 == pytest.approx(metrics)
    model, tok, template = load_model(ref.uri)
    assert template.family == "world"
    assert base_key(TinyBaseConfig(**{**SMALL, "epochs": 1.0, "seed": 1}), examples) != base_key(cfg, examples)
    assert base_key(cfg, examples[:-1]) != base_key(cfg, examples)
