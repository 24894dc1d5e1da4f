"""The stage graph's scheduler on stand-in stages: order, upstream-only inputs, side by side, failure."""

import threading
import time

import pytest

from midpo.config import load_config
from midpo.pipeline import STAGES, Stage, run_graph, stages_for, upstream
from midpo.stages import StageOutput
from midpo.storage import ArtifactRef


def _stage(name, needs=()):
    return Stage(name, "data", lambda *a: None, needs)


def test_stages_run_after_their_upstream_with_only_its_outputs():
    plan = [_stage("a"), _stage("b", ("a",)), _stage("c", ("a",)), _stage("d", ("b",))]
    seen, lock, running, overlap = {}, threading.Lock(), set(), []

    def run_one(stage, inputs):
        with lock:
            running.add(stage.name)
            overlap.append(set(running))
        time.sleep(0.05)
        with lock:
            running.discard(stage.name)
        seen[stage.name] = set(inputs)
        return StageOutput({stage.name: ArtifactRef(f"file:///x/{stage.name}", stage.name)})

    done = run_graph(plan, run_one, workers=2)
    assert set(done) == {"a", "b", "c", "d"}
    assert seen == {"a": set(), "b": {"a"}, "c": {"a"}, "d": {"a", "b"}}  # c ran beside d's upstream, never leaks into d
    assert {"b", "c"} in overlap  # independent stages side by side with 2 workers
    overlap.clear()
    run_graph(plan, run_one, workers=1)
    assert overlap and all(len(r) == 1 for r in overlap)  # one at a time


def test_a_failed_stage_stops_what_depends_on_it():
    ran = []

    def run_one(stage, inputs):
        ran.append(stage.name)
        if stage.name == "b":
            raise RuntimeError("boom")
        return StageOutput({})

    with pytest.raises(RuntimeError, match="boom"):
        run_graph([_stage("a"), _stage("b", ("a",)), _stage("c", ("b",))], run_one, workers=1)
    assert ran == ["a", "b"]


def test_stages_waiting_on_each_other_are_an_error_not_a_hang():
    loop = [_stage("a", ("b",)), _stage("b", ("a",))]
    for workers in (1, 2):
        with pytest.raises(ValueError, match="wait on each other"):
            run_graph(loop, lambda s, i: StageOutput({}), workers=workers)


def test_plans_follow_needs():
    names = [s.name for s in STAGES]
    graph = {s.name: s for s in STAGES}
    assert all(names.index(n) < names.index(s.name) for s in STAGES for n in s.needs)  # STAGES order respects needs
    assert upstream("safety-expert", graph) == {"world", "data", "base", "judges", "passes"}
    assert [s.name for s in stages_for(load_config("tiny-ci"), until=["judges", "refusal"])] == ["world", "data", "base", "refusal", "judges"]
    smollm2 = stages_for(load_config("smollm2"), until="helpfulness-expert")  # no world section: skipped, nothing waits on it
    assert [s.name for s in smollm2] == ["data", "base", "judges", "passes", "helpfulness-expert"]
    with pytest.raises(ValueError, match="unknown stage"):
        stages_for(load_config("tiny-ci"), until="nope")
