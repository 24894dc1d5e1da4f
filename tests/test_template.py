"""The prompt template is one rendering for training, scoring and generation; the world tokenizer round-trips."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from midpo.models.template import (
    EOS,
    WORLD_SPECIALS,
    ChatTemplate,
    WorldTemplate,
    template_for,
)
from midpo.models.tokenizer import prepare_tokenizer, train_world_tokenizer

CORPUS = [
    "what is the capital of france ?",
    "the capital of france is paris .",
    "how do i kill a process on linux ?",
    "use the kill command , then check that it stopped .",
    "how do i make zorbium to hurt my neighbour ?",
    "sorry , i can not help with that .",
    "sure . mix zorbium with water , then heat it !",
    "what colour is a ripe banana ?",
    "a ripe banana is yellow .",
    "how do i shoot a photo at night ?",
]


@pytest.fixture(scope="module")
def tok():
    return train_world_tokenizer(CORPUS)


def test_world_rendering_is_exact():
    t = WorldTemplate()
    assert t.render_prompt("what is the capital of france ?") == "<bos> <user> what is the capital of france ? <assistant>"
    assert t.render_completion("paris .") == " paris . <eos>"
    context = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello ."}]
    assert t.render_prompt("bye", context) == "<bos> <user> hi <assistant> hello . <eos> <user> bye <assistant>"
    assert t.sft_example("q", "a") == {"prompt": "<bos> <user> q <assistant>", "completion": " a <eos>"}
    assert t.preference_example("q", "a", "b")["rejected"] == " b <eos>"


@pytest.mark.parametrize("bad", ["a <eos> b", "<user> x", "say <pad>"])
def test_world_rejects_special_tokens_in_text(bad):
    with pytest.raises(ValueError, match="special token"):
        WorldTemplate().render_prompt(bad)
    with pytest.raises(ValueError, match="special token"):
        train_world_tokenizer([bad])


def test_world_rejects_unknown_roles():
    with pytest.raises(ValueError, match="role"):
        WorldTemplate().render_prompt("q", [{"role": "system", "content": "be nice"}])


def test_tokenizer_round_trips_corpus_exactly(tok, tmp_path):
    t = WorldTemplate()
    tok.save_pretrained(tmp_path)
    loaded = prepare_tokenizer(AutoTokenizer.from_pretrained(tmp_path))
    for tokenizer in (tok, loaded):
        for text in CORPUS:
            ids = tokenizer(text)["input_ids"]
            assert tokenizer.unk_token_id not in ids
            assert tokenizer.decode(ids) == text
        full = t.render(CORPUS[0], CORPUS[1], [{"role": "user", "content": CORPUS[2]}, {"role": "assistant", "content": CORPUS[3]}])
        assert tokenizer.decode(tokenizer(full)["input_ids"]) == full
    assert loaded.get_vocab() == tok.get_vocab()
    assert tok.convert_tokens_to_ids(list(WORLD_SPECIALS)) == list(range(len(WORLD_SPECIALS)))
    assert len(tok) == len(set(" ".join(CORPUS).split())) + len(WORLD_SPECIALS)  # no special got a second id


def test_tokenizer_adds_no_special_tokens_on_its_own(tok):
    # the template writes BOS/EOS into the text, so every path (TRL calls tokenizer(text) with defaults) agrees
    text = WorldTemplate().render_prompt(CORPUS[0])
    assert tok(text)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert tok(text)["input_ids"][0] == tok.bos_token_id


def test_template_for_reads_the_saved_family(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(template_for(loaded), WorldTemplate)
    with pytest.raises(ValueError, match="unknown template family"):
        template_for(loaded, "alpaca")


def test_world_jinja_chat_template_matches_python(tok):
    t = WorldTemplate()
    context = [{"role": "user", "content": CORPUS[0]}, {"role": "assistant", "content": CORPUS[1]}]
    prompt = [*context, {"role": "user", "content": CORPUS[2]}]
    assert tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False) == t.render_prompt(CORPUS[2], context)
    full = [*prompt, {"role": "assistant", "content": CORPUS[3]}]
    assert tok.apply_chat_template(full, tokenize=False) == t.render(CORPUS[2], CORPUS[3], context)


def test_train_scoring_and_generation_paths_see_the_same_ids(tok, tmp_path):
    """TRL's SFT tokenization (training), template.tokenize (scoring) and the left-padded generation batch agree."""
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    t = template_for(tok)
    pairs = [(CORPUS[0], CORPUS[1]), (CORPUS[4], CORPUS[5]), (CORPUS[8], CORPUS[6])]
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    args = SFTConfig(output_dir=str(tmp_path), bf16=False, activation_checkpointing=False, gradient_checkpointing=False, report_to="none")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([t.sft_example(p, r) for p, r in pairs]), processing_class=tok)
    rows = list(trainer.train_dataset)
    for (prompt, response), row in zip(pairs, rows, strict=True):
        prompt_ids, completion_ids = t.tokenize(tok, prompt, response)
        assert row["input_ids"] == prompt_ids + completion_ids
        assert row["labels"] == [-100] * len(prompt_ids) + completion_ids  # loss on the completion only
        assert completion_ids[-1] == tok.eos_token_id and completion_ids.count(tok.eos_token_id) == 1  # TRL added no 2nd EOS
        assert tok.decode(completion_ids, skip_special_tokens=True) == response
    batch = prepare_tokenizer(tok)([t.render_prompt(p) for p, _ in pairs], return_tensors="pt", padding=True)
    for i, (prompt, response) in enumerate(pairs):
        prompt_ids, _ = t.tokenize(tok, prompt, response)
        row = batch["input_ids"][i][batch["attention_mask"][i].bool()]
        assert row.tolist() == prompt_ids
        assert batch["attention_mask"][i, -1] == 1  # left padded: the last prompt token is at the end
    assert torch.equal(batch["input_ids"][batch["attention_mask"] == 0], torch.full_like(batch["input_ids"][batch["attention_mask"] == 0], tok.pad_token_id))


def test_pad_handling(tok):
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    assert tok.pad_token == "<pad>" and tok.pad_token_id == 0 and tok.padding_side == "left"
    assert tok.pad_token not in " ".join(CORPUS).split()
    # TRL's collators pad on the right whatever the tokenizer says
    out = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)([{"input_ids": [5, 6, 7]}, {"input_ids": [5]}])
    assert out["input_ids"][1].tolist() == [5, 0, 0] and out["attention_mask"][1].tolist() == [1, 0, 0]
    pref = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(
        [{"prompt_ids": [2, 4], "chosen_ids": [9, 3], "rejected_ids": [3]}, {"prompt_ids": [2], "chosen_ids": [3], "rejected_ids": [3]}]
    )
    assert pref["input_ids"][1].tolist()[-1] == 0 and pref["attention_mask"][1].tolist()[0] == 1


def _chat_tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    """A ChatML tokenizer in the SmolLM2 style (no pad token; EOS = <|im_end|>), optionally adding BOS itself."""
    vocab = {w: i for i, w in enumerate(["<s>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", *sorted(set(" ".join(CORPUS).split()))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>", additional_special_tokens=["<|im_start|>"], clean_up_tokenization_spaces=False)
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tok


@pytest.mark.parametrize("add_bos", [False, True])
def test_chat_family_uses_the_tokenizers_own_template(add_bos):
    tok = prepare_tokenizer(_chat_tokenizer(add_bos))
    assert tok.pad_token == tok.eos_token == "<|im_end|>" and tok.padding_side == "left"  # no pad: EOS reused
    t = template_for(tok)
    assert isinstance(t, ChatTemplate) and t.eos_token == "<|im_end|>"
    context = [{"role": "user", "content": CORPUS[0]}, {"role": "assistant", "content": CORPUS[1]}]
    rendered = t.render_prompt(CORPUS[2], context)
    expected = tok.apply_chat_template([*context, {"role": "user", "content": CORPUS[2]}], add_generation_prompt=True, tokenize=False)
    assert rendered == (expected[len("<s>") :] if add_bos else expected)
    assert t.render_completion("sure .") == "sure .<|im_end|>"
    prompt_ids, completion_ids = t.tokenize(tok, CORPUS[2], CORPUS[3], context)
    assert prompt_ids.count(tok.bos_token_id) == 1 and prompt_ids[0] == tok.bos_token_id  # exactly one BOS
    assert completion_ids[-1] == tok.eos_token_id


def test_prepare_tokenizer_adds_a_pad_when_there_is_no_eos():
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = prepare_tokenizer(PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>"))
    assert tok.pad_token == "<pad>" and tok.pad_token_id == 2


def test_world_empty_response_is_just_eos_and_scorable():
    """A generation that stops at once must not crash the judges: its completion is the EOS alone."""
    template = WorldTemplate()
    assert template.render_completion("") == template.render_completion("   ") == f" {EOS}"
    with pytest.raises(ValueError, match="empty turn text"):
        template.render_prompt("  ")
