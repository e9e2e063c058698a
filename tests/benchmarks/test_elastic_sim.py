"""benchmarks/elastic_sim.py: the real `Fleet` on small traces written by hand (every step one
unit long: the learner's stage alone), then the whole table: seeded, and docs/elastic.md's."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from elastic_sim import ARRIVE, LOSE, NOTICE, Scenario, Sim, table  # noqa: E402
from scaling_model import MEASURED, StageTimes, predict  # noqa: E402

UNIT = StageTimes(generate=0.0, reward=0.0, learner=1.0, sync=0.0)  # a step: 1, any fleet


def sim(engines: int, min_engines: int, max_engines: int, nodes: int, **kw) -> Sim:
    kw = {"max_nodes": nodes, "start_steps": 3, "replace_timeout_steps": 5, "prompts": 16,
          "steps": 10, "times": UNIT, **kw}
    return Sim(Scenario("hand", engines, min_engines, max_engines, nodes, **kw))


def test_a_node_that_joins_gets_an_engine_admitted_after_its_start():
    s = sim(1, 1, 2, nodes=1)
    s.at(2.5, ARRIVE)  # during step 2: placed at the boundary of step 3, up 3 steps later
    r = s.run()
    assert r.engines == [1] * 6 + [2] * 4
    assert (r.joins, r.leaves, r.lost, r.stalled) == (1, 0, 0, 0)
    assert s.fleet.nodes[1] == "node-1" and s.fleet.admitted() == [0, 1]
    # the GPU of the new node counts from its arrival: 1 x 10 + 1 x 7.5, 14 of it serving
    assert r.gpu_time == pytest.approx(17.5) and r.serving_time == pytest.approx(14)


def test_a_drained_node_loses_no_samples_a_short_notice_loses_its_slice():
    s = sim(2, 1, 2, nodes=2, notice_steps=2)
    s.at(2.5, NOTICE, "node-1")  # the engine finishes step 2, leaves before step 3
    r = s.run()
    assert r.engines == [2] * 3 + [1] * 7
    assert (r.lost, r.leaves, r.drops, r.restarts, r.stalled) == (0, 1, 0, 0, 0)
    assert "node-1" not in s.nodes  # the node went at 4.5, with no engine on it

    s = sim(2, 1, 2, nodes=2, notice_steps=0.2)
    s.at(2.5, NOTICE, "node-1")  # gone at 2.7, mid-step
    assert s.run().lost == 8 * 8  # its slice: 8 of 16 prompts x 8 completions


def test_a_loss_without_notice_loses_that_engines_slice_once():
    # no room: the step waits the replace timeout (2.5 + 5), then the engine is dropped
    s = sim(2, 1, 2, nodes=2)
    s.at(2.5, LOSE, "node-1")
    r = s.run()
    assert r.lost == 64 and r.drops == 1 and r.restarts == 0
    assert r.stalled == pytest.approx(7.5 - 3) and r.engines == [2] * 3 + [1] * 7
    # a free GPU: replaced there, the step waits its start (2.5 + 3), the fleet stays whole
    s = sim(2, 1, 2, nodes=3)
    s.at(2.5, LOSE, "node-1")
    r = s.run()
    assert r.lost == 64 and r.restarts == 1 and r.drops == 0
    assert r.stalled == pytest.approx(5.5 - 3) and r.engines == [2] * 10
    assert s.fleet.nodes[1] == "node-2"
    # dropped at once (the comparison policy): no wait
    s = sim(2, 1, 2, nodes=2, drop_lost=True)
    s.at(2.5, LOSE, "node-1")
    r = s.run()
    assert (r.lost, r.drops, r.stalled) == (64, 1, 0)
    # lost between steps, or after its slice while the step waits: nothing in flight
    s = sim(2, 1, 2, nodes=2)
    s.at(3.0, LOSE, "node-1")
    r = s.run()
    assert (r.lost, r.leaves, r.stalled) == (0, 1, 0) and r.engines == [2] * 3 + [1] * 7
    s = sim(3, 1, 3, nodes=3)
    s.at(2.5, LOSE, "node-2")  # 5 of 16 prompts (6, 5, 5); the step waits for room until 7.5
    s.at(4.0, LOSE, "node-0")  # its slice was in at 3
    r = s.run()
    assert (r.lost, r.leaves, r.drops, r.restarts) == (5 * 8, 2, 1, 0)
    assert r.engines == [3] * 3 + [1] * 7


def test_below_min_the_run_ends():
    s = sim(2, 2, 2, nodes=2)
    s.at(2.5, LOSE, "node-1")
    r = s.run()
    assert len(r.engines) == 2  # step 2 did not finish
    assert r.ended.endswith("1 rollout engine(s) left, fewer than 2 (rollout.min_engines)")
    # drained below min: the run waits the replace timeout for room, then ends
    s = sim(2, 2, 3, nodes=2)
    s.at(2.5, NOTICE, "node-1")
    r = s.run()
    assert r.engines == [2, 2, 2] and r.below_min == pytest.approx(5)
    assert r.ended == "fewer than rollout.min_engines=2 for 5 steps"
    # ... or goes on when a node comes in time (3.5) and its engine starts (+3)
    s = sim(2, 2, 3, nodes=2)
    s.at(2.5, NOTICE, "node-1")
    s.at(3.5, ARRIVE)
    r = s.run()
    assert not r.ended and r.below_min == pytest.approx(3.5 + 3 - 3)
    assert r.engines == [2] * 10 and s.fleet.admitted() == [0, 2]  # 1 left, 2 joined


def test_a_lost_node_of_three_engines_spends_one_calls_restart_budget():
    s = sim(3, 1, 3, nodes=1, gpus_per_node=3, max_restarts=2)
    s.at(2.5, LOSE, "node-0")
    r = s.run()
    assert len(r.engines) == 2 and "after 2 restart(s) in the same call" in r.ended


def test_step_time_is_the_scaling_models():
    sc = Scenario("stable", 8, 4, 8, nodes=8, max_nodes=8, prompts=64, steps=50)
    r = Sim(sc).run()
    t = MEASURED["Unsloth"]
    scaled = StageTimes(t.generate * 4, t.reward * 4, t.learner * 4, t.sync)
    assert r.seconds / 50 == pytest.approx(predict(scaled, 8, False, 1).step_s)
    assert r.serving_time == pytest.approx(r.gpu_time) and r.engines == [8] * 50


def test_the_table_is_seeded_and_is_the_docs():
    assert table(seed=3, steps=300) == table(seed=3, steps=300)
    assert table(seed=3, steps=300) != table(seed=4, steps=300)
    doc = (ROOT / "docs" / "elastic.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith(("| stable |", "| spot",
                                                                   "| growing"))]
    assert len(rows) >= 5
    printed = table().splitlines()
    for line in rows:
        assert line in printed, line
