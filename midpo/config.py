"""Typed configuration: one dataclass per stage section, loaded from a YAML profile plus ``--set`` overrides.

A profile is ``configs/<name>.yaml`` (shipped as the package ``midpo_configs``) or any YAML file. Loading
is strict: an unknown key, a wrong type or a missing file is a :class:`ConfigError` that names the key
and the file it came from. Each stage function receives only its own section.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from midpo.data.schema import PROMPT_KINDS
from midpo.judges.refusal import RefusalConfig
from midpo.judges.score import ScoreConfig, default_cost_config, default_reward_config
from midpo.models.tiny import TinyBaseConfig
from midpo.moe.core import GateConfig
from midpo.world.config import WorldConfig


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and where it came from."""


# --------------------------------------------------------------------------------------------------
# Sections


@dataclass
class SourceConfig:
    """One preference source: a path, file:// or s3:// URI, ``builtin:NAME`` (vendored data), a hub id, or
    ``artifact:OUTPUT/PATH``, a file of an earlier stage's output (e.g. ``artifact:world/pairs.jsonl``)."""

    uri: str
    format: Literal["auto", "pku", "hh", "alpaca-eval"] = "auto"
    prompt_kind: str | None = None  # set the prompt kind of every record of this source
    # Keep only the first N usable pairs of this source (file order, after exclusions and duplicates):
    # a slice for smoke runs. The kept records are the dataset's content, so another limit is another version.
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.prompt_kind is not None and self.prompt_kind not in PROMPT_KINDS:
            raise ValueError(f"prompt_kind must be one of {PROMPT_KINDS} or null, got {self.prompt_kind!r}")
        if self.limit is not None and (isinstance(self.limit, bool) or self.limit < 1):
            raise ValueError(f"limit must be a positive number of records or null, got {self.limit!r}")


@dataclass
class DataConfig:
    """Data preparation: sources, subset rules (midpo-method.md) and the prompt-disjoint split."""

    sources: list[SourceConfig] = field(default_factory=list)
    # Safety pairs: exactly one response labeled safe, chosen = the safe one. Sources without per-response
    # safety labels (hh-rlhf) either use their safer_response_id ("safer-label", the data recipe) or are skipped.
    unlabeled_safety: Literal["safer-label", "skip"] = "safer-label"
    # Router data (D_dual): "label" = both safe and safer == better; "label+safety" adds the safety pairs.
    dual_rule: Literal["label", "label+safety"] = "label+safety"
    eval_fraction: float = 0.1
    split_seed: int = 0
    max_chars: int = 16000  # longer prompt + response texts are excluded as `too_long`

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("at least one source is required")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_chars <= 0:
            raise ValueError(f"max_chars must be positive, got {self.max_chars}")

    def builder_dict(self) -> dict[str, Any]:
        """The fields that shape the prepared dataset (part of its version), without source locations."""
        d = dataclasses.asdict(self)
        d.pop("sources")
        return d


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["down_proj"])


@dataclass
class MethodOverrides:
    """One method's departures from the shared training section (e.g. each expert's learning rate)."""

    learning_rate: float | None = None
    beta: float | None = None
    epochs: float | None = None
    loss_params: dict[str, float] = field(default_factory=dict)  # the loss's own parameters (SafeDPO's delta, ...)


@dataclass
class TrainingConfig:
    """Preference-training hyperparameters shared by the experts, baselines and router.

    TRL's surprising defaults (learning_rate 1e-6, bf16 on, gradient checkpointing on) are fields
    without defaults here, so every profile must write them out.
    """

    learning_rate: float
    bf16: bool
    gradient_checkpointing: bool
    save_strategy: Literal["no", "steps", "epoch"]
    save_steps: int = 50
    beta: float = 0.1
    epochs: float = 3.0
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.01
    max_length: int = 512
    seed: int = 0
    max_steps: int = -1  # > 0 stops after that many optimizer steps (smoke runs); -1 = the epochs decide
    # Mirror checkpoints under the artifact root (``checkpoints/<run key>``) so a retry on another machine
    # resumes; off, they stay under $MIDPO_HOME/checkpoints. Where checkpoints go never changes a result.
    sync_checkpoints: bool = False
    parallel: int = 2  # baselines trained at once, each in its own child process
    logging_steps: int = 10  # a point of the training curves every N optimizer steps
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Methods trained beyond the two experts (midpo-method.md baselines; `midpo compare` asks for all).
    baselines: list[str] = field(default_factory=list)
    methods: dict[str, MethodOverrides] = field(default_factory=dict)  # per-method overrides, by method name
    # The processes training runs on, filled in from run.launch (not a profile setting): the effective batch
    # is per_device_batch_size x gradient_accumulation_steps x processes.
    processes: int = 1

    def for_method(self, name: str) -> TrainingConfig:
        """The training config of method ``name``: its overrides applied, the per-method tables dropped
        (so a method's version depends on its own settings only)."""
        o = self.methods.get(name, MethodOverrides())
        changes = {k: v for k in ("learning_rate", "beta", "epochs") if (v := getattr(o, k)) is not None}
        return dataclasses.replace(self, **changes, baselines=[], methods={})

    RUNTIME_FIELDS = ("sync_checkpoints", "parallel", "logging_steps")  # where and how a run trains, never what it learns

    def recipe(self) -> dict[str, Any]:
        """The fields that decide what training learns (versions and run claims hash these). One process
        is left out, so versions trained before launches existed keep their keys."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RUNTIME_FIELDS and (k, v) != ("processes", 1)}

    def loss_params(self, name: str) -> dict[str, float]:
        return dict(self.methods[name].loss_params) if name in self.methods else {}

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if min(self.per_device_batch_size, self.gradient_accumulation_steps, self.parallel, self.processes) < 1:
            raise ValueError("per_device_batch_size, gradient_accumulation_steps, parallel and processes must be >= 1")
        from midpo.train.methods import check_names

        check_names([*self.baselines, *self.methods])


@dataclass
class BaseConfig:
    """The base policy: trained from scratch on the world (``tiny``) or an existing model (``model``)."""

    tiny: TinyBaseConfig | None = None
    model: str | None = None  # a hub id, local folder, s3:// URI, .gguf file, or `smollm2`

    def __post_init__(self) -> None:
        if (self.tiny is None) == (self.model is None):
            raise ValueError("set exactly one of base.tiny (train a tiny model) and base.model (load one)")


@dataclass
class JudgesConfig:
    """The judges: reward and cost score models (SPE-DPO margins, evaluation) and the refusal classifier."""

    reward: ScoreConfig = field(default_factory=default_reward_config)
    cost: ScoreConfig = field(default_factory=default_cost_config)
    refusal: RefusalConfig | None = field(default_factory=RefusalConfig)  # null: no learned refusal judge
    # score models trained at once, each in a child process with its share of the cores (never changes a model);
    # 1: one after another in-process with every core, faster when one model dominates (the tiny reward model)
    parallel: int = 1

    def __post_init__(self) -> None:
        if self.parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {self.parallel}")


@dataclass
class EvalConfig:
    """The evaluation protocol: which sets, how many prompts and samples, how to decode."""

    sets: list[str] = field(default_factory=lambda: ["world-harmful", "world-borderline", "world-benign"])
    n_per_set: int = 240
    samples_per_prompt: int = 4
    temperature: float = 1.0
    greedy: bool = True  # also decode greedily and report x_greedy beside the sampled figures
    max_new_tokens: int = 48
    batch_size: int = 128
    seed: int = 0
    n_boot: int = 1000
    parallel: int = 2  # models evaluated at once, each in its own child process (never changes a figure)

    RUNTIME_FIELDS = ("parallel",)

    def protocol(self) -> dict[str, Any]:
        """What an evaluation's figures depend on: the config minus where and how it runs."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RUNTIME_FIELDS}

    def __post_init__(self) -> None:
        if self.n_per_set < 1 or self.samples_per_prompt < 1 or self.max_new_tokens < 1 or self.parallel < 1:
            raise ValueError("n_per_set, samples_per_prompt, max_new_tokens and parallel must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive (greedy figures come from `greedy`), got {self.temperature}")


# The stages that may run on several processes under `accelerate launch` (run.launch): those that train.
LAUNCHABLE = ("safety-expert", "helpfulness-expert", "baselines", "router")


@dataclass
class LaunchConfig:
    """Run the training stages on several processes (one per GPU) under ``accelerate launch`` (midpo.launch).

    ``config_file`` is an accelerate config (``infra/accelerate/deepspeed_zero3.yaml``, ``fsdp.yaml``; a
    relative path is read from the working directory). A launched stage holds ``num_processes`` slots of
    the ``gpu`` limit (null: one per visible GPU), so with as many processes as GPUs it runs alone.
    """

    config_file: str
    num_processes: int | None = None
    stages: list[str] = field(default_factory=lambda: list(LAUNCHABLE))

    def __post_init__(self) -> None:
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
        unknown = [s for s in self.stages if s not in LAUNCHABLE]
        if unknown:
            raise ValueError(f"stage {unknown[0]!r} cannot be launched on several processes (only: {', '.join(LAUNCHABLE)})")


@dataclass
class RunConfig:
    """Pipeline-level settings: per-stage time budgets (seconds) and the MLflow experiment."""

    experiment: str = "midpo"
    stage_budgets: dict[str, float] = field(default_factory=dict)
    budget: float | None = None  # seconds for the whole run (wall); exceeding it or a stage's budget is reported, never fatal
    # Intra-op threads of torch (null: one per core this process may run on). Jobs run in parallel child
    # processes split them (midpo.parallel); the tiny world trains 1.5x faster on 2 threads than on 1.
    torch_threads: int | None = None
    # Stages that run a model at once under `midpo run` (the `gpu` concurrency limit of its own Prefect API;
    # null: one per visible GPU, 1 without one). A deployed flow uses its server's limit (`midpo stack up`).
    gpu_slots: int | None = None
    launch: LaunchConfig | None = None  # null: every stage in one process

    def __post_init__(self) -> None:
        if self.gpu_slots is not None and self.gpu_slots < 1:
            raise ValueError(f"gpu_slots must be >= 1, got {self.gpu_slots}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")


@dataclass
class RouterConfig:
    """MidPO stage 2: the router's pairs (D_dual, midpo.moe.dual) and its gates over the frozen experts.

    ``training`` holds the optimizer settings (its ``lora`` and per-method tables do not apply: only the
    gates train). The reference is the base, through the shared reference log-probs.
    """

    training: TrainingConfig
    dual_rule: Literal["label", "label+safety", "reward", "reward+safety"] = "label+safety"
    reward_choice: Literal["higher-reward", "lower-cost"] = "higher-reward"  # the reward rules' chosen response
    gate: GateConfig = field(default_factory=GateConfig)
    reg_weight: float = 1.0  # weight of mean(alpha) + mean(1 - beta)

    def __post_init__(self) -> None:
        if self.reg_weight < 0:
            raise ValueError(f"reg_weight must be >= 0, got {self.reg_weight}")


@dataclass
class RegistryConfig:
    """Where each pipeline run's MidPO model goes in the MLflow model registry (interfaces.md)."""

    model_name: str = "midpo"
    alias: str = "challenger"  # the latest candidate; promotion moves `champion`
    # The promotion gate's sets (eval set names; null: the profile's eval.sets), each cut to eval.n_per_set
    # prompts and versioned by their content (docs/lifecycle.md). Another gate set re-evaluates the champion.
    gate_sets: list[str] | None = None

    def __post_init__(self) -> None:
        if not self.model_name or not self.alias:
            raise ValueError("registry.model_name and registry.alias must be non-empty")


@dataclass
class MidpoConfig:
    """A whole profile. Sections map one-to-one onto pipeline stages."""

    profile: str
    data: DataConfig
    training: TrainingConfig
    world: WorldConfig | None = None  # the synthetic world (tiny profiles); absent for real data
    base: BaseConfig | None = None
    judges: JudgesConfig | None = None
    router: RouterConfig | None = None
    eval: EvalConfig | None = None
    registry: RegistryConfig | None = None
    run: RunConfig = field(default_factory=RunConfig)
    description: str = ""

    def __post_init__(self) -> None:
        launched = set(self.run.launch.stages) if self.run.launch is not None else set()
        together = {"safety-expert", "helpfulness-expert", *(["baselines"] if self.training.baselines else [])}
        if launched & together and not together <= launched:
            # the process count is part of the effective batch: methods compared side by side share it, and
            # merge-half reuses the experts by version
            raise ValueError(f"run.launch.stages: launch {', '.join(sorted(together))} together or none of them "
                             f"(launched: {', '.join(sorted(launched & together))})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------------
# Loading


def profile_path(profile: str) -> Path:
    """``tiny`` -> the shipped ``configs/tiny.yaml``; anything ending in .yaml/.yml is a file path."""
    if profile.endswith((".yaml", ".yml")):
        path = Path(profile)
        if not path.is_file():
            raise ConfigError(f"{profile}: profile file not found")
        return path
    path = Path(str(importlib.resources.files("midpo_configs").joinpath(f"{profile}.yaml")))
    if not path.is_file():
        raise ConfigError(f"unknown profile {profile!r}: choose one of {', '.join(available_profiles())} or pass a .yaml file")
    return path


def available_profiles() -> list[str]:
    root = importlib.resources.files("midpo_configs")
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_config(profile: str = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> MidpoConfig:
    """Load a profile and apply ``key.path=value`` overrides (values parsed as YAML)."""
    path = profile_path(profile)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a profile must be a mapping of sections")
    raw = json.loads(json.dumps(raw))  # YAML anchors alias one object: an override must change one place only
    raw.setdefault("profile", path.stem)
    for item in overrides:
        _apply_override(raw, item)
    origin = str(path) + (" (with --set " + ", ".join(overrides) + ")" if overrides else "")
    return _build(MidpoConfig, raw, "", origin)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    *parents, last = key.split(".")
    node: Any = raw
    for part in parents:
        node = _child(node, part, key)
    parsed = yaml.safe_load(value) if value != "" else ""
    if isinstance(node, list):
        node[_index(node, last, key)] = parsed
    else:
        node[last] = parsed


def _child(node: Any, part: str, key: str) -> Any:
    """The section (or list item) ``part`` of ``node``, created when a mapping lacks it."""
    if isinstance(node, list):
        return node[_index(node, part, key)]
    if not isinstance(node, dict):
        raise ConfigError(f"--set {key}: {part!r} is inside a value, not a section")
    return node.setdefault(part, {})


def _index(node: list[Any], part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {key}: {part!r} is not an index of a list of {len(node)}")
    return int(part)


def _build(tp: Any, value: Any, key: str, origin: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise ConfigError naming ``key`` and ``origin``."""
    where = f"{origin}: {key or '<root>'}"
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise ConfigError(f"{origin}: unknown key {_join(key, unknown[0])} (known: {', '.join(fields)})")
        kwargs = {}
        for name, f in fields.items():
            if name in value:
                kwargs[name] = _build(hints[name], value[name], _join(key, name), origin)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{origin}: missing key {_join(key, name)}")
        try:
            return tp(**kwargs)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}: {e}") from None
    origin_tp, args = get_origin(tp), get_args(tp)
    if origin_tp in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _build(inner, value, key, origin)
    if origin_tp is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin_tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_build(args[0], v, f"{key}[{i}]", origin) for i, v in enumerate(value)]
    if origin_tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return {_build(args[0], k, key, origin): _build(args[1], v, _join(key, str(k)), origin) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 2e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is Any or (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
