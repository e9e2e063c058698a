"""One actor group for every role: rollout engines, reward workers, and the learner (a group of
one). The only place that waits on an actor's calls.

`ActorGroup` submits a call to its members, waits for all of them with one `ray.wait` and a
deadline, and treats a member whose process is gone (`faults.is_lost_actor`) or whose call runs
past its deadline (a hung process: SIGSTOP, a deadlock, a stuck device) the same way: the member
is killed, started again where it was (the placement's `start(i)`: its own bundle), the role's
hook runs on the new member (an engine loads the group's adapter), and the lost call is
submitted again, at most `max_restarts` times per call; then `ActorLostError`, which the run
ends with (exit 3, after a checkpoint). A role whose lost call cannot simply be repeated (the
learner: its state went with its process) asks for `repeat=False` and gets `MemberRestarted`
instead, once the new member is ready.

Deadlines follow from the work (`work_deadline`: tokens at a floor throughput plus a slack);
their settings and margins are documented in `config.ClusterConfig`.

Actors stay plain classes: the group only holds handles and calls `start(i)`, which the
placement (`cluster.placement`) builds around `ray.remote`.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Sequence

from grpo_ray.faults import ActorLostError, InfraError, first_line, is_lost_actor


def work_deadline(tokens: float, floor_tokens_per_s: float, slack_s: float) -> float:
    """Seconds a call may take to process `tokens` at no less than `floor_tokens_per_s`, plus
    `slack_s` (start-up of the call: compilation, scheduling)."""
    return tokens / floor_tokens_per_s + slack_s


class MemberRestarted(BaseException):
    """A member of a `repeat=False` group was lost and has been started again (fresh, without
    the state it had): the caller restores that state (the trainer: the newest checkpoint).
    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way (a
    transport's fallback, a retry) takes it for an ordinary failure."""

    def __init__(self, index: int, reason: str, seconds: float):
        super().__init__(reason)
        self.index, self.reason, self.seconds = index, reason, seconds


class ActorGroup:
    """Handles of one role's actors and how to start member i again.

    role: what a member is called in messages (`rollout engine`, `reward worker`, `learner`);
    start(i): a new member i, placed where member i was (None: a lost member ends the call with
    ActorLostError); after_start(i): the role's hook on a new member i (returns text for the
    restart line, e.g. the adapter it loaded); ready_timeout_s: how long a new member may take to
    start; where: how the restart line says where it started. `members` is kept, not copied: a
    replacement takes its predecessor's place in the same list."""

    def __init__(self, role: str, members: list[Any],
                 start: Callable[[int], Any] | None = None, max_restarts: int = 2,
                 ready_timeout_s: float = 600.0,
                 after_start: Callable[[int], str | None] | None = None,
                 notify: Callable[[str], None] = print, where: str = " in its placement bundle",
                 repeat: bool = True) -> None:
        if not members:
            raise ValueError(f"{role} group: needs at least one member")
        self.role, self.members = role, members
        self.start, self.after_start, self.notify = start, after_start, notify
        self.max_restarts, self.ready_timeout_s = max_restarts, ready_timeout_s
        self.where, self.repeat = where, repeat
        self.restarts = 0
        """Members started again over the group's life (lost or hung)."""

    def __len__(self) -> int:
        return len(self.members)

    # ---- calls ---------------------------------------------------------------------------------
    def call(self, what: str, submit: Callable[[int], Any], timeout_s: float,
             indices: Sequence[int] | None = None,
             on_timeout: Callable[[int], str | None] | None = None,
             setting: str = "") -> list[Any]:
        """`submit(i)` (an ObjectRef) on members `indices` (default all) at once; their results
        in that order (`stream` says what happens to lost and hung members)."""
        indices = list(range(len(self.members)) if indices is None else indices)
        results = dict(self.stream(what, submit, timeout_s, indices, on_timeout, setting))
        return [results[i] for i in indices]

    def stream(self, what: str, submit: Callable[[int], Any], timeout_s: float,
               indices: Sequence[int] | None = None,
               on_timeout: Callable[[int], str | None] | None = None,
               setting: str = "") -> Iterator[tuple[int, Any]]:
        """(i, result) for each member i as soon as its call returns. All calls are in flight at
        once and waited on together; a call not done `timeout_s` after it was submitted counts as
        a hung member. A lost or hung member is replaced (`replace`) and its call submitted again
        with a fresh deadline, at most `max_restarts` times in this call; `on_timeout(i)`, asked
        before a hung member is killed, may give the reason to report (and change what the next
        `submit(i)` sends); `setting` names what decides the deadline, for the message. An error the member's own code raised is raised here as Ray gives it
        (`RayTaskError`)."""
        indices = list(range(len(self.members)) if indices is None else indices)
        pending: dict[Any, tuple[int, float]] = {}  # ref -> (member, deadline)
        for i in indices:  # submitted now, whenever the caller starts reading
            pending[submit(i)] = (i, time.monotonic() + timeout_s)
        return self._collect(what, submit, timeout_s, pending, on_timeout, setting)

    def _collect(self, what: str, submit: Callable[[int], Any], timeout_s: float,
                 pending: dict[Any, tuple[int, float]],
                 on_timeout: Callable[[int], str | None] | None,
                 setting: str) -> Iterator[tuple[int, Any]]:
        import ray

        def launch(i: int) -> None:
            pending[submit(i)] = (i, time.monotonic() + timeout_s)

        restarts = 0
        while pending:
            wait_s = max(0.0, min(d for _, d in pending.values()) - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait_s)
            if ready:
                ref = ready[0]
                i, _ = pending.pop(ref)
                try:
                    yield i, ray.get(ref)
                    continue
                except Exception as e:  # noqa: BLE001 - lost members are replaced, else raise
                    if not is_lost_actor(e):
                        raise
                    reason = f"{self.role} {i} lost during {what} ({first_line(e)})"
            else:  # the earliest deadline passed
                now = time.monotonic()
                ref, (i, _) = min(pending.items(), key=lambda item: item[1][1])
                if pending[ref][1] > now:
                    continue
                del pending[ref]
                reason = ((on_timeout(i) if on_timeout else None)
                          or f"{self.role} {i} did not finish {what} within its deadline of "
                             f"{timeout_s:.0f} s{f' ({setting})' if setting else ''}: hung")
            restarts += 1
            if restarts > self.max_restarts:
                raise ActorLostError(f"{reason}, after {self.max_restarts} restart(s) in the same "
                                     "call (cluster.max_restarts); see the Ray logs of its node")
            self.replace(i, reason)
            launch(i)

    def wait_done(self, i: int, what: str, ref: Any, timeout_s: float, setting: str = "") -> None:
        """Wait, without fetching it, until member i's call `ref` (submitted by the caller) is
        done, then check that the member is still there: a hang or a loss replaces it (for a
        `repeat=False` group, which cannot repeat a call it did not submit: `MemberRestarted`).
        For a result that should stay in the object store (an adapter on its way to the
        engines)."""
        import ray

        ready, _ = ray.wait([ref], timeout=timeout_s, fetch_local=False)
        if not ready:
            self.replace(i, f"{self.role} {i} did not finish {what} within its deadline of "
                            f"{timeout_s:.0f} s{f' ({setting})' if setting else ''}: hung")
            raise ActorLostError(f"{self.role} {i}: {what} lost with the member")
        try:
            ray.get(self.members[i].__ray_ready__.remote(), timeout=timeout_s)
        except Exception as e:  # noqa: BLE001 - gone or hung: the call's result is lost
            if not (is_lost_actor(e) or isinstance(e, ray.exceptions.GetTimeoutError)):
                raise
            self.replace(i, f"{self.role} {i} lost during {what} ({first_line(e)})")
            raise ActorLostError(f"{self.role} {i}: {what} lost with the member") from None

    # ---- replacing a member --------------------------------------------------------------------
    def replace(self, i: int, reason: str) -> None:
        """Kill member i (dead already, hung, or failing a check), start it again (`start`), wait
        until it is ready, run the role's hook on it and say so through `notify`. ActorLostError
        when it cannot come back; `MemberRestarted` afterwards in a `repeat=False` group."""
        import ray

        if self.start is None:
            raise ActorLostError(f"{reason}; this {self.role} group cannot start new members")
        began = time.perf_counter()
        ray.kill(self.members[i], no_restart=True)  # a hung call dies with its process
        self.members[i] = member = self.start(i)
        try:
            ray.get(member.__ray_ready__.remote(), timeout=self.ready_timeout_s)
            extra = self.after_start(i) if self.after_start is not None else None
        except ActorLostError as e:  # the hook's own verdict on the new member
            raise ActorLostError(f"{reason}; {e}") from None
        except InfraError:  # e.g. the sync check's verdict, which names what it measured
            raise
        except Exception as e:  # noqa: BLE001 - any failure to come back ends the run
            raise ActorLostError(f"{reason}; starting it again failed: {first_line(e)} "
                                 f"(cluster.restart_timeout_s={self.ready_timeout_s:g})") from None
        self.restarts += 1
        seconds = time.perf_counter() - began
        if not self.repeat:
            raise MemberRestarted(i, reason, seconds)
        self.notify(f"{reason}: started again{self.where} in {seconds:.1f} s"
                    + (f" {extra}" if extra else ""))

    def kill_all(self) -> None:
        import ray

        for member in self.members:
            ray.kill(member)
