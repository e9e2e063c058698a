#!/usr/bin/env python
"""The learning benchmark: does GRPO through the whole pipeline teach a model something?

    python scripts/learning_benchmark.py [--config configs/learn-cpu.yaml] [--eval-every 10]
        [section.key=value ...]

Starts from `builtin:tiny-warm` (the tiny model after a supervised warm-up that gives it the XML
format but answers correctly only ~20% of the time at temperature 1), then runs GRPO steps with
the real actors: an embedded local Ray (or RAY_ADDRESS), a vLLM engine, reward actors, the PEFT
learner, the adapter synced to the engine after every step. Held-out correctness is measured
as the trainer evaluates (`Trainer.evaluate`; the config samples `eval.samples` completions of
each of the `eval.num_samples` held-out prompts at `eval.temperature`, the same seed every time)
before training, every `--eval-every` steps and after the last step.

Writes to `output.dir`: `curve.csv` (one row per step; step 0 is the start), `curve.png`
(reward, correctness and format against steps), `summary.json`, and the run's own logs.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

CSV_COLUMNS = ["step", "reward_mean", "correctness_reward_mean", "accuracy", "format_rate",
               "heldout_accuracy", "heldout_format", "train_s", "wall_s"]
"""`accuracy` / `format_rate`: of the step's training completions; `heldout_*`: sampled held-out
evaluation after the step (empty where none ran); `train_s`: seconds of GRPO steps so far;
`wall_s`: seconds since actor placement began (engine start and evaluations included)."""


@dataclass
class Result:
    curve: list[dict[str, Any]]
    """One row per step, CSV_COLUMNS; row 0 is the evaluation before the first step."""
    before: dict[str, float]
    after: dict[str, float]
    """Sampled held-out evaluations (`evaluation.evaluate`'s metrics) before and after training."""
    steps: int
    warmup_s: float
    """Seconds to build (or find already built) the warmed-up model."""
    train_s: float
    """Seconds of the GRPO steps alone (generate, score, update, sync, log)."""
    wall_s: float
    """Seconds from the start of actor placement to the last evaluation."""


def run_benchmark(cfg: Any, eval_every: int, print_fn: Callable[[str], None] = print) -> Result:
    """Warm-up (through `model.path`), then `algorithm.total_steps` GRPO steps with held-out
    evaluations before, every `eval_every` steps and after. Joins the Ray cluster already
    initialized, else starts one as `grpo-ray train` does."""
    from grpo_ray.cluster.connect import connect_ray
    from grpo_ray.driver.trainer import Trainer

    if eval_every < 1:
        raise ValueError(f"--eval-every must be >= 1 (got {eval_every})")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trainer = Trainer(cfg, print_fn)
    start = time.perf_counter()
    trainer.prepare_data()  # builds builtin:tiny-warm (or finds it built)
    warmup_s = time.perf_counter() - start
    print_fn(f"model {trainer.model_path} ready in {warmup_s:.1f} s")
    connect_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.num_gpus)

    total = cfg.algorithm.total_steps
    placed = time.perf_counter()
    try:
        trainer.setup()
        before = after = trainer.evaluate("before")
        curve = [_row(0, None, before, 0.0, time.perf_counter() - placed)]
        train_s = 0.0
        while trainer.step < total:
            metrics = trainer.run_step()
            train_s += metrics["time/step_s"]
            step = trainer.step
            held = (trainer.evaluate(f"step {step}") if step % eval_every == 0 or step == total
                    else None)
            after = held or after
            curve.append(_row(step, metrics, held, train_s, time.perf_counter() - placed))
        trainer.save_adapter(trainer.out / "adapter")
        wall_s = time.perf_counter() - placed
    finally:
        trainer.close()
    return Result(curve, before, after, total, warmup_s, train_s, wall_s)


def _row(step: int, m: dict[str, float] | None, held: dict[str, float] | None, train_s: float,
         wall_s: float) -> dict[str, Any]:
    m = m or {}
    return {"step": step, "reward_mean": m.get("reward/mean"),
            "correctness_reward_mean": m.get("reward/correctness/mean"),
            "accuracy": m.get("accuracy"), "format_rate": m.get("format_rate"),
            "heldout_accuracy": held["accuracy"] if held else None,
            "heldout_format": held["strict_format"] if held else None,
            "train_s": round(train_s, 2), "wall_s": round(wall_s, 2)}


def write_csv(curve: list[dict[str, Any]], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in curve:
            writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_COLUMNS})
    return path


def plot(result: Result, path: Path, held_out: str) -> Path:
    """Three panels against steps: training reward, correctness (training batch and held-out),
    strict format (training batch and held-out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in result.curve if r["step"] > 0]
    held = [r for r in result.curve if r["heldout_accuracy"] is not None]
    x = [r["step"] for r in steps]

    def smooth(values: list[float], k: int = 5) -> list[float]:
        return [sum(values[max(0, i - k + 1):i + 1]) / len(values[max(0, i - k + 1):i + 1])
                for i in range(len(values))]

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    reward = [r["reward_mean"] for r in steps]
    axes[0].plot(x, reward, color="tab:blue", alpha=0.3, label="per step")
    axes[0].plot(x, smooth(reward), color="tab:blue", label="mean of 5 steps")
    axes[0].set_title("training reward (batch mean)")
    for ax, train_key, held_key, title in [
            (axes[1], "accuracy", "heldout_accuracy", "correct answers"),
            (axes[2], "format_rate", "heldout_format", "strict XML format")]:
        ax.plot(x, [r[train_key] for r in steps], color="tab:gray", alpha=0.35,
                label="training batch (per step)")
        ax.plot([r["step"] for r in held], [r[held_key] for r in held], "o-", color="tab:red",
                label=f"held-out, {held_out}")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(title)
    for ax in axes:
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    b, a = result.before["accuracy"], result.after["accuracy"]
    fig.suptitle(f"GRPO on a 2-core CPU: held-out accuracy {b:.2f} -> {a:.2f} in {result.steps} "
                 f"steps ({result.train_s / 60:.1f} min of training)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def held_out_label(cfg: Any) -> str:
    """`256 prompts x 4 samples at T=1` (or `... greedy`)."""
    e = cfg.eval
    how = "greedy" if e.temperature == 0 else f"x {e.samples} samples at T={e.temperature:g}"
    return f"{e.num_samples} prompts {how}"


def summary(result: Result, cfg: Any) -> dict[str, Any]:
    b, a = result.before, result.after
    return {
        "heldout_prompts": int(b["num_samples"]), "samples_per_prompt": cfg.eval.samples,
        "heldout_temperature": cfg.eval.temperature,
        "heldout_accuracy_before": b["accuracy"],
        "heldout_accuracy_after": a["accuracy"],
        "heldout_format_before": b["strict_format"], "heldout_format_after": a["strict_format"],
        "steps": result.steps, "prompts_per_step": cfg.rollout.prompts_per_step,
        "num_generations": cfg.rollout.num_generations, "warmup_s": round(result.warmup_s, 1),
        "train_s": round(result.train_s, 1), "wall_s": round(result.wall_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/learn-cpu.yaml")
    parser.add_argument("--eval-every", type=int, default=10,
                        help="held-out evaluation every N steps (and before, after)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_intermixed_args(argv)

    import ray

    from grpo_ray.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(cfg.output.dir)
    result = run_benchmark(cfg, args.eval_every)
    ray.shutdown()
    write_csv(result.curve, out / "curve.csv")
    plot(result, out / "curve.png", held_out_label(cfg))
    figures = summary(result, cfg)
    (out / "summary.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"held-out accuracy ({held_out_label(cfg)}): "
          f"{figures['heldout_accuracy_before']:.3f} -> {figures['heldout_accuracy_after']:.3f} "
          f"({figures['heldout_accuracy_after'] - figures['heldout_accuracy_before']:+.3f})")
    print(f"held-out strict format: {figures['heldout_format_before']:.3f} -> "
          f"{figures['heldout_format_after']:.3f}")
    print(f"{result.steps} GRPO steps of {cfg.rollout.prompts_per_step} prompts x "
          f"{cfg.rollout.num_generations} completions: {result.train_s:.0f} s of training, "
          f"{result.wall_s:.0f} s wall with engine start and evaluations; "
          f"warm-up {result.warmup_s:.0f} s")
    print(f"written: {out / 'curve.csv'}, {out / 'curve.png'}, {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
