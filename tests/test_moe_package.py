"""The MoE package: one folder with hashed content, an exact save -> load round trip, a clear error on a
corrupted file, the MLflow pyfunc (log -> register -> alias -> load by alias in a fresh process that
cannot import midpo -> generate), ``midpo generate``, and the gate heat-map's data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from test_moe import PROMPTS, logits, moe_model, parts  # noqa: F401 (parts: the module-scoped fixture)

from midpo.cli import main
from midpo.moe.core import forced_gates
from midpo.moe.heatmap import gate_heatmap
from midpo.moe.package import (
    MoEPackageError,
    generate,
    is_moe_folder,
    load_moe,
    render_completion,
    render_prompt,
    save_moe,
)

torch.set_num_threads(1)

CHAT = [{"role": "user", "content": "what is the capital of spain ?"}, {"role": "assistant", "content": "the capital of spain is madrid ."}, {"role": "user", "content": PROMPTS[0]}]



@pytest.fixture(scope="module")
def folder(parts, tmp_path_factory):
    return save_moe(tmp_path_factory.mktemp("moe") / "midpo", parts.base, parts.safety, parts.helpfulness, parts.router)


@pytest.fixture(scope="module")
def loaded(folder):
    return load_moe(folder, device="cpu")


def test_save_writes_one_hashed_folder(folder, parts):
    config = json.loads((folder / "moe_config.json").read_text())
    assert config["format_version"] == 1 and config["layers"] == 2 and config["template"] == "world"
    assert config["gate"]["kind"] == "linear" and config["reg_weight"] == 1.0
    files = config["files"]
    assert {"base/config.json", "base/model.safetensors", "base/tokenizer.json", "base/chat_template.jinja", "gates.safetensors",
            "experts/safety/adapter_config.json", "experts/safety/adapter_model.safetensors",
            "experts/helpfulness/adapter_config.json", "experts/helpfulness/adapter_model.safetensors"} <= set(files)
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert on_disk == set(files) | {"moe_config.json"}
    assert all(len(h) == 64 for h in files.values())
    assert is_moe_folder(folder) and not is_moe_folder(parts.base) and not is_moe_folder(parts.router)
    with pytest.raises(MoEPackageError, match="not empty"):
        save_moe(folder, parts.base, parts.safety, parts.helpfulness, parts.router)


def test_round_trip_gives_identical_logits(parts, loaded):
    model, tokenizer = loaded
    reference, tok, template = moe_model(parts)  # built in memory from the parts
    assert not model.training and tokenizer.padding_side == "left"
    assert torch.equal(logits(model, tokenizer, template), logits(reference, tok, template))
    with forced_gates(model, 0.0, 1.0), forced_gates(reference, 0.0, 1.0):
        assert torch.equal(logits(model, tokenizer, template), logits(reference, tok, template))


def test_a_corrupted_or_missing_file_fails_naming_it(folder, tmp_path):
    bad = shutil.copytree(folder, tmp_path / "bad")
    target = bad / "experts" / "helpfulness" / "adapter_model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(MoEPackageError, match=r"experts/helpfulness/adapter_model\.safetensors is corrupted"):
        load_moe(bad, device="cpu")
    assert main(["generate", "--model", str(bad), "--prompt", PROMPTS[0]]) == 1
    missing = shutil.copytree(folder, tmp_path / "missing")
    (missing / "gates.safetensors").unlink()
    with pytest.raises(MoEPackageError, match=r"gates\.safetensors is missing"):
        load_moe(missing, device="cpu")
    config = json.loads((folder / "moe_config.json").read_text())
    newer = shutil.copytree(folder, tmp_path / "newer")
    (newer / "moe_config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(MoEPackageError, match="format_version 99"):
        load_moe(newer, device="cpu")


# A fresh interpreter in which midpo cannot be imported: a meta-path finder placed before every other
# one (the editable install's finder included) refuses midpo*, and the repository leaves sys.path.
FRESH = r'''
import importlib.abc, json, sys

class NoMidpo(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0].startswith("midpo"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked for this test)", name=name)
        return None

sys.meta_path.insert(0, NoMidpo())
repo = sys.argv[3]
sys.path[:] = [p for p in sys.path if p and not p.startswith(repo)]
try:
    import midpo  # noqa: F401
    raise SystemExit("midpo is importable: the test would prove nothing")
except ImportError:
    pass

import mlflow
import pandas as pd
import torch

torch.set_num_threads(1)
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
prompts = json.loads(sys.argv[4])
out = {
    "list": model.predict(prompts, params={"max_new_tokens": 10}),
    "frame": model.predict(pd.DataFrame({"prompt": prompts}), params={"max_new_tokens": 10}),
    "chat": model.predict([json.loads(sys.argv[5])], params={"max_new_tokens": 10}),
    "default": model.predict(prompts[:1]),
    "midpo_modules": sorted(m for m in sys.modules if m.startswith("midpo")),
    "serving": sys.modules["serving"].__file__,
}
print("RESULT " + json.dumps(out))
'''


def test_pyfunc_loads_by_alias_without_midpo_and_generates(folder, loaded, tmp_path, monkeypatch, capsys):
    import mlflow

    from midpo.moe.serving import log_moe_model
    from midpo.tracking import tracking_uri

    uri = tracking_uri()  # SQLite under this test's MIDPO_HOME
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("moe-serving", artifact_location=(tmp_path / "mlartifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = log_moe_model(folder, registered_model_name="midpo-test", alias="champion")
    assert str(info.registered_model_version) == "1"
    assert str(mlflow.MlflowClient().get_model_version_by_alias("midpo-test", "champion").version) == "1"
    requirements = (tmp_path / "mlartifacts").rglob("requirements.txt")
    pins = next(requirements).read_text().split()
    assert {p.split("==")[0] for p in pins} >= {"torch", "transformers", "safetensors"} and all("==" in p for p in pins)

    model, tokenizer = loaded
    expected = generate(model, tokenizer, PROMPTS, max_new_tokens=10)
    expected_chat = generate(model, tokenizer, [CHAT], max_new_tokens=10)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "fresh.py"
    script.write_text(FRESH)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    proc = subprocess.run(
        [sys.executable, str(script), uri, "models:/midpo-test@champion", repo, json.dumps(PROMPTS), json.dumps(CHAT)],
        check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    assert out["midpo_modules"] == [] and "/code/serving.py" in out["serving"]  # the shipped code, not midpo
    assert out["list"] == expected and out["frame"] == expected and out["chat"] == expected_chat
    assert out["default"] == generate(model, tokenizer, PROMPTS[:1], max_new_tokens=64)

    # `midpo generate` through the registry (in this process: restore what loading a pyfunc changes)
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    try:
        capsys.readouterr()
        assert main(["generate", "--model", "models:/midpo-test@champion", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max-new-tokens", "10"]) == 0
        assert capsys.readouterr().out.splitlines() == expected[:2]
    finally:
        for name in set(sys.modules) - before:
            if name in ("core", "package", "serving") or name.startswith("code_model_"):
                del sys.modules[name]


def test_midpo_generate_on_a_moe_folder(folder, loaded, parts, tmp_path, capsys):
    from midpo.storage import ArtifactStore

    model, tokenizer = loaded
    expected = generate(model, tokenizer, PROMPTS, max_new_tokens=8)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "--file", str(prompts_file), "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.splitlines() == expected
    # published to the artifact store (which adds its own manifest file) and named by URI, as JSON lines
    ref = ArtifactStore().publish(folder, "models/midpo/test")
    assert main(["generate", "--model", ref.uri, "--prompt", PROMPTS[1], "--max-new-tokens", "8", "--jsonl"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [{"prompt": PROMPTS[1], "response": expected[1]}]
    # a plain model folder goes through midpo's loader
    assert main(["generate", "--model", str(parts.base), "--prompt", PROMPTS[0], "--max-new-tokens", "8"]) == 0
    with forced_gates(model, 0.0, 0.0):
        assert capsys.readouterr().out.splitlines() == generate(model, tokenizer, PROMPTS[:1], max_new_tokens=8)


def test_heatmap_shows_the_gates(loaded, tmp_path):
    model, tokenizer = loaded
    response = "the capital of peru is lima ."
    with forced_gates(model, 0.25, 0.75):
        gates = gate_heatmap(model, tokenizer, PROMPTS[0], response, tmp_path / "gates.png")
    png = (tmp_path / "gates.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000 and gates.path == tmp_path / "gates.png"
    prompt_text = render_prompt(tokenizer, PROMPTS[0])
    n_tokens = len(tokenizer(prompt_text + render_completion(tokenizer, response))["input_ids"])
    assert gates.alpha.shape == gates.beta.shape == (2, n_tokens) and len(gates.tokens) == n_tokens
    assert gates.prompt_tokens == len(tokenizer(prompt_text)["input_ids"]) < n_tokens
    assert gates.tokens[0] == "<bos>" and gates.tokens[-1] == "<eos>" and "lima" in gates.tokens
    assert (gates.alpha == 0.25).all() and (gates.beta == 0.75).all()
    learned = gate_heatmap(model, tokenizer, CHAT)  # the learned gates, no file
    assert learned.path is None and ((learned.alpha > 0) & (learned.alpha < 1)).all() and learned.alpha.std() > 0
