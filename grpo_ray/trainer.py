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
    """`builtin:tiny` -> build the tiny model once under the output directory;
    `builtin:tiny-warm` -> the tiny model after the learning benchmark's supervised warm-up
    (`warm_tiny_model`)."""
    if cfg.model.path == "builtin:tiny-warm":
        return str(warm_tiny_model(cfg).resolve())
    if cfg.model.path != "builtin:tiny":
        return cfg.model.path
    from grpo_ray.models.tiny import save_tiny

    path = Path(cfg.output.dir) / "tiny-model"
    if not (path / "config.json").exists():
        save_tiny(path, seed=cfg.algorithm.seed)
    return str(path.resolve())


def warm_tiny_model(cfg: Config) -> Path:
    """The tiny model (seed `algorithm.seed`) after `sft_warmup` with `BENCHMARK_WARMUP` on the
    synthetic train rows, built once per settings as `<output.dir>/tiny-warm-<hash>`: runs with
    the same settings and output directory reuse it (~45 s on 2 CPU cores)."""
    import hashlib
    import json
    import os
    import tempfile

    import torch

    from grpo_ray.data.dataset import load_rows
    from grpo_ray.models.tiny import save_tiny
    from grpo_ray.models.warmup import BENCHMARK_WARMUP, sft_warmup

    d = cfg.data
    if d.source != "synthetic":
        raise ValueError(f"model.path=builtin:tiny-warm warms up on synthetic rows; it needs "
                         f"data.source=synthetic (got {d.source!r})")
    threads = 2  # fixed: the same float sums, hence the same model, whatever the core count
    settings = dict(BENCHMARK_WARMUP, seed=cfg.algorithm.seed, system_prompt=d.system_prompt,
                    rows=[d.num_synthetic, d.seed, d.synthetic_max_value], threads=threads)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cfg.output.dir) / f"tiny-warm-{key}"
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tiny-warm-") as tmp:
            base = save_tiny(Path(tmp) / "base", seed=cfg.algorithm.seed)
            warm = sft_warmup(str(base), str(Path(tmp) / "warm"), load_rows(d),
                              seed=cfg.algorithm.seed, system_prompt=d.system_prompt,
                              **BENCHMARK_WARMUP)
            if not (path / "config.json").exists():  # another process may have finished first
                os.replace(warm, path)  # a rename: a half-written model is never found
    finally:
        torch.set_num_threads(previous)
    return path


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


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts, as `key: old -> new`."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


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

    # ---- set-up ------------------------------------------------------------------------------
    def prepare_data(self) -> "Trainer":
        """Model path, tokenizer, training and evaluation prompts: no Ray needed, so a bad row
        fails here, before any actor or GPU is taken."""
        from grpo_ray.data.dataset import PromptIterator, load_rows, load_tokenizer
        from grpo_ray.evaluation import held_out_batch, sanity_batch

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self.model_path = resolve_model_path(cfg)
        tokenizer = load_tokenizer(self.model_path)
        self.prompts = PromptIterator(load_rows(cfg.data), tokenizer, cfg.rollout.prompts_per_step,
                                      cfg.data.max_prompt_length, cfg.data.system_prompt,
                                      cfg.data.seed)
        self.eval_prompts = held_out_batch(cfg, tokenizer), sanity_batch(cfg, tokenizer)
        return self

    def setup(self) -> "Trainer":
        from grpo_ray.cluster.placement import place_actors
        from grpo_ray.learner.worker import LearnerWorker
        from grpo_ray.reward.pool import RewardPool
        from grpo_ray.rollout.worker import RolloutWorker
        from grpo_ray.tracking import Tracker
        from grpo_ray.weight_sync.adapter import AdapterBroadcast

        cfg = self.cfg
        if not hasattr(self, "prompts"):
            self.prepare_data()
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
        """Each engine samples its slice of the prompts; one `ray.get` for all.

        Prompt j of step s samples with seed `base + s * prompts_per_step + j` (engines add the
        prompt's index within their slice), so a step's completions are a function of the
        adapter, the prompts and the step: a resumed run samples what an uninterrupted one did,
        whatever the number of engines."""
        import ray

        engines = self.actors.engines
        slices = batch.split(len(engines))
        first = self.cfg.algorithm.seed * 1_000_003 + self.step * len(batch)
        parts = ray.get([e.generate.remote(p.prompt_ids, seed=first + i * len(p))
                         for i, (e, p) in enumerate(zip(engines, slices))])
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
        save_every, eval_every = self.cfg.output.save_every, self.cfg.eval.every_steps
        total = self.cfg.algorithm.total_steps
        if self.step == 0:  # a resumed run was evaluated before its first step already
            self.evaluate("before")
        while self.step < total:
            history.append(self.run_step())
            if save_every and self.step % save_every == 0:
                self.save_checkpoint()
            if eval_every and self.step % eval_every == 0 and self.step < total:
                self.evaluate(f"step {self.step}")
        if self.saved_step != self.step:
            self.save_checkpoint()
        self.save_adapter(self.out / "adapter")
        self.evaluate("after")
        self.print_evaluation()
        return history

    def evaluate(self, tag: str) -> dict[str, float]:
        """Greedy answers of the held-out prompts and of the sanity question with the engines'
        current adapter. Metrics go to `eval.jsonl` (with the tag) and, as `eval/...` at the
        current step, to TensorBoard / W&B; not to the console table or `metrics.jsonl`, whose
        rows are training steps. Prints one line."""
        from grpo_ray.evaluation import eval_max_tokens, evaluate

        held_out, sanity = self.eval_prompts
        start = time.perf_counter()
        metrics, _ = evaluate(self.actors.engines, held_out, eval_max_tokens(self.cfg))
        _, (self.sanity_answers[tag],) = evaluate(self.actors.engines[:1], sanity,
                                                  eval_max_tokens(self.cfg))
        metrics["time_s"] = time.perf_counter() - start
        self.tracker.log_eval(metrics, self.step, tag)
        self.evals[tag] = metrics
        self.print(f"eval {tag} (step {self.step}, adapter version "
                   f"{metrics['adapter_version']:.0f}, {metrics['num_samples']:.0f} prompts): "
                   f"accuracy {metrics['accuracy_numeric']:.3f} (exact "
                   f"{metrics['accuracy_exact']:.3f}), format strict "
                   f"{metrics['strict_format']:.3f} soft {metrics['soft_format']:.3f}, "
                   f"reasoning {metrics['reasoning_words_mean']:.1f} words, "
                   f"{metrics['time_s']:.1f} s")
        return metrics

    def print_evaluation(self) -> None:
        """The before/after table and the sanity question's two answers."""
        from grpo_ray.evaluation import format_side_by_side

        before, after = self.evals.get("before"), self.evals["after"]
        if before is not None:  # a resumed run has only "after"
            self.print(format_side_by_side(before, after))
        self.print(f"sanity check: {self.cfg.eval.sanity_question!r}")
        for tag, metrics in ((t, self.evals[t]) for t in ("before", "after") if t in self.evals):
            version = int(metrics["adapter_version"])
            which = "base model" if version == 0 else "trained adapter"
            self.print(f"--- {tag} training, adapter version {version} ({which}):\n"
                       f"{self.sanity_answers[tag]}")

    def save_adapter(self, path: Path) -> Path:
        """Write the learner's current adapter (PEFT format) from the driver, so the output
        directory need not be shared with the learner's node."""
        import ray

        from grpo_ray.weight_sync.adapter import write_adapter

        payload = ray.get(self.actors.learner.export_adapter.remote(self.version))
        return write_adapter(payload, path)

    def save_checkpoint(self) -> Path:
        """Checkpoint the run after `self.step` steps under `<output.dir>/checkpoints`."""
        import ray

        from grpo_ray.checkpoint import save_checkpoint

        learner = self.actors.learner
        state, adapter = ray.get([learner.state_dict.remote(),
                                  learner.export_adapter.remote(self.version)])
        trainer_state = {"adapter_version": self.version, "data": self.prompts.state_dict(),
                         "config": self.cfg.to_dict()}
        path = save_checkpoint(self.checkpoints, self.step, state, trainer_state, adapter,
                               keep=self.cfg.output.keep_checkpoints)
        self.saved_step = self.step
        return path

    def restore(self, path: Path) -> None:
        """Continue from checkpoint `path`: learner state, data position, step, adapter version,
        and the engines get the checkpoint's adapter. Call after `setup`."""
        import ray

        from grpo_ray.checkpoint import load_checkpoint, truncate_jsonl

        learner_state, state = load_checkpoint(path)
        ray.get(self.actors.learner.load_state_dict.remote(learner_state))
        self.prompts.load_state_dict(state["data"])
        self.step, self.version = state["step"], state["adapter_version"]
        self.saved_step = self.step
        if self.version > 0:  # engines start with the base model, version 0
            self.broadcast.sync(self.actors.learner, self.actors.engines, self.version)
        # rows a crashed run logged after its last checkpoint are logged again from here
        for name in ("metrics.jsonl", "completions.jsonl", "eval.jsonl"):
            truncate_jsonl(self.out / name, self.step)
        self.print(f"resumed from {path} at step {self.step}, adapter version {self.version}")
        changed = _changed_keys(state.get("config", {}), self.cfg.to_dict())
        if changed:  # e.g. a longer run: the lr schedule then differs from the saved run's
            self.print(f"config differs from the checkpoint's: {', '.join(changed)}")

    def close(self) -> None:
        if hasattr(self, "tracker"):
            self.tracker.close()
        if hasattr(self, "actors"):
            self.actors.shutdown()
