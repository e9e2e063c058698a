"""The peer beside us: TRL's `GRPOTrainer` with vLLM colocated, at the shape and settings of
`benchmarks/grpo_step.py`, timed per optimizer step on the same machine.

    python benchmarks/trl_peer.py --model /tmp/q3b [--steps 4] [--json out.json]

The stack the reference notebook uses minus Unsloth's `fast_inference` (which the pinned versions
do not run): one process, TRL's trainer on a bf16 LoRA (rank, alpha and target modules of
`--config`), its vLLM engine in the same process (`vllm_mode="colocate"`, the config's
`rollout.gpu_memory_utilization`), the same synthetic prompts with the recipe's system prompt,
the same reward (`rewards_bench.sevens`, which random weights earn), and the config's learning
rate, beta, epsilon, temperature, group size and completion length. One optimizer step is one
generation of prompts_per_step x num_generations completions, trained in micro-batches of
`--micro-batch` rows (TRL's `per_device_train_batch_size`; gradient accumulation makes up the
rest): the same work as one of our steps. A single process, as TRL's colocated mode runs on one
GPU: RANK=0, WORLD_SIZE=1 and a free MASTER_PORT are set here.

Prints each step's seconds (TrainerCallback, from step begin to step end, generation included)
and the median after the first step; --json writes them with the environment.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_model, print_environment  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="/tmp/q3b", help="model directory (built if missing)")
    p.add_argument("--config", default="configs/qwen2.5-3b-gsm8k-1gpu.yaml",
                   help="where the settings come from (ours: the peer runs the same recipe)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=16,
                   help="rows per forward/backward (TRL's per_device_train_batch_size)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--no-vllm", action="store_true",
                   help="generate with transformers instead (where vLLM cannot run colocated)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p


def single_process_env() -> None:
    """What torch.distributed (vLLM's external launcher in TRL's colocated mode) needs in one
    plain `python` process."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    single_process_env()
    from grpo_ray.config import load_config

    cfg = load_config(args.config, [f"model.path={args.model}", *args.overrides])
    env = print_environment()
    ensure_model(args.model)

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from rewards_bench import sevens
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo_ray.answer_format import chat_messages
    from grpo_ray.driver.data.synthetic import synthetic_rows

    ro, algo, lr = cfg.rollout, cfg.algorithm, cfg.learner
    group = ro.prompts_per_step * ro.num_generations
    if group % args.micro_batch:
        parser().error(f"--micro-batch {args.micro_batch} must divide prompts_per_step x "
                       f"num_generations = {group}")
    rows = synthetic_rows(ro.prompts_per_step * (args.steps + 1), seed=algo.seed)
    data = Dataset.from_list([{"prompt": chat_messages(r["question"])} for r in rows])
    dtype = getattr(torch, args.dtype)
    cuda = torch.cuda.is_available()
    out_dir = tempfile.mkdtemp(prefix="trl-peer-")
    config = GRPOConfig(
        output_dir=out_dir, max_steps=args.steps, seed=algo.seed, report_to=[],
        logging_steps=1, save_strategy="no", bf16=cuda and args.dtype == "bfloat16",
        learning_rate=lr.learning_rate, adam_beta1=lr.adam_beta1, adam_beta2=lr.adam_beta2,
        weight_decay=lr.weight_decay, warmup_steps=lr.warmup_ratio,  # < 1: a ratio
        lr_scheduler_type=lr.lr_scheduler_type, max_grad_norm=lr.max_grad_norm,
        gradient_checkpointing=lr.gradient_checkpointing,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=group // args.micro_batch,
        num_generations=ro.num_generations, max_completion_length=args.max_new_tokens,
        temperature=ro.temperature, top_p=ro.top_p, beta=algo.beta, epsilon=algo.epsilon,
        loss_type=algo.loss_type, scale_rewards=algo.scale_rewards,
        vllm_importance_sampling_correction=algo.importance_sampling_correction,
        use_vllm=not args.no_vllm, vllm_mode="colocate",
        vllm_gpu_memory_utilization=ro.gpu_memory_utilization,
        vllm_max_model_length=ro.max_model_len)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._start = 0.0

        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self._start)

    times = StepTimes()
    trainer = GRPOTrainer(model=model, reward_funcs=[sevens], args=config, train_dataset=data,
                          processing_class=tokenizer, peft_config=lora, callbacks=[times])
    setup_s = time.perf_counter() - start  # the model, the LoRA and the vLLM engine
    trainer.train()
    steady = times.seconds[1:] or times.seconds
    engine = "transformers (--no-vllm)" if args.no_vllm else "vLLM colocated"
    print(f"\nTRL GRPOTrainer ({env['gpu']}; trl {env['trl']}; LoRA r{cfg.lora.r} on "
          f"{len(cfg.lora.target_modules)} projections, {args.dtype}; {engine}; "
          f"{ro.prompts_per_step} prompts x {ro.num_generations} completions x up to "
          f"{args.max_new_tokens} tokens, micro-batches of {args.micro_batch}); set-up "
          f"{setup_s:.1f} s")
    print("step s: " + ", ".join(f"{s:.2f}" for s in times.seconds)
          + f"; after the first: median {statistics.median(steady):.2f}, "
          f"{min(steady):.2f}-{max(steady):.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"environment": env, "engine": engine, "setup_s": setup_s,
             "step_s": times.seconds, "median_after_first_s": statistics.median(steady),
             "log": trainer.state.log_history, "config": cfg.to_dict(),
             "micro_batch": args.micro_batch, "dtype": args.dtype}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
