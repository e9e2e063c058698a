"""The actor group every role uses (`cluster.group.ActorGroup`), on tiny plain actors in a real
placement group on a real local Ray: a member killed with SIGKILL (between calls or inside one)
is started again in its own bundle and its call repeated; a member stopped with SIGSTOP past its
deadline counts as lost and is replaced; a crash loop ends with ActorLostError; results come in
the members' order, or as each returns."""
from __future__ import annotations

import os
import signal
import time

import pytest

from grpo_ray.cluster.group import ActorGroup, MemberRestarted, work_deadline
from grpo_ray.faults import ActorLostError


class Member:
    """A plain class, as every actor of the project."""

    def __init__(self) -> None:
        self.loaded = None

    def where(self) -> tuple[int, str]:
        import ray

        return os.getpid(), ray.get_runtime_context().get_placement_group_id()

    def work(self, x: int, sleep_s: float = 0.0, die: bool = False, stop: bool = False) -> int:
        if die:
            os.kill(os.getpid(), signal.SIGKILL)
        if stop:
            os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(sleep_s)
        return 10 * x

    def load(self, value: str) -> None:
        self.loaded = value

    def get_loaded(self) -> str | None:
        return self.loaded


@pytest.fixture
def group(ray_local):
    """Three members, each in its own bundle of one placement group, and the group's lines."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray = ray_local
    pg = placement_group([{"CPU": 0.1}] * 3)
    ray.get(pg.ready(), timeout=60)

    def start(i: int):
        return ray.remote(Member).options(
            num_cpus=0.1, scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=i)).remote()

    lines: list[str] = []
    hooked: list[int] = []

    def after_start(i: int) -> str:  # the role's hook: the new member gets the group's state
        ray.get(g.members[i].load.remote("current"))
        hooked.append(i)
        return "with the current state"

    g = ActorGroup("member", [start(i) for i in range(3)], start, max_restarts=1,
                   ready_timeout_s=60, after_start=after_start, notify=lines.append)
    ray.get([m.__ray_ready__.remote() for m in g.members])
    yield g, lines, hooked
    pids = []
    for m in g.members:
        try:
            pids.append(ray.get(m.where.remote(), timeout=30)[0])
        except ray.exceptions.RayError:  # the crash loop's member stays dead
            pass
    g.kill_all()
    remove_placement_group(pg)
    for pid in pids:  # nothing of ours left stopped
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_work_deadline():
    assert work_deadline(2000, 200.0, 180.0) == pytest.approx(190.0)


def test_results_in_order_and_streamed_as_they_come(ray_local, group):
    g, lines, _ = group
    sleeps = [0.6, 0.3, 0.0]
    submit = lambda i: g.members[i].work.remote(i, sleeps[i])  # noqa: E731
    assert g.call("work", submit, timeout_s=30) == [0, 10, 20]
    assert [i for i, _ in g.stream("work", submit, timeout_s=30)] == [2, 1, 0]
    assert g.call("work", submit, timeout_s=30, indices=[2, 0]) == [20, 0]
    assert g.restarts == 0 and lines == []


def test_a_killed_member_is_started_again_in_its_bundle_and_its_call_repeated(ray_local, group):
    g, lines, hooked = group
    ray = ray_local
    pid, group_id = ray.get(g.members[1].where.remote())
    os.kill(pid, signal.SIGKILL)  # between calls: found by the next one
    assert g.call("work", lambda i: g.members[i].work.remote(i), timeout_s=30) == [0, 10, 20]
    new_pid, new_group_id = ray.get(g.members[1].where.remote())
    assert new_pid != pid and new_group_id == group_id  # in the placement group (`start(1)`)
    assert hooked == [1] and ray.get(g.members[1].get_loaded.remote()) == "current"
    assert len(lines) == 1 and lines[0].startswith("member 1 lost during work (ActorDiedError")
    assert " started again in its placement bundle in " in lines[0]
    assert lines[0].endswith(" s with the current state")

    # killed inside the call: the call is repeated on the new member (which does not die)
    dies = {0}
    submit = lambda i: g.members[i].work.remote(i, die=i in dies and not dies.clear())  # noqa
    assert g.call("work", submit, timeout_s=30) == [0, 10, 20]
    assert g.restarts == 2 and len(lines) == 2 and lines[1].startswith("member 0 lost during work")


def test_a_stopped_member_counts_as_lost_after_its_deadline(ray_local, group):
    g, lines, _ = group
    ray = ray_local
    pid, _ = ray.get(g.members[2].where.remote())
    os.kill(pid, signal.SIGSTOP)  # hung: the process is there and answers nothing
    start = time.monotonic()
    assert g.call("work", lambda i: g.members[i].work.remote(i), timeout_s=3.0,
                  setting="test.deadline") == [0, 10, 20]
    took = time.monotonic() - start
    assert 3.0 <= took < 60, took
    assert lines[0].startswith("member 2 did not finish work within its deadline of 3 s "
                               "(test.deadline): hung: started again in its placement bundle")
    assert ray.get(g.members[2].where.remote())[0] != pid
    time.sleep(1.0)
    with pytest.raises(ProcessLookupError):  # the stopped process was killed, not left behind
        os.kill(pid, 0)


def test_a_crash_loop_ends_with_actor_lost_error(ray_local, group):
    g, lines, _ = group
    with pytest.raises(ActorLostError, match=r"^member 1 lost during work \(ActorDiedError.*"
                                             r"after 1 restart\(s\) in the same call "
                                             r"\(cluster.max_restarts\)"):
        g.call("work", lambda i: g.members[i].work.remote(i, die=i == 1), timeout_s=30)
    assert g.restarts == 1 and len(lines) == 1


def test_a_group_that_cannot_repeat_the_call_says_the_member_restarted(ray_local, group):
    """The learner's case: the new member lacks the old one's state, the caller restores it."""
    g, lines, _ = group
    ray = ray_local
    g.health.repeat = False
    pid, _ = ray.get(g.members[0].where.remote())
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(MemberRestarted) as restarted:
        g.call("work", lambda i: g.members[i].work.remote(i), timeout_s=30, indices=[0])
    assert restarted.value.index == 0 and restarted.value.seconds > 0
    assert restarted.value.reason.startswith("member 0 lost during work (ActorDiedError")
    assert ray.get(g.members[0].work.remote(4)) == 40 and lines == []


def test_a_result_left_in_the_object_store_is_handed_over_once_its_member_answers(ray_local,
                                                                                   group):
    """`fetch=False` (an adapter on its way to the engines): the ref, not the value; a member
    lost in such a call is replaced and the call repeated, as any other (it used to end with
    ActorLostError after a successful replacement)."""
    g, lines, hooked = group
    ray = ray_local
    calls = []

    def submit(i):
        calls.append(i)
        return g.members[i].work.remote(7, die=len(calls) == 1)

    (ref,) = g.call("work", submit, timeout_s=30, indices=[2], fetch=False)
    assert isinstance(ref, ray.ObjectRef) and ray.get(ref) == 70
    assert calls == [2, 2] and hooked == [2] and len(lines) == 1
    assert lines[0].startswith("member 2 lost during work (ActorDiedError")
