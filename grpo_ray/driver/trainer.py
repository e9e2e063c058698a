"""Runs in the driver: places the actors, then runs GRPO steps in order:
generate -> score -> advantages -> update -> sync the adapter (verified) -> log.

The driver holds no model. It moves token ids and scores between actors, turns rewards into
group-relative advantages (`groups`: cheap, and it is the only place that sees whole groups) and
logs. One step off policy, the engines generate the next step's rollout while the learner
updates: `run_step` shows what runs beside what. Lost or hung engines and reward workers are
replaced where they are owned (`cluster`); the loop only reports what they did. A lost learner
and every failure that ends the run go through `recovery` (a checkpoint first).
"""
from __future__ import annotations

import time
from pathlib import Path

from grpo_ray.cluster.group import MemberRestarted, work_deadline
from grpo_ray.config import Config
from grpo_ray.contracts import ScoredBatch, TrainBatch
from grpo_ray.driver.metrics import StageTimer, sample_rows, step_metrics
from grpo_ray.driver.outputs import RunOutputs
from grpo_ray.driver.recovery import Recovery
from grpo_ray.driver.rollouts import PendingRollout
from grpo_ray.faults import Interrupted, StopOnSignal


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


class Trainer(RunOutputs):
    """Owns the actors of one run and the loop over steps (its evaluations and outputs:
    `RunOutputs`, its base)."""

    def __init__(self, cfg: Config, print_fn=print):
        from grpo_ray.driver.groups import Groups

        self.cfg, self.print = cfg, print_fn
        self.out = Path(cfg.output.dir)
        self.checkpoints = self.out / "checkpoints"
        self.step = 0
        self.version = 0
        self.in_flight = 0
        """The step being run (0 between steps)."""
        self.next_rollout: PendingRollout | None = None
        """The next step's rollout, submitted one step off while the learner updates."""
        a = cfg.algorithm
        self.groups = Groups(cfg.rollout.num_generations, a.scale_rewards,
                             a.mask_truncated_completions, a.multi_objective_aggregation,
                             tuple(f.weight for f in cfg.reward.functions))
        self.recovery = Recovery(self)
        self.evals: dict[str, dict[str, float]] = {}
        """Evaluation metrics by tag (`before`, `step N`, `after`)."""
        self.sanity_answers: dict[str, str] = {}
        self.sanity_right: dict[str, bool | None] = {}
        """The sanity question's answer by tag, and whether it is right (None: no gold)."""

    @property
    def saved_step(self) -> int | None:
        return self.recovery.saved_step

    # ---- set-up ------------------------------------------------------------------------------
    def prepare_data(self) -> "Trainer":
        """Reward functions, data rows, model path, tokenizer, training and evaluation prompts:
        no Ray needed, so a bad name, row or path fails here in one line, before any actor or
        GPU is taken, and writes nothing to `output.dir`."""
        from grpo_ray.driver.data.dataset import load_rows
        from grpo_ray.driver.data.prompts import PromptIterator, load_tokenizer
        from grpo_ray.driver.evaluation import held_out_batch, sanity_check
        from grpo_ray.driver.judge import make_judge
        from grpo_ray.driver.models.resolve import resolve_model_path
        from grpo_ray.sync.probe import probe_sequences

        cfg = self.cfg
        self.judge = make_judge(cfg)  # resolves every reward function
        rows = load_rows(cfg.data)
        self.model_path = resolve_model_path(cfg)
        tokenizer = load_tokenizer(self.model_path)
        self.prompts = PromptIterator(rows, tokenizer, cfg.rollout.prompts_per_step,
                                      cfg.data.max_prompt_length, cfg.data.system_prompt,
                                      cfg.data.seed)
        held_out = held_out_batch(cfg, tokenizer)
        self.eval_prompts = held_out, sanity_check(cfg, tokenizer, held_out)
        self.data_state = self.prompts.state_dict()
        """Data position after the last completed step: what a checkpoint records."""
        self.initial_data_state = self.data_state
        """Data position before step 1: where a learner lost before any checkpoint goes back."""
        self.probe_ids = probe_sequences(tokenizer)
        return self

    def setup(self) -> "Trainer":
        from grpo_ray.cluster.placement import place_actors
        from grpo_ray.cluster.rewards import RewardPool
        from grpo_ray.driver.rollouts import Rollouts
        from grpo_ray.driver.tracking import Tracker
        from grpo_ray.learner.worker import LearnerWorker
        from grpo_ray.rollout.worker import RolloutWorker
        from grpo_ray.sync.broadcast import AdapterSync
        from grpo_ray.sync.probe import ProbeRule

        cfg = self.cfg
        if not hasattr(self, "prompts"):
            self.prepare_data()
        self.write_config()
        engines, workers = cfg.rollout.num_engines, cfg.reward.num_workers
        # within 80 columns, as the bar and the table are
        self.print(f"starting the actors: 1 learner, {engines} rollout engine"
                   f"{'s' * (engines != 1)} (vLLM), {workers} reward worker{'s' * (workers != 1)}"
                   " ...")
        start = time.monotonic()
        self.actors = place_actors(
            cfg,
            LearnerWorker, (self.model_path, cfg.model, cfg.lora, cfg.learner, cfg.algorithm,
                            cfg.rollout.max_completion_length, cfg.rollout.temperature),
            RolloutWorker, lambda i: (self.model_path, cfg.rollout, cfg.engine_lora_rank,
                                      cfg.model.dtype, cfg.algorithm.seed, i),
            notify=self.print)
        self.learner, self.engines = self.actors.learner, self.actors.engines
        self.rewards = RewardPool(self.actors.reward_workers, cfg.reward.functions,
                                  cfg.reward.timeout_s, start=self.actors.start_reward_worker,
                                  max_restarts=cfg.cluster.max_restarts,
                                  max_unscored_fraction=cfg.reward.max_unscored_fraction,
                                  notify=self.print)
        self.rollouts = Rollouts(cfg, self.prompts, self.engines, self.rewards, self.groups)
        self.tracker = Tracker(cfg.logging, self.out, cfg.resolved(), self.print,
                               total_steps=cfg.algorithm.total_steps)
        # every sync verified, every new engine admitted by it; the probe scored by engines and
        # learner before any training
        self.sync = AdapterSync(self.learner, self.engines,
                                self.probe_ids if cfg.cluster.sync_probe else None,
                                ProbeRule.of(cfg.cluster), notify=self.print)
        self.engines.admit = self.sync.admit
        probe_start = time.monotonic()
        if cfg.cluster.sync_probe:  # each engine's first forward: tens of seconds on a CPU
            self.print(f"actors up in {probe_start - start:.0f} s; the sync probe's first "
                       "scores (engines and learner, the base model) ...")
        self.sync.start()
        learner = self.learner.call("description", "describe")
        now = time.monotonic()
        self.startup = self.actors.startup | {"probe_base_s": now - probe_start,
                                              "total_s": now - start}
        """Seconds of this start-up, by part (`Actors.startup`) and in all."""
        self.print(f"placed: {self.actors.plan.layout} layout, 1 learner ({learner}), "
                   f"{len(self.engines)} rollout engine(s), "
                   f"{len(self.actors.reward_workers)} reward worker(s); model {self.model_path}; "
                   f"{describe_startup(self.startup)}")
        return self

    def update_deadline(self, batch: TrainBatch) -> float:
        """Seconds the learner may take for the update on `batch` (`cluster.
        update_floor_tokens_per_s`, `cluster.deadline_slack_s`)."""
        c = self.cfg.cluster
        tokens = sum(len(p) + len(x) for p, x in zip(batch.prompt_ids, batch.completion_ids))
        return work_deadline(tokens * self.cfg.algorithm.num_iterations,
                             c.update_floor_tokens_per_s, c.deadline_slack_s)

    # ---- one step ----------------------------------------------------------------------------
    def run_step(self) -> dict[str, float]:
        """One step: this step's rollout (collected one step off, else generated now), the
        update, then the sync of the new adapter. One step off, the engines generate the next
        step's rollout while the learner updates, and the sync waits for them."""
        timer, start = StageTimer(), time.perf_counter()
        self.in_flight = self.step + 1
        with timer("rollout"):  # on policy: generation and rewards; one step off: the wait
            scored = (self.next_rollout or self.rollouts.submit(self.step)).result()
        self.next_rollout = None
        staleness = self.check_staleness(scored)
        batch = self.groups.train_batch(scored)
        update = self.learner.submit(
            "the update", "train_step", batch, timeout_s=self.update_deadline(batch),
            setting="cluster.update_floor_tokens_per_s, cluster.deadline_slack_s")
        data_state = self.prompts.state_dict()
        if self.cfg.algorithm.max_staleness and self.step + 1 < self.cfg.algorithm.total_steps:
            # beside the update, with the adapter the engines still hold
            self.next_rollout = self.rollouts.submit(self.step + 1)
        with timer("update"):
            stats = update.result()
        # the step is done once the learner took it: a failure from here on checkpoints it
        self.version, self.step, self.data_state = self.version + 1, self.step + 1, data_state
        with timer("wait_rollout"):  # a sync never lands inside a generate call
            if self.next_rollout is not None:
                self.next_rollout.result()
                self.data_state = self.prompts.state_dict()
        with timer("sync"):
            sync = {f"sync/{k}": v for k, v in self.sync.send(self.version).items()}
        metrics = self.log_step(scored, stats, sync, timer.times, staleness,
                                time.perf_counter() - start)
        self.in_flight = 0
        return metrics

    def check_staleness(self, scored: ScoredBatch) -> int:
        """How many versions the learner is ahead of the rollout's samples; RuntimeError beyond
        `algorithm.max_staleness`."""
        staleness = self.version - scored.version
        if not 0 <= staleness <= self.cfg.algorithm.max_staleness:
            raise RuntimeError(f"step {self.step + 1} would train on adapter version "
                               f"{scored.version}'s samples at version {self.version}, beyond "
                               f"algorithm.max_staleness={self.cfg.algorithm.max_staleness}")
        return staleness

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
        metrics.update({"rollout/engines": float(len(self.engines)),
                        "rollout/engine_joins": float(self.engines.fleet.joins),
                        "rollout/engine_leaves": float(self.engines.fleet.leaves),
                        "faults/engine_restarts": float(self.engines.restarts),
                        "faults/engine_repairs": float(self.sync.repairs),
                        "faults/reward_worker_restarts": float(self.rewards.restarts),
                        "faults/learner_restarts": float(self.recovery.learner_restarts)})
        self.tracker.log(metrics, self.step)
        self.tracker.log_samples(sample_rows(batch, rollout, scores,
                                             self.cfg.logging.samples_per_step), self.step)
        return metrics

    # ---- the run -----------------------------------------------------------------------------
    def fit(self) -> list[dict[str, float]]:
        """Evaluate, train to `algorithm.total_steps`, checkpoint, save the adapter, evaluate.

        SIGINT/SIGTERM stop it after the step in flight with a checkpoint (`Interrupted`). A lost
        or hung learner is started again and the run goes on from the newest checkpoint; any
        error that ends the run checkpoints the last completed step first (`recovery`)."""
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
                            self.recovery.recover_learner(lost)
                            lost = None
                            del history[max(0, self.step - first):]  # those steps run again
                        self.train(history, stop)
                        if stop.signum is None:
                            self.recovery.checkpoint_if_new()
                            self.save_adapter(self.out / "adapter")
                        break
                    except MemberRestarted as e:  # the learner, started again without state
                        lost = e
            except Exception as error:  # noqa: BLE001 - whatever ends the run, checkpoint first
                self.recovery.on_failure(error, learner_fresh=lost is not None)
                raise
            if stop.signum is not None:
                raise Interrupted(stop.signum, self.step, self.recovery.checkpoint_if_new())
            self.evaluate("after")
        self.print_evaluation()
        return history

    def train(self, history: list[dict[str, float]], stop: StopOnSignal) -> None:
        """Steps until `algorithm.total_steps` or a stop signal, with the periodic checkpoints
        and evaluations."""
        save_every, eval_every = self.cfg.output.save_every, self.cfg.eval.every_steps
        total = self.cfg.algorithm.total_steps
        while self.step < total and stop.signum is None:
            self.engines.between_steps()  # an elastic fleet grows and shrinks here, not in a step
            history.append(self.run_step())
            if save_every and self.step % save_every == 0:
                self.recovery.checkpoint()
            if eval_every and self.step % eval_every == 0 and self.step < total:
                self.evaluate(f"step {self.step}")

    def restore(self, path: Path) -> None:
        """Continue from checkpoint `path` (`Recovery.restore`). Call after `setup`."""
        self.recovery.restore(path)

    def close(self) -> None:
        if hasattr(self, "tracker"):
            self.tracker.close()
        if hasattr(self, "actors"):
            self.actors.shutdown()
