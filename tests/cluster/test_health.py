"""The actor group's decisions (`cluster.health`), as plain unit tests: no Ray."""
from __future__ import annotations

import pytest

from grpo_ray.cluster.health import (Action, GroupHealth, Outcome, State, hung_reason,
                                     lost_reason)


def test_a_returned_call_is_delivered_and_a_members_own_error_raised():
    call = GroupHealth("rollout engine", 2, max_restarts=1).call()
    assert call.judge(0, Outcome.RETURNED).action is Action.DELIVER
    assert call.judge(1, Outcome.RAISED).action is Action.RAISE
    assert call.restarts == 0  # neither costs a restart


@pytest.mark.parametrize("outcome", [Outcome.LOST, Outcome.HUNG])
def test_lost_and_hung_members_are_replaced_until_the_calls_budget_is_spent(outcome):
    group = GroupHealth("rollout engine", 2, max_restarts=2)
    call = group.call()
    assert [call.judge(i, outcome, "gone").action for i in (0, 1)] == [Action.REPLACE] * 2
    verdict = call.judge(0, outcome, "rollout engine 0 lost during generation (X)")
    assert verdict.action is Action.GIVE_UP
    assert verdict.reason == ("rollout engine 0 lost during generation (X), after 2 restart(s) "
                              "in the same call (cluster.max_restarts); see the Ray logs of its "
                              "node")
    # the budget is per call: the next call starts afresh (a long run survives many losses)
    assert group.call().judge(0, outcome, "gone").action is Action.REPLACE


def test_no_restarts_allowed_gives_up_at_the_first_loss():
    call = GroupHealth("reward worker", 1, max_restarts=0).call()
    assert call.judge(0, Outcome.LOST, "x").action is Action.GIVE_UP


def test_a_group_that_cannot_start_members_gives_up_and_says_why():
    call = GroupHealth("rollout engine", 1, max_restarts=5, can_start=False).call()
    verdict = call.judge(0, Outcome.HUNG, "rollout engine 0 hung")
    assert verdict.action is Action.GIVE_UP
    assert verdict.reason == "rollout engine 0 hung; this rollout engine group cannot start new members"


def test_a_member_is_admitted_only_after_it_is_up_and_its_hook_accepted_it():
    group = GroupHealth("rollout engine", 3, max_restarts=1)
    assert group.admitted() == [0, 1, 2]
    group.replacing(1)
    assert group.states[1] is State.STARTING and group.admitted() == [0, 2]
    with pytest.raises(RuntimeError, match="rollout engine 1 is starting, not stale"):
        group.admit(1)  # not up yet: never given work
    group.up(1)
    assert group.states[1] is State.STALE and group.admitted() == [0, 2]
    group.admit(1)
    assert group.admitted() == [0, 1, 2] and group.restarts == 1
    group.gone(2)
    assert group.admitted() == [0, 1]


def test_a_learner_is_restored_by_its_caller_rather_than_repeated():
    assert GroupHealth("learner", 1, 2, repeat=False).after_replace() is False
    assert GroupHealth("rollout engine", 1, 2).after_replace() is True


def test_the_reasons_name_the_member_the_call_and_the_setting():
    assert hung_reason("learner", 0, "the update", 312.4, "cluster.deadline_slack_s") == (
        "learner 0 did not finish the update within its deadline of 312 s "
        "(cluster.deadline_slack_s): hung")
    assert lost_reason("reward worker", 1, "scoring", "ActorDiedError: x") == (
        "reward worker 1 lost during scoring (ActorDiedError: x)")


def test_an_empty_group_is_refused():
    with pytest.raises(ValueError, match="learner group: needs at least one member"):
        GroupHealth("learner", 0, 1)
