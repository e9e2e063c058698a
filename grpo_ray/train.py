"""`grpo-ray`: the command line. Imports nothing heavy until a command runs, so `--help` is instant.

    grpo-ray train --config configs/tiny-cpu.yaml [section.key=value ...]
    grpo-ray build-tiny PATH [--shape qwen2.5-3b]

Without an address it starts an embedded local Ray; with `cluster.address` or RAY_ADDRESS (as
under `ray job submit`) it joins that cluster.
"""
from __future__ import annotations

import argparse
import os
import sys


def connect_ray(address: str | None, num_cpus: int | None, num_gpus: int | None) -> None:
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False)


def cmd_train(args: argparse.Namespace) -> int:
    from grpo_ray.config import load_config

    cfg = load_config(args.config, args.overrides)
    # the driver itself never generates, but it may build the tiny model and tokenize prompts
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    connect_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.num_gpus)

    from grpo_ray.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        trainer.setup()
        trainer.fit()
        print(f"adapter saved to {trainer.out / 'adapter'}")
    finally:
        trainer.close()
    return 0


def cmd_build_tiny(args: argparse.Namespace) -> int:
    from grpo_ray.models.tiny import main as build

    build([args.path, "--shape", args.shape, "--dtype", args.dtype])
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grpo-ray", description="GRPO on Ray: vLLM rollout actors, "
                                "reward actors and a (Q)LoRA learner.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run GRPO training")
    t.add_argument("--config", help="YAML file under configs/ (defaults apply without one)")
    t.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="dotted overrides, applied after the file")
    t.set_defaults(run=cmd_train)
    b = sub.add_parser("build-tiny", help="build a random-weight Qwen2 model and tokenizer")
    b.add_argument("path")
    b.add_argument("--shape", choices=["tiny", "qwen2.5-3b"], default="tiny")
    b.add_argument("--dtype", default="float32")
    b.set_defaults(run=cmd_build_tiny)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from grpo_ray.config import ConfigError

    try:
        return args.run(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
