"""One actor group for every role: rollout engines, reward workers, and the learner (a group of
one). The only place that waits on an actor's calls.

`ActorGroup` submits a call to its members, waits for all of them with one `ray.wait` and a
deadline, and treats a member whose process is gone (`faults.is_lost_actor`) or whose call runs
past its deadline (a hung process: SIGSTOP, a deadlock, a stuck device) the same way: the member
is killed, started again where it was (the placement's `start(i)`: its own bundle), the role's
hook runs on the new member (an engine loads the group's adapter and passes the sync check), and
the lost call is submitted again, at most `max_restarts` times per call; then `ActorLostError`,
which the run ends with (exit 3, after a checkpoint). A role whose lost call cannot simply be
repeated (the learner: its state went with its process) asks for `repeat=False` and gets
`MemberRestarted` instead, once the new member is ready. What to do after each outcome is decided
in `cluster.health` (pure code); this module performs it.

Deadlines follow from the work (`work_deadline`: tokens at a floor throughput plus a slack);
their settings and margins are documented in `config.ClusterConfig`.

Actors stay plain classes: the group only holds handles and calls `start(i)`, which the
placement (`cluster.placement`) builds around `ray.remote`.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Sequence

from grpo_ray.cluster.health import Action, GroupHealth, Outcome, Verdict, hung_reason, lost_reason
from grpo_ray.faults import ActorLostError, InfraError, first_line, is_lost_actor


def work_deadline(tokens: float, floor_tokens_per_s: float, slack_s: float) -> float:
    """Seconds a call may take to process `tokens` at no less than `floor_tokens_per_s`, plus
    `slack_s` (start-up of the call: compilation, scheduling)."""
    return tokens / floor_tokens_per_s + slack_s


class MemberRestarted(Exception):
    """A member of a `repeat=False` group was lost and has been started again (fresh, without
    the state it had): the caller restores that state (the trainer: the newest checkpoint).
    Whoever catches `Exception` on the way (a transport's fallback, a retry) lets it through."""

    def __init__(self, index: int, reason: str, seconds: float):
        super().__init__(reason)
        self.index, self.reason, self.seconds = index, reason, seconds


class NoRoom(Exception):
    """A member's replacement found no room in the cluster within its wait (its node is gone and
    no other holds its bundle): an elastic fleet drops it (`health.CallHealth.no_room`)."""


class ActorGroup:
    """Handles of one role's actors and how to start member i again.

    role: what a member is called in messages (`rollout engine`, `reward worker`, `learner`);
    start(i): a new member i, placed where member i was (None: a lost member ends the call with
    ActorLostError); after_start(i): the role's hook on a new member i, which admits it (returns
    text for the restart line, e.g. the adapter it loaded; raises to refuse it);
    ready_timeout_s: how long a new member may take to start; where: how the restart line says
    where it started. `members` is kept, not copied: a replacement takes its predecessor's place
    in the same list; a member gone for good stays there as None (indices are slots). `health`
    holds the decisions (`cluster.health.GroupHealth`, or a `cluster.fleet.Fleet`)."""

    def __init__(self, role: str, members: list[Any],
                 start: Callable[[int], Any] | None = None, max_restarts: int = 2,
                 ready_timeout_s: float = 600.0,
                 after_start: Callable[[int], str | None] | None = None,
                 notify: Callable[[str], None] = print, where: str = " in its placement bundle",
                 repeat: bool = True, health: GroupHealth | None = None) -> None:
        self.health = health or GroupHealth(role, len(members), max_restarts, start is not None,
                                            repeat)
        self.role, self.members = role, members
        self.start, self.after_start, self.notify = start, after_start, notify
        self.ready_timeout_s, self.where = ready_timeout_s, where

    def __len__(self) -> int:
        return len(self.members)

    @property
    def restarts(self) -> int:
        """Members started again over the group's life (lost or hung)."""
        return self.health.restarts

    @property
    def max_restarts(self) -> int:
        return self.health.max_restarts

    @max_restarts.setter
    def max_restarts(self, n: int) -> None:
        self.health.max_restarts = n

    # ---- calls ---------------------------------------------------------------------------------
    def call(self, what: str, submit: Callable[[int], Any], timeout_s: float,
             indices: Sequence[int] | None = None,
             on_timeout: Callable[[int], str | None] | None = None,
             setting: str = "", fetch: bool = True) -> list[Any]:
        """`submit(i)` (an ObjectRef) on members `indices` (default the working ones) at once;
        their results in that order (`stream` says what happens to lost and hung members)."""
        indices = list(self.health.working() if indices is None else indices)
        results = dict(self.stream(what, submit, timeout_s, indices, on_timeout, setting, fetch))
        return [results[i] for i in indices]

    def stream(self, what: str, submit: Callable[[int], Any], timeout_s: float,
               indices: Sequence[int] | None = None,
               on_timeout: Callable[[int], str | None] | None = None,
               setting: str = "", fetch: bool = True,
               route: Callable[[int], int] | None = None) -> Iterator[tuple[int, Any]]:
        """(k, result) for each call k (default: one per working member) as soon as it returns.
        `submit(k)` submits call k on member `route(k)` (default: member k) and returns its
        ObjectRef. All calls are in flight at once and waited on together; a call not done
        `timeout_s` after it was submitted counts as a hung member. A lost or hung member is
        replaced (`replace`) and its call submitted again with a fresh deadline, at most
        `max_restarts` times in this call (`cluster.health`); a member whose replacement finds
        no room is dropped and `route` sends its call to another member. `on_timeout(i)`, asked
        before a hung member is killed, may give the reason to report (and change what the next
        submit sends); `setting` names what decides the deadline, for the message. An error the
        member's own code raised is raised here as Ray gives it (`RayTaskError`). A call routed
        to a dropped member alone gives None. `fetch=False`
        yields the ObjectRef itself once it is ready and its member still alive, without
        fetching it (an adapter on its way to the engines)."""
        keys = list(self.health.working() if indices is None else indices)
        route = route or (lambda k: k)
        pending: dict[Any, tuple[int, float]] = {}  # ref -> (call, deadline)
        for k in keys:  # submitted now, whenever the caller starts reading
            pending[submit(k)] = (k, time.monotonic() + timeout_s)
        return self._collect(what, submit, timeout_s, pending, on_timeout, setting, fetch, route)

    def _collect(self, what: str, submit: Callable[[int], Any], timeout_s: float,
                 pending: dict[Any, tuple[int, float]],
                 on_timeout: Callable[[int], str | None] | None,
                 setting: str, fetch: bool, route: Callable[[int], int]
                 ) -> Iterator[tuple[int, Any]]:
        import ray

        health = self.health.call()
        while pending:
            wait_s = max(0.0, min(d for _, d in pending.values()) - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait_s, fetch_local=fetch)
            if ready:
                ref = ready[0]
                k, _ = pending.pop(ref)
                i = route(k)
                outcome, value, reason = self._outcome(i, ref, what, timeout_s, fetch)
            else:  # the earliest deadline passed
                ref, (k, deadline) = min(pending.items(), key=lambda item: item[1][1])
                if deadline > time.monotonic():
                    continue
                del pending[ref]
                i = route(k)
                outcome, value = Outcome.HUNG, None
                reason = ((on_timeout(i) if on_timeout else None)
                          or hung_reason(self.role, i, what, timeout_s, setting))
            verdict = health.judge(i, outcome, reason)
            if verdict.action is Action.DELIVER:
                yield k, value
                continue
            if verdict.action is Action.RAISE:
                _settle(pending)
                raise value
            try:
                self._perform(i, verdict)
            except NoRoom as e:
                verdict = health.no_room(i, f"{reason}; {e}")
                if verdict.action is not Action.DROP:
                    raise ActorLostError(verdict.reason) from None
                self.drop(i, f"{verdict.reason}: dropped")
                if self.members[route(k)] is None:  # a call of that member alone: none left
                    yield k, None
                    continue
            pending[submit(k)] = (k, time.monotonic() + timeout_s)

    def _outcome(self, i: int, ref: Any, what: str, timeout_s: float,
                 fetch: bool) -> tuple[Outcome, Any, str]:
        """(outcome, the result or the member's own error, the reason for a lost member) of a
        call that is done."""
        import ray

        try:
            if fetch:
                return Outcome.RETURNED, ray.get(ref), ""
            # the object stays where it is; its maker must still be there to serve it (a CUDA
            # IPC handle points into the member's own memory)
            ray.get(self.members[i].__ray_ready__.remote(), timeout=timeout_s)
            return Outcome.RETURNED, ref, ""
        except ray.exceptions.GetTimeoutError:
            return Outcome.HUNG, None, hung_reason(self.role, i, what, timeout_s)
        except Exception as e:  # noqa: BLE001 - a lost member is replaced, its own error raised
            if is_lost_actor(e):
                return Outcome.LOST, None, lost_reason(self.role, i, what, first_line(e))
            return Outcome.RAISED, e, ""

    def _perform(self, i: int, verdict: Verdict) -> None:
        if verdict.action is Action.GIVE_UP:
            raise ActorLostError(verdict.reason)
        self.replace(i, verdict.reason)

    # ---- replacing a member --------------------------------------------------------------------
    def replace(self, i: int, reason: str) -> None:
        """Kill member i (dead already, hung, or failing a check), start it again (`start`), wait
        until it is ready, admit it through the role's hook and say so through `notify`.
        ActorLostError when it cannot come back; `MemberRestarted` afterwards in a
        `repeat=False` group."""
        import ray

        if self.start is None:
            raise ActorLostError(f"{reason}; this {self.role} group cannot start new members")
        began = time.perf_counter()
        ray.kill(self.members[i], no_restart=True)  # a hung call dies with its process
        self.health.replacing(i)
        self.members[i] = member = self.start(i)  # NoRoom: no place for it came
        try:
            ray.get(member.__ray_ready__.remote(), timeout=self.ready_timeout_s)
            self.health.up(i)
            extra = self.after_start(i) if self.after_start is not None else None
        except ActorLostError as e:  # the hook's own verdict on the new member
            raise ActorLostError(f"{reason}; {e}") from None
        except InfraError:  # e.g. the sync check's verdict, which names what it measured
            raise
        except Exception as e:  # noqa: BLE001 - any failure to come back ends the run
            raise ActorLostError(f"{reason}; starting it again failed: {first_line(e)} "
                                 f"(cluster.restart_timeout_s={self.ready_timeout_s:g})") from None
        self.health.admit(i)
        seconds = time.perf_counter() - began
        if not self.health.after_replace():
            raise MemberRestarted(i, reason, seconds)
        self.notify(f"{reason}: started again{self.where} in {seconds:.1f} s"
                    + (f" {extra}" if extra else ""))

    def drop(self, i: int, reason: str) -> None:
        """Member i is gone for good (its slot stays, empty); said through `notify`."""
        import ray

        if self.members[i] is not None:
            ray.kill(self.members[i], no_restart=True)
        self.members[i] = None
        self.health.gone(i)
        self.notify(f"{reason}; {len(self.health.working())} {self.role}(s) go on")

    def kill_all(self) -> None:
        import ray

        for i, member in enumerate(self.members):
            if member is not None:
                ray.kill(member)
            self.health.gone(i)


def _settle(pending: dict[Any, Any], bound_s: float = 10.0) -> None:
    """Fetch what the calls still in flight return (waiting at most `bound_s`) and drop it: when
    one member's error ends the call, its siblings often fail alike, and Ray prints each error
    never fetched as an "Unhandled error" with its traceback after ours, burying the run's last
    line."""
    import ray

    if not pending:
        return
    ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=bound_s)
    for ref in ready:
        try:
            ray.get(ref)
        except Exception:  # noqa: BLE001 - the first error is the one raised
            pass
