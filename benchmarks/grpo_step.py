"""Full GRPO steps of the reference recipe's shape on one GPU (colocated learner and engine),
stage by stage, then the adapter sync's transports compared on the same live actors.

    python benchmarks/grpo_step.py --model /tmp/q3b [--steps 3] [section.key=value ...]

Runs the steps of `grpo-ray train --config configs/qwen2.5-3b-gsm8k-1gpu.yaml` (the same Trainer,
through a local Ray), with random weights of Qwen2.5-3B's shape (built at --model if missing),
synthetic prompts and completions of up to 256 tokens (random weights rarely stop earlier), and a
reward random weights earn (`rewards_bench.sevens`), so every update moves the adapter. Prints
each step's stages (generation, rewards, the learner's log-probs and update, sync), peak GPU
memory (the learner's torch peak; the whole GPU's, sampled from nvidia-smi), and after every sync
how far the engine's log-probs of a fixed completion are from the learner's and whether they
moved as the learner's did.

With --compare-loss-kernel, the same actors then run --steps more steps with the other
`learner.loss_kernel` (chunked <-> liger, switched through the learner's `set_loss_kernel`), and
the two kernels' update times and learner peak memory are printed side by side.
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
from common import ensure_model, print_environment, timed  # noqa: E402

# learner/time_logprobs_s: every pass without gradients (the reference's, and the old
# log-probs' when num_iterations > 1), of which time_ref_s the reference's; time_update_s: the rest
# of the learner's step. The last three are figures of the learner's step, not times.
STAGES = [("generate", "time/generate_s"), ("rewards", "time/reward_s"),
          ("no-grad log-probs", "learner/time_logprobs_s"), ("of which ref", "learner/time_ref_s"),
          ("update", "learner/time_update_s"), ("learner call", "time/update_s"),
          ("wait for rollout", "time/wait_rollout_s"), ("sync", "time/sync_s"),
          ("step", "time/step_s"), ("staleness", "rollout/staleness"),
          ("padding", "learner/padding_fraction"),
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
    p.add_argument("--overlap-steps", type=int, default=0,
                   help="after --steps on policy, this many steps one step off policy "
                   "(algorithm.max_staleness=1) on the same actors")
    p.add_argument("--rollout-repeats", type=int, default=3,
                   help="timed generations of a step's batch before and after training")
    p.add_argument("--reward", default="rewards_bench:sevens",
                   help="reward function (import path); the default is one random weights earn")
    p.add_argument("--compare-loss-kernel", action="store_true",
                   help="then --steps more steps with the other learner.loss_kernel, on the "
                        "same actors (not with --overlap-steps)")
    p.add_argument("--profile", metavar="PATH",
                   help="run the last on-policy step with the torch profiler on in the learner's "
                        "process and write its ops by GPU time here")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p


def measure_syncs(trainer, first_version: int, repeats: int,
                  probe_ids: tuple[list[list[int]], list[list[int]]] | None = None
                  ) -> dict[str, dict[str, float]]:
    """Median export / load / total seconds of each transport, on the run's own actors:
    `before` is the transport this project had (fp32 tensors pickled by Ray, written to a
    safetensors file on tmpfs that vLLM reads); then the engines' dtype in one buffer, from a file
    and in memory; `after` is the run's own `AdapterSync.send` (CUDA IPC when the engine shares
    the learner's GPU, else the previous row; its check included, as in every step). With
    `probe_ids` (the trainer's sync probe), the learner's side of the sync check right after
    each `after` sync, part by part."""
    import ray

    learner, engines, sync = trainer.learner.actor, trainer.engines, trainer.sync
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

    transports = {
        "before: fp32 tensors through the object store, safetensors file": manual(
            lambda v: learner.export_adapter.remote(v, "tensors"), True),
        f"{dtype} one buffer through the object store, safetensors file": manual(
            lambda v: learner.export_adapter.remote(v, "packed", dtype), True),
        f"{dtype} one buffer through the object store, in memory": manual(
            lambda v: learner.export_adapter.remote(v, "packed", dtype), False),
        "after: AdapterSync.send": sync.send,
    }
    version, out = first_version, {}
    # what each CUDA IPC export did before it kept the adapter's parameters (sender.
    # lora_parameters): a walk of the whole model's state dict, timed alone in the learner
    walks = [ray.get(learner.__ray_call__.remote(_state_dict_walk_s)) for _ in range(repeats)]
    out["export before: get_peft_model_state_dict alone"] = {
        "export_s": statistics.median(walks), "load_s": 0.0, "total_s": statistics.median(walks),
        "runs": repeats}
    probe_parts = []
    for name, sync in transports.items():
        runs = []
        for _ in range(repeats):
            runs.append(sync(version))
            version += 1
            if name.startswith("after") and probe_ids is not None:
                start = time.perf_counter()
                parts = ray.get(learner.__ray_call__.remote(_learner_probe_parts, *probe_ids))
                probe_parts.append(parts | {"round_trip_s": time.perf_counter() - start})
        if name.startswith("after"):
            name = f"after: AdapterSync.send ({sync.transport.name})"
        out[name] = {k: statistics.median(r[k] for r in runs)
                     for k in ("export_s", "load_s", "total_s")}
        out[name]["runs"] = repeats
    # a merged engine's load, part by part, on the version it holds (the GPU synchronized after
    # each part, so each is charged its own GPU work)
    form = sync.transport.form
    parts = [ray.get(engines.engines[0].__ray_call__.remote(
        _merged_load_parts, learner.export_adapter.remote(version - 1, form, dtype)))
        for _ in range(repeats)]
    if all(parts):
        out["merged engine's load, part by part"] = {
            k: statistics.median(p[k] for p in parts) for k in parts[0]} | {"runs": repeats}
    if probe_parts:
        out["the learner's side of the sync check, part by part"] = {
            k: statistics.median(p[k] for p in probe_parts) for k in probe_parts[0]
        } | {"runs": repeats}
    return out


def _merged_load_parts(worker, payload) -> dict[str, float]:
    """Run through `__ray_call__` in an engine: seconds of each part of `VllmMergedWeights.load`
    for `payload` (the version the engine holds, merged again), and of the merge's host side
    alone (`merge_host_s`: near `merge_s` where the merge is bound by its launches, far below
    where by the GPU's work), of the sync check's count of the modules it serves
    (`served_modules_s`), then the A/B's other merge (`_merge_in_place`); {} for a LoRA engine."""
    from grpo_ray.sync.digest import tensor_digest
    from grpo_ray.sync.merged import VllmMergedWeights, lora_scale

    slot = worker.adapter
    if not isinstance(slot, VllmMergedWeights):
        return {}
    tensors, materialize_s = timed(lambda: payload.materialize(slot.device))
    _, digest_s = timed(lambda: tensor_digest(tensors))

    scale = lora_scale(payload.peft_config)

    def merge() -> float:  # the product's merge; its host seconds: until the calls are queued
        start = time.perf_counter()
        slot.llm.collective_rpc("grpo_merge", args=(slot.model_path, tensors, scale))
        return time.perf_counter() - start

    merge_host_s, merge_s = timed(merge)
    _, reset_s = timed(slot.llm.reset_prefix_cache)
    _, served_s = timed(slot.served_modules)  # the sync check's count of the merge, every sync
    out = {"materialize_s": materialize_s, "digest_s": digest_s, "merge_s": merge_s,
           "merge_host_s": merge_host_s, "reset_prefix_cache_s": reset_s,
           "served_modules_s": served_s}
    # the A/B: the other merge on the same weights, then the product's again (a failure of the
    # other is printed, and the parts above kept)
    try:
        (other,), in_place_s = timed(lambda: slot.llm.collective_rpc(
            _merge_in_place, args=(tensors, scale)))
        if other:
            out |= other | {"merge_in_place_s": in_place_s}
    except Exception as e:  # noqa: BLE001 - an experiment's failure must not lose the run
        print(f"merge in place failed: {type(e).__name__}: {e}")
    merge()
    return out


def _merge_in_place(worker, tensors, scale) -> dict[str, float]:
    """The merge A/B's other side, not the product's (`MergedWeightsExtension.grpo_merge`: the
    base in fp32, B @ A added in fp32, rounded, copied into the weight): run on a vLLM worker by
    `collective_rpc`, each shard written by one addmm of the pristine base and B @ A straight
    into the engine's weight, in its dtype (cuBLAS
    accumulates in fp32 and rounds once), no fp32 copy and fewer launches. Returns how far it
    lands from the product's merge over the first three weights: the largest difference relative
    to their largest value, and the fraction of elements that differ. Empty where vLLM repacked
    the weights (its CPU backend)."""
    import torch

    from grpo_ray.sync.merged import merge_plan

    model = worker.get_model()
    params, modules = dict(model.named_parameters()), dict(model.named_modules())
    base = worker._grpo_base  # the pristine base the extension keeps
    plan = merge_plan(list(tensors), getattr(model, "packed_modules_mapping", {}))
    if any(params[name].shape != base[name].shape for name in plan):
        return {}
    sample = {name: params[name].detach().clone() for name in list(plan)[:3]}
    with torch.no_grad():
        for name, shards in plan.items():
            weight = params[name]
            sizes = getattr(modules[name.removesuffix(".weight")], "output_sizes", None) or [
                weight.shape[0]]
            lora = dict(shards)
            for shard in range(len(sizes)):
                rows = slice(sum(sizes[:shard]), sum(sizes[:shard + 1]))
                if shard in lora:
                    torch.addmm(base[name][rows], tensors[f"{lora[shard]}.lora_B.weight"],
                                tensors[f"{lora[shard]}.lora_A.weight"], alpha=scale,
                                out=weight[rows])
                else:
                    weight[rows].copy_(base[name][rows])
        gaps = [((params[n] - w).abs().max() / w.abs().max()).item() for n, w in sample.items()]
        differ = sum((params[n] != w).sum().item() for n, w in sample.items())
    return {"in_place_max_rel_diff": max(gaps),
            "in_place_differ_fraction": differ / sum(w.numel() for w in sample.values())}


def _learner_probe_parts(worker, prompt_ids, completion_ids) -> dict[str, float]:
    """Run through `__ray_call__` in the learner right after a sync: seconds of what the sync
    check asks of it (`AdapterSync.verify`), apart: the GPU work still queued when the call
    arrives, the identity of the last export, the probe's log-probs."""
    _, queued_s = timed(lambda: None)
    _, identity_s = timed(worker.exported_identity)
    _, logprobs_s = timed(lambda: worker.sequence_logprobs(prompt_ids, completion_ids, 1.0))
    return {"queued_s": queued_s, "identity_s": identity_s, "logprobs_s": logprobs_s}


def _state_dict_walk_s(worker) -> float:
    """Run through `__ray_call__` in the learner: seconds of one `get_peft_model_state_dict`."""
    from grpo_ray.sync.sender import _lora_state

    return timed(lambda: _lora_state(worker.model, "default"))[1]


def probe(trainer, fixed) -> tuple[list[float], list[float]]:
    """The engine's and the learner's log-probs of one fixed completion."""
    engine = trainer.engines.score(*fixed)[0][0]
    learner = trainer.learner.call("probe", "sequence_logprobs", *fixed)[0]
    return engine, learner


def generation_rate(trainer, repeats: int) -> float:
    """Median output tokens/s of the engines on a step-shaped batch (held-out prompts, the step's
    sampling), with the adapter they hold now."""
    from grpo_ray.contracts import PromptBatch, Sampling

    cfg, held_out = trainer.cfg, trainer.eval_prompts[0]
    n = cfg.rollout.prompts_per_step
    batch = PromptBatch(held_out.prompt_ids[:n], held_out.prompts[:n], held_out.answers[:n],
                        held_out.questions[:n])
    rates = []
    for i in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        out = trainer.engines.generate(batch, Sampling.training(cfg.rollout, seed=i))
        if i:
            rates.append(sum(len(c) for c in out.completion_ids) / (time.perf_counter() - start))
    return statistics.median(rates)


PHASES = ["on policy", "one step off", "other loss kernel"]
"""A run's phases, in order: --steps, --overlap-steps, and --compare-loss-kernel's steps."""


def steady_phases(history: list[dict], lengths: list[int]) -> dict[str, list[dict]]:
    """Each phase's steady steps (`lengths` steps each, `PHASES` in order; a phase of 0 steps
    is left out): its first step left out (warm-ups, a batch made on the spot) and, one step
    off, the run's last too (nothing left to prefetch while it trains); a step run under
    --profile is left out as well."""
    out, start = {}, 0
    for name, n in zip(PHASES, lengths):
        end = start + n
        if n:
            last = end - 1 if name == "one step off" and end == len(history) else end
            out[name] = [m for m in history[start + 1:last] if not m.get("profiled")]
        start = end
    return out


def steady_spread(history: list[dict], lengths: list[int]) -> dict[str, dict]:
    """Median and largest step and update seconds of each phase's steady steps
    (`steady_phases`): a recompile or another stall shows as a largest far above the median."""
    return {name: {k: [statistics.median(m[key] for m in ms), max(m[key] for m in ms)]
                   for k, key in (("step_s", "time/step_s"),
                                  ("update_s", "learner/time_update_s"))}
            for name, ms in steady_phases(history, lengths).items() if ms}


def _profiler_start(worker) -> None:
    """Turn the torch profiler on in the learner's process (through `__ray_call__`): it records
    every op from now on, on any thread, until `_profiler_table`."""
    import torch
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    worker._benchmark_profiler = torch.profiler.profile(activities=activities)
    worker._benchmark_profiler.start()


def _profiler_table(worker, rows: int = 40) -> str:
    """Stop the profiler of `_profiler_start`: its ops by self GPU time (CPU time on a CPU)."""
    import torch

    prof = worker._benchmark_profiler
    prof.stop()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def mean_abs(a: list[float], b: list[float]) -> float:
    return sum(abs(x - y) for x, y in zip(a, b)) / len(a)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.compare_loss_kernel and args.overlap_steps:
        parser().error("--compare-loss-kernel compares on-policy steps: leave out --overlap-steps")
    from grpo_ray.config import load_config

    out_dir = tempfile.mkdtemp(prefix="grpo-step-")
    compare_steps = args.steps if args.compare_loss_kernel else 0
    total = args.steps + args.overlap_steps + compare_steps
    cfg = load_config(args.config, [
        f"model.path={args.model}", "data.source=synthetic", f"algorithm.total_steps={total}",
        f"rollout.max_completion_length={args.max_new_tokens}", f"output.dir={out_dir}",
        "logging.samples_per_step=0", f"reward.functions=[{{name: '{args.reward}'}}]",
        *args.overrides])
    env = print_environment()
    ensure_model(args.model)

    import common
    import ray

    from grpo_ray.cluster.connect import connect_ray
    from grpo_ray.driver.trainer import Trainer

    # the functions this script runs in the actors (`__ray_call__`) use `timed`: shipped by value,
    # the actors need no benchmarks/ on their path
    ray.cloudpickle.register_pickle_by_value(common)

    connect_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.num_gpus)
    trainer = Trainer(cfg)
    # the same fixed completion before and after every sync: does the engine follow the learner?
    fixed = ([list(range(11, 43))], [list(range(300, 364))])
    with GpuMemorySampler() as memory:
        start = time.perf_counter()
        trainer.setup()
        setup_s = time.perf_counter() - start
        try:
            history, probes = [], [probe(trainer, fixed)]
            rates = {"version 0": generation_rate(trainer, args.rollout_repeats)}
            start = time.perf_counter()
            kernels = [cfg.learner.loss_kernel]
            while trainer.step < total:
                if trainer.step == args.steps and args.overlap_steps:
                    trainer.cfg.algorithm.max_staleness = 1  # the same actors, one step off
                if trainer.step == args.steps and compare_steps:
                    kernels.append({"chunked": "liger", "liger": "chunked"}[kernels[0]])
                    trainer.learner.call("kernel switch", "set_loss_kernel", kernels[1])
                profiled = args.profile and trainer.step == args.steps - 1
                if profiled:
                    trainer.learner.call("profiler", "__ray_call__", _profiler_start)
                started = time.time()  # wall clock: against the suite's nvidia-smi samples
                history.append(trainer.run_step() | {"bench/started_unix": started})
                if profiled:
                    history[-1]["profiled"] = 1.0  # slowed by the profiler: not a steady step
                    table = trainer.learner.call("profiler", "__ray_call__", _profiler_table)
                    Path(args.profile).write_text(
                        f"torch profiler, the learner's process, step {trainer.step} "
                        f"({env['gpu']}; learner.backend={cfg.learner.backend}; the step's update, "
                        f"reference pass and its sync's learner calls)\n{table}")
                probes.append(probe(trainer, fixed))
            fit_s = time.perf_counter() - start
            rates[f"version {trainer.version}"] = generation_rate(trainer, args.rollout_repeats)
            syncs = (measure_syncs(trainer, trainer.version + 1, args.sync_repeats,
                                   trainer.probe_ids) if args.sync_repeats else {})
            learner = ray.get(trainer.learner.actor.__ray_call__.remote(
                lambda w: getattr(w, "description", "")))
        finally:
            trainer.close()
    ray.shutdown()
    follow = [{"engine_vs_learner": mean_abs(e, lr), "learner_moved": mean_abs(lr, lr0),
               "engine_change_off_by": mean_abs([x - x0 for x, x0 in zip(e, e0)],
                                                [y - y0 for y, y0 in zip(lr, lr0)])}
              for (e, lr), (e0, lr0) in zip(probes[1:], probes[:-1])]

    tokens = [m["completion_length"] * cfg.rollout.prompts_per_step * cfg.rollout.num_generations
              for m in history]
    print(f"\nGRPO steps on one GPU ({env['gpu']}; learner: {learner}; colocated="
          f"{cfg.cluster.colocate}, merged rollout={cfg.rollout.merge_adapter}; "
          f"{cfg.rollout.prompts_per_step} prompts x {cfg.rollout.num_generations} completions x "
          f"up to {args.max_new_tokens} tokens; random weights of {args.model}; reward "
          f"{args.reward}); set-up {setup_s:.1f} s, {len(history)} steps {fit_s:.1f} s")
    print("| step | " + " | ".join(name for name, _ in STAGES) + " | completion tokens | "
          "reward std | learner peak GiB | sync ms | engine-learner gap | engine follows |")
    print("|---" * (len(STAGES) + 7) + "|")
    for i, (m, n, f) in enumerate(zip(history, tokens, follow)):
        print(f"| {i + 1} | " + " | ".join(f"{m.get(key, float('nan')):.2f}" for _, key in STAGES)
              + f" | {n:.0f} | {m['reward/std']:.3f} | {m['learner/peak_memory_gb']:.1f} | "
              f"{1000 * m['sync/total_s']:.0f} | {f['engine_vs_learner']:.4f} | "
              f"moved {f['learner_moved']:.4f}, off by {f['engine_change_off_by']:.4f} |")
    lengths = [args.steps, args.overlap_steps, compare_steps]
    if args.overlap_steps:
        phases = steady_phases(history, lengths)
        print("steady state (first step of each phase and the last step left out): " + "; ".join(
            f"{name}: step {statistics.median(m['time/step_s'] for m in ms):.2f} s, "
            f"{statistics.median(c * m['completion_length'] / m['time/step_s'] for m in ms):,.0f}"
            " completion tokens/s" for name, ms in phases.items() if ms
            for c in [cfg.rollout.prompts_per_step * cfg.rollout.num_generations]))
    stalls = steady_spread(history, lengths)
    print("steady steps (first step of each phase and the last step left out), median and "
          "largest: " + "; ".join(
        f"{name}: step {v['step_s'][0]:.2f} / {v['step_s'][1]:.2f} s "
        f"({v['step_s'][1] / v['step_s'][0]:.2f}x), update {v['update_s'][0]:.2f} / "
        f"{v['update_s'][1]:.2f} s" for name, v in stalls.items()))
    print(f"generation, output tokens/s (median of {args.rollout_repeats}): "
          + ", ".join(f"{k}: {v:,.0f}" for k, v in rates.items())
          + (" (version 0 of a merged engine is plain vLLM without LoRA)"
             if cfg.rollout.merge_adapter else ""))
    print(f"peak GPU memory in use (nvidia-smi, engine + learner + CUDA contexts): "
          f"{memory.peak_mib / 1024:.1f} GiB; the engine reserves "
          f"{cfg.rollout.gpu_memory_utilization:.0%} of the GPU")
    kernel_times = {}
    if compare_steps:
        steady = steady_phases(history, lengths)  # the first step of each kernel warms up
        for kernel, name, ms in zip(kernels, ["on policy", "other loss kernel"],
                                    [history[:args.steps], history[args.steps:]]):
            ms = steady[name] or ms  # one step each: that step
            kernel_times[kernel] = {
                "update_s": statistics.median(m["learner/time_update_s"] for m in ms),
                "peak_memory_gb": max(m["learner/peak_memory_gb"] for m in ms)}
        print("\nlearner.loss_kernel on the same actors, " + f"{args.steps} steps each "
              "(median update s, largest learner peak GiB; first step of each and a profiled "
              "one left out): "
              + "; ".join(f"{k}: {v['update_s']:.2f} s, {v['peak_memory_gb']:.1f} GiB"
                          for k, v in kernel_times.items()))
    if syncs:
        print(f"\nadapter sync, rank {cfg.lora.r} on all 7 projections, median of "
              f"{args.sync_repeats} ({env['gpu']})")
        print("| transport | export ms | load ms | total ms |")
        print("|---|---|---|---|")
        for name, s in syncs.items():
            if "export_s" in s:
                print(f"| {name} | {1000 * s['export_s']:.1f} | {1000 * s['load_s']:.1f} | "
                      f"{1000 * s['total_s']:.1f} |")
            else:
                print(f"{name}: " + ", ".join(
                    f"{k.removesuffix('_s')} {1000 * v:.1f} ms" if k.endswith("_s")
                    else f"{k} {v:.3g}" for k, v in s.items() if k != "runs"))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"environment": env, "learner": learner, "config": cfg.to_dict(), "setup_s": setup_s,
             "setup_parts": trainer.startup,
             "fit_s": fit_s, "history": history, "follow": follow, "generation_rates": rates,
             "gpu_peak_mib": memory.peak_mib, "syncs": syncs,
             "loss_kernels": kernel_times, "after_warmup": stalls,
             "phase_steps": lengths, "overrides": args.overrides}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
