"""Score models: losses against hand-computed values, the trainer's overrides, last-token scoring that
does not depend on padding, the plug-in path for external scorers, and the stage (train -> publish ->
Scorer.load -> score, cache hit) on a small synthetic world."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from midpo.config import DataConfig, SourceConfig
from midpo.data.prepare import prepare
from midpo.judges.losses import (
    bradley_terry_loss,
    cost_loss,
    reward_loss,
    safety_sign,
    sign_loss,
)
from midpo.judges.score import (
    METRIC_NAMES,
    ScoreConfig,
    ScoreLoraConfig,
    cost_row,
    evaluate_score_models,
    pairwise_accuracy,
    score_key,
    sign_accuracy,
    tokenize_rows,
    train_score_model,
    trainer_args,
)
from midpo.judges.scorer import SAFE_RLHF_CHAT_TEMPLATE, Scorer
from midpo.models.template import ChatTemplate, WorldTemplate
from midpo.models.tiny import TinyBaseConfig, base_stage
from midpo.models.tokenizer import train_world_tokenizer
from midpo.storage import ArtifactStore
from midpo.world import WorldConfig, clean_labels, vocabulary
from midpo.world.artifact import PAIRS, SFT, build_world

torch.set_num_threads(1)  # tiny models: one thread is much faster on a shared machine


def nll(x: float) -> float:
    """-log σ(x) = log(1 + e^-x)."""
    return math.log1p(math.exp(-x))


# --------------------------------------------------------------------------------------------------
# Losses


def test_reward_loss_is_bradley_terry():
    """chosen - rejected = 2 -> log(1 + e^-2) = 0.126928; = -2 -> log(1 + e^2) = 2.126928; 0 -> log 2."""
    chosen, rejected = torch.tensor([2.0, 0.0, 1.5]), torch.tensor([0.0, 2.0, 1.5])
    expected = torch.tensor([0.126928, 2.126928, 0.693147])
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), expected, atol=1e-6, rtol=0)
    # signs never change the reward loss
    torch.testing.assert_close(reward_loss(chosen, rejected, torch.ones(3), -torch.ones(3)), expected, atol=1e-6, rtol=0)


def test_cost_loss_hand_computed():
    """Pair 1: safe (C=-1) vs unsafe (C=2): pairwise -log σ(2-(-1)) = log(1+e^-3) = 0.048587,
    safe sign term -log σ(-1·-1) = log(1+e^-1) = 0.313262, unsafe sign term -log σ(1·2) = 0.126928;
    total 0.488777.
    Pair 2: both safe, safer C=-2, other C=-1: pairwise log(1+e^-1) = 0.313262, sign terms
    -log σ(2) = 0.126928 and -log σ(1) = 0.313262; total 0.753452.
    Pair 3: both unsafe, safer C=0.5, unsafer C=0: pairwise log(1+e^0.5) = 0.974077 (ordered wrong),
    sign terms -log σ(0.5) = 0.474077 and -log σ(0) = 0.693147; total 2.141301."""
    safer = torch.tensor([-1.0, -2.0, 0.5])
    unsafer = torch.tensor([2.0, -1.0, 0.0])
    safer_sign = torch.tensor([-1.0, -1.0, 1.0])
    unsafer_sign = torch.tensor([1.0, -1.0, 1.0])
    expected = torch.tensor([0.488777, 0.753452, 2.141301])
    torch.testing.assert_close(cost_loss(safer, unsafer, safer_sign, unsafer_sign), expected, atol=1e-6, rtol=0)
    assert expected[0].item() == pytest.approx(nll(3) + nll(1) + nll(2), abs=1e-6)
    assert expected[2].item() == pytest.approx(nll(-0.5) + nll(0.5) + nll(0), abs=1e-6)


def test_cost_loss_skips_sign_terms_of_null_labels():
    """Same pair as above (C_safer = -1, C_unsafer = 2): a null label (sign 0) removes its term entirely
    (not -log σ(0) = log 2): only safer null -> 0.048587 + 0.126928 = 0.175515; only unsafer null ->
    0.048587 + 0.313262 = 0.361849; both null -> the pairwise term 0.048587 alone."""
    safer, unsafer = torch.tensor([-1.0, -1.0, -1.0]), torch.tensor([2.0, 2.0, 2.0])
    safer_sign = torch.tensor([0.0, -1.0, 0.0])
    unsafer_sign = torch.tensor([1.0, 0.0, 0.0])
    expected = torch.tensor([0.175515, 0.361849, 0.048587])
    torch.testing.assert_close(cost_loss(safer, unsafer, safer_sign, unsafer_sign), expected, atol=1e-6, rtol=0)
    # a skipped term gives no gradient either
    c = torch.tensor([3.0], requires_grad=True)
    sign_loss(c, torch.tensor([0.0])).sum().backward()
    assert c.grad.item() == 0.0


def test_safety_sign_convention():
    assert (safety_sign(False), safety_sign(True), safety_sign(None)) == (1.0, -1.0, 0.0)  # +1 = unsafe


def test_cost_row_orders_safer_first_and_carries_signs():
    from midpo.data.schema import PreferencePair

    pair = PreferencePair("q ?", "bad .", "good .", is_response_0_safe=False, is_response_1_safe=True, better_response_id=0, safer_response_id=1)
    row = cost_row(pair)
    assert (row["chosen"], row["rejected"], row["chosen_sign"], row["rejected_sign"]) == ("good .", "bad .", -1.0, 1.0)
    unlabeled = PreferencePair("q ?", "a .", "b .", safer_response_id=0)
    assert cost_row(unlabeled)["chosen_sign"] == cost_row(unlabeled)["rejected_sign"] == 0.0
    assert cost_row(PreferencePair("q ?", "a .", "b .", better_response_id=0)) is None


def test_accuracy_helpers():
    # pair 0 prefers 0 (2 > 1: hit), pair 1 prefers 1 (tie: miss), pair 2 unlabelled (skipped)
    assert pairwise_accuracy([2.0, 1.0, 0.0], [1.0, 1.0, 5.0], [0, 1, None]) == (0.5, 2)
    # cost: preferred = safer must score lower
    assert pairwise_accuracy([2.0, -1.0], [1.0, 0.0], [1, 0], higher_is_preferred=False) == (1.0, 2)
    assert sign_accuracy([1.0, -1.0, 0.0, 3.0], [False, True, True, None]) == (1.0, 3)
    assert sign_accuracy([0.0], [False]) == (0.0, 1)  # exactly 0 is not "unsafe"


def test_score_config_defaults_are_written_out_and_validated():
    cfg = ScoreConfig()
    assert (cfg.bf16, cfg.gradient_checkpointing, cfg.lora) == (False, False, None)
    with pytest.raises(ValueError, match="batch_size"):
        ScoreConfig(batch_size=0)
    with pytest.raises(ValueError, match="lora"):
        ScoreLoraConfig(target_modules=[])


def test_score_config_loads_from_a_profile_section():
    """The config loader builds ScoreConfig (nested optional LoRA included) the way it builds every section."""
    from midpo.config import _build

    cfg = _build(ScoreConfig, {"learning_rate": 1e-4, "lora": {"r": 8}}, "judges.reward", "test")
    assert cfg.learning_rate == 1e-4 and cfg.lora == ScoreLoraConfig(r=8)


# --------------------------------------------------------------------------------------------------
# Scoring at the last real token


CORPUS = ["what is the capital of france ?", "the capital of france is paris .", "sorry , i can not help with that .", "a ripe banana is yellow ."]


def tiny_scorer_model(vocab_size: int, pad_token_id: int | None, seed: int = 0) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, num_labels=1, pad_token_id=pad_token_id,
    )
    model = LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # scores far from 0, so differences are visible
    return model.eval()


def manual_score(model, ids: list[int]) -> float:
    """The score head applied to the hidden state of the row's last token (no padding at all)."""
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state  # (1, T, H)
        return model.score(hidden[0, -1]).item()


def test_score_is_at_the_last_real_token_and_padding_invariant():
    tok = train_world_tokenizer(CORPUS)
    model = tiny_scorer_model(len(tok), tok.pad_token_id)
    scorer = Scorer(model, tok, WorldTemplate(), batch_size=8)
    prompts = ["what is the capital of france ?", "what is the capital of france ?", "what is the capital of france ?"]
    responses = ["paris .", "the capital of france is paris .", "sorry , i can not help with that ."]
    contexts = [(), [{"role": "user", "content": "a ripe banana ?"}, {"role": "assistant", "content": "yellow ."}], ()]
    rows = [scorer.tokenize(p, r, c) for p, r, c in zip(prompts, responses, contexts)]
    assert len({len(r) for r in rows}) == 3  # really different lengths: the batch is padded
    assert all(r[-1] == tok.eos_token_id for r in rows)  # the last real token is the template's EOS

    batched = scorer.score(prompts, responses, contexts)
    alone = [scorer.score([p], [r], [c])[0] for p, r, c in zip(prompts, responses, contexts)]
    manual = [manual_score(model, r) for r in rows]
    assert batched == pytest.approx(alone, abs=1e-5)
    assert batched == pytest.approx(manual, abs=1e-5)
    assert len({round(s, 4) for s in batched}) == 3
    # the scorer pads on the right with the pad id, and the model pools at the last non-pad position
    assert model.config.pad_token_id == tok.pad_token_id and tok.pad_token_id != tok.eos_token_id
    # order and batch size do not matter
    small = Scorer(model, tok, WorldTemplate(), batch_size=2)
    assert small.score(prompts[::-1], responses[::-1], contexts[::-1]) == pytest.approx(batched[::-1], abs=1e-5)


def test_scorer_rejects_bad_input():
    tok = train_world_tokenizer(CORPUS)
    scorer = Scorer(tiny_scorer_model(len(tok), tok.pad_token_id), tok, WorldTemplate())
    with pytest.raises(ValueError, match="prompts but"):
        scorer.score(["a ?"], ["b .", "c ."])
    two_labels = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_labels=2))
    with pytest.raises(ValueError, match="num_labels=1"):
        Scorer(two_labels, tok, WorldTemplate())


def test_trainer_feeds_the_signs_to_the_pluggable_loss(tmp_path):
    """The sign columns survive remove_unused_columns and the collator, never reach model.forward, and
    the loss is exactly the loss function of the scores of [chosen; rejected]."""
    from datasets import Dataset

    from midpo.judges.trainer import ScoreCollator, ScoreTrainer

    tok = train_world_tokenizer(CORPUS)
    model = tiny_scorer_model(len(tok), tok.pad_token_id).train()
    q = "what is the capital of france ?"
    rows = [
        {"prompt": q, "context": [], "chosen": "the capital of france is paris .", "rejected": "sorry , i can not help with that .", "chosen_sign": -1.0, "rejected_sign": 1.0},
        {"prompt": q, "context": [], "chosen": "paris .", "rejected": "a ripe banana is yellow .", "chosen_sign": 0.0, "rejected_sign": -1.0},
    ]
    cfg = ScoreConfig(batch_size=2, max_length=64)
    trainer = ScoreTrainer(
        model=model, args=trainer_args(cfg, str(tmp_path)), train_dataset=Dataset.from_list(tokenize_rows(rows, tok, WorldTemplate())),
        processing_class=tok, data_collator=ScoreCollator(pad_token_id=tok.pad_token_id), loss_fn=cost_loss, chosen_higher=False,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert sorted(zip(batch["chosen_sign"].tolist(), batch["rejected_sign"].tolist())) == [(-1.0, 1.0), (0.0, -1.0)]
    assert batch["input_ids"].shape[0] == 4  # [chosen; rejected]
    with torch.no_grad():
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        expected = cost_loss(scores[:2], scores[2:], batch["chosen_sign"], batch["rejected_sign"]).mean()
        plain = bradley_terry_loss(scores[2:], scores[:2]).mean()
        loss = trainer.compute_loss(model, dict(batch))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert abs(loss.item() - plain.item()) > 1e-3  # the sign terms are really in


# --------------------------------------------------------------------------------------------------
# Plug-in path: any HF sequence-classification folder, its own chat template

CHAT_WORDS = ["user", "assistant", "what", "is", "the", "capital", "of", "france", "?", "paris", ".", "sorry", ",", "i", "can", "not", "help"]
CHATML = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }}\n{{ m['content'] }} <|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant\n{% endif %}"
)


def chat_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with a ChatML-like chat template, EOS <|im_end|> and no pad token (like SmolLM2)."""
    vocab = {w: i for i, w in enumerate(["<unk>", "<|im_start|>", "<|im_end|>", *CHAT_WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"], clean_up_tokenization_spaces=False)
    tok.chat_template = CHATML
    return tok


@pytest.fixture
def external_folder(tmp_path):
    tok = chat_tokenizer()
    model = tiny_scorer_model(len(tok), pad_token_id=None, seed=1)
    folder = tmp_path / "external-rm"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_plug_in_any_sequence_classification_folder(external_folder):
    scorer = Scorer.load(external_folder, device="cpu", batch_size=4)
    assert isinstance(scorer.template, ChatTemplate) and scorer.template.family == "chat"
    assert scorer.tokenizer.pad_token == "<|im_end|>"  # no pad token: prepare_tokenizer reuses EOS
    assert scorer.model.config.pad_token_id == scorer.tokenizer.pad_token_id  # so batches > 1 can be pooled
    text = scorer.template.render("what is the capital of france ?", "paris .")
    assert text == "<|im_start|> user\nwhat is the capital of france ? <|im_end|>\n<|im_start|> assistant\nparis .<|im_end|>"
    prompts = ["what is the capital of france ?"] * 3
    responses = ["paris .", "sorry , i can not help .", "the capital of france is paris ."]
    batched = scorer.score(prompts, responses)
    alone = [scorer.score([p], [r])[0] for p, r in zip(prompts, responses)]
    assert batched == pytest.approx(alone, abs=1e-5)
    # pad == EOS: transformers pools at the rightmost token that is not the pad id, i.e. the last response
    # token before the closing EOS, in training (TRL) and scoring alike
    ids = scorer.tokenize(prompts[0], responses[0])
    assert batched[0] == pytest.approx(manual_score(scorer.model, ids[:-1]), abs=1e-5)


def test_plug_in_rejects_a_classifier_with_two_labels(tmp_path):
    tok = chat_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_labels=2)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="num_labels=1"):
        Scorer.load(tmp_path / "m", device="cpu")


def test_plug_in_safe_rlhf_score_model(external_folder, tmp_path):
    """A folder in safe-rlhf's format (beaver-7b-*: LlamaForScore, head ``score_head`` with a bias, no
    chat template) scores as the same model with the bias added."""
    reference = Scorer.load(external_folder, device="cpu")
    prompts, responses = ["what is the capital of france ?"] * 2, ["paris .", "sorry , i can not help ."]
    expected = [s + 0.5 for s in reference.score(prompts, responses)]

    folder = tmp_path / "beaver-like"
    folder.mkdir()
    weights = load_file(external_folder / "model.safetensors")
    weights["score_head.weight"] = weights.pop("score.weight")
    weights["score_head.bias"] = torch.tensor([0.5])
    save_file(weights, folder / "model.safetensors")
    config = json.loads((external_folder / "config.json").read_text())
    config.update(architectures=["LlamaForScore"], score_dim=1, score_bias=True, pad_token_id=None)
    for key in ("id2label", "label2id", "num_labels"):
        config.pop(key, None)
    (folder / "config.json").write_text(json.dumps(config))
    tok = chat_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(folder)

    beaver = Scorer.load(folder, device="cpu", chat_template=CHATML)
    assert beaver.score(prompts, responses) == pytest.approx(expected, abs=1e-5)
    # without a chat template, safe-rlhf's own dialogue format
    default = Scorer.load(folder, device="cpu")
    assert default.tokenizer.chat_template == SAFE_RLHF_CHAT_TEMPLATE
    assert default.template.render_prompt("hi") == "BEGINNING OF CONVERSATION: USER: hi ASSISTANT:"


# --------------------------------------------------------------------------------------------------
# The stage on a small synthetic world

WORLD = WorldConfig(n_pairs_harmful=60, n_pairs_borderline=60, n_pairs_benign=60, n_sft_harmful=40, n_sft_borderline=40, n_sft_benign=40, n_eval=10)
BASE = TinyBaseConfig(hidden_size=32, num_layers=2, intermediate_size=64, num_heads=2, max_position=128, max_length=128, epochs=1.0, batch_size=32, learning_rate=3e-3, logging_steps=5)
FAST = ScoreConfig(learning_rate=1e-3, epochs=1.0, batch_size=16, max_length=128, seed=0, max_pairs=48, logging_steps=1)


@pytest.fixture(scope="module")
def world_inputs(tmp_path_factory):
    """A small world, its prepared dataset and a tiny base, published in one store."""
    store = ArtifactStore((tmp_path_factory.mktemp("judges") / "artifacts").as_uri())
    world, _, _ = build_world(WORLD, store)
    data = prepare(DataConfig(sources=[SourceConfig(uri=f"{world.uri}/{PAIRS}", format="pku")], unlabeled_safety="skip", eval_fraction=0.2), store)
    sft = [json.loads(line) for line in (store.fetch(store.key_of(world.uri)) / SFT).read_text().splitlines()]
    base, _, _ = base_stage(BASE, sft, store, vocabulary())
    return store, data.ref, base


def test_train_publish_load_score_and_cache_hit(world_inputs, monkeypatch):
    store, dataset, base = world_inputs
    base_folder = store.fetch(store.key_of(base.uri))
    refs = {}
    for kind in ("reward", "cost"):
        ref, metrics, hit = train_score_model(kind, FAST, base_folder, dataset, store)
        assert not hit and ref.uri.startswith(store.uri(f"judges/{kind}/"))
        assert metrics["pairs"] == 48 and metrics["steps"] == 3 and metrics["dropped_too_long"] == 0
        assert math.isfinite(metrics["final_loss"]) and metrics["trainable_params"] == metrics["params"]
        refs[kind] = ref

    folder = store.fetch(store.key_of(refs["cost"].uri))
    meta = json.loads((folder / "midpo_score.json").read_text())
    assert meta["kind"] == "cost" and meta["template"] == "world" and meta["config"]["max_pairs"] == 48
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    scorer = Scorer.load(folder, device="cpu", batch_size=3)
    assert scorer.template.family == "world"
    prompts = ["what is the capital of france ?"] * 4
    responses = ["the capital of france is paris .", "paris .", "sorry , i can not help with that .", "the capital of france is lima ."]
    scores = scorer.score(prompts, responses)
    assert all(math.isfinite(s) for s in scores)
    assert scores == pytest.approx([scorer.score([p], [r])[0] for p, r in zip(prompts, responses)], abs=1e-5)

    # held-out accuracies: the six metric names, against noisy labels and the oracle's clean labels
    metrics = evaluate_score_models(refs["reward"], refs["cost"], dataset, store, oracle=clean_labels)
    assert set(METRIC_NAMES) <= set(metrics)
    assert all(0.0 <= metrics[name] <= 1.0 for name in METRIC_NAMES)
    assert metrics["n_cost_responses_noisy"] == 2 * metrics["n_cost_pairs_noisy"] > 0
    noisy_only = evaluate_score_models(refs["reward"], refs["cost"], dataset, store)
    assert "reward_pairwise_accuracy" not in noisy_only and noisy_only["cost_sign_accuracy_noisy"] == metrics["cost_sign_accuracy_noisy"]

    # second call: a cache hit, no training
    def no_training(*args, **kwargs):
        raise AssertionError("a published score model must not be retrained")

    monkeypatch.setattr("midpo.judges.score.build_score_model", no_training)
    ref2, metrics2, hit2 = train_score_model("reward", FAST, base_folder, dataset, store)
    assert hit2 and ref2 == refs["reward"] and metrics2["steps"] == 3
    ref3, _, hit3 = train_score_model("reward", FAST, base, dataset, store)  # the same base as an ArtifactRef
    assert hit3 and ref3 == ref2


def test_key_changes_with_every_input():
    cfg = ScoreConfig()
    key = score_key("reward", cfg, "base1", "data1")
    assert key.startswith("judges/reward/")
    others = {
        score_key("cost", cfg, "base1", "data1"),
        score_key("reward", ScoreConfig(seed=1), "base1", "data1"),
        score_key("reward", cfg, "base2", "data1"),
        score_key("reward", cfg, "base1", "data2"),
    }
    assert key not in others and len(others) == 4


def test_lora_score_model_is_saved_merged(world_inputs):
    """A large base trains LoRA (peft SEQ_CLS: the head trains in full); the folder is a plain merged model."""
    store, dataset, base = world_inputs
    cfg = ScoreConfig(learning_rate=1e-3, epochs=1.0, batch_size=8, max_pairs=16, logging_steps=1, lora=ScoreLoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    ref, metrics, hit = train_score_model("cost", cfg, base, dataset, store)
    assert not hit and metrics["steps"] == 2 and 0 < metrics["trainable_params"] < metrics["params"]
    folder = store.fetch(store.key_of(ref.uri))
    assert not (folder / "adapter_config.json").exists()
    scorer = Scorer.load(folder, device="cpu")
    assert all(math.isfinite(s) for s in scorer.score(["what is the capital of france ?"], ["paris ."]))
