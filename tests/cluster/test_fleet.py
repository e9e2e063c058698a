"""The rollout fleet's decisions (`cluster.fleet`, on `cluster.health`), as plain unit tests:
no Ray."""
from __future__ import annotations

import pytest

from grpo_ray.cluster.fleet import Fleet
from grpo_ray.cluster.health import Action, Outcome, State


def test_a_fixed_fleet_never_moves():
    fleet = Fleet(2, min_engines=2, max_engines=2, max_restarts=2)
    assert not fleet.decide()
    assert fleet.admitted() == [0, 1]


def test_a_fleet_below_max_asks_for_engines_and_admits_those_that_came_up():
    fleet = Fleet(1, min_engines=1, max_engines=3, max_restarts=2)
    assert fleet.decide().ask == 2  # up to max_engines
    a, b = fleet.ask(), fleet.ask()
    assert (a, b) == (1, 2) and fleet.decide().ask == 0  # they count, placed or not
    assert fleet.waiting == {1, 2}
    fleet.placed(a, "node-a")
    assert fleet.waiting == {2} and fleet.nodes[a] == "node-a"
    fleet.up(a)
    d = fleet.decide()
    assert d.admit == [a] and d.ask == 0
    fleet.joined(a)
    assert fleet.admitted() == [0, 1] and fleet.joins == 1 and fleet.restarts == 0
    # only admitted engines take work: the one still waiting for room does not
    assert fleet.states[b] is State.STARTING


def test_an_engine_on_a_draining_node_leaves_and_another_is_asked_for():
    fleet = Fleet(2, min_engines=1, max_engines=2, max_restarts=2)
    fleet.nodes[1] = "node-b"
    d = fleet.decide(draining={"node-b"})
    assert list(d.leave) == [1] and "node-b" in d.leave[1] and d.ask == 1
    fleet.left(1)
    fleet.left(1)  # once
    assert fleet.admitted() == [0] and fleet.leaves == 1


def test_a_replacement_without_room_is_dropped_above_min_and_gives_up_below():
    fleet = Fleet(3, min_engines=2, max_engines=3, max_restarts=2)
    call = fleet.call()
    assert call.judge(2, Outcome.LOST, "gone").action is Action.REPLACE
    fleet.replacing(2)
    verdict = call.no_room(2, "rollout engine 2 lost; no room")
    assert verdict.action is Action.DROP  # two still serve
    fleet.left(2)
    fleet.replacing(1)
    verdict = call.no_room(1, "rollout engine 1 lost; no room")
    assert verdict.action is Action.GIVE_UP
    assert verdict.reason == ("rollout engine 1 lost; no room; 1 rollout engine(s) left, fewer "
                              "than 2 (rollout.min_engines)")


def test_a_failed_admission_leaves_and_bounds_are_checked():
    fleet = Fleet(1, min_engines=1, max_engines=2, max_restarts=2)
    i = fleet.ask()
    fleet.placed(i)
    with pytest.raises(RuntimeError, match="rollout engine 1 is starting, not stale"):
        fleet.joined(i)
    fleet.up(i)
    fleet.left(i)  # refused at its admission
    assert fleet.leaves == 1 and fleet.states[i] is State.GONE and fleet.decide().ask == 1
    with pytest.raises(ValueError, match="min_engines"):
        Fleet(1, min_engines=2, max_engines=3, max_restarts=2)
