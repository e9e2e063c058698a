"""Full GRPO steps of the reference recipe's shape on one GPU (colocated learner and engine),
stage by stage, then the adapter sync's transports compared on the same live actors.

    python benchmarks/grpo_step.py --model /tmp/q3b [--steps 3] [section.key=value ...]

Runs what `grpo-ray train --config configs/qwen2.5-3b-gsm8k-1gpu.yaml` runs (the same Trainer,
through a local Ray), with random weights of Qwen2.5-3B's shape (built at --model if missing),
synthetic prompts and completions of up to 256 tokens (random weights rarely stop earlier). Prints
each step's stages (generation, rewards, the learner's old/reference log-probs and update, sync)
and peak GPU memory (the learner's torch peak; the whole GPU's, sampled from nvidia-smi).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_model, print_environment  # noqa: E402

# learner/time_logprobs_s: every pass without gradients (the reference's, and the old
# log-probs' when num_iterations > 1), of which time_ref_s the reference's; time_update_s: the rest
# of the learner's step. The last three are figures of the learner's step, not times.
STAGES = [("generate", "time/generate_s"), ("rewards", "time/reward_s"),
          ("no-grad log-probs", "learner/time_logprobs_s"), ("of which ref", "learner/time_ref_s"),
          ("update", "learner/time_update_s"), ("learner call", "time/update_s"),
          ("sync", "time/sync_s"), ("step", "time/step_s"), ("padding", "learner/padding_fraction"),
          ("learner TFLOP/s", "learner/tflops_per_s"), ("MFU", "learner/mfu")]


class GpuMemorySampler:
    """Largest `memory.used` of GPU 0 that nvidia-smi reports while running (every 100 ms)."""

    def __init__(self) -> None:
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                                      "--format=csv,noheader,nounits", "-i", "0"],
                                     capture_output=True, text=True, timeout=10).stdout
                self.peak_mib = max(self.peak_mib, float(out.strip() or 0))
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return
            self._stop.wait(0.1)

    def __enter__(self) -> "GpuMemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="/tmp/q3b", help="model directory (built if missing)")
    p.add_argument("--config", default="configs/qwen2.5-3b-gsm8k-1gpu.yaml")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--sync-repeats", type=int, default=5,
                   help="syncs per transport after training (0: skip the comparison)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p


def measure_syncs(actors, first_version: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median export / load / total seconds of each transport, on the run's own actors:
    `before` is the transport this project had (fp32 tensors pickled by Ray, written to a
    safetensors file on tmpfs that vLLM reads); then the engines' dtype in one buffer, from a file
    and in memory; `after` is AdapterBroadcast.sync (CUDA IPC when the engine shares the
    learner's GPU, else the previous row)."""
    import ray

    from grpo_ray.weight_sync.broadcast import AdapterBroadcast

    learner, engines = actors.learner, actors.engines
    dtype = engines.lora_dtype()

    def manual(export, from_file):
        def sync(version):
            start = time.perf_counter()
            ref = export(version)
            ray.wait([ref], fetch_local=False)
            export_s = time.perf_counter() - start
            loads = ray.get([e.load_adapter.remote(ref, from_file=from_file)
                             for e in engines.engines])
            return {"export_s": export_s, "load_s": max(loads),
                    "total_s": time.perf_counter() - start}
        return sync

    broadcast = AdapterBroadcast()
    transports = {
        "before: fp32 tensors through the object store, safetensors file": manual(
            lambda v: learner.export_adapter.remote(v, "tensors"), True),
        f"{dtype} one buffer through the object store, safetensors file": manual(
            lambda v: learner.export_adapter.remote(v, "packed", dtype), True),
        f"{dtype} one buffer through the object store, in memory": manual(
            lambda v: learner.export_adapter.remote(v, "packed", dtype), False),
        "after: AdapterBroadcast.sync": lambda v: broadcast.sync(learner, engines, v),
    }
    version, out = first_version, {}
    for name, sync in transports.items():
        runs = []
        for _ in range(repeats):
            runs.append(sync(version))
            version += 1
        if name.startswith("after"):
            name = f"after: AdapterBroadcast.sync ({broadcast.transport})"
        out[name] = {k: statistics.median(r[k] for r in runs)
                     for k in ("export_s", "load_s", "total_s")}
        out[name]["runs"] = repeats
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from grpo_ray.config import load_config

    out_dir = tempfile.mkdtemp(prefix="grpo-step-")
    cfg = load_config(args.config, [
        f"model.path={args.model}", "data.source=synthetic", f"algorithm.total_steps={args.steps}",
        f"rollout.max_completion_length={args.max_new_tokens}", f"output.dir={out_dir}",
        "logging.samples_per_step=0", *args.overrides])
    env = print_environment()
    ensure_model(args.model)

    import ray

    from grpo_ray.cli import connect_ray
    from grpo_ray.trainer import Trainer

    connect_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.num_gpus)
    trainer = Trainer(cfg)
    with GpuMemorySampler() as memory:
        start = time.perf_counter()
        trainer.setup()
        setup_s = time.perf_counter() - start
        try:
            start = time.perf_counter()
            history = trainer.fit()
            fit_s = time.perf_counter() - start
            syncs = (measure_syncs(trainer.actors, trainer.version + 1, args.sync_repeats)
                     if args.sync_repeats else {})
        finally:
            trainer.close()
    ray.shutdown()

    tokens = [m["completion_length"] * cfg.rollout.prompts_per_step * cfg.rollout.num_generations
              for m in history]
    print(f"\nGRPO steps on one GPU ({env['gpu']}; colocated={cfg.cluster.colocate}, 4-bit "
          f"learner={cfg.learner.load_in_4bit}; {cfg.rollout.prompts_per_step} prompts x "
          f"{cfg.rollout.num_generations} completions x up to {args.max_new_tokens} tokens; "
          f"random weights of {args.model}); set-up {setup_s:.1f} s, fit {fit_s:.1f} s "
          "(with the trainer's evaluations and checkpoint)")
    print("| step | " + " | ".join(name for name, _ in STAGES) + " | completion tokens | "
          "learner peak GiB | sync ms (export / load) |")
    print("|---" * (len(STAGES) + 4) + "|")
    for i, (m, n) in enumerate(zip(history, tokens)):
        print(f"| {i + 1} | " + " | ".join(f"{m.get(key, float('nan')):.2f}" for _, key in STAGES)
              + f" | {n:.0f} | {m['learner/peak_memory_gb']:.1f} | {1000 * m['sync/total_s']:.0f}"
              f" ({1000 * m['sync/export_s']:.0f} / {1000 * m['sync/load_s']:.0f}) |")
    print(f"peak GPU memory in use (nvidia-smi, engine + learner + CUDA contexts): "
          f"{memory.peak_mib / 1024:.1f} GiB; the engine reserves "
          f"{cfg.rollout.gpu_memory_utilization:.0%} of the GPU")
    if syncs:
        print(f"\nadapter sync, rank {cfg.lora.r} on all 7 projections, median of "
              f"{args.sync_repeats} ({env['gpu']})")
        print("| transport | export ms | load ms | total ms |")
        print("|---|---|---|---|")
        for name, s in syncs.items():
            print(f"| {name} | {1000 * s['export_s']:.1f} | {1000 * s['load_s']:.1f} | "
                  f"{1000 * s['total_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"environment": env, "config": cfg.to_dict(), "setup_s": setup_s, "fit_s": fit_s,
             "history": history, "gpu_peak_mib": memory.peak_mib, "syncs": syncs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
