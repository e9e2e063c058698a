"""The driver: places the actors, then runs GRPO steps in order:
generate -> score -> advantages -> update -> sync the adapter -> log.

The driver holds no model. It moves token ids and scores between actors, computes the
group-relative advantages (cheap, and it is the only place that sees whole groups), and logs.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from grpo_ray.config import Config
from grpo_ray.contracts import PromptBatch, Rollout, Scores, TrainBatch


class StageTimer:
    """Wall time of each named stage of one step."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.times[f"time/{name}_s"] = time.perf_counter() - start


def resolve_model_path(cfg: Config) -> str:
    """`builtin:tiny` -> build the tiny model once under the output directory."""
    if cfg.model.path != "builtin:tiny":
        return cfg.model.path
    from grpo_ray.models.tiny import save_tiny

    path = Path(cfg.output.dir) / "tiny-model"
    if not (path / "config.json").exists():
        save_tiny(path, seed=cfg.algorithm.seed)
    return str(path.resolve())


def step_metrics(batch: PromptBatch, rollout: Rollout, scores: Scores) -> dict[str, float]:
    """Reward (total and per function), accuracy, format rate and completion length."""
    from grpo_ray.reward.functions import answers_match, extract_answer, strict_format_reward

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    def std(xs: list[float]) -> float:
        m = mean(xs)
        return math.sqrt(mean([(x - m) ** 2 for x in xs])) if xs else float("nan")

    out: dict[str, float] = {}
    for name, values in [("total", scores.total), *scores.per_function.items()]:
        valid = [v for v in values if v is not None]
        key = "reward" if name == "total" else f"reward/{name}"
        out[f"{key}/mean"], out[f"{key}/std"] = mean(valid), std(valid)
    golds = [batch.answers[i] for i in rollout.prompt_index]
    # judged the same way whatever rewards are configured: numeric match, fixed strict format
    out["accuracy"] = mean([float(answers_match(extract_answer(t), g))
                            for t, g in zip(rollout.completion_texts, golds)])
    out["format_rate"] = mean([float(s > 0) for s in
                               strict_format_reward([], rollout.completion_texts)])
    out["completion_length"] = mean([len(c) for c in rollout.completion_ids])
    out["truncated_rate"] = mean([float(r == "length") for r in rollout.finish_reasons])
    out["unscored_rate"] = mean([float(v is None) for v in scores.total])
    return out


def sample_rows(batch: PromptBatch, rollout: Rollout, scores: Scores, k: int) -> list[dict[str, Any]]:
    """The first `k` completions of the step, with their prompt, gold answer and each reward."""
    rows = []
    for row in range(min(k, len(rollout))):
        p = rollout.prompt_index[row]
        rows.append({"question": batch.questions[p], "gold": batch.answers[p],
                     "completion": rollout.completion_texts[row],
                     "rewards": {n: v[row] for n, v in scores.per_function.items()},
                     "total": scores.total[row]})
    return rows


class Trainer:
    """Owns the actors of one run and the loop over steps."""

    def __init__(self, cfg: Config, print_fn=print):
        self.cfg, self.print = cfg, print_fn
        self.out = Path(cfg.output.dir)
        self.version = 0
        self.step = 0

    # ---- set-up ------------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        from grpo_ray.cluster.placement import place_actors
        from grpo_ray.data.dataset import PromptIterator, load_rows, load_tokenizer
        from grpo_ray.learner.worker import LearnerWorker
        from grpo_ray.reward.pool import RewardPool
        from grpo_ray.rollout.worker import RolloutWorker
        from grpo_ray.tracking import Tracker
        from grpo_ray.weight_sync.adapter import AdapterBroadcast

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        # Data first: a bad row fails here, before any actor or GPU is taken.
        self.model_path = resolve_model_path(cfg)
        tokenizer = load_tokenizer(self.model_path)
        self.prompts = PromptIterator(load_rows(cfg.data), tokenizer, cfg.rollout.prompts_per_step,
                                      cfg.data.max_prompt_length, cfg.data.system_prompt,
                                      cfg.data.seed)
        self.actors = place_actors(
            cfg,
            LearnerWorker, (self.model_path, cfg.model, cfg.lora, cfg.learner, cfg.algorithm,
                            cfg.rollout.max_completion_length, cfg.rollout.temperature),
            RolloutWorker, [(self.model_path, cfg.rollout, cfg.lora, cfg.model.dtype,
                             cfg.algorithm.seed, i) for i in range(cfg.rollout.num_engines)])
        self.rewards = RewardPool(self.actors.reward_workers, cfg.reward.functions,
                                  cfg.reward.timeout_s)
        self.broadcast = AdapterBroadcast()
        self.tracker = Tracker(cfg.logging, self.out, cfg.to_dict(), self.print,
                               total_steps=cfg.algorithm.total_steps)
        self.print(f"placed: {self.actors.plan.layout} layout, 1 learner, "
                   f"{len(self.actors.engines)} rollout engine(s), "
                   f"{len(self.actors.reward_workers)} reward worker(s); model {self.model_path}")
        return self

    # ---- one step ----------------------------------------------------------------------------
    def generate(self, batch: PromptBatch) -> Rollout:
        """Each engine samples its slice of the prompts; one `ray.get` for all."""
        import ray

        engines = self.actors.engines
        parts = ray.get([e.generate.remote(p.prompt_ids) for e, p in
                         zip(engines, batch.split(len(engines)))])
        rollout = Rollout.concat(parts)
        if rollout.adapter_version != self.version:
            raise RuntimeError(f"engines sampled with adapter version {rollout.adapter_version}, "
                               f"the learner is at {self.version}")
        return rollout

    def train_batch(self, rollout: Rollout, scores: Scores) -> TrainBatch:
        import torch

        from grpo_ray.algo.grpo import group_advantages

        rewards = torch.tensor([math.nan if s is None else s for s in scores.total],
                               dtype=torch.float64)
        advantages = group_advantages(rewards, self.cfg.rollout.num_generations,
                                      self.cfg.algorithm.scale_rewards)
        return TrainBatch(rollout.prompt_ids, rollout.completion_ids, advantages.tolist(),
                          rollout.sampling_logprobs, mask=[s is not None for s in scores.total])

    def run_step(self) -> dict[str, float]:
        import ray

        timer = StageTimer()
        start = time.perf_counter()
        batch = self.prompts.next_batch()
        with timer("generate"):
            rollout = self.generate(batch)
        with timer("reward"):
            scores = self.rewards.score(batch, rollout)
        train_batch = self.train_batch(rollout, scores)
        with timer("update"):
            stats = ray.get(self.actors.learner.train_step.remote(train_batch))
        self.version += 1
        with timer("sync"):
            sync = self.broadcast.sync(self.actors.learner, self.actors.engines, self.version)
        self.step += 1

        metrics = step_metrics(batch, rollout, scores)
        metrics.update({f"learner/{k}": v for k, v in stats.items()})
        metrics.update({f"sync/{k}": v for k, v in sync.items()})
        metrics.update(timer.times)
        metrics["time/step_s"] = time.perf_counter() - start
        metrics["rollout/tokens_per_s"] = (sum(len(c) for c in rollout.completion_ids)
                                           / metrics["time/generate_s"])
        metrics["adapter_version"] = float(self.version)
        self.tracker.log(metrics, self.step)
        self.tracker.log_samples(sample_rows(batch, rollout, scores,
                                             self.cfg.logging.samples_per_step), self.step)
        return metrics

    # ---- the run -----------------------------------------------------------------------------
    def fit(self) -> list[dict[str, float]]:
        history = []
        while self.step < self.cfg.algorithm.total_steps:
            history.append(self.run_step())
        self.save_adapter(self.out / "adapter")
        return history

    def save_adapter(self, path: Path) -> Path:
        """Write the learner's current adapter (PEFT format) from the driver, so the output
        directory need not be shared with the learner's node."""
        import ray

        from grpo_ray.weight_sync.adapter import write_adapter

        payload = ray.get(self.actors.learner.export_adapter.remote(self.version))
        return write_adapter(payload, path)

    def close(self) -> None:
        if hasattr(self, "tracker"):
            self.tracker.close()
        if hasattr(self, "actors"):
            self.actors.shutdown()
