"""`midpo compare` on tiny-ci (2 seeds, a few methods, 3 training steps each): metrics.json averaged over
seeds with spreads and costs, the shared stages computed once, the Pareto plot's data, and report.md."""

import contextlib
import io
import json
import math
import statistics

import pytest
import torch

from midpo.cli import main
from midpo.compare import aggregate_seeds, pairs_seen, resolve_methods, seed_config
from midpo.config import ConfigError, load_config
from midpo.eval.report import pareto_data, pareto_front, plot_pareto
from midpo.storage import ArtifactStore

torch.set_num_threads(1)

METHODS = ["base", "safety-expert", "helpfulness-expert", "midpo", "merge-half", "dpo-mix"]
OVERRIDES = ["training.max_steps=3", 'training.save_strategy="no"', "router.training.max_steps=3", 'router.training.save_strategy="no"']


pytestmark = pytest.mark.shared_home  # one MIDPO_HOME (module_home) for the module


@pytest.fixture(scope="module")
def compared(module_home, tmp_path_factory):
    """`midpo compare` through the CLI: (report dir, metrics.json, stdout)."""
    report = tmp_path_factory.mktemp("compare") / "report"
    argv = ["compare", "--profile", "tiny-ci", *(a for o in OVERRIDES for a in ("--set", o)), "--methods", ",".join(METHODS), "--seeds", "2", "--report-dir", str(report)]
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setenv("MIDPO_HOME", str(module_home))
        mp.delenv("MIDPO_ARTIFACT_ROOT", raising=False)
        assert main(argv) == 0
    return report, json.loads((report / "metrics.json").read_text()), out.getvalue()


def test_metrics_are_seed_means_with_spreads(compared):
    report, m, out = compared
    assert [k for k in m if k not in ("judges", "run", "costs")] == METHODS
    assert f"report: {report}" in out
    cfg = load_config("tiny-ci").eval
    seeds = [json.loads((report / f"seed-{s}" / "metrics.json").read_text()) for s in range(2)]
    for method in METHODS:
        assert list(m[method]) == cfg.sets
        for name, metrics in m[method].items():
            assert metrics["n"] == cfg.n_per_set and metrics["samples_per_prompt"] == cfg.samples_per_prompt and metrics["judge"]
            per_seed = [s[method][name] for s in seeds]
            for key, value in metrics.items():
                if key.endswith(("_std", "_ci")) or not isinstance(value, float):
                    continue
                values = [p[key] for p in per_seed]
                assert value == pytest.approx(statistics.fmean(values)), (method, name, key)
                assert metrics[f"{key}_std"] == pytest.approx(statistics.stdev(values)), (method, name, key)
                if f"{key}_ci" in metrics:
                    assert metrics[f"{key}_ci"] == pytest.approx([statistics.fmean(p[f"{key}_ci"][i] for p in per_seed) for i in (0, 1)])
    assert set(m["judges"]) >= {"reward_pairwise_accuracy", "cost_sign_accuracy"}
    run = m["run"]
    assert run["profile"] == "tiny-ci" and len(run["dataset_version"]) == 16 and run["seeds"] == 2 and run["wall_seconds"] > 0
    assert [r["training_seed"] for r in run["per_seed"]] == [0, 1] and [r["eval_seed"] for r in run["per_seed"]] == [0, 1]


def test_costs_count_shared_stages_once(compared):
    _, m, _ = compared
    costs = m["costs"]
    assert set(costs) == {*METHODS, "shared"}
    for method in METHODS:
        assert {"train_seconds", "trainable_params", "pairs_seen"} <= set(costs[method])
    assert costs["base"]["train_seconds"] == costs["base"]["trainable_params"] == costs["base"]["pairs_seen"] == 0
    experts = [costs["safety-expert"], costs["helpfulness-expert"]]
    for c in (*experts, costs["dpo-mix"]):  # 3 steps of 8 pairs, fewer than one epoch of tiny-ci's pairs
        assert c["pairs_seen"] == 24 and c["trainable_params"] > 0 and c["train_seconds"] > 0
    for key in ("train_seconds", "trainable_params", "pairs_seen"):
        assert costs["merge-half"][key] == pytest.approx(sum(c[key] for c in experts))  # no training of its own
        assert costs["midpo"][key] > sum(c[key] for c in experts)  # + its router
    assert costs["midpo"]["pairs_seen"] == 72 and costs["midpo"]["includes"] == ["safety-expert", "helpfulness-expert", "router"]
    shared = costs["shared"]
    assert list(shared["seconds"]) == ["world", "data", "base", "refusal", "judges", "passes", "dual"]
    assert shared["cache_hits"] == []  # a fresh MIDPO_HOME: this comparison paid for them, once
    assert shared["seconds"]["base"] > 0 and shared["total_seconds"] == pytest.approx(sum(shared["seconds"].values()), abs=0.01)


def test_shared_stages_are_seed_independent(compared):
    _, m, _ = compared
    first, second = m["run"]["per_seed"]
    for run in (first, second):  # computed before the seeds ran, found by both
        assert {"world", "data", "base", "judges", "dual"} <= set(run["cache_hits"])
    assert "safety-expert" not in second["cache_hits"] and "router" not in second["cache_hits"] and "eval" not in second["cache_hits"]
    assert first["dataset_version"] == second["dataset_version"]


def test_pareto_plot_draws_the_metrics(compared, tmp_path):
    report, m, _ = compared
    data = pareto_data(m)
    assert data.x_label == "world-benign oracle_helpfulness" and data.y_label == "world-harmful oracle_safety_rate"
    for method in METHODS:
        x, y = m[method]["world-benign"]["oracle_helpfulness"], m[method]["world-harmful"]["oracle_safety_rate"]
        assert data.points[method] == (x, y)
        low, high = m[method]["world-harmful"]["oracle_safety_rate_ci"]
        assert data.errors[method][1] == pytest.approx((max(0.0, y - low), max(0.0, high - y)))
    assert data.front == pareto_front(data.points) and data.front
    drawn = plot_pareto(data, tmp_path / "pareto.png")
    assert {label.removesuffix(" (front)"): p for label, p in drawn["points"].items()} == data.points
    assert {label.removesuffix(" (front)") for label in drawn["points"] if label.endswith(" (front)")} == set(data.front)
    for name in ("pareto.png", "oracle.png", "gates-world-harmful.png", "gates-world-benign.png"):
        _assert_real_png(report / name)


def _assert_real_png(path):
    import matplotlib.image

    assert path.is_file() and path.stat().st_size > 10_000, path
    pixels = matplotlib.image.imread(str(path))
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300 and pixels[..., :3].std() > 0.05, path  # not blank


def test_report_has_tables_costs_samples_and_heatmap(compared):
    report, _, _ = compared
    md = (report / "report.md").read_text()
    for section in ("## Summary", "## Pareto front", "## Training cost", "## Per eval set", "## Sample generations", "## Gate heat-map", "## Seeds"):
        assert section in md
    summary = md.split("## Summary")[1].split("## Pareto front")[0]
    assert "world-harmful oracle_safety_rate" in summary and "world-benign oracle_helpfulness" in summary
    for method in METHODS:
        row = next(line for line in summary.splitlines() if line.startswith(f"| {method} |"))
        assert " ± " in row and "[" in row
    cost = md.split("## Training cost")[1].split("## Per eval set")[0]
    assert all(f"| {method} |" in cost for method in METHODS) and "Shared stages" in cost and "| judges |" in cost
    assert "![safety against helpfulness](pareto.png)" in md and "Pareto-optimal" in md
    assert "![gates on world-harmful](gates-world-harmful.png)" in md and "![gates on world-benign](gates-world-benign.png)" in md
    samples = md.split("## Sample generations")[1].split("## Gate heat-map")[0]
    assert samples.count("### world-harmful:") == 2 and all(f"| {method} |" in samples for method in METHODS)
    assert "(seed-1/report.md)" in md and (report / "seed-1" / "report.md").is_file()


def test_report_says_where_midpo_stands_and_why_the_union_conflicts(compared):
    """The standing table is the relation of the plotted means; the union counts match the subsets by hand."""
    from midpo.data.prepare import load_subset
    from midpo.eval.report import _relation

    report, m, _ = compared
    md = (report / "report.md").read_text()
    standing = md.split("## Where MidPO stands")[1].split("## Training cost")[0]
    data = pareto_data(m)
    me = data.points["midpo"]
    beaten = [k for k, p in data.points.items() if k != "midpo" and _relation(me, p) == "is dominated by"]
    assert ("not Pareto-dominated by any method" in standing) == (not beaten)
    for method in METHODS[:3] + METHODS[4:]:
        row = next(line for line in standing.splitlines() if line.startswith(f"| {method} |"))
        assert f"| {_relation(me, data.points[method])} |" in row
    assert "- **dpo-mix**: MidPO" in standing and "- **merge-half**: MidPO" in standing
    for other, axis in (("safety-expert", 0), ("helpfulness-expert", 1)):  # each expert on its weaker axis
        better = "better" if me[axis] > data.points[other][axis] else "not better"
        assert f"{me[axis]:.3f} vs {data.points[other][axis]:.3f}, {better}." in standing
    union = m["run"]["union"]
    ref = ArtifactStore().ref(f"datasets/{m['run']['dataset_version']}")
    safety, helpful = (load_subset(ref, n, "train").to_list() for n in ("safety", "helpfulness"))
    chosen = {r["pair_id"]: r["chosen_index"] for r in helpful}
    assert union["safety"]["total"] == len(safety) and union["helpfulness"]["total"] == len(helpful)
    assert union["reversed"]["total"] == sum(r["pair_id"] in chosen and chosen[r["pair_id"]] != r["chosen_index"] for r in safety) > 0
    assert f"{union['reversed']['total']:,} of the safety pairs" in standing


# --------------------------------------------------------------------------------------------------
# Without a pipeline


def test_pareto_front_on_hand_made_points(tmp_path):
    points = {
        "a": (0.2, 0.9),  # front: the safest
        "b": (0.5, 0.7),  # front
        "c": (0.4, 0.6),  # dominated by b
        "d": (0.9, 0.1),  # front: the most helpful
        "e": (0.5, 0.7),  # equal to b: neither dominates the other
        "f": (0.2, 0.5),  # dominated by a (same x, lower y)
        "g": (math.nan, 0.99),  # not comparable: left out
    }
    assert pareto_front(points) == ["a", "b", "e", "d"]
    assert pareto_front({"only": (0.1, 0.1)}) == ["only"]

    def ci(v):
        return [v - 0.05, v + 0.1]

    metrics = {  # no oracle figures: the learned judges' rates on a real-data set
        method: {"hh-harmful": {"safety_rate": y, "safety_rate_ci": ci(y)}, "alpaca-eval": {"helpfulness": x, "helpfulness_ci": ci(x)}}
        for method, (x, y) in points.items() if method != "g"
    } | {"run": {"seeds": 3}, "costs": {}}
    data = pareto_data(metrics)
    assert data.x_label == "alpaca-eval helpfulness" and data.y_label == "hh-harmful safety_rate"
    assert data.front == ["a", "b", "e", "d"] and data.points["c"] == (0.4, 0.6)
    assert data.errors["c"][0] == pytest.approx((0.05, 0.1)) and data.errors["c"][1] == pytest.approx((0.05, 0.1))
    drawn = plot_pareto(data, tmp_path / "pareto.png")
    assert drawn["points"]["c"] == (0.4, 0.6) and drawn["points"]["a (front)"] == (0.2, 0.9)
    assert drawn["front_line"] == [points[m] for m in data.front] and drawn["front_drawstyle"] == "steps-pre"
    _assert_real_png(tmp_path / "pareto.png")
    assert pareto_data({"base": {"world-benign": {"oracle_helpfulness": 0.5}}}) is None  # no harmful set: no plot


def test_pareto_labels_of_close_points_do_not_overlap(tmp_path):
    """The tiny comparison's figures, where safedpo/bfpo and helpfulness-expert/modpo crowd each other."""
    points = {
        "base": (0.828, 0.307), "safety-expert": (0.693, 0.872), "helpfulness-expert": (0.860, 0.035), "midpo": (0.857, 0.849),
        "merge-half": (0.849, 0.274), "dpo-helpful": (0.840, 0.009), "dpo-harmless": (0.685, 0.875), "dpo-mix": (0.809, 0.122),
        "safedpo": (0.409, 0.998), "bfpo": (0.486, 0.997), "modpo": (0.724, 0.035),
    }  # fmt: skip
    metrics = {
        m: {"world-harmful": {"oracle_safety_rate": y}, "world-benign": {"oracle_helpfulness": x}} for m, (x, y) in points.items()
    } | {"run": {"seeds": 3}}
    boxes = list(plot_pareto(pareto_data(metrics), tmp_path / "pareto.png")["labels"].values())
    assert len(boxes) == len(points)
    for i, (ax0, ay0, ax1, ay1) in enumerate(boxes):
        for bx0, by0, bx1, by1 in boxes[i + 1 :]:
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, "two labels overlap"


def test_aggregate_seeds_by_hand():
    seeds = [
        {"m": {"s": {"n": 8, "judge": {"safety_rate": "cost-model"}, "safety_rate": 0.5, "safety_rate_ci": [0.4, 0.6]}}},
        {"m": {"s": {"n": 8, "judge": {"safety_rate": "cost-model"}, "safety_rate": 0.7, "safety_rate_ci": [0.6, 1.0]}}},
    ]
    out = aggregate_seeds(seeds)["m"]["s"]
    assert out["safety_rate"] == pytest.approx(0.6) and out["safety_rate_std"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert out["safety_rate_ci"] == pytest.approx([0.5, 0.8]) and out["n"] == 8 and out["judge"] == {"safety_rate": "cost-model"}
    assert aggregate_seeds(seeds[:1])["m"]["s"]["safety_rate_std"] == 0.0
    by_cat = [{"m": {"s": {"by_category": {"homonyms": {"safety_rate": v, "n": 3}}}}} for v in (0.2, 0.6)]
    assert aggregate_seeds(by_cat)["m"]["s"]["by_category"]["homonyms"] == {"safety_rate": pytest.approx(0.4), "safety_rate_std": pytest.approx(statistics.stdev([0.2, 0.6])), "n": 3}


def test_pairs_seen():
    assert pairs_seen(100, 3, 8) == 24  # a few steps: their batches
    assert pairs_seen(100, 13, 8) == 100  # one epoch: 12 full batches and one of 4
    assert pairs_seen(100, 26, 8) == 200 and pairs_seen(100, 27, 8) == 208
    assert pairs_seen(0, 5, 8) == 0


def test_methods_and_seed_configs():
    assert resolve_methods(None)[:4] == ["base", "safety-expert", "helpfulness-expert", "midpo"] and len(resolve_methods(None)) == 11
    assert resolve_methods(["dpo-mix", "base"]) == ["base", "dpo-mix"]  # interfaces.md's order
    with pytest.raises(ConfigError, match="unknown method 'dpo-typo'"):
        resolve_methods(["base", "dpo-typo"])
    cfg = load_config("tiny-ci")
    s2 = seed_config(cfg, 2, ["base", "midpo", "merge-half", "safedpo"])
    assert (s2.training.seed, s2.eval.seed, s2.router.training.seed) == (cfg.training.seed + 2, cfg.eval.seed + 2, cfg.router.training.seed + 2)
    assert s2.training.baselines == ["merge-half", "safedpo"]
    assert (s2.world, s2.data, s2.base, s2.judges) == (cfg.world, cfg.data, cfg.base, cfg.judges)
    assert seed_config(cfg, 0, ["base", "dpo-mix"]).router is None  # no midpo: no router stages
    assert cfg.training.seed == 0 and cfg.training.baselines == []  # the profile itself is untouched


def test_cli_rejects_unknown_methods(capsys):
    assert main(["compare", "--profile", "tiny-ci", "--methods", "base,nope"]) == 1
    assert "unknown method 'nope'" in capsys.readouterr().err
