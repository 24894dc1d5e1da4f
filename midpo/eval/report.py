"""The one place that writes a run's report: metrics.json, report.md and the plots beside them."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RESERVED = ("judges", "run", "costs")


def methods_of(metrics: dict[str, Any]) -> list[str]:
    return [k for k in metrics if k not in RESERVED]


def _fmt(m: dict[str, Any], key: str) -> str:
    if key not in m:
        return ""
    ci = m.get(f"{key}_ci")
    text = f"{m[key]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    greedy = m.get(f"{key}_greedy")
    return text + (f" (greedy {greedy:.3f})" if greedy is not None else "")


def _metric_keys(sets: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for m in sets:
        for k, v in m.items():
            if isinstance(v, float) and not k.endswith(("_greedy", "_std")) and k not in keys:
                keys.append(k)
    return keys


def render_markdown(metrics: dict[str, Any]) -> str:
    lines = ["# midpo report", ""]
    run = metrics.get("run", {})
    if run:
        lines += [f"Profile `{run.get('profile')}`, dataset version `{run.get('dataset_version')}`, wall time {run.get('wall_seconds', 0):.0f} s.", ""]
        lines += ["| stage | seconds | cache hit |", "|---|---|---|"]
        lines += [f"| {s} | {t:.1f} | {'yes' if s in run.get('cache_hits', []) else ''} |" for s, t in run.get("stage_seconds", {}).items()]
        lines.append("")
    methods = methods_of(metrics)
    sets = sorted({s for m in methods for s in metrics[m]})
    for name in sets:
        rows = {m: metrics[m][name] for m in methods if name in metrics[m]}
        keys = _metric_keys(list(rows.values()))
        first = next(iter(rows.values()))
        lines += [f"## {name}", "", f"n = {first.get('n')} prompts x {first.get('samples_per_prompt')} samples; mean [95% bootstrap CI over prompts].", ""]
        lines += ["| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        lines += [f"| {m} | " + " | ".join(_fmt(r, k) for k in keys) + " |" for m, r in rows.items()]
        lines.append("")
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
