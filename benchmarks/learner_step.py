"""The learner's GRPO update alone (no Ray, no vLLM), on a step-shaped batch of random tokens,
with settings switched on the same loaded learner: an A/B of learner settings in one process.

    python benchmarks/learner_step.py --model /tmp/q3b [--steps 3] \
        --variant learner.cast_lm_head_to_fp32=null --variant learner.cast_lm_head_to_fp32=false

Builds `LearnerWorker` from --config (the recipe's one-GPU config: 4-bit learner,
`max_tokens_per_micro_batch`) with `overrides`, then for each --variant (space-separated
`learner.key=value` settings) runs one warm-up `train_step` and --steps timed ones on the same
batch: 16 prompts x 8 completions of 256 tokens by default, prompts of 80-160 tokens, random
advantages. Settings the learner reads at every step (`PER_STEP`: the lm_head dtype, micro-batch
sizes, the loss kernel) are switched on the loaded learner; any other (gradient checkpointing,
the backend) loads a fresh one, the previous one freed first. Prints each variant's update and
reference times (medians), the learner's peak memory and the time of the sync probe's log-probs
(`LearnerWorker.sequence_logprobs` of `sync.probe`'s sequences, median of 5, the learner's
side of every sync check); --json writes them.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_model, print_environment, timed  # noqa: E402

PER_STEP = {"cast_lm_head_to_fp32", "micro_batch_size", "max_tokens_per_micro_batch",
            "logprob_chunk_size", "loss_kernel", "max_grad_norm"}
"""LearnerConfig fields `LearnerWorker` reads at each step: switched without a reload."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="/tmp/q3b", help="model directory (built if missing)")
    p.add_argument("--config", default="configs/qwen2.5-3b-gsm8k-1gpu.yaml")
    p.add_argument("--shape", default="16x8x256", help="prompts x completions x tokens")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    p.add_argument("--variant", action="append", default=[],
                   help="space-separated learner.key=value settings (repeat; default: as loaded)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p


def step_batch(shape: str, vocab: int, seed: int = 0):
    """A TrainBatch of `shape` (PxNxT) with random tokens, advantages and sampling log-probs."""
    import torch

    from grpo_ray.contracts import TrainBatch

    P, n, T = (int(x) for x in shape.split("x"))
    g = torch.Generator().manual_seed(seed)
    prompts, completions = [], []
    for _ in range(P):
        prompt = torch.randint(3, vocab, (int(torch.randint(80, 161, (1,), generator=g)),),
                               generator=g).tolist()
        for _ in range(n):
            prompts.append(prompt)
            completions.append(torch.randint(3, vocab, (T,), generator=g).tolist())
    advantages = torch.randn(P * n, generator=g).tolist()
    sampling = [(-5.0 - torch.rand(T, generator=g)).tolist() for _ in completions]
    return TrainBatch(prompts, completions, advantages, sampling)


def _settings(text: str) -> dict[str, object]:
    """`learner.key=value ...` -> {key: value}, values read as YAML (true, null, 1e-6)."""
    import yaml

    out = {}
    for item in text.split():
        key, _, value = item.partition("=")
        if not key.startswith("learner.") or not value:
            raise SystemExit(f"--variant {text!r}: expected learner.key=value settings")
        out[key.removeprefix("learner.")] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from grpo_ray.config import LearnerConfig, load_config
    from grpo_ray.faults import first_line

    env = print_environment()
    ensure_model(args.model)
    cfg = load_config(args.config, [f"model.path={args.model}", "data.source=synthetic",
                                    *args.overrides])
    import torch
    from transformers import AutoConfig

    from grpo_ray.driver.data.prompts import load_tokenizer
    from grpo_ray.learner.worker import LearnerWorker
    from grpo_ray.sync.probe import probe_sequences

    T = int(args.shape.split("x")[2])
    batch = step_batch(args.shape, AutoConfig.from_pretrained(args.model).vocab_size)
    probe = probe_sequences(load_tokenizer(args.model))
    worker, loaded_with, rows = None, None, []
    for text in args.variant or [""]:
        settings = _settings(text)
        learner = LearnerConfig.model_validate({**cfg.learner.model_dump(), **settings})
        # the whole load-time config, not the variant's words: a variant that restates what is
        # loaded (e.g. a default) steps on the same learner
        load_time = {k: v for k, v in learner.model_dump().items() if k not in PER_STEP}
        if worker is None or load_time != loaded_with:
            worker = None  # free the previous learner's GPU memory before the next loads
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            start = time.perf_counter()
            worker = LearnerWorker(args.model, cfg.model, cfg.lora, learner, cfg.algorithm, T,
                                   cfg.rollout.temperature)
            loaded_with = load_time
            print(f"learner: {worker.description}, loaded in {time.perf_counter() - start:.1f} "
                  f"s; batch {args.shape}", flush=True)
        worker.learner = learner
        try:
            runs = [worker.train_step(batch) for _ in range(args.steps + 1)][1:]  # 1 warm-up
        except torch.OutOfMemoryError as e:  # this variant does not fit; the others still run
            rows.append({"variant": text or "as loaded", "learner": worker.description,
                         "error": first_line(e)})
            print(f"{text or 'as loaded'}: out of memory ({first_line(e)})", flush=True)
            worker, loaded_with = None, None
            continue
        row = {"variant": text or "as loaded", "learner": worker.description,
               "update_s": statistics.median(r["time_update_s"] for r in runs),
               "ref_s": statistics.median(r["time_ref_s"] for r in runs),
               "update_all_s": [r["time_update_s"] for r in runs],
               "peak_memory_gb": max(r["peak_memory_gb"] for r in runs),
               "mfu": statistics.median(r.get("mfu", float("nan")) for r in runs),
               "probe_s": statistics.median(timed(lambda: worker.sequence_logprobs(
                   *probe, 1.0))[1] for _ in range(5))}
        rows.append(row)
        print(f"{row['variant']}: update {row['update_s']:.2f} s (of {args.steps}: "
              + ", ".join(f"{x:.2f}" for x in row["update_all_s"])
              + f"), reference {row['ref_s']:.2f} s, peak {row['peak_memory_gb']:.1f} GiB, "
              f"MFU {row['mfu']:.2f}, the sync probe's log-probs {1000 * row['probe_s']:.0f} ms",
              flush=True)
    if torch.cuda.is_available():
        print(f"({env['gpu']})")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "shape": args.shape,
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
