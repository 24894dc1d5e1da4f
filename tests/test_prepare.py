"""`midpo data prepare`: versions, cache hits, prompt-disjoint splits, exclusion counts, crash safety, s3."""

import json
from pathlib import Path

import datasets
import pytest

from midpo.cli import main
from midpo.config import DataConfig, SourceConfig
from midpo.data.prepare import DataError, load_pairs_table, load_subset, prepare
from midpo.storage import ArtifactStore


def record(i: int, prompt: str | None = None, **labels) -> dict:
    base = {
        "prompt": prompt or f"question {i}?",
        "response_0": f"a safe answer {i}",
        "response_1": f"an unsafe answer {i}",
        "is_response_0_safe": True,
        "is_response_1_safe": False,
        "better_response_id": 0,
        "safer_response_id": 0,
    }
    return {**base, **labels}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(*paths: Path, **kw) -> DataConfig:
    return DataConfig(sources=[SourceConfig(uri=str(p)) for p in paths], **kw)


def test_prepare_twice_is_a_cache_hit_with_the_same_version(tmp_path, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", [record(i) for i in range(40)])
    args = ["data", "prepare", "--profile", "smollm2", "--source", str(src)]
    assert main(args) == 0
    first = capsys.readouterr().out.strip().splitlines()
    assert main(args) == 0
    second = capsys.readouterr().out.strip().splitlines()
    assert first[-1].startswith("dataset_version=") and first[-1] == second[-1]
    assert "nothing to do" in second[0]


def test_changing_one_record_changes_the_version(tmp_path):
    rows = [record(i) for i in range(10)]
    v1 = prepare(config(write_jsonl(tmp_path / "a.jsonl", rows))).ref.version
    rows[3]["response_0"] = "a different safe answer"
    v2 = prepare(config(write_jsonl(tmp_path / "b.jsonl", rows))).ref.version
    assert v1 != v2
    # the builder config is part of the version; the source's location is not
    assert prepare(config(tmp_path / "b.jsonl", eval_fraction=0.3)).ref.version != v2
    (tmp_path / "c.jsonl").write_text((tmp_path / "b.jsonl").read_text())
    assert prepare(config(tmp_path / "c.jsonl")).ref.version == v2


def test_splits_are_disjoint_by_prompt_and_deterministic(tmp_path):
    rows = [record(i, prompt=f"shared prompt {i % 15}?", response_0=f"safe {i}") for i in range(120)]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    prepared = prepare(config(src, eval_fraction=0.3))
    table = load_pairs_table(prepared.ref).to_list()
    sides = {}
    for row in table:
        sides.setdefault(row["prompt"], set()).add(row["split"])
    assert all(len(s) == 1 for s in sides.values())
    assert {"train", "eval"} == set().union(*sides.values())
    for subset in ("safety", "helpfulness", "dual"):
        train = {r["prompt"] for r in load_subset(prepared.ref, subset, "train")}
        held = {r["prompt"] for r in load_subset(prepared.ref, subset, "eval")}
        assert not train & held
    again = prepare(config(src, eval_fraction=0.3, split_seed=0), ArtifactStore((tmp_path / "other").as_uri()))
    assert again.meta["pairs"] == prepared.meta["pairs"]


def test_subsets_and_metadata_count_every_exclusion(tmp_path):
    rows = [record(i) for i in range(6)]
    rows.append(record(99, response_1="a safe answer 99"))  # identical responses
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    b = write_jsonl(tmp_path / "b.jsonl", rows[:2] + [record(7, is_response_1_safe=True, better_response_id=1, safer_response_id=1)])
    prepared = prepare(config(a, b, eval_fraction=0.0))
    meta = prepared.meta
    assert meta["exclusions"] == {"duplicate": 2, "identical_responses": 1}
    assert meta["subsets"]["safety"]["train"]["total"] == 6
    assert meta["subsets"]["helpfulness"]["train"]["total"] == 7
    assert meta["subsets"]["dual"]["train"]["total"] == 6 + 1  # label+safety: 6 safety pairs + 1 both-safe pair
    ds = load_subset(prepared.ref, "dual", "train")
    assert isinstance(ds, datasets.Dataset) and set(ds.column_names) >= {"pair_id", "prompt", "chosen", "rejected", "chosen_index"}
    assert len(load_subset(prepared.ref, "safety", "eval")) == 0  # empty splits keep their columns
    assert set(load_subset(prepared.ref, "safety", "eval").column_names) == set(ds.column_names)


def test_read_errors_abort_with_places(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps(record(1)) + "\n{not json\n")
    with pytest.raises(DataError, match="line 2"):
        prepare(config(src))
    assert main(["data", "prepare", "--profile", "smollm2", "--source", str(src)]) == 1
    assert "invalid_json" in capsys.readouterr().err


def test_interrupted_prepare_leaves_no_complete_version(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "d.jsonl", [record(i) for i in range(20)])
    cfg = config(src)
    store = ArtifactStore((tmp_path / "root").as_uri())
    real = datasets.Dataset.to_parquet
    calls = []

    def crash_on_third_file(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed mid-write")
        return real(self, *a, **k)

    monkeypatch.setattr(datasets.Dataset, "to_parquet", crash_on_third_file)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, store)
    datasets_dir = tmp_path / "root" / "datasets"
    assert not datasets_dir.exists() or not any(datasets_dir.iterdir())
    monkeypatch.setattr(datasets.Dataset, "to_parquet", real)
    prepared = prepare(cfg, store)
    assert not prepared.cache_hit and store.is_complete(f"datasets/{prepared.ref.version}")


def test_prepare_to_s3_and_read_back(s3_endpoint, bucket, tmp_path, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", [record(i) for i in range(30)])
    root = f"s3://{bucket}/midpo"
    assert main(["data", "prepare", "--profile", "smollm2", "--source", str(src), "--out", root]) == 0
    version = capsys.readouterr().out.strip().splitlines()[-1].split("=", 1)[1]
    store = ArtifactStore(root)
    assert store.is_complete(f"datasets/{version}")
    prepared = prepare(config(src), store)
    assert prepared.cache_hit and prepared.ref.version == version
    assert len(load_subset(prepared.ref, "safety", "train", store)) + len(load_subset(prepared.ref, "safety", "eval", store)) == 30
