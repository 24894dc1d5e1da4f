"""Profiles load strictly: errors name the key and the file."""

from pathlib import Path

import pytest

from midpo.cli import main
from midpo.config import ConfigError, available_profiles, load_config


def test_shipped_profiles_load():
    assert {"tiny", "tiny-ci", "smollm2", "alpaca7b"} <= set(available_profiles())
    for name in available_profiles():
        cfg = load_config(name)
        assert cfg.profile == name
        assert cfg.training.learning_rate > 0


def test_profiles_write_out_trl_defaults():
    import yaml

    from midpo.config import profile_path

    for name in available_profiles():
        raw = yaml.safe_load(profile_path(name).read_text())
        assert {"learning_rate", "bf16", "gradient_checkpointing", "save_strategy"} <= set(raw["training"]), name


def test_set_overrides_nested_and_list_fields():
    cfg = load_config("smollm2", ["data.eval_fraction=0.25", "training.lora.r=8", "data.sources.0.uri=/tmp/x.jsonl"])
    assert cfg.data.eval_fraction == 0.25 and cfg.training.lora.r == 8
    assert cfg.data.sources[0].uri == "/tmp/x.jsonl"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return p


BASE = """
data:
  sources: [{uri: builtin:pku_saferlhf_sample.jsonl}]
training:
  learning_rate: 1.0e-4
  bf16: false
  gradient_checkpointing: false
  save_strategy: "no"
"""


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, BASE + "  typo_key: 3\n")
    with pytest.raises(ConfigError, match=r"p\.yaml.*unknown key training\.typo_key"):
        load_config(str(p))


def test_wrong_type_names_key_and_file(tmp_path):
    p = write(tmp_path, BASE.replace("bf16: false", "bf16: maybe"))
    with pytest.raises(ConfigError, match=r"p\.yaml.*training\.bf16: expected bool"):
        load_config(str(p))


def test_missing_trl_default_is_an_error(tmp_path):
    p = write(tmp_path, BASE.replace("  learning_rate: 1.0e-4\n", ""))
    with pytest.raises(ConfigError, match=r"missing key training\.learning_rate"):
        load_config(str(p))


def test_bad_value_and_literal(tmp_path):
    with pytest.raises(ConfigError, match=r"data: eval_fraction"):
        load_config(str(write(tmp_path, BASE)), ["data.eval_fraction=1.5"])
    with pytest.raises(ConfigError, match=r"data\.dual_rule: 'nope' is not one of"):
        load_config(str(write(tmp_path, BASE)), ["data.dual_rule=nope"])
    with pytest.raises(ConfigError, match=r"--set data\.sources\.5\.uri"):
        load_config(str(write(tmp_path, BASE)), ["data.sources.5.uri=x"])
    with pytest.raises(ConfigError, match=r"unknown key data\.nope"):
        load_config(str(write(tmp_path, BASE)), ["data.nope=1"])


def test_missing_file_and_unknown_profile(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "absent.yaml"))
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        load_config("nope")


def test_config_show_cli(capsys, tmp_path):
    assert main(["config", "show", "--profile", "smollm2", "--set", "training.beta=0.2"]) == 0
    assert "beta: 0.2" in capsys.readouterr().out
    assert main(["config", "show", "--profile", str(write(tmp_path, BASE + "  bogus: 1\n"))]) == 1
    assert "unknown key training.bogus" in capsys.readouterr().err


def test_an_override_changes_one_place_even_through_a_yaml_anchor():
    """tiny-ci writes the cost model as an alias of the reward model's settings (`cost: *score`)."""
    cfg = load_config("tiny-ci", ["judges.cost.max_pairs=7"])
    assert cfg.judges.cost.max_pairs == 7 and cfg.judges.reward.max_pairs != 7
