"""The reward actor pool: completions are sharded over CPU actors that run the reward functions.

Rewards run outside the driver so that a slow, hung or crashing user function cannot stall or
kill the loop. What a function cannot do becomes unscored rows (None, TRL's rule), counted per
function in `Scores.failed`, with its first error in `Scores.errors`:
- it raises, or returns NaN/inf or None instead of a list: those rows (its whole shard when it
  raises) are unscored for that function;
- it runs past `reward.timeout_s`: its worker is killed and replaced, and the shard is scored
  again without it (the worker says which functions it was running);
- its worker's process dies: the worker is replaced and the shard scored again.
Both go through the role-neutral `ActorGroup` (`cluster.group`), at most `max_restarts` times
in one call.
A wrong number of scores or a value that is not a number is a bug in the function, not a passing
failure: it fails the step at once with the function's name. `unscored_error` says when a step
has too few scored rows to train on (`reward.max_unscored_fraction`).
"""
from __future__ import annotations

from typing import Any, Callable

import ray
from ray.exceptions import GetTimeoutError, RayTaskError

from grpo_ray.cluster.engines import even_slices
from grpo_ray.cluster.group import ActorGroup
from grpo_ray.config import RewardFunctionConfig, UserError
from grpo_ray.contracts import PromptBatch, Rollout, Scores
from grpo_ray.faults import ActorLostError
from grpo_ray.reward.registry import get_reward_functions
from grpo_ray.reward.worker import RewardWorker, ShardScores

# Calls a worker runs at once: one scoring call plus `running()`, which the pool asks after a
# timeout.
_WORKER_CONCURRENCY = 4


class RewardError(UserError, RuntimeError):
    """Too many rows of a step could not be scored; the message names the functions."""

    kind = "reward error"


class RewardPool:
    """Scores a step's rollout on the reward workers and sums the weighted functions.

    `workers` is kept, not copied: a replaced worker takes its predecessor's place in the same
    list, which the placement's `Actors` shuts down at the end. `start()` starts one more worker
    (None: a lost or hung worker ends the step with ActorLostError). `notify` gets one line per
    worker replaced and the first failure of each function; a step with more unscored rows than
    `max_unscored_fraction` raises RewardError (`unscored_error`)."""

    def __init__(self, workers: list[ray.actor.ActorHandle],
                 functions: list[RewardFunctionConfig], timeout_s: float,
                 start: Callable[[], ray.actor.ActorHandle] | None = None, max_restarts: int = 2,
                 max_unscored_fraction: float = 1.0, notify: Callable[[str], None] = print):
        if not workers:
            raise ValueError("reward pool: needs at least one worker")
        self.workers = workers
        self.weights = [float(f.weight) for f in functions]
        self.timeout_s, self.max_unscored_fraction = timeout_s, max_unscored_fraction
        # workers are plain CPU actors outside the placement group: any new one will do
        self.group = ActorGroup("reward worker", workers,
                                None if start is None else (lambda i: start()), max_restarts,
                                ready_timeout_s=max(60.0, timeout_s), notify=notify, where="")
        self._reported: set[str] = set()  # functions whose first failure was told

    @property
    def restarts(self) -> int:
        """Workers started again over the pool's life (lost or hung)."""
        return self.group.restarts

    @property
    def notify(self) -> Callable[[str], None]:
        return self.group.notify

    @notify.setter
    def notify(self, fn: Callable[[str], None]) -> None:
        self.group.notify = fn

    @property
    def max_restarts(self) -> int:
        return self.group.max_restarts

    @max_restarts.setter
    def max_restarts(self, n: int) -> None:
        self.group.max_restarts = n

    def score(self, batch: PromptBatch, rollout: Rollout, check_unscored: bool = True) -> Scores:
        """Per-function scores and weighted totals of every completion, prompt-major. With
        `check_unscored`, RewardError when too many rows are unscored (`unscored_error`; a
        caller scoring a step in parts checks the whole once)."""
        rows, texts = rollout.prompt_index, rollout.completion_texts
        if len(rows) != len(texts) or any(not 0 <= i < len(batch) for i in rows):
            raise ValueError(f"reward pool: rollout of {len(texts)} completions (prompt_index: "
                             f"{len(rows)} rows, largest {max(rows, default=-1)}) does not "
                             f"match a batch of {len(batch)} prompts")
        prompts = [batch.prompts[i] for i in rows]
        # the dataset's own columns first, as TRL passes them; the gold answer, the question and
        # the token ids keep their names over a dataset column of the same name
        columns = {name: [values[i] for i in rows] for name, values in batch.columns.items()}
        columns.update({"answer": [batch.answers[i] for i in rows],
                        "question": [batch.questions[i] for i in rows],
                        "completion_ids": rollout.completion_ids})
        shards = even_slices(len(texts), len(self.workers))

        def call(k: int, skip: dict[str, str]) -> ray.ObjectRef:
            a, b = shards[k]
            return self.workers[k].score.remote(prompts[a:b], texts[a:b],
                                                {c: v[a:b] for c, v in columns.items()}, skip)

        parts = self._gather(call, shards)
        if not parts:
            return Scores(per_function={}, total=[])
        scores = _merge(parts, self.weights)
        for name in [n for n in scores.errors if n not in self._reported]:
            self._reported.add(name)
            self.notify(f"reward function {name!r} failed on {scores.failed[name]} of "
                        f"{len(texts)} completions: {scores.errors[name]} (its rows are "
                        f"unscored; counted in reward/{name}/failed, told once)")
        if check_unscored:
            self.check_unscored(scores)
        return scores

    def check_unscored(self, scores: Scores) -> None:
        """RewardError when a step has too many unscored rows (`unscored_error`)."""
        problem = unscored_error(scores, self.max_unscored_fraction)
        if problem:
            raise RewardError(problem)

    def _gather(self, call: Callable[[int, dict[str, str]], ray.ObjectRef],
                shards: list[tuple[int, int]]) -> list[ShardScores]:
        """Every shard's scores: all calls at once, one wait of `timeout_s` (`ActorGroup`); a
        lost or hung worker is replaced and its shard scored again (after a hang, without the
        functions it was running)."""
        skip: dict[int, dict[str, str]] = {k: {} for k in range(len(shards))}
        done: dict[int, ShardScores] = {}

        def hung(k: int) -> str:
            """Before worker k is killed: which functions hang, skipped in its shard's retry."""
            names = self._running(k)
            why = f"timed out after {self.timeout_s:g} s (reward.timeout_s)"
            for name in names or self._names(done):
                skip[k].setdefault(name, why)
            return (f"reward worker {k} ran {', '.join(names) or 'its functions'} past "
                    f"reward.timeout_s={self.timeout_s:g} s; scoring its "
                    f"{shards[k][1] - shards[k][0]} completions again without "
                    f"{', '.join(names) or 'any function'}")

        try:
            for k, part in self.group.stream("scoring", lambda k: call(k, skip[k]),
                                             self.timeout_s, range(len(shards)), on_timeout=hung,
                                             setting="reward.timeout_s"):
                done[k] = part
        except RayTaskError as e:  # the one-line error naming the function, not Ray's
            raise e.cause from e
        return [done[k] for k in range(len(shards))]

    def _running(self, k: int) -> list[str]:
        """The functions worker k runs now ([] when it does not answer)."""
        try:
            return ray.get(self.workers[k].running.remote(), timeout=2.0)
        except Exception:  # noqa: BLE001 - a worker stuck outside Python, or gone
            return []

    def _names(self, results: dict[int, ShardScores]) -> list[str]:
        """Every function's name (from a finished shard, else from a worker)."""
        for part in results.values():
            return list(part.per_function)
        for k in range(len(self.workers)):
            try:
                return ray.get(self.workers[k].names.remote(), timeout=2.0)
            except Exception:  # noqa: BLE001 - try the next worker
                continue
        raise ActorLostError("reward pool: no worker answers")


def _merge(parts: list[ShardScores], weights: list[float]) -> Scores:
    """The shards' scores joined in row order, and the weighted totals."""
    names = list(parts[0].per_function)
    if len(names) != len(weights):
        raise ValueError(f"reward pool: workers run {len(names)} functions ({names}) but "
                         f"{len(weights)} weights were given")
    per_function = {name: [s for part in parts for s in part.per_function[name]]
                    for name in names}
    failed = {name: sum(part.failed.get(name, 0) for part in parts) for name in names}
    errors: dict[str, str] = {}
    for part in parts:
        for name, error in part.errors.items():
            errors.setdefault(name, error)
    # TRL's rule: a function's None means it does not apply to the row; the row is
    # unscorable (no advantage) only when no function scored it.
    total = []
    for i in range(len(per_function[names[0]])):
        scored = [w * per_function[name][i] for w, name in zip(weights, names)
                  if per_function[name][i] is not None]
        total.append(sum(scored) if scored else None)
    return Scores(per_function=per_function, total=total,
                  failed={k: v for k, v in failed.items() if v}, errors=errors)


def unscored_error(scores: Scores, max_fraction: float) -> str | None:
    """One line naming the functions when more than `max_fraction` of the step's completions
    are unscored, or when one function failed on more than that fraction (even if others
    scored those rows: a function that fails that often is broken, not unlucky); else None."""
    n = len(scores.total)
    unscored = sum(t is None for t in scores.total)
    failing = {k: c for k, c in scores.failed.items() if c > max_fraction * n}
    if not failing and unscored <= max_fraction * n:
        return None
    limit = f"reward.max_unscored_fraction={max_fraction:g}"
    if failing:
        return "; ".join(f"{name} failed on {c} of {n} completions ({scores.errors[name]})"
                         for name, c in failing.items()) + f", more than {limit}"
    culprits = ", ".join(f"{k} ({scores.errors[k]})" for k in scores.failed) or (
        f"{', '.join(scores.per_function)} returned None for them")
    return (f"{unscored} of {n} completions unscored, more than {limit}: {culprits}; raise "
            "the fraction if your functions leave rows unscored by design")


def reward_worker_starter(functions: list[RewardFunctionConfig], mode: str, num_cpus: float,
                          runtime_env: dict[str, Any] | None = None
                          ) -> Callable[[], ray.actor.ActorHandle]:
    """A function that starts one reward actor (without waiting for it): how the pool is built
    and how it replaces a lost or hung worker."""
    options: dict[str, Any] = {"num_cpus": num_cpus, "max_concurrency": _WORKER_CONCURRENCY}
    if runtime_env is not None:
        options["runtime_env"] = runtime_env
    actor = ray.remote(RewardWorker).options(**options)
    return lambda: actor.remote(functions, mode)


def build_reward_workers(functions: list[RewardFunctionConfig], mode: str, num_workers: int,
                         num_cpus: float, runtime_env: dict[str, Any] | None = None,
                         ready_timeout_s: float = 120.0) -> list[ray.actor.ActorHandle]:
    """Start `num_workers` reward actors and wait until they have loaded their functions.

    The functions are resolved here first, so a bad name or import path fails with its one-line
    message before any actor starts. `runtime_env` carries custom reward modules to the workers
    (e.g. `{"py_modules": [...]}` on a cluster)."""
    get_reward_functions(functions, mode)
    start = reward_worker_starter(functions, mode, num_cpus, runtime_env)
    workers = [start() for _ in range(num_workers)]
    try:
        ray.get([w.names.remote() for w in workers], timeout=ready_timeout_s)
    except GetTimeoutError:
        for w in workers:
            ray.kill(w)
        raise TimeoutError(f"reward pool: {num_workers} workers of {num_cpus:g} CPUs each did not "
                           f"start within {ready_timeout_s:g} s (not enough free CPUs?)") from None
    return workers
