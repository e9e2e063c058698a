"""The driver: places the actors, then runs GRPO steps in order:
generate -> score -> advantages -> update -> sync the adapter (verified) -> log
(`rollout.source` produces each step's scored batch; one step off policy, the next batch is
generated while the learner updates).

The driver holds no model. It moves token ids and scores between actors, computes the
group-relative advantages (cheap, and it is the only place that sees whole groups), and logs.
Lost or hung engines and reward workers are replaced where they are owned (`EngineGroup`,
`RewardPool`, both on `cluster.group.ActorGroup`); the loop only reports what they did. The
learner is a group of one: when it is lost or hangs, it is started again in its bundle and the
run goes back to the newest checkpoint (`recover_learner`). A stop (SIGINT, SIGTERM, or a
failure the actors survive) checkpoints the last completed step first (`fit`).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from grpo_ray.checkpoint import step_dir_name
from grpo_ray.cluster.group import MemberRestarted, work_deadline
from grpo_ray.config import Config, UserError
from grpo_ray.contracts import TrainBatch
from grpo_ray.faults import ActorLostError, InfraError, Interrupted, StopOnSignal, first_line
from grpo_ray.metrics import StageTimer, sample_rows, step_metrics
from grpo_ray.rollout.source import ScoredBatch


def describe_startup(parts: dict[str, float]) -> str:
    """`Trainer.startup` in words, for the start-up line."""
    engines = f"engines {parts['engines_s']:.0f} s"
    if parts["learner_after_engines"]:  # the learner imported beside them, then loaded
        order = (f"{engines} beside the learner's imports {parts['learner_imports_s']:.0f} s, "
                 f"then its load {parts['learner_s']:.0f} s (rollout.kv_cache_gb would load "
                 "them together)")
    else:
        order = f"{engines} beside the learner {parts['learner_s']:.0f} s"
    return (f"up in {parts['total_s']:.0f} s: {order}; the sync probe's first scores "
            f"{parts['probe_base_s']:.0f} s")


class Trainer:
    """Owns the actors of one run and the loop over steps."""

    def __init__(self, cfg: Config, print_fn=print):
        self.cfg, self.print = cfg, print_fn
        self.out = Path(cfg.output.dir)
        self.version = 0
        self.step = 0
        self.checkpoints = self.out / "checkpoints"
        self.saved_step: int | None = None
        """Step of the newest checkpoint this run wrote or resumed from."""
        self.evals: dict[str, dict[str, float]] = {}
        """Evaluation metrics by tag (`before`, `step N`, `after`)."""
        self.sanity_answers: dict[str, str] = {}
        self.learner_restarts = 0
        """Times the learner was lost or hung and started again (`recover_learner`)."""
        self._in_flight = 0  # the step being run (0 between steps)
        self._losses_at: tuple[int, int] = (0, 0)  # (step lost at, losses there in a row)

    # ---- set-up ------------------------------------------------------------------------------
    def prepare_data(self) -> "Trainer":
        """Reward functions, data rows, model path, tokenizer, training and evaluation prompts:
        no Ray needed, so a bad name, row or path fails here in one line, before any actor or
        GPU is taken, and writes nothing to `output.dir`."""
        from grpo_ray.data.dataset import PromptIterator, load_rows, load_tokenizer
        from grpo_ray.evaluation import held_out_batch, make_judge, sanity_batch
        from grpo_ray.models.resolve import resolve_model_path
        from grpo_ray.weight_sync.probe import probe_sequences

        cfg = self.cfg
        self.judge = make_judge(cfg)  # resolves every reward function
        rows = load_rows(cfg.data)
        self.model_path = resolve_model_path(cfg)
        tokenizer = load_tokenizer(self.model_path)
        self.prompts = PromptIterator(rows, tokenizer, cfg.rollout.prompts_per_step,
                                      cfg.data.max_prompt_length, cfg.data.system_prompt,
                                      cfg.data.seed)
        self.eval_prompts = held_out_batch(cfg, tokenizer), sanity_batch(cfg, tokenizer)
        self.data_state = self.prompts.state_dict()
        """Data position after the last completed step: what a checkpoint records."""
        self.initial_data_state = self.data_state
        """Data position before step 1: where a learner lost before any checkpoint goes back."""
        self.probe_ids = probe_sequences(tokenizer)
        return self

    def setup(self) -> "Trainer":
        import ray

        from grpo_ray.cluster.group import ActorGroup
        from grpo_ray.cluster.placement import place_actors
        from grpo_ray.learner.worker import LearnerWorker
        from grpo_ray.reward.pool import RewardPool
        from grpo_ray.rollout.source import RolloutSource
        from grpo_ray.rollout.worker import RolloutWorker
        from grpo_ray.tracking import Tracker
        from grpo_ray.weight_sync.broadcast import AdapterBroadcast

        cfg = self.cfg
        if not hasattr(self, "prompts"):
            self.prepare_data()
        start = time.monotonic()
        self.actors = place_actors(
            cfg,
            LearnerWorker, (self.model_path, cfg.model, cfg.lora, cfg.learner, cfg.algorithm,
                            cfg.rollout.max_completion_length, cfg.rollout.temperature),
            RolloutWorker, [(self.model_path, cfg.rollout, cfg.engine_lora_rank, cfg.model.dtype,
                             cfg.algorithm.seed, i) for i in range(cfg.rollout.num_engines)])
        self.engines = self.actors.engines
        self.engines.notify = self.print
        # the learner as a group of one: a lost or hung learner is started again in its bundle
        # and the run restores its state from the newest checkpoint (`recover_learner`)
        self.learner_group = ActorGroup("learner", [self.actors.learner],
                                        self.actors.start_learner, cfg.cluster.max_restarts,
                                        cfg.cluster.restart_timeout_s, notify=self.print,
                                        repeat=False)
        self.rewards = RewardPool(self.actors.reward_workers, cfg.reward.functions,
                                  cfg.reward.timeout_s, start=self.actors.start_reward_worker,
                                  max_restarts=cfg.cluster.max_restarts,
                                  max_unscored_fraction=cfg.reward.max_unscored_fraction,
                                  notify=self.print)
        self.rollouts = RolloutSource(cfg, self.prompts, self.engines, self.rewards)
        self.broadcast = AdapterBroadcast(notify=self.print)
        self.tracker = Tracker(cfg.logging, self.out, cfg.to_dict(), self.print,
                               total_steps=cfg.algorithm.total_steps)
        # every sync verified; the probe scored by engines and learner before any training
        probe_start = time.monotonic()
        self.broadcast.attach(self.learner, self.engines,
                              self.probe_ids if cfg.cluster.sync_probe else None,
                              cfg.cluster.probe_rule(), ask=self.learner_call)
        learner = self.learner_call("description", "describe")
        now = time.monotonic()
        self.startup = self.actors.startup | {"probe_base_s": now - probe_start,
                                              "total_s": now - start}
        """Seconds of this start-up, by part (`Actors.startup`) and in all."""
        self.print(f"placed: {self.actors.plan.layout} layout, 1 learner ({learner}), "
                   f"{len(self.actors.engines)} rollout engine(s), "
                   f"{len(self.actors.reward_workers)} reward worker(s); model {self.model_path}; "
                   f"{describe_startup(self.startup)}")
        return self

    # ---- the learner ---------------------------------------------------------------------------
    @property
    def learner(self):
        """The learner actor's handle (a restart replaces it)."""
        return self.learner_group.members[0]

    def learner_call(self, what: str, method: str, *args, timeout_s: float | None = None,
                     setting: str = "cluster.call_timeout_s"):
        """`learner.<method>(*args)` with a deadline (default `cluster.call_timeout_s`). A lost or
        hung learner is started again and `MemberRestarted` raised (`fit` recovers)."""
        timeout = self.cfg.cluster.call_timeout_s if timeout_s is None else timeout_s
        return self.learner_group.call(
            what, lambda i: getattr(self.learner, method).remote(*args), timeout,
            setting=setting)[0]

    def update_deadline(self, batch: TrainBatch) -> float:
        """Seconds the learner may take for the update on `batch` (`cluster.
        update_floor_tokens_per_s`, `cluster.deadline_slack_s`)."""
        c = self.cfg.cluster
        tokens = sum(len(p) + len(x) for p, x in zip(batch.prompt_ids, batch.completion_ids))
        return work_deadline(tokens * self.cfg.algorithm.num_iterations,
                             c.update_floor_tokens_per_s, c.deadline_slack_s)

    def _learner_lost(self, error: BaseException, what: str) -> None:
        """After an actor error in a call made outside `learner_call` (the sync probe's): when the
        learner is what is gone or hung, start it again (raises `MemberRestarted`)."""
        import ray

        from grpo_ray.faults import is_lost_actor

        if not is_lost_actor(error):
            return
        try:
            ray.get(self.learner.__ray_ready__.remote(), timeout=self.cfg.cluster.call_timeout_s)
        except Exception as e:  # noqa: BLE001 - gone, or not answering
            self.learner_group.replace(0, f"learner lost during {what} ({first_line(e)})")

    # ---- one step ----------------------------------------------------------------------------
    def train_batch(self, scored: ScoredBatch) -> TrainBatch:
        import torch

        from grpo_ray.algo.grpo import MULTI_OBJECTIVE_AGGREGATIONS
        from grpo_ray.algo.masking import loss_mask

        rollout, scores, a = scored.rollout, scored.scores, self.cfg.algorithm
        # (B, K): each function's scores (NaN: it did not score the row), in config order
        per_func = torch.tensor([[math.nan if s is None else s for s in values]
                                 for values in scores.per_function.values()],
                                dtype=torch.float64).reshape(-1, len(scores.total)).T
        weights = torch.tensor([f.weight for f in self.cfg.reward.functions],
                               dtype=torch.float64)
        advantages = MULTI_OBJECTIVE_AGGREGATIONS[a.multi_objective_aggregation](
            per_func, weights, self.cfg.rollout.num_generations, a.scale_rewards)
        return TrainBatch(rollout.prompt_ids, rollout.completion_ids, advantages.tolist(),
                          rollout.sampling_logprobs,
                          mask=loss_mask(scores.total, rollout.finish_reasons,
                                         a.mask_truncated_completions),
                          engine_index=rollout.engine_index, sampling_version=scored.version)

    def sync(self) -> dict[str, float]:
        """The new adapter to every engine, each verified to serve it, repaired or replaced if
        not (`weight_sync.broadcast`). Returns `sync/...` figures."""
        return self._sync()

    def _sync(self, force: bool = False) -> dict[str, float]:
        """`sync`; `force`: the engines follow a learner restored to an older version (or to
        the base model, version 0)."""
        learner, timeout = self.learner, self.cfg.cluster.call_timeout_s

        def wait_export(ref) -> None:
            self.learner_group.wait_done(0, "adapter export", ref, timeout,
                                         "cluster.call_timeout_s")

        if force and self.version == 0:  # a learner restarted before any checkpoint: the base
            self.broadcast.to_base(learner, self.engines)
            return {}
        try:
            return {f"sync/{k}": v for k, v in self.broadcast.sync(
                learner, self.engines, self.version, force, wait_export).items()}
        except Exception as e:  # noqa: BLE001 - the learner's loss is recovered, else raise
            self._learner_lost(e, "the sync check")
            raise

    def run_step(self) -> dict[str, float]:
        """One step: this step's scored batch (prefetched one step off, else generated now),
        the update, then the sync of the new adapter. One step off, the engines generate the
        next step's batch while the learner updates, and the sync waits for them."""
        timer = StageTimer()
        start = time.perf_counter()
        self._in_flight = self.step + 1
        with timer("rollout"):  # on policy: generation and rewards; one step off: the wait
            scored = self.rollouts.take(self.step)
        staleness = self.version - scored.version
        if not 0 <= staleness <= self.cfg.algorithm.max_staleness:
            raise RuntimeError(f"step {self.step + 1} would train on adapter version "
                               f"{scored.version}'s samples at version {self.version}, beyond "
                               f"algorithm.max_staleness={self.cfg.algorithm.max_staleness}")
        batch = self.train_batch(scored)
        update = self.learner_group.stream(
            "the update", lambda i: self.learner.train_step.remote(batch),
            self.update_deadline(batch),
            setting="cluster.update_floor_tokens_per_s, cluster.deadline_slack_s")
        if self.cfg.algorithm.max_staleness and self.step + 1 < self.cfg.algorithm.total_steps:
            self.rollouts.prefetch(self.step + 1)  # the engines still hold this version
        with timer("update"):
            (_, stats), = update
        # the step is done once the learner took it: a stop from here on checkpoints it
        self.version, self.step = self.version + 1, self.step + 1
        with timer("wait_rollout"):
            self.rollouts.complete()  # a sync never lands inside a generate call
        self.data_state = self.prompts.state_dict()
        with timer("sync"):
            sync = self.sync()
        metrics = self.log_step(scored, stats, sync, timer.times, staleness,
                                time.perf_counter() - start)
        self._in_flight = 0
        return metrics

    def log_step(self, scored: ScoredBatch, stats: dict[str, float], sync: dict[str, float],
                 times: dict[str, float], staleness: int, step_s: float) -> dict[str, float]:
        batch, rollout, scores = scored.batch, scored.rollout, scored.scores
        metrics = step_metrics(batch, rollout, scores, self.judge.column)
        metrics.update({f"learner/{k}": v for k, v in stats.items()})
        metrics.update(sync)
        metrics.update(scored.metrics)
        metrics.update(times)
        metrics["time/step_s"] = step_s
        metrics["rollout/tokens_per_s"] = (sum(len(c) for c in rollout.completion_ids)
                                           / max(metrics["time/generate_s"], 1e-9))
        metrics["rollout/staleness"] = float(staleness)
        metrics["adapter_version"] = float(self.version)
        metrics.update({"faults/engine_restarts": float(self.engines.restarts),
                        "faults/engine_repairs": float(self.broadcast.repairs),
                        "faults/reward_worker_restarts": float(self.rewards.restarts),
                        "faults/learner_restarts": float(self.learner_restarts)})
        self.tracker.log(metrics, self.step)
        self.tracker.log_samples(sample_rows(batch, rollout, scores,
                                             self.cfg.logging.samples_per_step), self.step)
        return metrics

    # ---- the run -----------------------------------------------------------------------------
    def fit(self) -> list[dict[str, float]]:
        """Evaluate, train to `algorithm.total_steps`, checkpoint, save the adapter, evaluate.

        SIGINT/SIGTERM stop it after the step in flight with a checkpoint (`Interrupted`); so do
        failures the learner survives (a reward error, an actor that cannot be brought back),
        which are raised again once the last completed step is saved. A lost or hung learner is
        started again and the run goes on from the newest checkpoint (`recover_learner`)."""
        history: list[dict[str, float]] = []
        first = self.step
        with StopOnSignal(self.print) as stop:
            try:
                if self.step == 0:  # a resumed run was evaluated before its first step already
                    self.evaluate("before")
                lost: MemberRestarted | None = None
                while True:
                    try:
                        if lost is not None:
                            self.recover_learner(lost)
                            lost = None
                            del history[max(0, self.step - first):]  # those steps run again
                        self.train(history, stop)
                        if stop.signum is None:
                            self.save_checkpoint_if_new()
                            self.save_adapter(self.out / "adapter")
                        break
                    except MemberRestarted as e:  # the learner, started again without state
                        lost = e
            except (UserError, InfraError):  # a reward error, an actor lost for good: the
                # learner is intact; what it learned is kept
                try:
                    self.save_checkpoint_if_new()
                except Exception as e:  # noqa: BLE001 - the learner itself may be what broke
                    self.print(f"no checkpoint of step {self.step} could be written: "
                               f"{first_line(e)}")
                raise
            if stop.signum is not None:
                raise Interrupted(stop.signum, self.step, self.save_checkpoint_if_new())
            self.evaluate("after")
        self.print_evaluation()
        return history

    def train(self, history: list[dict[str, float]], stop: StopOnSignal) -> None:
        """Steps until `algorithm.total_steps` or a stop signal, with the periodic checkpoints
        and evaluations."""
        save_every, eval_every = self.cfg.output.save_every, self.cfg.eval.every_steps
        total = self.cfg.algorithm.total_steps
        while self.step < total and stop.signum is None:
            history.append(self.run_step())
            if save_every and self.step % save_every == 0:
                self.save_checkpoint()
            if eval_every and self.step % eval_every == 0 and self.step < total:
                self.evaluate(f"step {self.step}")

    def recover_learner(self, lost: MemberRestarted) -> None:
        """After the learner was lost or hung (and started again, empty, in its bundle): restore
        the newest checkpoint (learner state, data position, step, version, the prefetched batch;
        none yet: step 0 and the base model), bring every engine to that version, cut the logs
        back to it, and say how many steps are redone. ActorLostError when the learner is lost
        more than `cluster.max_restarts` times before it gets past the step it was lost at."""
        from grpo_ray.checkpoint import resumable_checkpoint

        at = self._in_flight or self.step
        last_at, losses = self._losses_at
        losses = losses + 1 if at <= last_at else 1
        self._losses_at = (max(at, last_at), losses)
        if losses > self.cfg.cluster.max_restarts:
            raise ActorLostError(f"{lost.reason}: the learner was lost {losses} times before "
                                 f"getting past step {at} (cluster.max_restarts="
                                 f"{self.cfg.cluster.max_restarts})")
        began = time.perf_counter()
        self.learner_restarts += 1
        self.actors.learner = self.learner
        self.rollouts.reset()  # a generation in flight (one step off) is dropped
        path = resumable_checkpoint(self.checkpoints)[0] if self.saved_step else None
        self._restore_state(path)
        self._sync(force=True)
        self._truncate_logs()
        self._in_flight = 0
        where = f"restored checkpoint {path.name}" if path else "no checkpoint yet: back to step 0"
        redo = at - self.step
        self.print(f"learner lost at step {at}: {lost.reason}; restarted in its bundle in "
                   f"{lost.seconds:.1f} s, {where} (engines at adapter version {self.version}) "
                   f"in {time.perf_counter() - began:.1f} s more: {redo} step"
                   f"{'' if redo == 1 else 's'} to redo")

    def save_checkpoint_if_new(self) -> Path | None:
        """Checkpoint the last completed step unless it is saved already (None before step 1)."""
        if self.step == 0 or self.saved_step == self.step:
            return self.checkpoints / step_dir_name(self.step) if self.step else None
        path = self.save_checkpoint()
        self.print(f"checkpoint of step {self.step} written to {path}")
        return path

    def evaluate(self, tag: str) -> dict[str, float]:
        """Answers of the held-out prompts (`evaluation.eval_sampling`) and of the sanity question
        with the engines' current adapter. Metrics go to `eval.jsonl` (with the tag) and, as
        `eval/...` at the current step, to TensorBoard / W&B; not to the console table or
        `metrics.jsonl`, whose rows are training steps. Prints one line."""
        from grpo_ray.evaluation import eval_line, eval_sampling, evaluate, sanity_sampling

        held_out, sanity = self.eval_prompts
        start = time.perf_counter()
        metrics, _ = evaluate(self.engines, held_out, eval_sampling(self.cfg), self.judge)
        _, (self.sanity_answers[tag],) = evaluate(self.engines, sanity, sanity_sampling(self.cfg))
        metrics["time_s"] = time.perf_counter() - start
        self.tracker.log_eval(metrics, self.step, tag,
                              {"judge": self.judge.label, "held_out": held_out.source})
        self.evals[tag] = metrics
        self.print(eval_line(tag, self.step, metrics, self.cfg))
        return metrics

    def print_evaluation(self) -> None:
        """The before/after table and the sanity question's two answers."""
        from grpo_ray.evaluation import format_side_by_side

        before, after = self.evals.get("before"), self.evals["after"]
        if before is not None:  # a resumed run has only "after"
            self.print(format_side_by_side(before, after, judge=self.judge.label,
                                           source=self.eval_prompts[0].source))
        self.print(f"sanity check: {self.cfg.eval.sanity_question!r}")
        for tag, metrics in ((t, self.evals[t]) for t in ("before", "after") if t in self.evals):
            version = int(metrics["adapter_version"])
            which = "base model" if version == 0 else "trained adapter"
            self.print(f"--- {tag} training, adapter version {version} ({which}):\n"
                       f"{self.sanity_answers[tag]}")

    def save_adapter(self, path: Path) -> Path:
        """Write the learner's current adapter (PEFT format) from the driver, so the output
        directory need not be shared with the learner's node."""
        from grpo_ray.weight_sync.files import write_adapter

        return write_adapter(self.learner_call("adapter export", "export_adapter", self.version),
                             path)

    def save_checkpoint(self) -> Path:
        """Checkpoint the run after `self.step` steps under `<output.dir>/checkpoints`."""
        from grpo_ray.checkpoint import save_checkpoint

        state = self.learner_call("checkpoint state", "state_dict")
        adapter = self.learner_call("adapter export", "export_adapter", self.version)
        trainer_state = {"adapter_version": self.version, "data": self.data_state,
                         "config": self.cfg.to_dict(), "prefetched": self.rollouts.state_dict()}
        path = save_checkpoint(self.checkpoints, self.step, state, trainer_state, adapter,
                               keep=self.cfg.output.keep_checkpoints)
        self.saved_step = self.step
        return path

    def restore(self, path: Path) -> None:
        """Continue from checkpoint `path`: learner state, data position, step, adapter version,
        and the engines get the checkpoint's adapter. Call after `setup`."""
        from grpo_ray.checkpoint import changed_keys

        state = self._restore_state(path)
        if self.version > 0:  # engines start with the base model, version 0
            self.sync()
        # rows a crashed run logged after its last checkpoint are logged again from here
        self._truncate_logs()
        self.print(f"resumed from {path} at step {self.step}, adapter version {self.version}")
        changed = changed_keys(state.get("config", {}), self.cfg.to_dict())
        if changed:  # e.g. a longer run: the lr schedule is re-planned for the new total
            self.print(f"config differs from the checkpoint's: {', '.join(changed)}; the "
                       "learning-rate schedule follows this run's settings from step "
                       f"{self.step}")

    def _restore_state(self, path: Path | None) -> dict:
        """Learner state, data position, prefetched batch, step and adapter version of checkpoint
        `path` (None: those of step 0, for a fresh learner); the checkpoint's trainer state."""
        from grpo_ray.checkpoint import load_checkpoint

        if path is None:
            state = {"data": self.initial_data_state, "prefetched": None, "step": 0,
                     "adapter_version": 0}
        else:
            learner_state, state = load_checkpoint(path)
            self.learner_call("checkpoint restore", "load_state_dict", learner_state)
        self.prompts.load_state_dict(state["data"])
        self.data_state = self.prompts.state_dict()
        self.rollouts.load_state_dict(state.get("prefetched"))
        self.step, self.version = state["step"], state["adapter_version"]
        self.saved_step = self.step if path is not None else None
        return state

    def _truncate_logs(self) -> None:
        """Cut the per-step logs after `self.step`: the steps after it are logged again."""
        from grpo_ray.checkpoint import truncate_jsonl

        for name in ("metrics.jsonl", "completions.jsonl", "eval.jsonl"):
            truncate_jsonl(self.out / name, self.step)

    def close(self) -> None:
        if hasattr(self, "tracker"):
            self.tracker.close()
        if hasattr(self, "actors"):
            self.actors.shutdown()
