"""benchmarks/suite_table.py: issue 20's table from a suite's JSON, here runs written in code in
grpo_step.py's, trl_peer.py's and rollout_throughput.py's formats (the GPU writes the real ones)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from suite_table import table  # noqa: E402

ENV = {"gpu": "NVIDIA H200, 143771 MiB", "torch": "2.11.0", "vllm": "0.26.0", "trl": "1.15.0",
       "date": "2026-12-04"}


def step(s: float, staleness: float = 0.0) -> dict:
    return {"time/step_s": s, "time/generate_s": s / 2, "learner/time_ref_s": 0.5,
            "learner/time_update_s": 1.8, "time/sync_s": 0.3, "sync/total_s": 0.12,
            "learner/mfu": 0.33, "rollout/staleness": staleness}


def test_the_table_takes_each_phase_s_steady_steps_and_says_what_did_not_run(tmp_path):
    # 5 on policy (the first, 9 s, a warm-up; one run under the profiler), then 4 one step off
    # (first and last left out)
    history = [step(9.0), step(4.0), step(4.4), {**step(30.0), "profiled": 1.0}, step(5.0),
               step(7.0), step(2.4, 1), step(2.6, 1), step(1.0, 1)]
    (tmp_path / "step-unsloth-merged-compare.json").write_text(json.dumps({
        "environment": ENV, "history": history, "setup_s": 149.2, "phase_steps": [5, 4, 0],
        "syncs": {"after: AdapterSync.send (cuda-ipc)":
                  {"export_s": 0.084, "load_s": 0.082, "total_s": 0.167}}}))
    (tmp_path / "peer-trl.json").write_text(json.dumps({
        "environment": ENV, "engine": "vLLM colocated", "step_s": [8.1, 5.6, 5.7],
        "median_after_first_s": 5.65}))
    (tmp_path / "rollout.json").write_text(json.dumps({"environment": ENV, "rows": [
        {"mode": m, "shape": "16x8x256", "tokens_per_s": t}
        for m, t in [("actor-merged", 18000), ("plain-base", 20000), ("actor", 9000),
                     ("plain", 10000), ("plain-base-text", 15000)]]}))
    (tmp_path / "step-unsloth-merged-nockpt.json").write_text(json.dumps({
        "environment": ENV, "history": [step(8.0), step(3.5), step(3.7)], "setup_s": 101.0,
        "phase_steps": [3, 0, 0], "overrides": ["learner.gradient_checkpointing=false"]}))
    (tmp_path / "step-peft-merged.json").write_text(json.dumps({  # the bnb row's, as it ran
        "environment": ENV, "history": [step(8.0), step(4.6), step(4.8), step(5.0)],
        "setup_s": 120.4, "phase_steps": [4, 0, 0], "setup_parts": {
            "placement_s": 0.2, "engines_s": 66.2, "learner_imports_s": 30.4, "learner_s": 6.2,
            "probe_base_s": 2.6, "total_s": 76.0, "learner_after_engines": 1.0}}))
    (tmp_path / "step-peft.json").write_text(json.dumps({  # LoRA rollout: a variant beside it
        "environment": ENV, "history": [step(8.0), step(5.4), step(5.5)], "setup_s": 159.0,
        "phase_steps": [3, 0, 0]}))
    (tmp_path / "learner-ab-peft.json").write_text(json.dumps({"environment": ENV, "rows": [
        {"variant": "learner.cast_lm_head_to_fp32=false", "update_s": 5.05,
         "update_all_s": [4.97, 5.05, 5.28], "ref_s": 1.13, "peak_memory_gb": 13.8, "mfu": 0.15},
        {"variant": "learner.gradient_checkpointing=false", "error": "CUDA out of memory."}]}))
    rows = {cells[0]: cells[2] for cells in (line.strip("| ").split(" | ")
                                             for line in table(tmp_path).splitlines()[4:])}
    assert rows["Unsloth 4-bit, merged rollout, on policy"].startswith(
        "4.00-5.00 (median 4.40) s: generate 2.00-2.50 (median 2.20)")
    assert rows["the same, one step off"].startswith("2.40-2.60 s: generate 1.20-1.30")
    assert rows["bnb NF4 + PEFT, on policy"].startswith("4.60-5.00 (median 4.80) s: generate 2.30-2.50")
    assert rows["bnb NF4 + PEFT, on policy"].endswith("[step-peft-merged]")
    assert rows["step-peft: as above"].startswith("on policy: 5.40-5.50 s: generate 2.70-2.75")
    assert rows["rollout actor / plain vLLM, same run"] == (
        "actor-merged / plain-base: 90.0% at 16x8x256; actor / plain: 90.0% at 16x8x256; "
        "plain-base-text / plain-base: 75.0% at 16x8x256")
    assert rows["adapter sync, r64, CUDA IPC"] == (
        "120 (median 120) ms in the steps; alone 167 (export 84, load 82)")
    assert rows["start-up to first step"] == (
        "step-unsloth-merged-compare 149 s; step-peft-merged 120 s (up in 76 s: engines 66 s "
        "beside the learner's imports 30 s, then its load 6 s (rollout.kv_cache_gb would load "
        "them together); the sync probe's first scores 3 s)")
    assert rows["peer: TRL 1.15.0 GRPOTrainer, vLLM colocated, bf16 LoRA"] == (
        "5.60-5.70 s a step; ours faster by 1.28x on policy, 2.26x one step off")
    assert rows["step-unsloth-merged-nockpt: learner.gradient_checkpointing=false"] == (
        "on policy: 3.50-3.70 s: generate 1.75-1.85, reference 0.50, update 1.80, sync 0.30; "
        "MFU 0.33; set-up 101 s")
    assert rows["learner-ab-peft: learner.cast_lm_head_to_fp32=false"] == (
        "update 4.97-5.28 (median 5.05) s, reference 1.13 s, learner peak 13.8 GiB, MFU 0.15")
    assert rows["learner-ab-peft: learner.gradient_checkpointing=false"] == (
        "out of memory: CUDA out of memory.")
    assert rows["stalls"] == ("on policy: largest step 1.14x the median; one step off: "
                              "largest step 1.04x the median")


def test_the_gpu_during_each_part_from_nvidia_smi_samples(tmp_path):
    from suite_table import gpu_during

    head = ("timestamp, clocks.current.sm [MHz], clocks.current.memory [MHz], power.draw [W], "
            "temperature.gpu, utilization.gpu [%], memory.used [MiB], clocks_event_reasons.active")
    rows = [f"2026/12/04 20:15:2{i}.000, {clock} MHz, 3201 MHz, {power} W, 45, {busy} %, "
            f"12345 MiB, {reasons}" for i, (clock, power, busy, reasons) in enumerate([
                (1980, 300.5, 90, "0x0000000000000000"), (1755, 700.0, 99, "0x0000000000000004"),
                (1980, 120.0, 0, "0x0000000000000001"), ("[N/A]", 310.0, 95, "0x0")])]
    (tmp_path / "step-unsloth-merged.gpu.csv").write_text("\n".join([head, *rows]) + "\n")
    (tmp_path / "build.gpu.csv").write_text("Failed to initialize NVML\n")  # no samples: no row
    assert gpu_during(tmp_path).splitlines()[-1] == (
        "| step-unsloth-merged | 4 | 1755-1980 (median 1980) | 120-700 (median 305) | 92 | "
        "0x0000000000000004 |")  # the SW power cap seen; idle (0x1) is no slow-down
    assert gpu_during(tmp_path / "nothing") == ""

