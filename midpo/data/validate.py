"""``midpo data validate``: check a source without training; list every problem and count what is usable.

Exit codes: 0 usable (warnings allowed), 1 any error (truncated or corrupt content included), 2 nothing
readable (:class:`~midpo.data.readers.Unreadable`: a missing file, an unknown format, an unreachable hub).
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from midpo.data.readers import Unreadable, read_source
from midpo.data.schema import (
    EvalPrompt,
    LabeledCompletion,
    PreferencePair,
    Problem,
    Reason,
    Severity,
)
from midpo.data.subsets import SUBSETS, build_subsets, counts_by_kind

log = logging.getLogger(__name__)

EXIT_OK, EXIT_ERRORS, EXIT_UNREADABLE = 0, 1, 2


@dataclass
class ValidationReport:
    """What ``validate`` found. ``counts`` depends on the kind of record:

    - preference pairs: ``{subset: {kind: n, ..., "total": n}}`` for each of safety, helpfulness, dual;
    - labeled completions: ``{"completions": {kind: n, "total": n}, "refusals": n, "unsafe": n}``;
    - prompts: ``{"prompts": {kind: n, "total": n}}``.
    ``exclusions`` counts problems by reason, except ``unknown_field`` (a warning that keeps its record).
    """

    uri: str
    format: str
    n_seen: int
    n_records: int
    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)

    @property
    def n_errors(self) -> int:
        return sum(p.severity is Severity.ERROR for p in self.problems)

    @property
    def n_warnings(self) -> int:
        return sum(p.severity is Severity.WARNING for p in self.problems)

    @property
    def exclusions(self) -> dict[str, int]:
        c = Counter(p.reason.value for p in self.problems if p.reason is not Reason.UNKNOWN_FIELD)
        return dict(sorted(c.items()))

    @property
    def exit_code(self) -> int:
        return EXIT_ERRORS if self.n_errors else EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "format": self.format,
            "exit_code": self.exit_code,
            "records_seen": self.n_seen,
            "records_usable": self.n_records,
            "counts": self.counts,
            "exclusions": self.exclusions,
            "errors": self.n_errors,
            "warnings": self.n_warnings,
            "problems": [
                {"place": p.place, "severity": p.severity.value, "reason": p.reason.value, "detail": p.detail} for p in self.problems
            ],
        }

    def to_json(self) -> str:
        """One JSON object (what ``--json`` prints)."""
        return json.dumps(self.to_dict(), ensure_ascii=False)

    def format_text(self) -> str:
        """Each problem on its own line (``PLACE: SEVERITY REASON: detail``), then a summary block."""
        lines = [str(p) for p in self.problems]
        if lines:
            lines.append("")
        lines.append(f"{self.uri} ({self.format})")
        lines.append(f"  records: {self.n_seen} seen, {self.n_records} usable")
        for name, value in self.counts.items():
            lines.append(f"  {name}: {_kinds_text(value) if isinstance(value, dict) else value}")
        exclusions = ", ".join(f"{k} {v}" for k, v in self.exclusions.items()) or "none"
        lines.append(f"  exclusions: {exclusions}")
        lines.append(f"  errors: {self.n_errors}")
        lines.append(f"  warnings: {self.n_warnings}")
        return "\n".join(lines)


def _kinds_text(counts: dict[str, int]) -> str:
    by_kind = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "total")
    return f"{counts.get('total', 0)}" + (f" ({by_kind})" if by_kind else "")


def validate(
    uri: str,
    fmt: str = "auto",
    *,
    max_chars: int = 16000,
    unlabeled_safety: str = "safer-label",
    dual_rule: str = "label+safety",
) -> ValidationReport:
    """Read ``uri`` and count usable records per subset; raises Unreadable when nothing can be read."""
    result = read_source(uri, fmt, max_chars=max_chars)
    records = result.records
    counts: dict[str, Any]
    if result.format in ("pku", "hh", "alpaca-eval"):
        pairs = [r for r in records if isinstance(r, PreferencePair)]
        subsets = build_subsets(pairs, unlabeled_safety, dual_rule)
        counts = {name: counts_by_kind(subsets[name]) for name in SUBSETS}
    elif result.format == "completions":
        comps = [r for r in records if isinstance(r, LabeledCompletion)]
        counts = {
            "completions": counts_by_kind([{"prompt_kind": c.prompt_kind} for c in comps]),
            "refusals": sum(c.is_refusal for c in comps),
            "unsafe": sum(not c.is_safe for c in comps),
        }
    elif result.format == "prompts":
        prompts = [r for r in records if isinstance(r, EvalPrompt)]
        counts = {"prompts": counts_by_kind([{"prompt_kind": p.kind} for p in prompts])}
    else:
        counts = {}
    report = ValidationReport(uri, result.format, result.n_seen, len(records), result.problems, counts)
    log.info("validated %s: exit %d (%d errors, %d warnings)", uri, report.exit_code, report.n_errors, report.n_warnings)
    return report


def run_validate(uri: str, fmt: str = "auto", as_json: bool = False, **kwargs: Any) -> int:
    """Print the report (text or one JSON object) to stdout and return the exit code (0, 1 or 2).

    When nothing is readable the message goes to stderr (text) or into ``{"error": ...}`` (JSON).
    """
    try:
        report = validate(uri, fmt, **kwargs)
    except Unreadable as e:
        if as_json:
            print(json.dumps({"uri": uri, "exit_code": EXIT_UNREADABLE, "error": str(e)}, ensure_ascii=False))
        else:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_UNREADABLE
    print(report.to_json() if as_json else report.format_text())
    return report.exit_code
