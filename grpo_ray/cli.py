"""`grpo-ray` (or `python -m grpo_ray`): the command line. Imports nothing heavy until a command runs, so `--help` is instant.

    grpo-ray train --config configs/tiny-cpu.yaml [--trl-config grpo.yaml] [--resume] [--verbose]
                   [section.key=value ...]
    grpo-ray eval --config configs/tiny-cpu.yaml [--adapter DIR] [--out FILE] [--verbose]
                  [section.key=value ...]
    grpo-ray export --config configs/tiny-cpu.yaml [--adapter DIR] [--merge] [--out DIR]
                    [--dtype bfloat16] [--push-to-hub USER/REPO]
    grpo-ray build-tiny PATH [--shape qwen2.5-3b]

Without an address it starts an embedded local Ray; with `cluster.address` or RAY_ADDRESS (as
under `ray job submit`) it joins that cluster. The actors' own output goes to
`<output.dir>/logs/` unless `--verbose` (grpo_ray/logs.py). `train` is here; the other commands
are `driver/commands.py`'s, and joining a cluster is `cluster/connect.py`'s.
"""
from __future__ import annotations

import argparse
import os
import sys

from grpo_ray.cluster.connect import connect_ray
from grpo_ray.driver.commands import cmd_build_tiny, cmd_eval, cmd_export
from grpo_ray.logs import worker_logs


def cmd_train(args: argparse.Namespace) -> int:
    from grpo_ray.cluster.plan import fit_to_machine
    from grpo_ray.driver.trainer import Trainer
    from grpo_ray.faults import (EXIT_CODES, InfraError, Interrupted, StopNow,
                                 stop_at_once_on_signals)

    cfg = run_config(args)
    args.config_output_dir = cfg.output.dir  # where an unexpected error's traceback goes
    # before anything starts: a placement this machine cannot hold fails now, or default CPU
    # shares too large for it are scaled down (before the checkpoint's config is compared)
    fit_line = fit_to_machine(cfg)
    if fit_line:
        print(fit_line)
    trainer = Trainer(cfg)
    # before Ray starts: a run that would resume nothing, resume a damaged checkpoint, or
    # continue another config fails (or falls back to an older checkpoint) at once
    checkpoint, complete = checkpoint_to_resume(cfg, trainer.checkpoints, args.resume)
    if complete:
        return 0
    # the driver itself never generates, but it may build the tiny model and tokenize prompts
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trainer.prepare_data()
    try:
        connect_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.num_gpus,
                    cfg.cluster.placement_timeout_s, args.verbose)
        # signals: over Ray's own SIGTERM handler (an exit with code 15)
        with worker_logs(cfg.output.dir, args.verbose), stop_at_once_on_signals():
            try:
                trainer.setup()
                if checkpoint is not None:
                    trainer.restore(checkpoint)
                trainer.fit()
            finally:
                trainer.close()
        print(trainer.describe_outputs())
    except Interrupted as e:
        print(_interrupted_line(e.step, e.checkpoint, args), file=sys.stderr)
        return e.exit_code
    except InfraError as e:  # after `fit` checkpointed what it could: say what is lost
        lost = trainer.step - (trainer.saved_step or 0)
        e.args = (f"{e}; {lost} step(s) since the last checkpoint lost"
                  + (f" (checkpoint of step {trainer.saved_step} in {trainer.checkpoints}; the "
                     "same command resumes from it)" if trainer.saved_step else ""),)
        raise
    except (KeyboardInterrupt, StopNow) as e:  # before the loop, or a second signal in it
        signum = getattr(e, "signum", 2)
        print(f"stopped at once ({'SIGTERM' if signum == 15 else 'SIGINT'}) at step "
              f"{trainer.step}, without a checkpoint of the step in flight; "
              + (f"resume with: {_resume_command(args)}" if trainer.saved_step or checkpoint
                 else "nothing to resume"), file=sys.stderr)
        return EXIT_CODES.get(signum, 130)
    return 0


def run_config(args: argparse.Namespace):
    """The config of `train`: defaults <- `--config` <- overrides; with `--trl-config` (a TRL
    YAML file, carried over field by field) TRL's defaults go under `--config` and the fields the
    file sets over it (`trl_config.load_with_trl`); the console says what it did not carry over
    and, for every key set differently by two sources, which one won."""
    from grpo_ray.config import load_config

    if not getattr(args, "trl_config", None):
        return load_config(args.config, args.overrides)
    from grpo_ray.driver.trl_config import load_with_trl

    cfg, ignored, differ = load_with_trl(args.trl_config, args.config, args.overrides)
    print(f"--trl-config {args.trl_config}: carried over"
          + (f"; not supported here (ignored): {', '.join(ignored)}" if ignored else ""))
    if differ:
        print("set differently by two sources (the first wins):\n  " + "\n  ".join(differ))
    return cfg


def checkpoint_to_resume(cfg, root, resume: bool) -> tuple[object, bool]:
    """The checkpoint this run continues from (None: a fresh run), and whether the run is already
    complete. Without `--resume`, a checkpoint of the same config is resumed (the same command
    run again after its driver died); one of another config is refused in one line naming the
    keys. The newest checkpoint that passes its manifest is used (`resumable_checkpoint`)."""
    from pathlib import Path

    from grpo_ray.config import Config, UserError
    from grpo_ray.driver.checkpoint import (STATE_FILE, latest_checkpoint, resumable_checkpoint,
                                            resume_differences, summarize_differences)

    if latest_checkpoint(root) is None:
        if resume:
            raise UserError(f"--resume: no checkpoint in {root}")
        return None, False
    checkpoint, skipped = resumable_checkpoint(root)
    for line in skipped:
        print(f"warning: {line}", file=sys.stderr)
    if resume:  # continues with this run's settings, whatever they are
        return checkpoint, False
    import json

    state = json.loads((checkpoint / STATE_FILE).read_text())
    step, total = state["step"], cfg.algorithm.total_steps
    differ = resume_differences(state.get("config"), cfg.resolved(), Config().to_dict())
    if differ:
        raise UserError(f"{root} holds checkpoints of another config ({checkpoint.name}; "
                        f"{summarize_differences(differ)}): set another output.dir for a new "
                        "run, or pass --resume to continue that one with this run's settings")
    adapter = Path(cfg.output.dir) / "adapter" / "adapter_model.safetensors"
    if step >= total and adapter.is_file() and _evaluated_after(Path(cfg.output.dir), step):
        print(f"this run is complete: {checkpoint} is step {step} of {total} and its adapter is "
              f"in {adapter.parent}; nothing to do (another output.dir starts a new run)")
        return checkpoint, True
    left = ("the final evaluation is missing: it runs now" if step >= total
            else f"{root} holds a checkpoint of this config")
    print(f"resuming from {checkpoint} (step {step} of {total}): {left}")
    return checkpoint, False


def _evaluated_after(out, step: int) -> bool:
    """Whether `out/eval.jsonl` holds the final evaluation (tag "after") of step `step`: a run
    that stopped after writing its adapter but during that evaluation is not complete."""
    import json

    path = out / "eval.jsonl"
    if not path.is_file():
        return False
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut by the stop
            continue
        if row.get("tag") == "after" and row.get("step") == step:
            return True
    return False


def _resume_command(args: argparse.Namespace) -> str:
    import shlex

    config = ["--config", args.config] if args.config else []
    if getattr(args, "trl_config", None):
        config = ["--trl-config", args.trl_config, *config]
    return shlex.join(["grpo-ray", "train", *config, *args.overrides, "--resume"])


def _interrupted_line(step: int, checkpoint: object, args: argparse.Namespace) -> str:
    if checkpoint is None:
        return "interrupted before step 1: nothing to resume (start again without --resume)"
    return (f"interrupted at step {step}: checkpoint written to {checkpoint}; resume with: "
            f"{_resume_command(args)}")


VERBOSE_HELP = ("print the actors' own output (vLLM, transformers, Ray workers) here, as Ray "
                "does; by default it goes to <output.dir>/logs/")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grpo-ray", description="GRPO on Ray: vLLM rollout actors, "
                                "reward actors and a (Q)LoRA learner.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run GRPO training")
    t.add_argument("--config", help="YAML file under configs/ (defaults apply without one)")
    t.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="dotted overrides, applied after the file")
    t.add_argument("--trl-config", metavar="YAML",
                   help="a TRL GRPOConfig YAML file, carried over field by field under --config "
                   "and the overrides (docs/trl.md)")
    t.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint under output.dir/checkpoints")
    t.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    t.set_defaults(run=cmd_train)
    e = sub.add_parser("eval", help="evaluate the base model or an adapter on held-out prompts")
    e.add_argument("--config", help="YAML file under configs/ (defaults apply without one)")
    e.add_argument("--adapter", help="PEFT adapter directory (default: the base model alone)")
    e.add_argument("--out", metavar="FILE", help="JSON-lines file to append the result to, "
                   "the engines' logs beside it (default: eval-<name>.jsonl beside the adapter "
                   "<name>; without --adapter <output.dir>/eval-base.jsonl)")
    e.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    e.add_argument("overrides", nargs="*", metavar="section.key=value")
    e.set_defaults(run=cmd_eval)
    x = sub.add_parser("export", help="save the adapter or merge it into a 16-bit model; "
                       "optionally push to the Hugging Face Hub (token from HF_TOKEN)")
    x.add_argument("--config", help="YAML file under configs/ (model.path is the base)")
    x.add_argument("--adapter", help="PEFT adapter directory (default: <output.dir>/adapter)")
    x.add_argument("--merge", action="store_true",
                   help="merge the adapter into the base model (default out: <output.dir>/merged)")
    x.add_argument("--out", help="directory to write (without --merge: adapter + tokenizer)")
    x.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="weights dtype of the merged model")
    x.add_argument("--push-to-hub", metavar="REPO", help="upload the result to this Hub repo")
    x.add_argument("overrides", nargs="*", metavar="section.key=value")
    x.set_defaults(run=cmd_export)
    b = sub.add_parser("build-tiny", help="build a random-weight Qwen2 model and tokenizer")
    b.add_argument("path")
    b.add_argument("--shape", choices=["tiny", "qwen2.5-3b"], default="tiny")
    b.add_argument("--dtype", default="float32")
    b.set_defaults(run=cmd_build_tiny)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from grpo_ray.config import UserError
    from grpo_ray.faults import EXIT_BUG, EXIT_INFRA, InfraError, first_line

    # every error ends in one line and an exit code by whose it is: what a user can fix (config,
    # data, placement, export) 2, a failure of the machines 3, anything else (a bug, ours or a
    # library's) 1 with its traceback in a file; a run checkpointed before any of them
    try:
        return args.run(args)
    except UserError as e:
        print(f"{e.kind}: {e}", file=sys.stderr)
        return 2
    except InfraError as e:
        print(f"{e.kind}: {e}", file=sys.stderr)
        return EXIT_INFRA
    except Exception as e:  # noqa: BLE001 - a bug: one line here, the traceback in the log
        path = _write_traceback(e, getattr(args, "config_output_dir", None))
        print(f"error: {first_line(e)} (an unexpected error: the traceback is in {path})",
              file=sys.stderr)
        return EXIT_BUG


def _write_traceback(error: BaseException, output_dir: str | None):
    """The error's whole traceback, in `<output.dir>/logs/error.log` (else a temporary file)."""
    import tempfile
    import traceback
    from pathlib import Path

    text = "".join(traceback.format_exception(error))
    if output_dir:
        path = Path(output_dir) / "logs" / "error.log"
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        path = Path(tempfile.mkstemp(prefix="grpo-ray-error-", suffix=".log")[1])
    path.write_text(text)
    return path


if __name__ == "__main__":
    sys.exit(main())
