"""Issue 20's one table, from the JSON one `gpu_suite.sh` run wrote into its $SUITE directory:
every figure beside its goal, as a range over the steady steps, with the GPU and what was not run.

    python benchmarks/suite_table.py outputs/gpu-suite [--out outputs/gpu-suite/table.md]

Reads `step-unsloth-merged*.json`, `step-peft*.json` (benchmarks/grpo_step.py; the bnb row from
`step-peft-merged` where it ran, as the Unsloth row's rollout is merged), `rollout.json`
(benchmarks/rollout_throughput.py), `peer-trl.json` (benchmarks/trl_peer.py) and
`learner-ab-*.json` (benchmarks/learner_step.py); a part that did not run shows as "not run".
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_step import steady_phases  # noqa: E402

from grpo_ray.driver.trainer import describe_startup  # noqa: E402


def _load(suite: Path, *names: str) -> tuple[str, dict] | None:
    """The first of `names` (JSON files in `suite`) that exists: (name, its content)."""
    for name in names:
        path = suite / f"{name}.json"
        if path.is_file():
            return name, json.loads(path.read_text())
    return None


def phases(run: dict) -> dict[str, list[dict]]:
    """A grpo_step run's steady steps by phase (`grpo_step.steady_phases`), from its
    `phase_steps`; runs written before it: two equal halves when they compared anything."""
    history = run["history"]
    n = len(history)
    lengths = run.get("phase_steps") or (
        [n // 2, n - n // 2, 0] if max(m.get("rollout/staleness", 0) for m in history) > 0
        else [n // 2, 0, n - n // 2] if len(run.get("loss_kernels") or {}) == 2 else [n, 0, 0])
    return steady_phases(history, lengths)


def span(values: list[float], fmt: str = "{:.2f}") -> str:
    """`lo-hi` (or the one value), and the median when there are three or more."""
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    text = fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}-{fmt.format(hi)}"
    return text + (f" (median {fmt.format(statistics.median(values))})" if len(values) >= 3 else "")


def _col(ms: list[dict], key: str) -> list[float]:
    return [m[key] for m in ms if key in m]


def step_row(ms: list[dict]) -> str:
    return (f"{span(_col(ms, 'time/step_s'))} s: generate {span(_col(ms, 'time/generate_s'))}, "
            f"reference {span(_col(ms, 'learner/time_ref_s'))}, update "
            f"{span(_col(ms, 'learner/time_update_s'))}, sync {span(_col(ms, 'time/sync_s'))}")


def table(suite: Path) -> str:
    unsloth = _load(suite, "step-unsloth-merged-compare", "step-unsloth-merged",
                    "step-unsloth-merged-kernels")
    peft = _load(suite, "step-peft-merged", "step-peft-compare", "step-peft", "step-peft-kernels")
    rollout, peer = _load(suite, "rollout"), _load(suite, "peer-trl")
    rows: list[tuple[str, str, str]] = []
    not_run = "not run"
    u = phases(unsloth[1]) if unsloth else {}
    p = phases(peft[1]) if peft else {}
    on, off = u.get("on policy", []), u.get("one step off", [])
    rows.append(("Unsloth 4-bit, merged rollout, on policy", "<= 3.5 s",
                 f"{step_row(on)} [{unsloth[0]}]" if on else not_run))
    rows.append(("the same, one step off", "<= 2.5 s",
                 f"{step_row(off)} [{unsloth[0]}]" if off else not_run))
    rows.append(("bnb NF4 + PEFT, on policy", "<= 5 s",
                 f"{step_row(p['on policy'])} [{peft[0]}]" if p.get("on policy") else not_run))
    rows.append(("learner MFU", ">= 0.45 Unsloth",
                 f"Unsloth {span(_col(on, 'learner/mfu'))}; bnb "
                 f"{span(_col(p.get('on policy', []), 'learner/mfu'))}" if on or p else not_run))
    if rollout:
        rates = {(r["mode"], r["shape"]): r["tokens_per_s"] for r in rollout[1]["rows"]}
        shapes = sorted({s for _, s in rates}, key=lambda s: [int(x) for x in s.split("x")])
        parts = []
        for actor, plain in (("actor-merged", "plain-base"), ("actor", "plain"),
                             ("plain-base-text", "plain-base")):
            ratios = [f"{rates[(actor, s)] / rates[(plain, s)]:.1%} at {s}" for s in shapes
                      if (actor, s) in rates and (plain, s) in rates]
            if ratios:
                parts.append(f"{actor} / {plain}: " + ", ".join(ratios))
        rows.append(("rollout actor / plain vLLM, same run", "merged >= 97%, LoRA >= 90%",
                     "; ".join(parts) or not_run))
    else:
        rows.append(("rollout actor / plain vLLM, same run", "merged >= 97%, LoRA >= 90%",
                     not_run))
    syncs = (unsloth[1].get("syncs") or {}) if unsloth else {}
    ipc = next((v for k, v in syncs.items() if "cuda-ipc" in k), None)
    rows.append(("adapter sync, r64, CUDA IPC", "<= 50 ms", (
        f"{span([1000 * x for x in _col(on + off, 'sync/total_s')], '{:.0f}')} ms in the steps"
        + (f"; alone {1000 * ipc['total_s']:.0f} (export {1000 * ipc['export_s']:.0f}, load "
           f"{1000 * ipc['load_s']:.0f})" if ipc else "")) if on else not_run))
    starts = [f"{r[0]} {r[1]['setup_s']:.0f} s" + (
        f" ({describe_startup(r[1]['setup_parts'])})" if "setup_parts" in r[1] else "")
        for r in (unsloth, peft) if r]
    rows.append(("start-up to first step", "<= 60 s", "; ".join(starts) or not_run))
    if peer and on:
        theirs = peer[1]["median_after_first_s"]
        ratio = [f"{theirs / statistics.median(_col(ms, 'time/step_s')):.2f}x {name}"
                 for name, ms in (("on policy", on), ("one step off", off)) if ms]
        rows.append((f"peer: TRL {peer[1]['environment'].get('trl', '?')} GRPOTrainer, "
                     f"{peer[1]['engine']}, bf16 LoRA", ">= 2.5x on policy, >= 3.4x one step off",
                     f"{span(peer[1]['step_s'][1:])} s a step; ours faster by " + ", ".join(ratio)))
    else:
        rows.append(("peer: TRL GRPOTrainer, vLLM colocated, bf16 LoRA",
                     ">= 2.5x on policy, >= 3.4x one step off", not_run))
    stalls = []
    for name, ms in (("on policy", on), ("one step off", off)):
        steps = _col(ms, "time/step_s")
        if steps:
            stalls.append(f"{name}: largest step {max(steps) / statistics.median(steps):.2f}x "
                          "the median")
    rows.append(("stalls", "no steady step above 1.5x the median", "; ".join(stalls) or not_run))
    used = {r[0] for r in (unsloth, peft) if r}
    for path in sorted(suite.glob("step-*.json")):  # the same parts with other settings
        if path.stem not in used:
            run = json.loads(path.read_text())
            parts = [f"{name}: {step_row(ms)}; MFU {span(_col(ms, 'learner/mfu'))}"
                     for name, ms in phases(run).items() if ms]
            rows.append((f"{path.stem}: {' '.join(run.get('overrides') or []) or 'as above'}",
                         "(variant)", "; ".join(parts) + f"; set-up {run['setup_s']:.0f} s"
                         if parts else not_run))
    for path in sorted(suite.glob("learner-ab-*.json")):  # the update alone, one process each
        for r in json.loads(path.read_text())["rows"]:
            rows.append((f"{path.stem}: {r['variant']}", "(learner A/B)", (
                f"out of memory: {r['error']}" if "error" in r else
                f"update {span(r['update_all_s'])} s, reference {r['ref_s']:.2f} s, learner peak "
                f"{r['peak_memory_gb']:.1f} GiB, MFU {r['mfu']:.2f}")))
    env = next((r[1]["environment"] for r in (unsloth, peft, peer, rollout) if r), {})
    head = (f"One `gpu_suite.sh` run in {suite.name}: {env.get('gpu', 'GPU unknown')}, torch "
            f"{env.get('torch', '?')}, vLLM {env.get('vllm', '?')}, {env.get('date', '')}. "
            "Ranges over the steady steps.\n\n| figure | goal | measured |\n|---|---|---|\n")
    return head + "".join(f"| {a} | {b} | {c} |\n" for a, b, c in rows) + gpu_during(suite)


def gpu_during(suite: Path) -> str:
    """What nvidia-smi sampled during each part (`<part>.gpu.csv`, gpu_suite.sh's `run`), a row
    a part: whether the GPU's clocks came down (and why) or it sat idle; "" without samples."""
    rows = []
    for path in sorted(suite.glob("*.gpu.csv")):
        lines = [line.split(", ") for line in path.read_text().splitlines()]
        if len(lines) < 2:
            continue
        head = [h.split(" [")[0] for h in lines[0]]
        samples = [dict(zip(head, line)) for line in lines[1:] if len(line) == len(head)]

        def values(*keys: str) -> list[float]:  # the field's query name or its long name
            out = []
            for sample in samples:
                try:
                    out.append(float(next(sample[k] for k in keys if k in sample).split()[0]))
                except (StopIteration, ValueError, IndexError):  # absent, or [N/A]
                    pass
            return out

        clock = values("clocks.current.sm", "clocks.sm")
        power, busy = values("power.draw"), values("utilization.gpu")
        reasons = sorted({r for x in samples if (r := x.get("clocks_event_reasons.active", ""))
                          and int(r, 16) & ~1})  # 0x1: idle, not a slow-down
        rows.append(f"| {path.name.removesuffix('.gpu.csv')} | {len(samples)} | "
                    f"{span(clock, '{:.0f}')} | {span(power, '{:.0f}')} | "
                    f"{statistics.median(busy):.0f} | {', '.join(reasons) or '-'} |\n"
                    if clock and power and busy else "")
    if not any(rows):
        return ""
    return ("\nThe GPU during each part (nvidia-smi every 200 ms):\n\n| part | samples | SM clock "
            "MHz | power W | busy % (median) | clock slow-down reasons seen |\n|---|---|---|---|"
            "---|---|\n" + "".join(rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("suite", type=Path, help="the suite's output directory ($SUITE)")
    p.add_argument("--out", type=Path, help="also write the table here")
    args = p.parse_args(argv)
    text = table(args.suite)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
