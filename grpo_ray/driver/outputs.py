"""Runs in the driver: what a run shows and writes besides its steps' metrics and checkpoints
(the base class of `trainer.Trainer`). The held-out evaluations (`evaluate`: the engines'
answers with their current adapter, the record in `eval.jsonl`, one line on the console), the
before/after table at the end, the trained adapter, `config.yaml` and the list of what the run
wrote.

It reads what the trainer sets up: `cfg`, `out`, `print`, `step`, `version`, `judge`,
`model_path`, `eval_prompts`, `engines`, `learner`, `tracker`, and keeps its evaluations in
`evals`, `sanity_answers` and `sanity_right` (made in `Trainer.__init__`).
"""
from __future__ import annotations

import time
from pathlib import Path


class RunOutputs:
    """The trainer's evaluations and outputs (module docstring)."""

    def evaluate(self, tag: str) -> dict[str, float]:
        """Answers of the held-out prompts (`evaluation.eval_sampling`) and of the sanity question
        with the engines' current adapter. The record (`evaluation.eval_record`: metrics,
        sanity answer, every completion) goes to `eval.jsonl`, its metrics, as `eval/...` at the
        current step, to TensorBoard / W&B; not to the console table or `metrics.jsonl`, whose
        rows are training steps. Prints a line before (on a CPU it takes a while) and one
        after."""
        from grpo_ray.driver.evaluation import (answer_sanity, eval_line, eval_record,
                                                eval_sampling, eval_start_line, evaluate)

        held_out, sanity = self.eval_prompts
        what = {"before": "the base model, before training",
                "after": f"the trained adapter, after step {self.step}"}.get(
                    tag, f"the adapter of step {self.step}")
        self.print(eval_start_line(what, len(held_out), self.cfg))
        start = time.perf_counter()
        metrics, texts = evaluate(self.engines, held_out, eval_sampling(self.cfg), self.judge)
        answer, right = answer_sanity(self.engines, sanity, self.cfg, self.judge)
        metrics["time_s"] = time.perf_counter() - start
        self.tracker.log_eval(eval_record(tag, self.step, self.model_path, None, held_out,
                                          self.judge, metrics, texts, sanity, answer, right))
        self.evals[tag], self.sanity_answers[tag], self.sanity_right[tag] = metrics, answer, right
        self.print(eval_line(tag, self.step, metrics, self.cfg))
        return metrics

    def print_evaluation(self) -> None:
        """The before/after table and the sanity question's two answers."""
        from grpo_ray.driver.evaluation import format_side_by_side, show_answer

        before, after = self.evals.get("before"), self.evals["after"]
        if before is not None:  # a resumed run reads it back from eval.jsonl (`restore`)
            self.print(format_side_by_side(before, after, judge=self.judge.label,
                                           source=self.eval_prompts[0].source))
        self.print(self.eval_prompts[1].heading)
        for tag, metrics in ((t, self.evals[t]) for t in ("before", "after") if t in self.evals):
            version = int(metrics["adapter_version"])
            which = "base model" if version == 0 else "trained adapter"
            right = {True: ": right", False: ": wrong", None: ""}[self.sanity_right.get(tag)]
            self.print(f"--- {tag} training, adapter version {version} ({which}){right}\n"
                       f"{show_answer(self.sanity_answers[tag])}")

    def save_adapter(self, path: Path) -> Path:
        """Write the learner's current adapter (PEFT format) from the driver, so the output
        directory need not be shared with the learner's node."""
        from grpo_ray.sync.files import write_adapter

        return write_adapter(self.learner.call("adapter export", "export_adapter", self.version),
                             path)

    def read_back_evaluation(self, tag: str) -> None:
        """The last evaluation `tag` that `eval.jsonl` holds (a resumed run's "before" ran in
        an earlier process), as if this run had made it."""
        import json

        path = self.out / "eval.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()
                if line.strip()] if path.is_file() else []
        for row in rows:
            if row.get("tag") == tag and "metrics" in row:  # older files wrote no "metrics"
                self.evals[tag] = row["metrics"]
                self.sanity_answers[tag] = row["sanity"]["answer"]
                self.sanity_right[tag] = row["sanity"]["right"]

    def write_config(self) -> Path:
        """`<output.dir>/config.yaml`: this run's config as resolved (`Config.resolved`), every
        key, defaults included, so that the folder says what ran without the command or the
        source; `--config` takes it back as it is."""
        import yaml

        from grpo_ray.driver.tracking import timestamp

        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "config.yaml"
        path.write_text(f"# grpo-ray train, resolved config (every key), {timestamp()}\n"
                        + yaml.safe_dump(self.cfg.resolved(), sort_keys=False))
        return path

    def describe_outputs(self) -> str:
        """What the run wrote to `output.dir`, one line per entry, for the end of the run."""
        known = {
            "config.yaml": "the config as resolved (every key)",
            "adapter": "the trained LoRA adapter, PEFT format (--adapter)",
            "checkpoints": "resumable checkpoints (--resume)",
            "metrics.jsonl": "one row per step: every figure, with its time",
            "eval.jsonl": "one row per evaluation, with every completion",
            "completions.jsonl": f"{self.cfg.logging.samples_per_step} completions per step, "
                                 "with each reward",
            "curves.png": "reward, accuracy and format rate against steps",
            "tensorboard": "TensorBoard events (tensorboard --logdir ...)",
            "logs": "the actors' own output (vLLM, transformers, Ray)",
        }
        order = list(known)
        present = sorted(self.out.iterdir(), key=lambda p: (
            order.index(p.name) if p.name in known else len(order), p.name))
        names = [p.name + ("/" if p.is_dir() else "") for p in present]
        width = max(map(len, names), default=0)
        return "\n".join([f"written to {self.out}/:"] + [
            f"  {name:<{width}}  {known.get(p.name, '')}".rstrip()
            for name, p in zip(names, present)])
