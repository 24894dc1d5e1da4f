"""MidpoDPOTrainer on pinned trl 1.16 with a tiny random Llama (hidden 32, 2 layers) and a world tokenizer.

Each override of a private TRL method is covered here: the loss's columns survive both drop points and
reach the loss (and never ``model.forward``), supplied reference columns pass through untouched, the
reference table equals the policy's log-probs at step 0, only LoRA matrices train, and a run SIGKILLed
after its first checkpoint resumes without redoing steps and ends where an uninterrupted run ends.
"""

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from midpo.config import LoraConfig, TrainingConfig
from midpo.eval.forcing import response_logprobs
from midpo.models.load import load_model
from midpo.models.tiny import BASE_META, TinyBaseConfig, build_tiny_model
from midpo.models.tokenizer import train_world_tokenizer
from midpo.train.losses import LOSS_COLUMNS
from midpo.train.refs import (
    REF_COLUMNS,
    attach_reference,
    ensure_fused_head,
    load_reference_table,
    reference_table,
    save_reference_table,
    sequence_logps,
    tokenize_pair,
)
from midpo.train.trainer import (
    ADAPTER_META,
    MidpoDPOTrainer,
    dpo_config,
    last_checkpoint,
    peft_lora_config,
    preference_dataset,
    train_adapter,
)

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]

CAPITALS = {"france": "paris", "spain": "madrid", "italy": "rome", "japan": "tokyo", "egypt": "cairo", "peru": "lima"}
REFUSAL = "sorry , i can not help with that ."


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Preference rows as load_subset gives them, plus every per-pair column a loss may read."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        c = rng.choice(sorted(CAPITALS))
        good = f"the capital of {c} is {CAPITALS[c]} ."
        bad = rng.choice([REFUSAL, f"the capital of {c} is {rng.choice(sorted(CAPITALS.values()))} . or so i heard ."])
        context = [{"role": "user", "content": "quick question ."}, {"role": "assistant", "content": "ok ."}] if i % 3 == 0 else []
        rows.append(
            {
                "pair_id": f"pair-{i:03d}",
                "prompt": f"what is the capital of {c} ?",
                "context": context,
                "chosen": good,
                "rejected": bad,
                "chosen_index": rng.randint(0, 1),
                "prompt_kind": "benign",
                "margin": rng.uniform(-1.0, 1.0),
                "chosen_unsafe": 0.0,
                "rejected_unsafe": float(rng.random() < 0.5),
                "chosen_cost": rng.uniform(-1, 1),
                "rejected_cost": rng.uniform(-1, 1),
            }
        )
    return rows


def tcfg(**kw) -> TrainingConfig:
    base = dict(learning_rate=1e-3, bf16=False, gradient_checkpointing=False, save_strategy="no", epochs=1.0, per_device_batch_size=4, warmup_ratio=0.0, max_length=64)
    return TrainingConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A random tiny Llama + world tokenizer saved as a model folder that load_model reads."""
    rows = make_rows(40)
    texts = [t for r in rows for t in (r["prompt"], r["chosen"], r["rejected"])] + ["quick question . ok ."]
    tok = train_world_tokenizer(texts)
    cfg = TinyBaseConfig(hidden_size=32, num_layers=2, intermediate_size=64, num_heads=2, max_position=64, max_length=64)
    model = build_tiny_model(cfg, tok)
    out = tmp_path_factory.mktemp("base")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / BASE_META).write_text(json.dumps({"template": "world", "config": {"hidden_size": 32}}))
    return out


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return make_rows(24)


@pytest.fixture(scope="module")
def table(base, rows):
    """The reference table, computed in batches of 7 responses (the trainer batches 2 x 4 rows)."""
    model, tok, template = load_model(base)
    return reference_table(model, tok, template, rows, max_length=64, batch_size=7)


def make_trainer(base, rows, tmp_path, loss_name="spe_dpo", columns=None, hook=None, **overrides):
    model, tok, template = load_model(base)
    if hook is not None:
        model.model.register_forward_pre_hook(hook, with_kwargs=True)  # the Llama backbone
    cfg = tcfg()
    columns = (*REF_COLUMNS, *LOSS_COLUMNS[loss_name]) if columns is None else columns
    args = dpo_config(cfg, tmp_path / "ckpt", **{"max_steps": 1, "logging_steps": 1, "save_strategy": "no", **overrides})
    return MidpoDPOTrainer(model, args, preference_dataset(rows, template, columns), tok, loss_name=loss_name, peft_config=peft_lora_config(cfg.lora))


def test_reference_table_equals_policy_logps_at_step_zero(base, rows, table, tmp_path):
    """Fresh LoRA (B = 0): the trainer's policy pass reproduces the reference.

    Bit for bit when the base sees the same padded batch (same tokenization, span, truncation and
    summation; PEFT with B = 0 adds an exact zero). Against the table, which was computed in other
    batches (7 single responses, padded to their own width), to float32 rounding: CPU kernels round
    differently for different padding widths, a few ulps of a ~50-nat sum.
    """
    assert len(table) == 2 * len(rows) and set(table["response_index"]) == {0, 1}
    trainer = make_trainer(base, attach_reference(rows, table), tmp_path)
    reference_model = ensure_fused_head(load_model(base)[0])
    seen, worst = 0, 0.0
    for batch in trainer.get_train_dataloader():
        with torch.no_grad():
            trainer.policy_chunks = 1  # TRL's single padded batch: bit for bit
            policy = trainer.policy_logps(trainer.model, batch)
            trainer.policy_chunks = 4  # length-sorted sub-batches: other padding widths, float rounding only
            chunked = trainer.policy_logps(trainer.model, batch)
            same_batch = sequence_logps(reference_model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        assert torch.equal(torch.cat([policy.chosen, policy.rejected]), same_batch)
        torch.testing.assert_close(torch.cat([chunked.chosen, chunked.rejected]), same_batch, rtol=0, atol=1e-4)
        table_values = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
        torch.testing.assert_close(same_batch, table_values, rtol=0, atol=1e-4)
        worst = max(worst, (same_batch - table_values).abs().max().item())
        seen += len(policy.chosen)
    assert seen == len(rows) and worst < 1e-4
    # The table's tokenization is TRL's: completion lengths equal the trainer's tokenized rows.
    n_tokens = {(r["pair_id"], r["response_index"]): r["n_tokens"] for r in table}
    for ex in trainer.train_dataset:
        ci = ex["chosen_index"]
        assert n_tokens[(ex["pair_id"], ci)] == len(ex["chosen_ids"]) and n_tokens[(ex["pair_id"], 1 - ci)] == len(ex["rejected_ids"])


def test_reference_table_agrees_with_teacher_forcing(base, rows, table):
    """An independent implementation (full-logit log_softmax, midpo.eval.forcing) gives the same sums,
    so neither is off by one token (a known defect of the official code)."""
    model, tok, template = load_model(base)
    by_key = {(r["pair_id"], r["response_index"]): r["logp"] for r in table}
    plain = [r for r in rows if not r["context"]][:6]  # forcing renders prompts without context
    forced = response_logprobs(model, tok, template, [r["prompt"] for r in plain for _ in (0, 1)], [t for r in plain for t in (r["chosen"], r["rejected"])])
    expected = [by_key[(r["pair_id"], k)] for r in plain for k in (r["chosen_index"], 1 - r["chosen_index"])]
    assert forced == pytest.approx(expected, abs=1e-4)


def test_reference_join_is_by_pair_and_index_not_position(rows, table, tmp_path):
    folder = save_reference_table(table, tmp_path / "refs", {"base": "b1", "data": "d1", "max_length": 64})
    loaded, meta = load_reference_table(folder, expect={"max_length": 64})
    assert meta["rows"] == len(table) and loaded["logp"] == table["logp"]
    with pytest.raises(ValueError, match="max_length"):
        load_reference_table(folder, expect={"max_length": 128})
    shuffled = list(reversed(rows[:5]))
    joined = attach_reference(shuffled, loaded.shuffle(seed=1))
    key = {(r["pair_id"], r["response_index"]): r["logp"] for r in table}
    for r in joined:
        assert r["ref_chosen_logps"] == key[(r["pair_id"], r["chosen_index"])]
        assert r["ref_rejected_logps"] == key[(r["pair_id"], 1 - r["chosen_index"])]
    swapped = {**rows[0], "chosen": rows[0]["rejected"], "rejected": rows[0]["chosen"], "chosen_index": 1 - rows[0]["chosen_index"]}
    (s,) = attach_reference([swapped], loaded)
    (o,) = attach_reference([rows[0]], loaded)
    assert (s["ref_chosen_logps"], s["ref_rejected_logps"]) == (o["ref_rejected_logps"], o["ref_chosen_logps"])
    with pytest.raises(KeyError, match="1 pair"):
        attach_reference([{**rows[0], "pair_id": "unknown"}], loaded)


def test_margin_column_reaches_the_loss_and_not_the_model(base, rows, table, tmp_path):
    """At step 0 policy == reference, so h = 0 and the SPE-DPO loss is -log σ(-max(0, m)):
    m = 0 gives log 2 = 0.693147; m = 50 gives log(1 + e^50) = 50.0. A dropped column cannot pass."""
    seen_keys: set[str] = set()

    def hook(module, args, kwargs):
        seen_keys.update(kwargs)

    losses = {}
    for m in (0.0, 50.0):
        data = [{**r, "margin": m} for r in attach_reference(rows, table)]
        trainer = make_trainer(base, data, tmp_path / str(m), hook=hook)
        trainer.train()
        first = trainer.state.log_history[0]
        losses[m] = first["loss"]
        assert first["spe/margin"] == pytest.approx(m)
        assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"} <= set(first)
    assert losses[0.0] == pytest.approx(math.log(2), abs=1e-5)
    assert losses[50.0] == pytest.approx(50.0, abs=1e-4)
    assert seen_keys and not seen_keys & {"margin", *REF_COLUMNS, "completion_mask"}, seen_keys


def test_supplied_reference_columns_pass_through_untouched(base, rows, table, tmp_path):
    """Shift every supplied reference value: the dataset keeps them exactly (no TRL recompute, no
    'duplicated columns'), and the step-0 rewards are β (π - ref) = 0.1 · (-3) = -0.3 and 0.1 · (+2) = +0.2."""
    data = [{**r, "ref_chosen_logps": r["ref_chosen_logps"] + 3.0, "ref_rejected_logps": r["ref_rejected_logps"] - 2.0} for r in attach_reference(rows, table)]
    trainer = make_trainer(base, data, tmp_path, loss_name="dpo")
    supplied = {r["pair_id"]: (r["ref_chosen_logps"], r["ref_rejected_logps"]) for r in data}
    for ex in trainer.train_dataset:
        assert (ex["ref_chosen_logps"], ex["ref_rejected_logps"]) == supplied[ex["pair_id"]]
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["rewards/chosen"] == pytest.approx(-0.3, abs=1e-5) and first["rewards/rejected"] == pytest.approx(0.2, abs=1e-5)


def test_without_columns_trl_computes_the_same_reference(base, rows, table, tmp_path):
    """The fallback (no columns: TRL's precompute with the adapter disabled) strips the margin before
    the model and gives the table's values."""
    seen_keys: set[str] = set()
    trainer = make_trainer(base, rows, tmp_path, columns=("margin",), hook=lambda m, a, kw: seen_keys.update(kw))
    key = {(r["pair_id"], r["response_index"]): r["logp"] for r in table}
    for ex in trainer.train_dataset:
        ci = ex["chosen_index"]
        assert ex["ref_chosen_logps"] == pytest.approx(key[(ex["pair_id"], ci)], abs=1e-5)
        assert ex["ref_rejected_logps"] == pytest.approx(key[(ex["pair_id"], 1 - ci)], abs=1e-5)
    assert seen_keys and "margin" not in seen_keys


def test_only_lora_parameters_train(base, rows, table, tmp_path):
    trainer = make_trainer(base, attach_reference(rows, table), tmp_path, loss_name="dpo", max_steps=2)
    names = trainer.trainable_parameter_names()
    assert names == sorted(f"base_model.model.model.layers.{i}.mlp.down_proj.lora_{ab}.default.weight" for i in (0, 1) for ab in "AB")
    peft_cfg = trainer.model.peft_config["default"]
    assert (peft_cfg.r, peft_cfg.lora_alpha, peft_cfg.lora_dropout, set(peft_cfg.target_modules)) == (16, 32, 0.0, {"down_proj"})
    assert not trainer.model.get_output_embeddings().weight.requires_grad
    assert sum(p.numel() for p in trainer.model.parameters() if p.requires_grad) == 2 * 16 * (64 + 32)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    lora_b = trainer.model.base_model.model.model.layers[0].mlp.down_proj.lora_B["default"].weight
    assert torch.count_nonzero(lora_b) == 0
    trainer.train()
    assert torch.count_nonzero(lora_b) > 0
    assert all(torch.equal(p, frozen[n]) for n, p in trainer.model.named_parameters() if n in frozen)


def test_every_loss_trains_one_step(base, rows, table, tmp_path):
    data = attach_reference(rows, table)
    for name in LOSS_COLUMNS:
        trainer = make_trainer(base, data, tmp_path / name, loss_name=name)
        trainer.train()
        assert math.isfinite(trainer.state.log_history[0]["loss"]), name
    bfpo = make_trainer(base, data, tmp_path / "bfpo-beta", loss_name="bfpo")
    assert bfpo.beta == 0.01 and bfpo.args.beta == 0.1


def test_misuse_is_an_error(base, rows, table, tmp_path):
    from peft import get_peft_model

    data = attach_reference(rows, table)
    with pytest.raises(ValueError, match="margin"):
        make_trainer(base, data, tmp_path, loss_name="spe_dpo", columns=REF_COLUMNS)
    model, tok, template = load_model(base)
    args = dpo_config(tcfg(), tmp_path / "x", max_steps=1)
    with pytest.raises(ValueError, match="plain base model"):
        MidpoDPOTrainer(get_peft_model(model, peft_lora_config(LoraConfig())), args, preference_dataset(data, template, REF_COLUMNS), tok, peft_config=peft_lora_config(LoraConfig()))
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        train_adapter(base, rows, "dpo", tcfg(), tmp_path / "out", checkpoint_dir=tmp_path / "ck")


def test_train_adapter_scores_eval_rows_and_guards_its_checkpoint_dir(base, rows, table, tmp_path):
    data = attach_reference(rows, table)
    ckpt = tmp_path / "ckpt"
    metrics = train_adapter(base, data[:16], "dpo", tcfg(), tmp_path / "out", checkpoint_dir=ckpt, eval_rows=data[16:], config_overrides={"max_steps": 2})
    assert metrics["steps"] == 2.0 and 0.0 <= metrics["eval_rewards/accuracies"] <= 1.0 and math.isfinite(metrics["eval_loss"])
    assert json.loads((ckpt / "midpo_run.json").read_text())["loss"] == "dpo"
    with pytest.raises(ValueError, match="another run .*loss"):
        train_adapter(base, data[:16], "spe_dpo", tcfg(), tmp_path / "out2", checkpoint_dir=ckpt, config_overrides={"max_steps": 2})


class _OutOfMemoryAbove(TrainerCallback):
    """An injected CUDA out-of-memory: any step whose micro-batch is above ``limit`` rows fails like one."""

    def __init__(self, limit):
        self.limit, self.seen = limit, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.seen.append((args.per_device_train_batch_size, args.gradient_accumulation_steps))
        if args.per_device_train_batch_size > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")


def test_out_of_memory_retries_with_a_smaller_micro_batch_and_the_same_effective_batch(base, rows, table, tmp_path):
    data = attach_reference(rows, table)[:16]
    oom = _OutOfMemoryAbove(limit=1)
    metrics = train_adapter(base, data, "dpo", tcfg(per_device_batch_size=4), tmp_path / "out", checkpoint_dir=tmp_path / "ckpt",
                            callbacks=[oom], config_overrides={"max_steps": 2})
    assert [s for s in dict.fromkeys(oom.seen)] == [(4, 1), (2, 2), (1, 4)]  # halved twice, effective batch 4 throughout
    assert metrics["oom_retries"] == 2 and metrics["micro_batch"] == 1 and metrics["gradient_accumulation"] == 4
    assert metrics["steps"] == 2 and metrics["pairs"] == 16
    plain = train_adapter(base, data, "dpo", tcfg(per_device_batch_size=4), tmp_path / "out2", checkpoint_dir=tmp_path / "ckpt2",
                          config_overrides={"max_steps": 2})
    assert metrics["final_loss"] == pytest.approx(plain["final_loss"], rel=1e-4)  # the same optimisation, split finer
    with pytest.raises(torch.OutOfMemoryError):  # an odd micro-batch cannot be halved into the same effective batch
        train_adapter(base, data, "dpo", tcfg(per_device_batch_size=3), tmp_path / "out3", checkpoint_dir=tmp_path / "ckpt3",
                      callbacks=[_OutOfMemoryAbove(limit=1)], config_overrides={"max_steps": 1})


def test_dpo_config_writes_out_trl_defaults(tmp_path):
    cfg = tcfg(learning_rate=5e-4, save_strategy="steps", save_steps=7, gradient_accumulation_steps=2)
    args = dpo_config(cfg, tmp_path, report_to=["mlflow"])
    assert (args.learning_rate, args.bf16, args.gradient_checkpointing, args.save_strategy, args.save_steps) == (5e-4, False, False, "steps", 7)
    assert args.precompute_ref_log_probs and args.beta == 0.1 and args.report_to == ["mlflow"] and args.gradient_accumulation_steps == 2
    assert dpo_config(cfg, tmp_path).report_to in ([], "none", ["none"])


def test_last_checkpoint_skips_partial_folders(tmp_path):
    assert last_checkpoint(tmp_path / "missing") is None
    for step, complete in ((3, True), (6, True), (9, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-6")


KILLED_RUN = textwrap.dedent(
    """
    import json, sys, time
    import torch
    torch.set_num_threads(1)
    from transformers import TrainerCallback
    from midpo.config import TrainingConfig
    from midpo.train.trainer import train_adapter

    spec = json.loads(open(sys.argv[1]).read())

    class HangAfterFirstSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            open(spec["marker"], "w").write(str(state.global_step))
            time.sleep(600)  # the parent SIGKILLs us here

    train_adapter(spec["base"], spec["rows"], "spe_dpo", TrainingConfig(**spec["cfg"]), spec["out"],
                  checkpoint_dir=spec["ckpt"], callbacks=[HangAfterFirstSave()])
    """
)


def test_resume_after_sigkill_continues_from_the_checkpoint(base, table, tmp_path):
    """10 steps (20 pairs, batch 2), checkpoints every 3. A subprocess hangs right after checkpoint-3 and
    is SIGKILLed; the restart resumes at step 4, ends at step 10, and equals an uninterrupted run."""
    rows = attach_reference(make_rows(20, seed=1), reference_table(*load_model(base), make_rows(20, seed=1), max_length=64))
    cfg = dict(learning_rate=1e-3, bf16=False, gradient_checkpointing=False, save_strategy="steps", save_steps=3, epochs=1.0, per_device_batch_size=2, warmup_ratio=0.0, max_length=64)
    ckpt, out = tmp_path / "ckpt", tmp_path / "adapter"
    spec = {"base": str(base), "rows": rows, "cfg": cfg, "out": str(out), "ckpt": str(ckpt), "marker": str(tmp_path / "saved")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "run.py").write_text(KILLED_RUN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "spec.json")], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "saved").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / "saved").read_text() == "3"
    assert last_checkpoint(ckpt) == str(ckpt / "checkpoint-3") and not out.exists()

    class StepRecorder(TrainerCallback):
        def __init__(self):
            self.steps: list[int] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

    recorder = StepRecorder()
    metrics = train_adapter(base, rows, "spe_dpo", TrainingConfig(**cfg), out, checkpoint_dir=ckpt, callbacks=[recorder])
    assert recorder.steps == list(range(4, 11))  # nothing before the checkpoint is redone
    assert (metrics["resumed_from_step"], metrics["steps"]) == (3.0, 10.0)

    # The same run without interruption ends at the same step with the same adapter, bit for bit.
    again = train_adapter(base, rows, "spe_dpo", TrainingConfig(**cfg), tmp_path / "adapter2", checkpoint_dir=tmp_path / "ckpt2")
    assert (again["resumed_from_step"], again["steps"]) == (0.0, 10.0)
    a, b = load_file(out / "adapter_model.safetensors"), load_file(tmp_path / "adapter2" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # The saved adapter: PEFT format plus midpo_adapter.json (config, data version, hyperparameters).
    assert {"adapter_config.json", "adapter_model.safetensors", ADAPTER_META, "log_history.json"} <= {p.name for p in out.iterdir()}
    meta = json.loads((out / ADAPTER_META).read_text())
    assert meta["loss"] == "spe_dpo" and meta["beta"] == 0.1 and meta["training"]["save_steps"] == 3
    assert meta["training"]["lora"] == {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["down_proj"]}
    assert len(meta["data_version"]) == 16 and meta["data_rule"] == {"kept": 20} and meta["base"]["meta"]["template"] == "world"
    assert meta["metrics"]["steps"] == 10.0 and meta["metrics"]["trainable_params"] == 2 * 16 * (64 + 32)

    from peft import PeftModel

    model, tok, template = load_model(base)
    peft_model = PeftModel.from_pretrained(model, out)
    r = rows[0]
    trained = response_logprobs(peft_model, tok, template, [r["prompt"]], [r["chosen"]])[0]
    with peft_model.disable_adapter():
        plain = response_logprobs(peft_model, tok, template, [r["prompt"]], [r["chosen"]])[0]
    assert trained != plain


def test_tokenize_pair_matches_trl_split(base):
    _, tok, template = load_model(base)
    prompt = template.render_prompt("what is the capital of peru ?")
    prompt_ids, (c0, c1) = tokenize_pair(tok, prompt, (template.render_completion("lima ."), template.render_completion(REFUSAL)))
    assert prompt_ids == tok(prompt)["input_ids"]
    assert c0 == tok(prompt + template.render_completion("lima ."))["input_ids"][len(prompt_ids) :]
    assert c1[-1] == tok.eos_token_id and c0[-1] == tok.eos_token_id
