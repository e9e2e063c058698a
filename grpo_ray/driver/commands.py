"""Runs in the driver: the commands of `grpo-ray` other than `train` (cli.py): `eval` (the base
model or an adapter on the held-out prompts, through rollout engines), `export` (the adapter with
its tokenizer, or merged into the base model; optionally pushed to the Hub) and `build-tiny`.
Like cli.py, it imports nothing heavy until a command runs.
"""
from __future__ import annotations

import argparse
import os

from grpo_ray.cluster.connect import connect_ray
from grpo_ray.logs import worker_logs


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from grpo_ray.cluster.plan import fit_to_machine
    from grpo_ray.config import UserError, load_config
    from grpo_ray.driver.data.prompts import load_tokenizer
    from grpo_ray.driver.evaluation import (answer_sanity, eval_record, eval_sampling,
                                            eval_start_line, evaluate, format_metrics,
                                            held_out_batch, sanity_check, show_answer)
    from grpo_ray.driver.judge import make_judge
    from grpo_ray.driver.models.resolve import resolve_model_path
    from grpo_ray.driver.tracking import append_jsonl
    from grpo_ray.sync.files import read_adapter

    cfg = load_config(args.config, args.overrides)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # prompts and adapter first: bad data or a wrong path fails before any engine starts
    model_path = resolve_model_path(cfg)
    tokenizer = load_tokenizer(model_path)
    held_out = held_out_batch(cfg, tokenizer)
    sanity = sanity_check(cfg, tokenizer, held_out)
    judge = make_judge(cfg)
    try:
        payload = read_adapter(args.adapter, version=1) if args.adapter else None
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"--adapter: {e}") from None
    path = eval_record_path(args.out, args.adapter, cfg.output.dir)
    # the engines must accept the adapter's rank, whatever lora.r says
    rank = max(cfg.engine_lora_rank, payload.peft_config.get("r", 0) if payload else 0)
    fit_line = fit_to_machine(cfg, engines_only=True)
    if fit_line:
        print(fit_line)
    connect_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.num_gpus,
                cfg.cluster.placement_timeout_s, args.verbose)

    import ray

    from grpo_ray.cluster.placement import place_engines
    from grpo_ray.rollout.worker import RolloutWorker

    # the engines' logs beside the record, not under a config's output.dir the run never used
    with worker_logs(Path(path).parent, args.verbose):
        print(f"starting {cfg.rollout.num_engines} rollout engine(s) (vLLM) ...", flush=True)
        engines = place_engines(cfg, RolloutWorker, [
            (model_path, cfg.rollout, rank, cfg.model.dtype, cfg.algorithm.seed, i)
            for i in range(cfg.rollout.num_engines)])
    which = f"adapter {args.adapter}" if args.adapter else "base model"
    try:
        if payload is not None:
            ref = ray.put(payload)
            engines.load_adapter(ref)
            # an engine started again mid-evaluation serves the adapter too
            engines.admit = lambda i: engines.admission_call(i, "load_adapter", ref)
        print(eval_start_line(f"the {which}", len(held_out), cfg), flush=True)
        metrics, texts = evaluate(engines, held_out, eval_sampling(cfg), judge)
        answer, right = answer_sanity(engines, sanity, cfg, judge)
    finally:
        engines.shutdown()
    print(f"eval of {which} on {model_path}, {len(held_out)} prompts of {held_out.source}:\n"
          f"{format_metrics(metrics, judge.label)}")
    verdict = {True: " (right)", False: " (wrong)", None: ""}[right]
    print(f"{sanity.heading}\n--- answer{verdict}:\n{show_answer(answer)}")
    append_jsonl(path, eval_record("eval", None, model_path, args.adapter, held_out, judge,
                                   metrics, texts, sanity, answer, right))
    print(f"appended to {path}")
    return 0


def eval_record_path(out: str | None, adapter: str | None, output_dir: str):
    """Where `grpo-ray eval` appends its line: `--out`, else beside the adapter it judged
    (`<adapter>/../eval-<adapter name>.jsonl`, next to the training run's own `eval.jsonl`, same
    schema), else, for the base model, `<output.dir>/eval-base.jsonl`. Its parent directory is
    made; the engines' logs go to `logs/` there."""
    from pathlib import Path

    if out:
        path = Path(out)
    elif adapter:
        judged = Path(adapter).resolve()
        path = judged.parent / f"eval-{judged.name}.jsonl"
    else:
        path = Path(output_dir) / "eval-base.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from grpo_ray.config import load_config
    from grpo_ray.driver.export import check_adapter, merge_adapter, push_to_hub, save_adapter_dir
    from grpo_ray.driver.models.resolve import resolve_model_path

    cfg = load_config(args.config, args.overrides)
    adapter = args.adapter or str(Path(cfg.output.dir) / "adapter")
    check_adapter(adapter)
    if args.merge:
        path = merge_adapter(resolve_model_path(cfg), adapter,
                             args.out or str(Path(cfg.output.dir) / "merged"), args.dtype)
        print(f"merged {args.dtype} model saved to {path}")
    elif args.out:
        path = save_adapter_dir(adapter, resolve_model_path(cfg), args.out)
        print(f"adapter and tokenizer saved to {path}")
    else:
        path = Path(adapter)
    if args.push_to_hub:
        print(f"pushed {path} to {push_to_hub(str(path), args.push_to_hub)}")
    return 0


def cmd_build_tiny(args: argparse.Namespace) -> int:
    from grpo_ray.driver.models.tiny import main as build

    build([args.path, "--shape", args.shape, "--dtype", args.dtype])
    return 0
