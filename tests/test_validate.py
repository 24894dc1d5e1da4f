"""validate / run_validate: reports, exit codes, text and JSON output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from midpo.data.validate import run_validate, validate
from midpo.storage import builtin_path
from tests.test_readers import pku


@pytest.fixture
def mixed(tmp_path) -> Path:
    """Two usable pairs (one safety+helpfulness, one dual), a bad label, a tie-free duplicate, a bad line."""
    rows = [
        json.dumps(pku(prompt_kind="harmful")),
        json.dumps(pku(prompt="Bake bread?", is_response_1_safe=True, better_response_id=0, prompt_kind="benign")),
        json.dumps(pku(better_response_id=4)),
        json.dumps(pku(prompt_kind="harmful")),
        "{oops",
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_report_counts_and_exit_code(mixed):
    report = validate(str(mixed))
    assert (report.format, report.n_seen, report.n_records, report.n_errors, report.n_warnings) == ("pku", 5, 2, 2, 1)
    assert report.exit_code == 1
    assert report.counts == {
        "safety": {"harmful": 1, "total": 1},
        "helpfulness": {"benign": 1, "harmful": 1, "total": 2},
        "dual": {"benign": 1, "harmful": 1, "total": 2},
    }
    assert report.exclusions == {"bad_label": 1, "duplicate": 1, "invalid_json": 1}
    assert validate(str(mixed), dual_rule="label").counts["dual"] == {"benign": 1, "total": 1}


def test_text_output(mixed, capsys):
    assert run_validate(str(mixed)) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == [
        "line 3: error bad_label: better_response_id must be 0, 1 or null, got 4",
        "line 4: warning duplicate: same record as line 1; the first is kept",
        "line 5: error invalid_json: Expecting property name enclosed in double quotes at column 2",
    ]
    assert out[3:] == [
        "",
        f"{mixed} (pku)",
        "  records: 5 seen, 2 usable",
        "  safety: 1 (harmful 1)",
        "  helpfulness: 2 (benign 1, harmful 1)",
        "  dual: 2 (benign 1, harmful 1)",
        "  exclusions: bad_label 1, duplicate 1, invalid_json 1",
        "  errors: 2",
        "  warnings: 1",
    ]


def test_json_output(mixed, capsys):
    assert run_validate(str(mixed), as_json=True) == 1
    out = capsys.readouterr().out
    data = json.loads(out)  # exactly one JSON object
    assert data["exit_code"] == 1 and data["format"] == "pku" and data["records_seen"] == 5 and data["records_usable"] == 2
    assert data["counts"]["dual"]["total"] == 2 and data["errors"] == 2 and data["warnings"] == 1
    assert data["problems"][0] == {"place": "line 3", "severity": "error", "reason": "bad_label", "detail": "better_response_id must be 0, 1 or null, got 4"}


def test_warnings_only_exit_zero(tmp_path, capsys):
    path = tmp_path / "w.jsonl"
    path.write_text(json.dumps(pku(extra=1)) + "\n" + json.dumps(pku(response_1="I can't help with that.")) + "\n")
    assert run_validate(str(path)) == 0
    out = capsys.readouterr().out
    assert "line 1: warning unknown_field: unknown field extra ignored" in out
    assert "line 2: warning identical_responses:" in out and "exclusions: identical_responses 1" in out


def test_truncated_gz_exit_1_without_traceback(tmp_path, capsys):
    data = builtin_path("hh_harmless_test.jsonl.gz").read_bytes()
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    assert run_validate(str(path)) == 1
    captured = capsys.readouterr()
    truncated = [line for line in captured.out.splitlines() if " truncated: " in line]
    assert len(truncated) == 1 and truncated[0].startswith("line ") and ": error truncated: the gzip file ends mid-stream" in truncated[0]
    assert "Traceback" not in captured.out + captured.err


def test_missing_file_exit_2(tmp_path, capsys):
    assert run_validate(str(tmp_path / "nope.jsonl")) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "no such file or directory" in captured.err
    assert run_validate(str(tmp_path / "nope.jsonl"), as_json=True) == 2
    data = json.loads(capsys.readouterr().out)
    assert data["exit_code"] == 2 and "no such file" in data["error"]


def test_unknown_format_exit_2(capsys):
    assert run_validate("builtin:pku_saferlhf_sample.jsonl", "csvish") == 2
    assert "unknown format" in capsys.readouterr().err


VENDORED = {
    "pku_saferlhf_sample.jsonl": ("pku", 12, {"safety": 1, "helpfulness": 12, "dual": 4}),
    "hh_harmless_test.jsonl.gz": ("hh", 2303, {"safety": 2303, "helpfulness": 0, "dual": 2303}),
    "alpaca_eval_gpt4_vs_davinci003_annotations.json": ("alpaca-eval", 793, {"safety": 0, "helpfulness": 793, "dual": 0}),
    "xstest_prompts.csv": ("prompts", 450, {"prompts": 450}),
    "alpaca_eval_805.json": ("prompts", 805, {"prompts": 805}),
    **{f"xstest_labeled/xstest_v2_completions_{m}_labeled.csv": ("completions", 450, {"completions": 450}) for m in ("gpt4", "llama2new", "llama2orig", "mistralinstruct")},
}


@pytest.mark.parametrize("name", sorted(VENDORED))
def test_vendored_files_validate_clean(name, capsys):
    fmt, usable, totals = VENDORED[name]
    report = validate(f"builtin:{name}")
    assert report.exit_code == 0 and report.n_errors == 0
    assert (report.format, report.n_records) == (fmt, usable)
    assert {k: v["total"] for k, v in report.counts.items() if isinstance(v, dict)} == totals
    assert run_validate(f"builtin:{name}") == 0
    assert "errors: 0" in capsys.readouterr().out


def test_hh_unlabeled_safety_skip():
    report = validate("builtin:hh_harmless_test.jsonl.gz", unlabeled_safety="skip")
    assert report.counts["safety"]["total"] == 0 and report.exclusions == {"empty_text": 4, "no_shared_prefix": 5}
