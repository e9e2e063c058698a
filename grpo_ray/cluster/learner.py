"""The driver's one handle of the learner actor: a group of one (`cluster.group.ActorGroup`,
`repeat=False`), so that every call has a deadline and a lost or hung learner is started again in
its bundle. Its state went with its process: the call raises `MemberRestarted` and the trainer
goes back to the newest checkpoint (`driver.recovery`). The trainer, the adapter sync and the
checkpoints all reach the learner through this object, never through a raw actor handle.
"""
from __future__ import annotations

from typing import Any, Callable

from grpo_ray.cluster.group import ActorGroup
from grpo_ray.config import ClusterConfig


class Pending:
    """A call in flight: `result()` waits for it (with the call's deadline)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def result(self) -> Any:
        (_, value), = self._stream
        return value


class LearnerHandle:
    """The learner actor, as the driver calls it. `start(0)` starts it again in its bundle
    (None: a lost learner ends the run); `cluster` gives the deadlines and the restart bound."""

    def __init__(self, actor: Any, start: Callable[[int], Any] | None, cluster: ClusterConfig,
                 notify: Callable[[str], None] = print) -> None:
        self.cluster = cluster
        self.group = ActorGroup("learner", [actor], start, cluster.max_restarts,
                                cluster.restart_timeout_s, notify=notify, repeat=False)

    @property
    def actor(self) -> Any:
        """The actor handle now (a restart replaces it)."""
        return self.group.members[0]

    @property
    def restarts(self) -> int:
        return self.group.restarts

    def call(self, what: str, method: str, *args: Any, timeout_s: float | None = None,
             setting: str = "cluster.call_timeout_s") -> Any:
        """`learner.<method>(*args)` with a deadline (default `cluster.call_timeout_s`)."""
        return self.submit(what, method, *args, timeout_s=timeout_s, setting=setting).result()

    def submit(self, what: str, method: str, *args: Any, timeout_s: float | None = None,
               setting: str = "cluster.call_timeout_s") -> Pending:
        """`call`, returning at once: the caller does other work, then `.result()`."""
        timeout = self.cluster.call_timeout_s if timeout_s is None else timeout_s
        return Pending(self.group.stream(
            what, lambda i: getattr(self.actor, method).remote(*args), timeout, setting=setting))

    def export(self, version: int, form: str, dtype: str | None) -> Any:
        """The ObjectRef of adapter `version` in `form` (`LearnerWorker.export_adapter`), once the
        learner has made it; not fetched (it goes to the engines from the object store)."""
        return self.group.call(
            "adapter export", lambda i: self.actor.export_adapter.remote(version, form, dtype),
            self.cluster.call_timeout_s, setting="cluster.call_timeout_s", fetch=False)[0]

    def kill(self) -> None:
        self.group.kill_all()
