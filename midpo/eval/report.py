"""The one place that writes a run's report: metrics.json, report.md and the plots beside them.

:func:`write_report` for ``midpo run`` and ``midpo eval``; :func:`write_compare_report` for ``midpo
compare`` (docs/compare.md): seed means with spreads, training costs, the Pareto plot
(:func:`pareto_data` returns the numbers it draws), samples side by side and the gate heat-maps.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RESERVED = ("judges", "run", "costs")


def methods_of(metrics: dict[str, Any]) -> list[str]:
    return [k for k in metrics if k not in RESERVED]


def _fmt(m: dict[str, Any], key: str, greedy: bool = True) -> str:
    if key not in m:
        return ""
    ci = m.get(f"{key}_ci")
    std = m.get(f"{key}_std")  # from `midpo compare`: the spread over seeds
    text = f"{m[key]:.3f}" + (f" ± {std:.3f}" if std is not None else "") + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    value = m.get(f"{key}_greedy") if greedy else None
    return text + (f" (greedy {value:.3f})" if value is not None else "")


def _metric_keys(sets: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for m in sets:
        for k, v in m.items():
            if isinstance(v, float) and not k.endswith(("_greedy", "_std")) and k not in keys:
                keys.append(k)
    return keys


def _set_tables(metrics: dict[str, Any], legend: str, level: str = "##") -> list[str]:
    """One table per eval set: every metric of every method."""
    lines: list[str] = []
    methods = methods_of(metrics)
    sets = sorted({s for m in methods for s in metrics[m]})
    for name in sets:
        rows = {m: metrics[m][name] for m in methods if name in metrics[m]}
        keys = _metric_keys(list(rows.values()))
        first = next(iter(rows.values()))
        lines += [f"{level} {name}", "", f"n = {first.get('n')} prompts x {first.get('samples_per_prompt')} samples; {legend}.", ""]
        lines += ["| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        lines += [f"| {m} | " + " | ".join(_fmt(r, k) for k in keys) + " |" for m, r in rows.items()]
        lines.append("")
        lines += _category_table(rows)
    return lines


def _category_table(rows: dict[str, dict[str, Any]]) -> list[str]:
    """A set's ``by_category`` breakdown (XSTest types): a row per category, a column per method, on the
    set's headline metric (safety_rate on harmful sets, over_refusal_rate or helpfulness otherwise)."""
    with_cats = {m: r["by_category"] for m, r in rows.items() if r.get("by_category")}
    if not with_cats:
        return []
    present = {k for cats in with_cats.values() for c in cats.values() for k in c}
    key = next((k for k in ("safety_rate", "over_refusal_rate", "helpfulness") if k in present), None)
    if key is None:
        return []
    categories = sorted({c for cats in with_cats.values() for c in cats})
    lines = [f"`{key}` per category:", "", "| category | n | " + " | ".join(with_cats) + " |", "|---|---|" + "---|" * len(with_cats)]
    for c in categories:
        n = next((cats[c].get("n") for cats in with_cats.values() if c in cats), "")
        cells = [f"{cats[c][key]:.3f}" if c in cats and key in cats[c] else "" for cats in with_cats.values()]
        lines.append(f"| {c} | {n} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def render_markdown(metrics: dict[str, Any]) -> str:
    lines = ["# midpo report", ""]
    run = metrics.get("run", {})
    if run:
        lines += [f"Profile `{run.get('profile')}`, dataset version `{run.get('dataset_version')}`, wall time {run.get('wall_seconds', 0):.0f} s.", ""]
        lines += ["| stage | seconds | cache hit |", "|---|---|---|"]
        lines += [f"| {s} | {t:.1f} | {'yes' if s in run.get('cache_hits', []) else ''} |" for s, t in run.get("stage_seconds", {}).items()]
        lines.append("")
    lines += _set_tables(metrics, "mean [95% bootstrap CI over prompts]")
    if metrics.get("judges"):
        lines += ["## Judges", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in metrics["judges"].items() if isinstance(v, float)]
        lines.append("")
    lines += ["![oracle metrics](oracle.png)", ""]
    return "\n".join(lines)


def plot_oracle(metrics: dict[str, Any], path: Path) -> None:
    """One panel per eval set: each oracle metric as bars per method, 95% CIs as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = methods_of(metrics)
    sets = sorted({s for m in methods for s in metrics[m]})
    fig, axes = plt.subplots(1, len(sets), figsize=(4.5 * len(sets), 3.6), squeeze=False)
    for ax, name in zip(axes[0], sets):
        keys = [k for k in _metric_keys([metrics[m][name] for m in methods if name in metrics[m]]) if k.startswith("oracle_") or k == "p_correct"]
        width = 0.8 / max(len(methods), 1)
        for i, m in enumerate(methods):
            r = metrics[m].get(name, {})
            vals = [r.get(k, 0.0) for k in keys]
            errs = [[v - r.get(f"{k}_ci", [v, v])[0] for k, v in zip(keys, vals)], [r.get(f"{k}_ci", [v, v])[1] - v for k, v in zip(keys, vals)]]
            ax.bar([j + i * width for j in range(len(keys))], vals, width, yerr=errs, capsize=2, label=m)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], [k.replace("oracle_", "") for k in keys], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(name)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report_dir: Path, metrics: dict[str, Any]) -> Path:
    """Write metrics.json, report.md and oracle.png into ``report_dir``; returns report.md's path."""
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if methods_of(metrics):
        plot_oracle(metrics, report_dir / "oracle.png")
    md = report_dir / "report.md"
    md.write_text(render_markdown(metrics))
    return md


# --------------------------------------------------------------------------------------------------
# `midpo compare`: the comparison report

# kinds of the built-in real-data sets (interfaces.md); world sets come from midpo.world.EVAL_SETS
BUILTIN_KINDS = {"xstest-unsafe": "harmful", "xstest-safe": "borderline", "hh-harmful": "harmful", "alpaca-eval": "benign"}
SAFETY_KEYS = ("oracle_safety_rate", "safety_rate")  # the y axis of the Pareto plot: the first present
HELPFULNESS_KEYS = ("oracle_helpfulness", "helpfulness")  # the x axis


def _sets_in_order(metrics: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(s for m in methods_of(metrics) for s in metrics[m]))


def set_kinds(metrics: dict[str, Any]) -> dict[str, str]:
    """``{eval set: kind}``: world and built-in sets by name, other sets (prompt files) by their metrics."""
    from midpo.world import EVAL_SETS

    kinds = {}
    for name in _sets_in_order(metrics):
        kind = EVAL_SETS.get(name) or BUILTIN_KINDS.get(name)
        if kind is None:
            keys = {k for m in methods_of(metrics) for k in metrics[m].get(name, {})}
            kind = "harmful" if keys & set(SAFETY_KEYS) else "benign" if "win_rate_vs_base" in keys else "borderline"
        kinds[name] = kind
    return kinds


@dataclass
class ParetoData:
    """What pareto.png draws: one point per method, its CI as error bars, the non-dominated methods."""

    x_label: str  # "<set> <metric>" of the helpfulness axis
    y_label: str  # "<set> <metric>" of the safety axis
    points: dict[str, tuple[float, float]]  # method -> (helpfulness, safety): seed means
    errors: dict[str, tuple[tuple[float, float], tuple[float, float]]]  # method -> ((x below, x above), (y below, y above)) from the CIs
    front: list[str]  # the Pareto-optimal methods (higher is better on both axes), by increasing x


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """The methods no other method dominates (at least as good on both axes, better on one), maximising
    both coordinates; by increasing x (then decreasing y). Points with a NaN coordinate are left out."""
    valid = {m: p for m, p in points.items() if not any(math.isnan(v) for v in p)}
    front = [
        m for m, (x, y) in valid.items()
        if not any(ox >= x and oy >= y and (ox > x or oy > y) for o, (ox, oy) in valid.items() if o != m)
    ]
    return sorted(front, key=lambda m: (valid[m][0], -valid[m][1]))


def _axis(metrics: dict[str, Any], kinds: dict[str, str], wanted: tuple[str, ...], keys: tuple[str, ...]) -> tuple[str, str] | None:
    """(set, metric) of the first set of the first wanted kind that has one of ``keys`` for some method."""
    for kind in wanted:
        for name in (s for s, k in kinds.items() if k == kind):
            present = {k for m in methods_of(metrics) for k in metrics[m].get(name, {})}
            key = next((k for k in keys if k in present), None)
            if key is not None:
                return name, key
    return None


def pareto_data(metrics: dict[str, Any], kinds: dict[str, str] | None = None) -> ParetoData | None:
    """Safety (the first harmful set's ``oracle_safety_rate``, else ``safety_rate``) against helpfulness
    (the first benign set's ``oracle_helpfulness``, else ``helpfulness``; a borderline set when there is no
    benign one) per method; None when the sets lack either axis."""
    kinds = kinds or set_kinds(metrics)
    y_axis = _axis(metrics, kinds, ("harmful",), SAFETY_KEYS)
    x_axis = _axis(metrics, kinds, ("benign", "borderline"), HELPFULNESS_KEYS)
    if x_axis is None or y_axis is None:
        return None
    points, errors = {}, {}
    for method in methods_of(metrics):
        x_m, y_m = metrics[method].get(x_axis[0], {}), metrics[method].get(y_axis[0], {})
        if x_axis[1] not in x_m or y_axis[1] not in y_m:
            continue
        x, y = float(x_m[x_axis[1]]), float(y_m[y_axis[1]])
        points[method] = (x, y)
        (xl, xh), (yl, yh) = x_m.get(f"{x_axis[1]}_ci", [x, x]), y_m.get(f"{y_axis[1]}_ci", [y, y])
        errors[method] = ((max(0.0, x - xl), max(0.0, xh - x)), (max(0.0, y - yl), max(0.0, yh - y)))
    return ParetoData(" ".join(x_axis), " ".join(y_axis), points, errors, pareto_front(points))


MARKERS = "osD^vPX*h<>"


def plot_pareto(data: ParetoData, path: Path, title: str = "") -> dict[str, Any]:
    """Safety (y) against helpfulness (x): a point per method with CI error bars, labelled in the legend
    and beside the point (coincident methods share one label); the Pareto front as a black step line
    through bold, black-edged markers. Rates keep the 0..1 scale. Returns what was drawn, read back from
    the figure: ``{"points": {legend label: (x, y)}, "front_line": [(x, y) vertices], "front_drawstyle"}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.0, 5.5))
    colors = plt.get_cmap("tab10").colors
    drawn: dict[str, Any] = {"points": {}, "front_line": []}
    for i, (method, (x, y)) in enumerate(data.points.items()):
        (xl, xh), (yl, yh) = data.errors[method]
        on_front = method in data.front
        color = colors[i % len(colors)]
        container = ax.errorbar(
            [x], [y], xerr=[[xl], [xh]], yerr=[[yl], [yh]], fmt=MARKERS[i % len(MARKERS)], color=color, ecolor=color, elinewidth=1.0,
            capsize=3, markersize=11 if on_front else 7, markeredgecolor="black" if on_front else color,
            markeredgewidth=2.0 if on_front else 1.0, label=method + (" (front)" if on_front else ""), zorder=3,
        )
        line = container.lines[0]
        drawn["points"][container.get_label()] = (float(line.get_xdata()[0]), float(line.get_ydata()[0]))
    if data.front:
        xs = [data.points[m][0] for m in data.front]
        ys = [data.points[m][1] for m in data.front]
        (step,) = ax.step(xs, ys, where="pre", color="black", linewidth=2.0, zorder=2, label="Pareto front")
        drawn["front_line"] = [(float(a), float(b)) for a, b in step.get_xydata()]
        drawn["front_drawstyle"] = step.get_drawstyle()
    values = [v for m in data.points for v in (data.points[m][0] - data.errors[m][0][0], data.points[m][0] + data.errors[m][0][1])]
    if values and min(values) >= 0.0 and max(values) <= 1.0:
        ax.set_xlim(-0.03, 1.03)
    values = [v for m in data.points for v in (data.points[m][1] - data.errors[m][1][0], data.points[m][1] + data.errors[m][1][1])]
    if values and min(values) >= 0.0 and max(values) <= 1.0:
        ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel(f"helpfulness: {data.x_label}  (higher is better)")
    ax.set_ylabel(f"safety: {data.y_label}  (higher is better)")
    ax.set_title(title or "safety against helpfulness", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()  # before the labels: their placement is in the final pixel coordinates
    drawn["labels"] = _label_points(fig, ax, data)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


# Label positions tried in turn around a point: (dx, dy) in points, horizontal and vertical alignment;
# the outer ring gets a leader line to its point.
_NEAR = [(8, 4, "left", "bottom"), (8, -4, "left", "top"), (-8, 4, "right", "bottom"), (-8, -4, "right", "top"),
         (0, 10, "center", "bottom"), (0, -10, "center", "top")]  # fmt: skip
_LABEL_SPOTS = _NEAR + [(dx * 3, dy * 3, ha, va) for dx, dy, ha, va in _NEAR]


def _label_points(fig: Any, ax: Any, data: ParetoData) -> dict[str, tuple[float, float, float, float]]:
    """Name every point beside it (coincident methods share one label), front methods in bold: each label
    takes the first spot around its point that overlaps no marker and no label placed before, inside the
    axes (else the spot with the fewest overlaps). Returns each label's pixel box (x0, y0, x1, y1)."""
    from matplotlib.transforms import Bbox

    groups: dict[tuple[float, float], list[str]] = {}
    for method, point in data.points.items():
        groups.setdefault((round(point[0], 6), round(point[1], 6)), []).append(method)
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    markers = [Bbox.from_extents(*(ax.transData.transform(p) - 8), *(ax.transData.transform(p) + 8)) for p in groups]
    placed: dict[str, Any] = {}
    for point, names in sorted(groups.items(), key=lambda g: (-g[0][1], g[0][0])):  # top to bottom
        best = None
        for i, (dx, dy, ha, va) in enumerate(_LABEL_SPOTS):
            text = ax.annotate("\n".join(names), point, textcoords="offset points", xytext=(dx, dy), ha=ha, va=va, fontsize=8,
                               fontweight="bold" if any(m in data.front for m in names) else "normal",
                               arrowprops={"arrowstyle": "-", "color": "gray", "lw": 0.6, "shrinkB": 7} if i >= len(_NEAR) else None)
            box = text.get_window_extent(renderer)
            own = markers[list(groups).index(point)]
            clashes = sum(box.overlaps(o) for o in [*placed.values(), *(m for m in markers if m is not own)])
            clashes += 0 if frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1) else 1
            if best is None or clashes < best[0]:
                if best is not None:
                    best[1].remove()
                best = (clashes, text, box)
            else:
                text.remove()
            if clashes == 0:
                break
        placed[", ".join(names)] = best[2]
    return {name: (float(b.x0), float(b.y0), float(b.x1), float(b.y1)) for name, b in placed.items()}


def _headline_keys(kind: str, present: set[str]) -> list[str]:
    """The summary table's columns for a set of this kind: the oracle's figure where there is one."""
    wanted = {"harmful": (SAFETY_KEYS,), "borderline": (HELPFULNESS_KEYS, ("oracle_over_refusal_rate", "over_refusal_rate")),
              "benign": (HELPFULNESS_KEYS, ("oracle_over_refusal_rate", "over_refusal_rate"))}[kind]
    return [k for options in wanted if (k := next((o for o in options if o in present), None))]


def _cell(text: str) -> str:
    text = " ".join(str(text).split())
    return text.replace("|", "\\|") if text else "*(empty)*"


def _relation(a: tuple[float, float], b: tuple[float, float]) -> str:
    """How point ``a`` stands against ``b`` (both axes higher is better)."""
    if a == b:
        return "ties"
    if a[0] >= b[0] and a[1] >= b[1]:
        return "dominates"
    if a[0] <= b[0] and a[1] <= b[1]:
        return "is dominated by"
    return "trades off against"


# the single-objective methods and the axis each one neglects
SINGLE_OBJECTIVE = {"dpo-helpful": "safety", "helpfulness-expert": "safety", "dpo-harmless": "helpfulness", "safety-expert": "helpfulness"}


def _midpo_standing(pareto: ParetoData, costs: dict[str, Any], union: dict[str, dict[str, int]] | None) -> list[str]:
    """Where MidPO stands: on the front or not, against every method, and against the two no-router ways
    of getting both behaviours (DPO on the union, the fixed merge), in quality and in training cost."""
    me = pareto.points["midpo"]
    lines = ["## Where MidPO stands", ""]
    beaten_by = [m for m, p in pareto.points.items() if m != "midpo" and _relation(me, p) == "is dominated by"]
    lines.append(
        f"MidPO is **{'Pareto-dominated by ' + ', '.join(beaten_by) if beaten_by else 'not Pareto-dominated by any method'}** "
        f"(helpfulness {me[0]:.3f}, safety {me[1]:.3f})."
    )
    lines += ["", "| method | helpfulness | safety | MidPO ... | MidPO helpfulness − method | MidPO safety − method |", "|---|---|---|---|---|---|"]
    for m, (x, y) in pareto.points.items():
        if m != "midpo":
            lines.append(f"| {m} | {x:.3f} | {y:.3f} | {_relation(me, (x, y))} | {me[0] - x:+.3f} | {me[1] - y:+.3f} |")
    lines.append("")
    for other, weak in SINGLE_OBJECTIVE.items():
        if other in pareto.points:
            axis = 0 if weak == "helpfulness" else 1
            mine_v, other_v = me[axis], pareto.points[other][axis]
            verdict = "better" if mine_v > other_v else "not better"
            lines.append(f"- against **{other}** on its weaker axis, {weak}: MidPO {mine_v:.3f} vs {other_v:.3f}, {verdict}.")
    mine = costs.get("midpo", {})
    for other in ("dpo-mix", "merge-half"):
        if other not in pareto.points or not mine:
            continue
        c = costs.get(other, {})
        cost = (f"; own training {c['train_seconds']:.0f} s, {c['trainable_params']:,.0f} trainable parameters, {c['pairs_seen']:,.0f} pairs seen "
                f"(MidPO: {mine['train_seconds']:.0f} s, {mine['trainable_params']:,.0f}, {mine['pairs_seen']:,.0f}, both experts included)") if c else ""
        lines.append(f"- **{other}**: MidPO {_relation(me, pareto.points[other])} it{cost}.")
    if union and "dpo-mix" in pareto.points:
        rev, saf = union["reversed"], union["safety"]
        kinds = ", ".join(f"{k} {v:,}" for k, v in rev.items() if k != "total")
        lines.append(
            f"- The union DPO-mix trains on holds {saf['total']:,} safety and {union['helpfulness']['total']:,} helpfulness pairs; "
            f"{rev['total']:,} of the safety pairs ({rev['total'] / max(saf['total'], 1):.0%}; {kinds}) are the same pairs as helpfulness "
            "pairs with the opposite preference, so DPO-mix is pushed both ways on each of them."
        )
    lines.append("")
    return lines


def render_compare_markdown(metrics: dict[str, Any], samples: dict[str, list[dict[str, Any]]], heatmaps: dict[str, str], pareto: ParetoData | None) -> str:
    run, costs = metrics.get("run", {}), metrics.get("costs", {})
    methods = methods_of(metrics)
    kinds = set_kinds(metrics)
    lines = ["# midpo compare", ""]
    lines += [
        (
            f"Profile `{run.get('profile')}`, dataset version `{run.get('dataset_version')}`, {run.get('seeds')} seed(s), "
            f"wall time {run.get('wall_seconds', 0):.0f} s. Every figure: mean over seeds ± standard deviation over seeds "
            "[mean of the per-seed 95% bootstrap CIs over prompts]."
        ),
        "",
        "## Summary",
        "",
    ]
    columns = [(s, k) for s, kind in kinds.items() for k in _headline_keys(kind, {k for m in methods for k in metrics[m].get(s, {})})]
    lines += ["| method | " + " | ".join(f"{s} {k}" for s, k in columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {m} | " + " | ".join(_fmt(metrics[m].get(s, {}), k, greedy=False) for s, k in columns) + " |" for m in methods]
    lines.append("")
    lines += ["## Pareto front", ""]
    if pareto is None:
        lines += ["No harmful set with a safety rate and helpful set with a helpfulness figure: no Pareto plot.", ""]
    else:
        lines += [
            (
                f"Safety = `{pareto.y_label}`, helpfulness = `{pareto.x_label}` (higher is better on both). "
                f"Pareto-optimal (no method is at least as good on both and better on one): **{', '.join(pareto.front)}**; "
                f"dominated: {', '.join(m for m in pareto.points if m not in pareto.front) or 'none'}."
            ),
            "",
            "![safety against helpfulness](pareto.png)",
            "",
        ]
    if pareto is not None and "midpo" in pareto.points:
        lines += _midpo_standing(pareto, costs, run.get("union"))
    lines += ["## Training cost", "", ("Each method's own training, mean over seeds (recorded when its artifact was built); "
                                       "`midpo` = its router + both experts, `merge-half` = both experts (it trains nothing), `base` = 0."), ""]
    lines += ["| method | train seconds | trainable params | pairs seen | includes |", "|---|---|---|---|---|"]
    for m in methods:
        c = costs.get(m)
        if c:
            std = f" ± {c['train_seconds_std']:.1f}" if c.get("train_seconds_std") else ""
            lines.append(f"| {m} | {c['train_seconds']:.1f}{std} | {c['trainable_params']:,.0f} | {c['pairs_seen']:,.0f} | {', '.join(c.get('includes', [])) or '-'} |")
    shared = costs.get("shared")
    if shared:
        hits = set(shared.get("cache_hits", []))
        lines += ["", (f"Shared stages, counted once for all methods ({shared.get('total_seconds', 0):.1f} s in this comparison; "
                       "a cache hit means an earlier run paid for it):"), "", "| stage | seconds | cache hit |", "|---|---|---|"]
        lines += [f"| {s} | {t:.1f} | {'yes' if s in hits else ''} |" for s, t in shared.get("seconds", {}).items()]
    lines.append("")
    lines += ["## Per eval set", ""]
    lines += _set_tables(metrics, "mean ± std over seeds [mean per-seed 95% bootstrap CI]", level="###")
    if metrics.get("judges"):
        lines += ["## Judges", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in metrics["judges"].items() if isinstance(v, float)]
        lines.append("")
    if samples:
        lines += ["## Sample generations", "", "The first sampled response of each method (first seed) to the first eval prompts of each set.", ""]
        for name, rows in samples.items():
            for row in rows:
                lines += [f"### {name}: {_cell(row['prompt'])}", "", "| method | response |", "|---|---|"]
                lines += [f"| {m} | {_cell(row['responses'][m])} |" for m in methods if m in row["responses"]]
                lines.append("")
    if heatmaps:
        lines += ["## Gate heat-map", "", ("The MoE's gates (alpha: safety expert, beta: helpfulness expert) per layer and token "
                                          "(first seed's model, its first sample as the response; the dashed line ends the prompt)."), ""]
        for name, filename in heatmaps.items():
            prompt = samples.get(name, [{}])[0].get("prompt", "")
            lines += [f"### {name} ({kinds.get(name)}): {_cell(prompt)}", "", f"![gates on {name}]({filename})", ""]
    if run.get("per_seed"):
        lines += ["## Seeds", "", "| seed offset | training seed | eval seed | wall seconds | cache hits | report |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['seed_offset']} | {r['training_seed']} | {r['eval_seed']} | {r['wall_seconds']:.0f} | {', '.join(r['cache_hits'])} | "
                  f"[seed-{r['seed_offset']}](seed-{r['seed_offset']}/report.md) |" for r in run["per_seed"]]
        lines.append("")
    lines += ["![oracle metrics](oracle.png)", ""]
    return "\n".join(lines)


def write_compare_report(report_dir: Path, metrics: dict[str, Any], samples: dict[str, list[dict[str, Any]]] | None = None, heatmaps: dict[str, str] | None = None) -> Path:
    """Write metrics.json, pareto.png, oracle.png and report.md of ``midpo compare``; returns report.md's path.
    ``samples``: ``{set: [{prompt, responses: {method: text}}]}``; ``heatmaps``: ``{set: PNG name in report_dir}``."""
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    pareto = pareto_data(metrics)
    if pareto is not None:
        seeds = metrics.get("run", {}).get("seeds")
        plot_pareto(pareto, report_dir / "pareto.png", f"safety against helpfulness: mean over {seeds} seed(s), error bars = mean 95% CI")
    if methods_of(metrics):
        plot_oracle(metrics, report_dir / "oracle.png")
    md = report_dir / "report.md"
    md.write_text(render_compare_markdown(metrics, samples or {}, heatmaps or {}, pareto))
    return md
