"""``midpo bench experts`` on tiny-ci with a few pairs: the report's last line, the JSON's fields, and the
helpers our side's one-time passes use. No timing assertions (the numbers are docs/benchmarks.md's)."""

import json
import math
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
try:
    from midpo_bench import experts
except ModuleNotFoundError:  # until pyproject.toml maps bench/ to midpo_bench
    sys.path.insert(0, str(ROOT))
    from bench import experts

RESULT = re.compile(r"^RESULT spe_vs_trl_throughput=[0-9.]+ experts_vs_two_stock_runs=[0-9.]+$")
RUN_FIELDS = {"pairs", "steps", "setup_seconds", "train_seconds", "total_seconds", "pairs_per_second", "mean_loss"}


def test_bench_experts_on_tiny_ci(tmp_path, capsys):
    out = tmp_path / "bench" / "experts.json"
    assert experts.main(["--profile", "tiny-ci", "--max-pairs", "16", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert RESULT.match(lines[-1]), lines[-1]

    result = json.loads(out.read_text())
    assert result["profile"] == "tiny-ci" and result["max_pairs"] == 16
    assert result["pairs"]["safety"] == result["pairs"]["helpfulness"] == 16
    assert 16 <= result["pairs"]["reference_table"] <= 32  # pairs of both subsets, each once
    t, x = result["throughput"], result["experts"]
    for side in ("ours", "stock"):
        assert set(t[side]) == RUN_FIELDS
        assert t[side]["pairs"] == 16 and t[side]["steps"] == 2  # tiny-ci: batch 8, one epoch
        assert set(x[side]["safety"]) == set(x[side]["helpfulness"]) == RUN_FIELDS
        assert x[side]["total_seconds"] > 0
    assert t["ours"] == x["ours"]["safety"] and t["stock"] == x["stock"]["safety"]  # the same runs
    assert {"reference_table_seconds", "margins_safety_seconds", "margins_helpfulness_seconds", "one_time_seconds"} <= set(x["ours"])
    assert t["ratio"] > 0 and x["ratio"] > 0
    assert math.isclose(t["ratio"], t["ours"]["pairs_per_second"] / t["stock"]["pairs_per_second"])
    assert math.isclose(x["ratio"], x["ours"]["total_seconds"] / x["stock"]["total_seconds"])
    assert lines[-1] == experts.result_line(result)
    assert t["target"] == 1.2 and x["target"] == 0.75 and isinstance(t["met"], bool) and isinstance(x["met"], bool)
    m = result["machine"]
    assert {"cpu_count", "usable_cores", "torch_threads", "torch_version", "device"} <= set(m)
    assert m["torch_threads"] == 1 and m["device"] == "cpu"  # tiny-ci's run.torch_threads, CPU torch

    # Our side's reference table in length-sorted chunks = the plain single call, up to batch-shape rounding.
    from midpo.config import load_config
    from midpo.models.load import load_model

    inputs = experts.prepare_inputs(load_config("tiny-ci"), max_pairs=16)  # cached by the run above
    model, tokenizer, template = load_model(inputs.base)
    rows = [r for e in experts.EXPERTS for r in inputs.rows[e]]
    tables = [experts.shared_reference_table(model, tokenizer, template, rows, max_length=128, batch_size=8, by_length=b) for b in (True, False)]
    sorted_, plain = ({(r["pair_id"], r["response_index"]): (r["logp"], r["n_tokens"]) for r in table} for table in tables)
    assert sorted_.keys() == plain.keys() and len(plain) == 2 * result["pairs"]["reference_table"]
    assert all(sorted_[k][1] == plain[k][1] and abs(sorted_[k][0] - plain[k][0]) < 1e-4 for k in plain)


class CountingScorer:
    """Scores a text by its length and records how many texts it was asked for."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def score(self, prompts, responses, contexts):
        self.calls.append(len(responses))
        return [float(len(p) + 10 * len(r) + len(c)) for p, r, c in zip(prompts, responses, contexts)]


def test_response_scores_score_each_text_once_and_key_by_response_index():
    rows = [
        {"pair_id": "a", "prompt": "p", "context": [], "chosen": "yes", "rejected": "no", "chosen_index": 1},
        {"pair_id": "b", "prompt": "p", "context": [], "chosen": "yes", "rejected": "nope", "chosen_index": 0},
        {"pair_id": "c", "prompt": "p", "context": [{"role": "user", "content": "x"}], "chosen": "yes", "rejected": "no", "chosen_index": 0},
    ]
    scorer = CountingScorer()
    scores, n_scored = experts.response_scores(scorer, rows)
    assert n_scored == scorer.calls[0] == 5  # (p, yes) and (p, no) repeat; a context makes another text
    by_key = {(s["pair_id"], s["response_index"]): s["score"] for s in scores}
    assert by_key == {("a", 1): 31.0, ("a", 0): 21.0, ("b", 0): 31.0, ("b", 1): 41.0, ("c", 0): 32.0, ("c", 1): 22.0}


def test_sample_and_projection():
    rows = [{"i": i} for i in range(10)]
    assert experts.sample(rows, None, 0) is rows and experts.sample(rows, 20, 0) is rows
    picked = experts.sample(rows, 4, 0)
    assert len(picked) == 4 and picked == sorted(picked, key=lambda r: r["i"]) and picked == experts.sample(rows, 4, 0)

    run = experts.RunTiming
    ours, stock = [run(10, 1, 1.0, 7.0, 0.0)], [run(10, 1, 1.0, 10.0, 0.0)]
    # ours = 6 + 1 + 7E, stock = 1 + 10E: equal at E = 2, 0.75x at (7 - 0.75) / (7.5 - 7) = 12.5 epochs
    assert experts.epochs_to_reach(1.0, 6.0, ours, stock, 1.0) == pytest.approx(2.0)
    assert experts.epochs_to_reach(0.75, 6.0, ours, stock, 1.0) == pytest.approx(12.5)
    assert experts.epochs_to_reach(0.5, 6.0, ours, stock, 1.0) is None  # 7 s/epoch never reaches 5


# --------------------------------------------------------------------------------------------------
# midpo bench moe

try:
    from midpo_bench import moe
except ModuleNotFoundError:
    from bench import moe

MOE_RESULT = re.compile(r"^RESULT moe_vs_merged_throughput=([0-9.]+) moe_vs_merged_memory=([0-9.]+)$")
MOE_SIDES = {"merged", "moe", "moe-official", *moe.PROTOTYPES}


def test_bench_moe_on_tiny_ci(tmp_path, capsys):
    out = tmp_path / "bench" / "moe.json"
    from midpo.cli import main

    argv = ["bench", "moe", "--profile", "tiny-ci", "--batch", "3", "--new-tokens", "5", "--rounds", "2", "--json", str(out)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    match = MOE_RESULT.match(lines[-1])
    assert match, lines[-1]

    result = json.loads(out.read_text())
    assert lines[-1] == moe.result_line(result)
    assert float(match[1]) == pytest.approx(result["throughput"]["ratio"], abs=1e-3)
    assert float(match[2]) == pytest.approx(result["memory"]["ratio"], abs=1e-3)
    assert result["profile"] == "tiny-ci" and result["experts_source"] == "pipeline"
    g = result["generation"]
    assert (g["batch"], g["new_tokens"], g["rounds"], g["tokens_per_generation"]) == (3, 5, 2, 15)
    assert g["greedy"] and g["kv_cache"] and g["device"] == "cpu" and g["prompt_tokens"] > 0
    assert result["model"]["layers"] == 2 and result["model"]["intermediate_size"] == 64  # tiny-ci's base

    sides = result["sides"]
    assert set(sides) == MOE_SIDES
    for name, s in sides.items():
        assert len(s["seconds"]) == len(s["cpu_seconds"]) == 2 and all(x > 0 for x in s["seconds"])
        assert s["tokens_per_second"] == pytest.approx(15 / s["median_seconds"])
        mem = s["memory"]
        assert mem["total_bytes"] == mem["weights_bytes"] + mem["generation_peak_bytes"] and mem["generation_peak_bytes"] > 0
        assert mem["ops"] > 0 and s["memory_vs_merged"] == pytest.approx(mem["total_bytes"] / sides["merged"]["memory"]["total_bytes"])
        if name in moe.PROTOTYPES:  # the prototypes compute the same function as the side they re-implement
            assert s["source"] in ("moe", "moe-official") and s["max_logit_difference_vs_source"] < 1e-4
    merged, ours = sides["merged"], sides["moe"]
    assert merged["throughput_vs_merged"] == 1.0 and merged["memory_vs_merged"] == 1.0
    # The MoE holds the merged side's weights plus two LoRAs and two gates per layer (d_ff = 64, r = 16, 2 layers).
    extra = 2 * (2 * (16 * 64 + 32 * 16) + 2 * (64 + 1)) * 4
    assert ours["memory"]["weights_bytes"] - merged["memory"]["weights_bytes"] == extra
    assert ours["parameters"] > merged["parameters"] and sides["moe-official"]["parameters"] > ours["parameters"]
    assert result["throughput"]["ratio"] == ours["throughput_vs_merged"] and result["memory"]["ratio"] == ours["memory_vs_merged"]
    assert result["throughput"]["target"] == 0.8 and result["memory"]["target"] == 1.15
    assert isinstance(result["throughput"]["met"], bool) and isinstance(result["memory"]["met"], bool)
    assert result["official"]["throughput_ratio"] == sides["moe-official"]["throughput_vs_merged"]
    assert {"down_proj (merged layer)", "moe layer (linear gate)", "proto-fused"} <= set(result["layer_microseconds"])
    m = result["machine"]
    assert m["torch_threads"] == 1 and m["device"] == "cpu"


def test_cpu_peak_allocated_follows_allocations_and_frees():
    import torch

    def work():
        a = torch.ones(1000)  # 4,000 bytes
        b = a + 1  # 8,000 alive
        del a
        c = b * 2  # a was freed first: still 8,000
        return c[:10]  # a view allocates nothing

    peak, ops = moe.cpu_peak_allocated(work)
    assert 8000 <= peak < 8100 and ops >= 4  # + a few bytes of scalar operands
    keep = torch.ones(500, 500)
    assert moe.cpu_peak_allocated(lambda: keep.T)[0] == 0


@pytest.mark.usefixtures("prefect_harness")
def test_bench_pipeline_on_tiny_ci(tmp_path, capsys):
    """Two flow runs on a fresh home: the first computes every stage, the rerun finds every one cached."""
    from midpo.cli import main
    from midpo.config import load_config
    from midpo.pipeline import stages_for

    out = tmp_path / "pipeline.json"
    assert main(["bench", "pipeline", "--profile", "tiny-ci", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.match(r"^RESULT orchestration_overhead=-?[0-9.]+ rerun_vs_first=[0-9.]+$", lines[-1]), lines[-1]
    result = json.loads(out.read_text())
    names = [s.name for s in stages_for(load_config("tiny-ci"))]
    assert list(result["first"]["stage_seconds"]) == names and result["rerun"]["cache_hits"] == names
    first = result["first"]
    assert first["stage_compute_seconds"] == pytest.approx(sum(first["stage_seconds"].values()), abs=0.01)
    assert result["orchestration_overhead"] == pytest.approx((first["wall_seconds"] - first["stage_compute_seconds"]) / first["wall_seconds"], abs=1e-3)
    assert 0 < result["rerun_vs_first"] < 1 and result["rerun"]["wall_seconds"] < first["wall_seconds"]
    assert set(result["met"]) == {"orchestration_overhead", "rerun_vs_first"}
