"""What a run does when something fails or is stopped: the vocabulary shared by the engine group,
the reward pool, the trainer and the command line.

- An actor whose process died (`kill -9`, a lost node, an out-of-memory kill) is started again
  by the group that owns it, which repeats the lost call; `ActorLostError` ends the run only after
  `cluster.max_restarts` losses in one call.
- SIGINT (Ctrl-C) and SIGTERM (`ray job stop`, a scheduler's preemption) stop the run after the
  step in flight, with a checkpoint (`StopOnSignal`); a second signal stops it at once.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator


class InfraError(RuntimeError):
    """A failure of the machines, not of the user's input (an actor that cannot be brought back,
    a sync the engines keep failing): the command line prints its one line and exits with
    `EXIT_INFRA`, after the trainer has checkpointed the last completed step. Running the same
    command again resumes from that checkpoint."""

    kind = "infrastructure error"


EXIT_INFRA = 3
"""Exit code of an infrastructure failure (bad input is 2, a signal 128 + its number)."""
EXIT_BUG = 1
"""Exit code of an unexpected error (a bug, ours or a library's): its traceback goes to
`<output.dir>/logs/error.log`, after the run checkpointed the last completed step."""


class ActorLostError(InfraError):
    """An actor could not be brought back (it died again and again, or its replacement did not
    start): the message says which, during what, and why."""

    kind = "actor lost"


def is_lost_actor(error: BaseException) -> bool:
    """True for Ray's errors that mean the actor's process is gone or cannot be reached
    (`ActorDiedError`, `ActorUnavailableError`, both `RayActorError`s), not for an exception the
    actor's own code raised."""
    from ray.exceptions import RayActorError

    return isinstance(error, RayActorError)


def first_line(error: BaseException, limit: int = 300) -> str:
    """`TypeName: first line of the message`, for one-line reports."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:limit] if text else ''}".rstrip(": ")


EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
"""The shell's convention, 128 + the signal's number."""


class StopNow(BaseException):
    """A second stop signal: leave at once, without finishing the step (a BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stop_at_once_on_signals() -> Iterator[None]:
    """While active, SIGINT and SIGTERM raise StopNow at once: what the command line installs
    while nothing can be finished (actors starting); `StopOnSignal` takes over in the training
    loop. Main thread only; the previous handlers come back on exit."""
    def handler(signum: int, frame: Any) -> None:
        raise StopNow(signum)

    previous = {s: signal.signal(s, handler) for s in EXIT_CODES}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class StopOnSignal:
    """While active (a context manager), SIGINT and SIGTERM only set `signum`: the loop checks it
    between steps, checkpoints and stops. A second signal raises `StopNow` at once. Handlers are
    installed in the main thread only (Python's rule) and restored on exit."""

    def __init__(self, print_fn: Callable[[str], None] = print):
        self.print = print_fn
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for s in EXIT_CODES:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise StopNow(signum)
        self.signum = signum
        self.print(f"{signal.Signals(signum).name} received: stopping after the step in flight "
                   "with a checkpoint (send it again to stop at once, without one)")


class Interrupted(Exception):
    """The run stopped on a signal after a step: where it stands and what was written."""

    def __init__(self, signum: int, step: int, checkpoint: Any):
        super().__init__(f"{signal.Signals(signum).name} at step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 128 + self.signum)
