#!/usr/bin/env python
"""The GPU suite's reliability parts (`benchmarks/gpu_suite.sh learn-check multi-engine
faults`): real runs of `configs/learn-gpu.yaml` on one GPU, each ending in one JSON line of what
happened, appended to `--json`.

    python benchmarks/reliability_gpu.py learn-check DIR [--min-rise 0.3]
    python benchmarks/reliability_gpu.py multi-engine [--kill-at 10] [section.key=value ...]
    python benchmarks/reliability_gpu.py faults [section.key=value ...]

- `learn-check DIR`: the learning benchmark's output in DIR (`summary.json`, `metrics.jsonl`)
  must show held-out accuracy up by at least `--min-rise` and no engine replaced or repaired
  (a healthy run never trips the sync check). Exit 1 otherwise.
- `multi-engine`: two engines and the learner share the GPU (`rollout.num_engines=2`); engine 1's
  process is SIGKILLed before step `--kill-at`; the run must finish every step.
- `faults`: faults injected into the engine on the GPU, each a separate step: a stale adapter (the
  engine ignores one adapter load) and a missing adapter (the engine claims the new version but
  generates and scores with no LoRA); each must be caught at the sync where it happens and the
  run must finish.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(_ROOT / "benchmarks"), str(_ROOT / "tests")]  # common, helpers


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def learn_check(out: Path, min_rise: float) -> dict[str, Any]:
    summary = json.loads((out / "summary.json").read_text())
    rows = _jsonl(out / "metrics.jsonl")
    last = rows[-1]
    faults = {k: v for k, v in last.items() if k.startswith("faults/")}
    rise = summary["heldout_accuracy_after"] - summary["heldout_accuracy_before"]
    ok = rise >= min_rise and not any(faults.values()) and summary["steps"] == len(rows)
    return {"part": "learn", "dir": str(out), "steps": len(rows),
            "heldout_before": summary["heldout_accuracy_before"],
            "heldout_after": summary["heldout_accuracy_after"], "rise": round(rise, 4),
            "faults": faults, "probe": _probe_ranges(rows), "ok": ok}


def _probe_ranges(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """[min, max] over the run of every `sync/probe...` figure (the sync check's calibration)."""
    out: dict[str, list[float]] = {}
    for row in rows:
        for k, v in row.items():
            if k.startswith("sync/probe") and isinstance(v, (int, float)):
                lo, hi = out.get(k, [v, v])
                out[k] = [min(lo, v), max(hi, v)]
    return {k: [round(a, 5), round(b, 5)] for k, (a, b) in sorted(out.items())}


def _trainer(overrides: list[str], lines: list[str]):
    from grpo_ray.cluster.connect import connect_ray
    from grpo_ray.config import load_config
    from grpo_ray.driver.trainer import Trainer

    cfg = load_config("configs/learn-gpu.yaml", overrides)

    def say(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    trainer = Trainer(cfg, say).prepare_data()
    connect_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.num_gpus)
    return trainer.setup()


def _pid(actor: Any) -> int:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def _run(trainer: Any, before_step: Callable[[int], None]) -> float:
    """Every step of the run, `before_step(step)` first; seconds of the steps."""
    start = time.perf_counter()
    while trainer.step < trainer.cfg.algorithm.total_steps:
        before_step(trainer.step + 1)
        trainer.run_step()
    return time.perf_counter() - start


def multi_engine(kill_at: int, overrides: list[str]) -> dict[str, Any]:
    lines: list[str] = []
    trainer = _trainer(["rollout.num_engines=2", "algorithm.total_steps=30",
                        "output.dir=outputs/gpu-suite/multi-engine", *overrides], lines)
    killed: dict[str, Any] = {}

    def before_step(step: int) -> None:
        if step == kill_at:
            killed["pid"] = _pid(trainer.engines.engines[1])
            os.kill(killed["pid"], signal.SIGKILL)
            killed["at"] = time.perf_counter()

    try:
        train_s = _run(trainer, before_step)
        restarts = [line for line in lines if "rollout engine 1" in line]
        recover = [float(m) for line in restarts
                   for m in re.findall(r"placement bundle in ([0-9.]+) s", line)]
        total = trainer.cfg.algorithm.total_steps
        return {"part": "multi-engine", "injected": "SIGKILL of engine 1's process",
                "step_injected": kill_at, "steps": trainer.step, "finished": trainer.step == total,
                "engine_restarts": trainer.engines.restarts, "recover_s": recover,
                "steps_lost": 0, "train_s": round(train_s, 1), "lines": restarts,
                "ok": trainer.step == total and trainer.engines.restarts >= 1}
    finally:
        trainer.close()


def faults(overrides: list[str]) -> dict[str, Any]:
    """A stale adapter at step 10's sync and a missing one at step 20's (tests/helpers.inject,
    run inside the engine's process), each to be caught at that sync."""
    import ray
    from helpers import inject

    lines: list[str] = []
    trainer = _trainer(["algorithm.total_steps=30", "output.dir=outputs/gpu-suite/faults",
                        *overrides], lines)
    plan = {10: ("previous", "stale adapter: the engine ignores the load of version 10"),
            20: ("no-adapter", "missing adapter: the engine generates and scores without LoRA "
                               "under version 20's label")}
    injected: dict[int, float] = {}

    def before_step(step: int) -> None:
        if step in plan:
            ray.get(trainer.engines.engines[0].__ray_call__.remote(inject, plan[step][0]))
            injected[step] = time.perf_counter()

    try:
        train_s = _run(trainer, before_step)
        caught = [line for line in lines if "failed the sync check" in line]
        rows = _jsonl(trainer.out / "metrics.jsonl")
        found = []
        for step, (fault, what) in plan.items():
            line = next((x for x in caught if f"at adapter version {step}:" in x), None)
            row = rows[step - 1]
            found.append({"injected": what, "step_injected": step,
                          "step_detected": step if line else None, "line": line,
                          "sync_s": round(row.get("sync/total_s", 0.0), 3),
                          "probe_s": round(row.get("sync/probe_s", 0.0), 3), "steps_lost": 0})
        total = trainer.cfg.algorithm.total_steps
        return {"part": "faults", "faults": found, "steps": trainer.step,
                "finished": trainer.step == total, "caught_lines": caught,
                "probe": _probe_ranges(rows), "train_s": round(train_s, 1),
                "ok": trainer.step == total and all(f["step_detected"] for f in found)}
    finally:
        trainer.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=["learn-check", "multi-engine", "faults"])
    p.add_argument("dir", nargs="?", help="learn-check: the learning benchmark's output.dir")
    p.add_argument("--min-rise", type=float, default=0.3)
    p.add_argument("--kill-at", type=int, default=10)
    p.add_argument("--json", default="outputs/gpu-suite/reliability.jsonl")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    from common import environment

    if args.part == "learn-check":
        result = learn_check(Path(args.dir), args.min_rise)
    elif args.part == "multi-engine":
        result = multi_engine(args.kill_at, args.overrides)
    else:
        result = faults(args.overrides)
    result["gpu"] = environment()["gpu"]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
