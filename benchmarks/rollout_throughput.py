"""Rollout throughput (output tokens/s) of a RolloutWorker Ray actor against plain vLLM, on the
same GPU, in the same run, with the same engine arguments and the same rank-64 LoRA adapter.

    python benchmarks/rollout_throughput.py --model /tmp/q3b [--shapes 16x8x256,64x8x256]
        [--modes actor,actor-merged,plain-base]

Each mode runs in its own process, one after the other (a vLLM engine does not give its GPU
memory back inside a process): `plain` (vLLM as a user runs it: `LLM(...)`, engine core in its
own process, adapter from a directory), `plain-inproc` (the same with the engine core in the
calling process, as the actor runs it), `plain-base` (plain vLLM without LoRA: the speed limit),
`plain-base-text` (the same with vLLM's default output: every token detokenized as it comes and
its log-prob in a `Logprob` dict, what the actor asked for before it took flat log-probs and
decoded once; all other modes sample with `RolloutWorker`'s own parameters),
`actor` (`ray.remote(RolloutWorker)` with the adapter applied as LoRA, timed from the driver, so
Ray's transfer of the completions is included) and `actor-merged` (the same actor with
`rollout.merge_adapter`: the adapter folded into its weights). Shapes are prompts x completions
per prompt x new tokens; the model has random weights, so completions almost never stop early.
Prints figures; `--json` also writes them.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_model, print_environment, prompt_ids, random_lora  # noqa: E402

MODES = ["actor", "actor-merged", "plain-base", "plain-base-text", "plain-inproc", "plain"]


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    try:
        shapes = [tuple(int(x) for x in s.split("x")) for s in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"--shapes {text!r}: expected PxNxT[,PxNxT...]")
    return shapes  # type: ignore[return-value]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="/tmp/q3b", help="model directory (built if missing)")
    p.add_argument("--shapes", type=parse_shapes, default=parse_shapes("16x8x256,64x8x256"))
    p.add_argument("--mode", choices=["all", *MODES], default="all")
    p.add_argument("--modes", default="actor,actor-merged,plain-base",
                   help="modes compared by --mode all, in order")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per shape (after 1 warm-up)")
    p.add_argument("--mode-timeout", type=float, default=240,
                   help="seconds one mode may take (engine start included)")
    p.add_argument("--json", help="write the rows here")
    return p


def _dtype() -> str:
    """The engines' dtype: bf16 on a GPU; fp32 on vLLM's CPU build (smoke runs)."""
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


def _configs(args, merge: bool = False):
    from grpo_ray.config import LoraConfig, RolloutConfig

    rollout = RolloutConfig(max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
                            gpu_memory_utilization=args.gpu_memory_utilization,
                            temperature=1.0, top_p=1.0, top_k=-1, merge_adapter=merge)
    return rollout, LoraConfig(r=args.lora_rank, alpha=args.lora_rank)


def _timed(run, shapes, prompts, repeats, mode) -> list[dict]:
    rows = []
    for P, n, T in shapes:
        run(prompts[:P], n, T)  # warm-up: first use of this batch size
        times, tokens = [], 0
        for _ in range(repeats):
            start = time.perf_counter()
            tokens = run(prompts[:P], n, T)
            times.append(time.perf_counter() - start)
        s = statistics.median(times)
        rows.append({"mode": mode, "shape": f"{P}x{n}x{T}", "output_tokens": tokens,
                     "seconds_median": s, "tokens_per_s": tokens / s,
                     "seconds_all": times})
        print(f"{mode:>12} {P}x{n}x{T}: {tokens} tokens in {s:.3f} s (median of {repeats}) "
              f"= {tokens / s:,.0f} tokens/s", flush=True)
    return rows


def run_plain(args, in_process: bool, with_lora: bool = True, text: bool = False) -> list[dict]:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    # this process has asked CUDA for its devices: a forked engine core could hang
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from grpo_ray.contracts import AdapterPayload, Sampling
    from grpo_ray.rollout.worker import engine_kwargs, sampling_params
    from grpo_ray.sync.files import write_adapter

    rollout, lora = _configs(args, merge=not with_lora)  # merge_adapter: an engine without LoRA
    tensors, config = random_lora(args.model, lora.r, lora.alpha, dtype=_dtype())
    adapter = write_adapter(AdapterPayload(1, tensors, config),
                            Path(tempfile.mkdtemp(prefix="bench-lora-")) / "v1")
    start = time.perf_counter()
    llm = LLM(args.model, **engine_kwargs(rollout, lora.r, _dtype(), 0,
                                          on_cuda=_dtype() != "float32"))
    start_s = time.perf_counter() - start
    request = LoRARequest("bench", 1, str(adapter)) if with_lora else None
    prompts = prompt_ids(args.model, max(s[0] for s in args.shapes))

    def run(batch, n, T):
        # the sampling parameters RolloutWorker.generate uses; `text`: vLLM's defaults instead
        # (each token detokenized, its log-prob in a dict), what the actor asked before
        params = (SamplingParams(n=n, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=T,
                                 logprobs=0) if text else sampling_params(Sampling(n, T)))
        outs = llm.generate([{"prompt_token_ids": p} for p in batch], params,
                            lora_request=request, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    mode = ("plain-base" if not with_lora else "plain-inproc" if in_process else "plain")
    mode += "-text" if text else ""
    rows = _timed(run, args.shapes, prompts, args.repeats, mode)
    for r in rows:
        r["engine_start_s"] = start_s
    return rows


def run_actor(args, merge: bool = False) -> list[dict]:
    import ray

    from grpo_ray.cluster.starting import ACTOR_ENV
    from grpo_ray.contracts import Sampling
    from grpo_ray.rollout.worker import RolloutWorker
    from grpo_ray.sync.sender import pack_tensors

    rollout, lora = _configs(args, merge)
    tensors, config = random_lora(args.model, lora.r, lora.alpha, dtype=_dtype())
    gpus = 1 if _dtype() != "float32" else 0
    ray.init(address="local", num_cpus=4, num_gpus=gpus, include_dashboard=False,
             runtime_env={"env_vars": ACTOR_ENV})
    start = time.perf_counter()
    engine = ray.remote(RolloutWorker).options(num_cpus=1, num_gpus=gpus).remote(
        args.model, rollout, lora.r, _dtype(), 0)
    ray.get(engine.ready.remote())
    start_s = time.perf_counter() - start
    load_s = ray.get(engine.load_adapter.remote(pack_tensors(tensors, 1, config, _dtype())))
    prompts = prompt_ids(args.model, max(s[0] for s in args.shapes))

    def run(batch, n, T):
        out = ray.get(engine.generate.remote(batch, Sampling(n=n, max_tokens=T)))
        return sum(len(c) for c in out.completion_ids)

    rows = _timed(run, args.shapes, prompts, args.repeats, "actor-merged" if merge else "actor")
    for r in rows:
        r["engine_start_s"], r["adapter_load_s"] = start_s, load_s
    ray.shutdown()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    ensure_model(args.model)
    if args.mode != "all":
        if args.mode.startswith("actor"):
            rows = run_actor(args, merge=args.mode == "actor-merged")
        else:
            rows = run_plain(args, args.mode != "plain",
                             with_lora=not args.mode.startswith("plain-base"),
                             text=args.mode.endswith("-text"))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return 0

    env = print_environment()
    rows = []
    modes = args.modes.split(",")
    for mode in modes:  # one process per engine: each gets the whole GPU
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, "--mode", mode, "--json", f.name, "--modes", args.modes,
                   "--model", args.model, "--lora-rank", str(args.lora_rank),
                   "--shapes", ",".join("x".join(map(str, s)) for s in args.shapes),
                   "--gpu-memory-utilization", str(args.gpu_memory_utilization),
                   "--max-model-len", str(args.max_model_len), "--repeats", str(args.repeats),
                   "--mode-timeout", str(args.mode_timeout),
                   *(["--enforce-eager"] if args.enforce_eager else [])]
            # own process group: a timeout also stops the engine-core process it started
            child = subprocess.Popen(cmd, start_new_session=True)
            try:
                code = child.wait(timeout=args.mode_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                print(f"{mode}: no result after {args.mode_timeout:g} s", flush=True)
                continue
            if code != 0:
                print(f"{mode}: failed with exit code {code}", flush=True)
                continue
            rows += json.loads(Path(f.name).read_text())
    by = {(r["mode"], r["shape"]): r for r in rows}
    print(f"\nrollout throughput, output tokens/s ({env['gpu']}; vLLM {env['vllm']}; random "
          f"weights of Qwen2.5-3B's shape; rank-{args.lora_rank} LoRA on all 7 projections)")
    first = modes[-1]  # the reference of the ratios: the last mode (plain-base by default)
    print("| prompts x n x new tokens | " + " | ".join(modes) + " | "
          + " | ".join(f"{m} / {first}" for m in modes[:-1]) + " |")
    print("|---" * (2 * len(modes)) + "|")
    for P, n, T in args.shapes:
        shape = f"{P}x{n}x{T}"
        tps = {m: by[(m, shape)]["tokens_per_s"] for m in modes if (m, shape) in by}
        ratios = [f"{tps[m] / tps[first]:.1%}" if {m, first} <= set(tps) else "-"
                  for m in modes[:-1]]
        print(f"| {shape} | " + " | ".join(f"{tps[m]:,.0f}" if m in tps else "-" for m in modes)
              + f" | {' | '.join(ratios)} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
