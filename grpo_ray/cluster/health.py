"""The decisions of an actor group, as pure code: no Ray, no processes. `cluster.group.ActorGroup`
performs them on real actors; plain unit tests check them (tests/cluster/test_health.py).

A member's call ends in one of four ways (`Outcome`): it returned; the member's own code raised
(an error of the caller's, raised as it is); the member's process is gone (lost: `kill -9`, a lost
node, an out-of-memory kill); or the call ran past its deadline (hung: SIGSTOP, a deadlock, a
stuck device). A lost or hung member is replaced in its bundle, at most `max_restarts` times within
one call, then the group gives up (`ActorLostError`, exit 3 after a checkpoint): a long run
survives any number of separate losses, a crash loop fails at once. A group that can start no
new member gives up at the first loss.

After a replacement, a role whose calls are stateless repeats the lost call on the new member
(engines: the sampling seed comes with the call; reward workers); a role whose state went with
the process (the learner) does not: its caller restores that state (`Restarted`). A member whose
replacement finds no room in the cluster (an elastic fleet's engine, `cluster.fleet`) is dropped
and its call goes to another member, as long as `min_members` are still admitted; below that
the group gives up.

A member's life (`State`): `starting` while its process comes up; `stale` once it is up but not
yet proven (an engine before it holds the current adapter and passed the sync check); `admitted`
once the role's hook accepted it: only admitted members are given work; `gone` when killed.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class Outcome(enum.Enum):
    RETURNED = "returned"
    RAISED = "raised"
    """The member's own code raised: the caller's error, not the member's fault."""
    LOST = "lost"
    HUNG = "hung"


class State(enum.Enum):
    STARTING = "starting"
    STALE = "stale"
    ADMITTED = "admitted"
    GONE = "gone"


class Action(enum.Enum):
    DELIVER = "deliver"
    """Hand the result to the caller."""
    RAISE = "raise"
    """Raise the member's own error to the caller."""
    REPLACE = "replace"
    """Kill the member, start it again in its bundle, admit it."""
    DROP = "drop"
    """The member is gone for good; its call goes to another member."""
    GIVE_UP = "give up"
    """End the call with `ActorLostError(verdict.reason)`."""


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str = ""


def hung_reason(role: str, i: int, what: str, timeout_s: float, setting: str = "") -> str:
    """What a member that ran past its deadline is reported as."""
    return (f"{role} {i} did not finish {what} within its deadline of {timeout_s:.0f} s"
            f"{f' ({setting})' if setting else ''}: hung")


def lost_reason(role: str, i: int, what: str, error: str) -> str:
    """What a member whose process is gone is reported as (`error`: the first line of Ray's)."""
    return f"{role} {i} lost during {what} ({error})"


class GroupHealth:
    """The members' states and the group's restart budget. `can_start`: the group can start a
    new member (else a loss ends the call); `repeat`: a lost call is repeated on the new member
    (else the caller restores the member's state, `after_replace` says so); `min_members`: the
    fewest admitted members the group works with (None: all it started with)."""

    def __init__(self, role: str, size: int, max_restarts: int, can_start: bool = True,
                 repeat: bool = True, min_members: int | None = None) -> None:
        if size < 1:
            raise ValueError(f"{role} group: needs at least one member")
        self.role, self.max_restarts = role, max_restarts
        self.can_start, self.repeat = can_start, repeat
        self.min_members = size if min_members is None else min_members
        self.states = [State.ADMITTED] * size
        self.restarts = 0
        """Members replaced over the group's life."""
        self.joining: set[int] = set()
        """Members added after the start (`add`), not yet admitted."""

    def admitted(self) -> list[int]:
        """The members proven to serve."""
        return [i for i, s in enumerate(self.states) if s is State.ADMITTED]

    def working(self) -> list[int]:
        """The members given work: the admitted ones, and one whose replacement failed (its next
        call finds out again, as a lost member's does); not one still joining, nor one gone."""
        return [i for i, s in enumerate(self.states)
                if s is not State.GONE and i not in self.joining]

    # ---- a member's life -----------------------------------------------------------------------
    def add(self) -> int:
        """A new member is asked for (it starts in a slot of its own): its index."""
        self.states.append(State.STARTING)
        self.joining.add(len(self.states) - 1)
        return len(self.states) - 1

    def replacing(self, i: int) -> None:
        """Member i is killed and started again."""
        self.states[i] = State.STARTING

    def up(self, i: int) -> None:
        """Member i's new process is up, not yet admitted."""
        self._move(i, State.STARTING, State.STALE)

    def admit(self, i: int, replacement: bool = True) -> None:
        """The role's hook accepted member i: it may be given work (`replacement`: it took a
        lost member's place, a restart; else it joined)."""
        self._move(i, State.STALE, State.ADMITTED)
        self.restarts += replacement
        self.joining.discard(i)

    def gone(self, i: int) -> None:
        self.states[i] = State.GONE
        self.joining.discard(i)

    def _move(self, i: int, before: State, after: State) -> None:
        if self.states[i] is not before:
            raise RuntimeError(f"{self.role} {i} is {self.states[i].value}, not "
                               f"{before.value}: cannot become {after.value}")
        self.states[i] = after

    # ---- a call --------------------------------------------------------------------------------
    def call(self) -> "CallHealth":
        """The decisions of one call (a generation, one step's scoring, an update)."""
        return CallHealth(self)

    def after_replace(self) -> bool:
        """Whether the lost call is repeated on the new member (else the caller is told that
        the member restarted without its state)."""
        return self.repeat


class CallHealth:
    """The restart budget of one call: `max_restarts` replacements, then the group gives up."""

    def __init__(self, group: GroupHealth) -> None:
        self.group = group
        self.restarts = 0

    def judge(self, i: int, outcome: Outcome, reason: str = "") -> Verdict:
        """What to do after member i's call ended with `outcome` (`reason`: how a lost or hung
        member is reported, `hung_reason` / `lost_reason`)."""
        if outcome is Outcome.RETURNED:
            return Verdict(Action.DELIVER)
        if outcome is Outcome.RAISED:
            return Verdict(Action.RAISE)
        g = self.group
        if not g.can_start:
            return Verdict(Action.GIVE_UP, f"{reason}; this {g.role} group cannot start new "
                                           "members")
        self.restarts += 1
        if self.restarts > g.max_restarts:
            return Verdict(Action.GIVE_UP, f"{reason}, after {g.max_restarts} restart(s) in the "
                                           "same call (cluster.max_restarts); see the Ray logs "
                                           "of its node")
        return Verdict(Action.REPLACE, reason)

    def no_room(self, i: int, reason: str) -> Verdict:
        """Member i's replacement found no room in the cluster: it is dropped and its call goes
        to another member while `min_members` stay admitted, else the group gives up."""
        g = self.group
        left = sum(1 for j in g.admitted() if j != i)
        if left >= g.min_members:
            return Verdict(Action.DROP, reason)
        return Verdict(Action.GIVE_UP, f"{reason}; {left} {g.role}(s) left, fewer than "
                                       f"{g.min_members} (rollout.min_engines)")
