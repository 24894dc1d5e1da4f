"""The MidPO model as one self-describing folder, and generation with it.

Layout written by :func:`save_moe`::

    <folder>/
      base/                      the Hugging Face base folder (config, weights, tokenizer, chat template)
      experts/safety/            PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors)
      experts/helpfulness/       PEFT LoRA adapter
      gates.safetensors          the trained gates (names relative to the model)
      moe_config.json            format_version, gate config, reg_weight, layers, template family,
                                 and the sha256 of every file above

:func:`load_moe` rebuilds base + :func:`attach_experts` + gates after checking every hash, in eval mode.
:func:`generate` renders prompts with the tokenizer's own chat template (the world tokenizer carries one
identical to midpo's ``WorldTemplate``), batches them with left padding and decodes with the KV cache,
greedy or sampled, cut at EOS.

This module depends on torch, transformers, safetensors and the standard library only: the MLflow model
ships it as code next to ``core.py`` and ``serving.py`` (:mod:`midpo.moe.serving`), where ``import midpo``
may fail. The one import below is the only place that knows both layouts.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

if __package__:  # imported as midpo.moe.package
    from . import core
else:  # shipped as top-level code modules (MLflow code_paths): core.py sits next to this file
    import core  # type: ignore[no-redef]

FORMAT = "midpo-moe"
FORMAT_VERSION = 1
CONFIG_FILE = "moe_config.json"
GATES_FILE = "gates.safetensors"  # the router's file name (midpo.moe.router.GATES_FILE)
ROUTER_META = "midpo_router.json"  # the router's config (midpo.moe.router.ROUTER_META)
BASE_META = "midpo_base.json"  # midpo.models.tiny.BASE_META: {"template": "world"|"chat", ...}
TEMPLATE_KEY = "midpo_template"  # midpo.models.template.TEMPLATE_KEY (tokenizer_config.json field)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ADAPTER_OPTIONAL = ("midpo_adapter.json",)  # provenance, copied when present
SKIP = {"_MANIFEST.json"}  # artifact-store bookkeeping, never part of a model


class MoEPackageError(ValueError):
    """A MoE folder that is incomplete, of an unknown format, or whose content does not match its hashes."""


# --------------------------------------------------------------------------------------------------
# Saving


def _sha256(path: Path) -> str:
    # midpo.storage.sha256_file's twin: this module ships with the model (code_paths) and never imports midpo.
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _copy_files(src: Path, dest: Path, names: Sequence[str] | None = None) -> None:
    dest.mkdir(parents=True)
    for path in sorted(src.iterdir()) if names is None else [src / n for n in names]:
        if path.name in SKIP:
            continue
        if path.is_dir():
            raise MoEPackageError(f"{src}: nested folder {path.name!r}; a MoE part must be a flat folder of files")
        shutil.copy2(path, dest / path.name)


def _template_family(base: Path) -> str:
    meta = base / BASE_META
    if meta.is_file():
        return json.loads(meta.read_text())["template"]
    tok_cfg = base / "tokenizer_config.json"
    if tok_cfg.is_file():
        return json.loads(tok_cfg.read_text()).get(TEMPLATE_KEY) or "chat"
    return "chat"


def save_moe(out_dir: str | Path, base_folder: str | Path, safety_folder: str | Path, helpfulness_folder: str | Path, router_folder: str | Path) -> Path:
    """Write the MoE folder ``out_dir`` (must not exist or be empty) from a base folder, the two expert
    adapter folders and a router folder (``gates.safetensors`` + ``midpo_router.json``); returns it."""
    out, base, router = Path(out_dir), Path(base_folder), Path(router_folder)
    if out.exists() and any(out.iterdir()):
        raise MoEPackageError(f"{out}: exists and is not empty")
    if not (base / "config.json").is_file():
        raise MoEPackageError(f"{base}: not a Hugging Face model folder (no config.json)")
    for name, folder in (("safety", safety_folder), ("helpfulness", helpfulness_folder)):
        missing = [f for f in ADAPTER_FILES if not (Path(folder) / f).is_file()]
        if missing:
            raise MoEPackageError(f"{folder}: the {name} expert is not a PEFT adapter folder (missing {missing})")
    if not (router / GATES_FILE).is_file() or not (router / ROUTER_META).is_file():
        raise MoEPackageError(f"{router}: a router folder holds {GATES_FILE} and {ROUTER_META}")
    router_meta = json.loads((router / ROUTER_META).read_text())
    gate = core.GateConfig(**router_meta.get("gate", {}))
    loras, _ = core.read_lora(safety_folder)  # validates the adapter (LoRA, down_proj only)

    out.mkdir(parents=True, exist_ok=True)
    _copy_files(base, out / "base")
    for name, folder in (("safety", safety_folder), ("helpfulness", helpfulness_folder)):
        present = [*ADAPTER_FILES, *(f for f in ADAPTER_OPTIONAL if (Path(folder) / f).is_file())]
        _copy_files(Path(folder), out / "experts" / name, present)
    shutil.copy2(router / GATES_FILE, out / GATES_FILE)
    files = {p.relative_to(out).as_posix(): _sha256(p) for p in sorted(out.rglob("*")) if p.is_file()}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "gate": {"kind": gate.kind, "hidden": gate.hidden, "init_std": gate.init_std},
        "reg_weight": router_meta.get("reg_weight"),
        "layers": len(loras),
        "template": _template_family(base),
        "experts": list(core.EXPERT_NAMES),
        "files": files,
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


# --------------------------------------------------------------------------------------------------
# Loading


def is_moe_folder(folder: str | Path) -> bool:
    """True for a folder written by :func:`save_moe` (its ``moe_config.json`` names the format)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, OSError):
        return False


def read_moe_config(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not is_moe_folder(folder):
        raise MoEPackageError(f"{folder}: not a MidPO MoE folder (no {CONFIG_FILE} of format {FORMAT!r})")
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise MoEPackageError(f"{folder}: MoE format_version {config.get('format_version')!r}; this code reads version {FORMAT_VERSION}")
    return config


def verify_moe(folder: str | Path, config: Mapping[str, Any] | None = None) -> None:
    """Check every file listed in ``moe_config.json`` against its sha256; raises naming the first bad file."""
    folder = Path(folder)
    config = config if config is not None else read_moe_config(folder)
    for rel, digest in config["files"].items():
        path = folder / rel
        if not path.is_file():
            raise MoEPackageError(f"{folder}: {rel} is missing (listed in {CONFIG_FILE})")
        actual = _sha256(path)
        if actual != digest:
            raise MoEPackageError(f"{folder}: {rel} is corrupted or was modified: sha256 {actual[:16]}... does not match {digest[:16]}... recorded in {CONFIG_FILE}")


def _prepare_tokenizer(tokenizer: Any) -> bool:
    """midpo.models.tokenizer.prepare_tokenizer: keep the pad token, else reuse EOS, else add ``<pad>``;
    pad on the left. Returns True when a token was added (the embeddings must grow)."""
    added = False
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            added = True
    tokenizer.padding_side = "left"
    return added


def _fit_tokenizer(tokenizer: Any, config: Any) -> None:
    """midpo.models.provision.fit_tokenizer: bound by the model's positions; truncation keeps the end."""
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions:
        tokenizer.model_max_length = min(int(tokenizer.model_max_length), int(positions))
    tokenizer.truncation_side = "left"


def load_gates(model: torch.nn.Module, path: str | Path) -> None:
    """Load ``gates.safetensors`` (or a folder holding it: a router or MoE folder) into a model whose
    experts are attached (strict: every gate, nothing else)."""
    from safetensors.torch import load_file

    path = Path(path) / GATES_FILE if Path(path).is_dir() else Path(path)
    state = load_file(str(path))
    params = dict(model.named_parameters())
    expected = {n for n in params if core.is_gate_parameter(n)}
    if set(state) != expected:
        raise MoEPackageError(f"{path}: gate tensors do not match the model's gates (missing {sorted(expected - set(state))[:3]}, extra {sorted(set(state) - expected)[:3]})")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def load_moe(folder: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None, verify: bool = True) -> tuple[Any, Any]:
    """``(model in eval mode, tokenizer)`` of a MoE folder, its hashes checked first (``verify``).

    ``device`` defaults to CUDA when available. The tokenizer is prepared as midpo prepares every
    tokenizer (pad token, left padding, bounded length) and carries the template family in
    ``init_kwargs["midpo_template"]``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    config = read_moe_config(folder)
    if verify:
        verify_moe(folder, config)
    device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "base"))
    added = _prepare_tokenizer(tokenizer)
    tokenizer.init_kwargs[TEMPLATE_KEY] = config["template"]
    model = AutoModelForCausalLM.from_pretrained(str(folder / "base"), dtype=dtype)
    if added or len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    _fit_tokenizer(tokenizer, model.config)
    layers = core.attach_experts(model, folder / "experts" / "safety", folder / "experts" / "helpfulness", core.GateConfig(**config["gate"]))
    if len(layers) != config["layers"]:
        raise MoEPackageError(f"{folder}: {len(layers)} MoE layers built, {CONFIG_FILE} records {config['layers']}")
    load_gates(model, folder / GATES_FILE)
    model.to(device)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# Prompts and generation (the conventions of midpo.models.template and midpo.models.load.generate)

Messages = list[dict[str, str]]


def template_family(tokenizer: Any) -> str:
    return getattr(tokenizer, "init_kwargs", {}).get(TEMPLATE_KEY) or "chat"


def as_messages(item: str | Sequence[Mapping[str, str]]) -> Messages:
    """A prompt string or a chat-message list as ``[{role, content}]`` ending in a user turn."""
    if isinstance(item, str):
        return [{"role": "user", "content": item}]
    messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in item]
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("a chat-message list must end with a user turn")
    return messages


def render_prompt(tokenizer: Any, item: str | Sequence[Mapping[str, str]]) -> str:
    """The text before the response, from the tokenizer's own chat template.

    World family: each turn is whitespace-normalized and may not contain a special token (as
    ``WorldTemplate``); the rendering then equals ``WorldTemplate().render_prompt``. Any family: a BOS
    the tokenizer adds itself is stripped from the text (``ChatTemplate``), so ``tokenizer(text)`` with
    defaults is the convention for every tokenization.
    """
    messages = as_messages(item)
    if template_family(tokenizer) == "world":
        specials = set(tokenizer.all_special_tokens)
        for m in messages:
            m["content"] = " ".join(m["content"].split())
            if not m["content"]:
                raise ValueError("empty turn text")
            bad = [s for s in specials if s in m["content"]]
            if bad:
                raise ValueError(f"world text must not contain the special token {bad[0]!r}: {m['content'][:80]!r}")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        probe = tokenizer("a")["input_ids"]
        if probe and probe[0] == tokenizer.bos_token_id:
            text = text[len(bos) :]
    return text


def render_completion(tokenizer: Any, response: str) -> str:
    """The response as the model produces it, with EOS (``PromptTemplate.render_completion``)."""
    if template_family(tokenizer) == "world":
        return f" {' '.join(response.split())} {tokenizer.eos_token}"
    return response + tokenizer.eos_token


def completion_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """Generated ids as the response: cut at the first EOS, special tokens dropped, stripped."""
    ids = list(ids)
    eos_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    if eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[Mapping[str, str]]],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    use_cache: bool = True,
) -> list[str]:
    """One response per prompt (a string or a chat-message list): left-padded batches, KV cache,
    greedy when ``temperature`` is 0 else sampled (``temperature``, nucleus ``top_p``), cut at EOS."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
    if tokenizer.padding_side != "left":
        raise ValueError("generation pads on the left: load the tokenizer with load_moe (or midpo's load_model)")
    texts = [render_prompt(tokenizer, p) for p in prompts]
    eos_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    sampling = {"do_sample": True, "temperature": float(temperature), "top_k": 0, "top_p": float(top_p)} if temperature > 0 else {"do_sample": False}
    device = next(model.parameters()).device
    out: list[str] = []
    for i in range(0, len(texts), batch_size):
        # over-long prompts keep their end (truncation_side "left") and leave room to answer
        limit = max(1, tokenizer.model_max_length - max_new_tokens)
        batch = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=limit).to(device)
        ids = model.generate(**batch, max_new_tokens=int(max_new_tokens), eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id, use_cache=use_cache, **sampling)
        new = ids[:, batch["input_ids"].shape[1] :]
        out += [completion_text(tokenizer, row.tolist()) for row in new]
    return out
