"""Runs in the driver: the run's state on disk and its way back after a failure.

- `checkpoint` writes the last completed step (learner state, data position, adapter version,
  the rollout collected for the next step one step off) under `<output.dir>/checkpoints`;
  `restore` continues from one, as `grpo-ray train` does after a stop.
- `recover_learner`: a lost or hung learner is started again in its bundle (`cluster.learner`),
  empty; the run goes back to the newest checkpoint (none yet: step 0 and the base model), the
  engines to its adapter version, and the per-step logs are cut back to it.
- `on_failure`: any other error that ends the run (a bad reward, an actor that cannot come
  back, an error in an actor's own code, a bug) first checkpoints the last completed step, where
  the learner still answers, then the error goes on to the command line (exit 2, 3 or 1 by its
  kind: `cli.main`).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from grpo_ray.cluster.group import MemberRestarted
from grpo_ray.driver.checkpoint import step_dir_name
from grpo_ray.faults import ActorLostError, first_line


class Recovery:
    """The trainer's checkpoints and recoveries (module docstring). `trainer`: the
    `driver.trainer.Trainer` whose state it writes and restores (typed Any: the trainer holds its
    Recovery, and the two modules import one way only)."""

    def __init__(self, trainer: Any) -> None:
        self.t = trainer
        self.saved_step: int | None = None
        """Step of the newest checkpoint this run wrote or resumed from."""
        self.learner_restarts = 0
        """Times the learner was lost or hung and started again."""
        self._losses_at: tuple[int, int] = (0, 0)  # (step lost at, losses there in a row)

    @property
    def root(self) -> Path:
        return self.t.out / "checkpoints"

    # ---- writing -------------------------------------------------------------------------------
    def checkpoint(self) -> Path:
        """Checkpoint the run after `step` steps."""
        from grpo_ray.driver.checkpoint import save_checkpoint

        t = self.t
        state = t.learner.call("checkpoint state", "state_dict")
        adapter = t.learner.call("adapter export", "export_adapter", t.version)
        prefetched = t.next_rollout.state_dict() if t.next_rollout is not None else None
        trainer_state = {"adapter_version": t.version, "data": t.data_state,
                         "config": t.cfg.resolved(), "prefetched": prefetched}
        path = save_checkpoint(self.root, t.step, state, trainer_state, adapter,
                               keep=t.cfg.output.keep_checkpoints)
        self.saved_step = t.step
        return path

    def checkpoint_if_new(self) -> Path | None:
        """Checkpoint the last completed step unless it is saved already (None before step 1)."""
        t = self.t
        if t.step == 0 or self.saved_step == t.step:
            return self.root / step_dir_name(t.step) if t.step else None
        path = self.checkpoint()
        t.print(f"checkpoint of step {t.step} written to {path}")
        return path

    def on_failure(self, error: BaseException, learner_fresh: bool = False) -> None:
        """Before `error` ends the run: the last completed step is checkpointed where the
        learner still answers (a rollout still in flight is left out: a resumed run generates it
        again, with the same seeds). `learner_fresh`: the learner was started again and its
        state not yet restored (the failure came during its recovery): nothing to checkpoint."""
        t = self.t
        if learner_fresh:
            t.print(f"no checkpoint of step {t.step} written: the learner was restarted without "
                    "its state and not restored")
            return
        if t.next_rollout is not None and not t.next_rollout.collected:
            t.next_rollout = None
        try:
            self.checkpoint_if_new()
        except Exception as e:  # noqa: BLE001 - the learner itself may be what broke
            t.print(f"no checkpoint of step {t.step} could be written: {first_line(e)}")

    # ---- reading -------------------------------------------------------------------------------
    def restore(self, path: Path) -> None:
        """Continue from checkpoint `path`: learner state, data position, step, adapter version,
        and the engines get the checkpoint's adapter. Call after `setup`."""
        from grpo_ray.driver.checkpoint import changed_keys

        t = self.t
        state = self._restore_state(path)
        if t.version > 0:  # engines start with the base model, version 0
            t.sync.send(t.version)
        # rows a crashed run logged after its last checkpoint are logged again from here
        self._truncate_logs()
        t.read_back_evaluation("before")  # for the before/after table at the end
        t.print(f"resumed from {path} at step {t.step}, adapter version {t.version}")
        changed = changed_keys(state.get("config", {}), t.cfg.resolved())
        if changed:  # e.g. a longer run: the lr schedule is re-planned for the new total
            t.print(f"config differs from the checkpoint's: {', '.join(changed)}; the "
                    f"learning-rate schedule follows this run's settings from step {t.step}")

    def recover_learner(self, lost: MemberRestarted) -> None:
        """After the learner was lost or hung (and started again, empty, in its bundle): restore
        the newest checkpoint (none yet: step 0 and the base model), bring every engine to its
        version, cut the logs back to it, and say how many steps are redone. ActorLostError when
        the learner is lost more than `cluster.max_restarts` times before it gets past the step
        it was lost at."""
        from grpo_ray.driver.checkpoint import resumable_checkpoint

        t = self.t
        at = t.in_flight or t.step
        last_at, losses = self._losses_at
        losses = losses + 1 if at <= last_at else 1
        self._losses_at = (max(at, last_at), losses)
        if losses > t.cfg.cluster.max_restarts:
            raise ActorLostError(f"{lost.reason}: the learner was lost {losses} times before "
                                 f"getting past step {at} (cluster.max_restarts="
                                 f"{t.cfg.cluster.max_restarts})")
        began = time.perf_counter()
        self.learner_restarts += 1
        t.next_rollout = None  # a generation in flight (one step off) is dropped
        path = resumable_checkpoint(self.root)[0] if self.saved_step else None
        self._restore_state(path)
        t.sync.reset(t.version)
        self._truncate_logs()
        t.in_flight = 0
        where = f"restored checkpoint {path.name}" if path else "no checkpoint yet: back to step 0"
        redo = at - t.step
        t.print(f"learner lost at step {at}: {lost.reason}; restarted in its bundle in "
                f"{lost.seconds:.1f} s, {where} (engines at adapter version {t.version}) in "
                f"{time.perf_counter() - began:.1f} s more: {redo} step"
                f"{'' if redo == 1 else 's'} to redo")

    def _restore_state(self, path: Path | None) -> dict:
        """Learner state, data position, prefetched rollout, step and adapter version of
        checkpoint `path` (None: those of step 0, for a fresh learner); the checkpoint's trainer
        state."""
        from grpo_ray.driver.checkpoint import load_checkpoint

        t = self.t
        if path is None:
            state = {"data": t.initial_data_state, "prefetched": None, "step": 0,
                     "adapter_version": 0}
        else:
            learner_state, state = load_checkpoint(path)
            t.learner.call("checkpoint restore", "load_state_dict", learner_state)
        t.prompts.load_state_dict(state["data"])
        t.data_state = t.prompts.state_dict()
        t.next_rollout = t.rollouts.restored(state.get("prefetched"))
        t.step, t.version = state["step"], state["adapter_version"]
        self.saved_step = t.step if path is not None else None
        return state

    def _truncate_logs(self) -> None:
        """Cut the per-step logs after `step`: the steps after it are logged again."""
        from grpo_ray.driver.checkpoint import truncate_jsonl

        for name in ("metrics.jsonl", "completions.jsonl", "eval.jsonl"):
            truncate_jsonl(self.t.out / name, self.t.step)
