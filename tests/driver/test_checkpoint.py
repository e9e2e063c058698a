"""Checkpoints and resume: atomic writes, pruning, the `latest` pointer, the learner's state
round trip, the CLI's guards, and the issue's test: a run resumed after 2 steps sees the prompts,
completions and final adapter of an uninterrupted 3-step run."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from grpo_ray.config import AlgorithmConfig, LearnerConfig, LoraConfig, ModelConfig, load_config
from grpo_ray.contracts import AdapterPayload, TrainBatch
from grpo_ray.driver.checkpoint import (CheckpointError, check_checkpoint, latest_checkpoint,
                                        load_checkpoint, resumable_checkpoint, save_checkpoint,
                                        truncate_jsonl)

LORA_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def fake_state(step: int) -> tuple[dict, dict, AdapterPayload]:
    """Small learner state, trainer state and adapter whose numbers identify the step."""
    lora = {"q.lora_A.default.weight": torch.full((2, 3), float(step))}
    learner = {"lora": lora, "optimizer": {"state": {0: {"step": torch.tensor(float(step))}}},
               "scheduler": {"last_epoch": step}, "rng": {"python": (3, (1, 2, 624), None)}}
    adapter = AdapterPayload(step, {LORA_A: torch.full((2, 3), float(step))}, {"r": 2})
    return learner, {"adapter_version": step, "data": {"epoch": 0, "position": 2 * step}}, adapter


def save(root, step, keep=2):
    return save_checkpoint(root, step, *fake_state(step), keep=keep)


# ---- files -------------------------------------------------------------------------------------
def test_save_then_load_round_trip(tmp_path):
    path = save(tmp_path, 7)
    assert path == tmp_path / "step-000007" and (tmp_path / "latest").read_text() == "step-000007\n"
    assert sorted(p.name for p in path.iterdir()) == ["adapter", "learner.pt", "manifest.json",
                                                      "trainer_state.json"]
    manifest = json.loads((path / "manifest.json").read_text())["files"]
    assert sorted(manifest) == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                                "learner.pt", "trainer_state.json"]
    learner_pt = (path / "learner.pt").read_bytes()
    assert manifest["learner.pt"] == {"bytes": len(learner_pt),
                                      "sha256": hashlib.sha256(learner_pt).hexdigest()}
    assert sorted(p.name for p in (path / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    learner, state = load_checkpoint(latest_checkpoint(tmp_path))
    assert torch.equal(learner["lora"]["q.lora_A.default.weight"], torch.full((2, 3), 7.0))
    assert learner["rng"]["python"] == (3, (1, 2, 624), None)  # tuples survive weights_only
    assert state == {"step": 7, "adapter_version": 7, "data": {"epoch": 0, "position": 14}}


def test_crash_during_a_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 1)
    real_save = torch.save

    def crash(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # half the checkpoint is on disk, then the crash
        assert any(p.name.startswith(".step-000002.tmp-") for p in tmp_path.iterdir())
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000001"]
    learner, state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["step"] == 1 and learner["scheduler"] == {"last_epoch": 1}


def test_keep_prunes_oldest_after_the_new_one_is_in_place(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000003", "step-000004"]
    save(tmp_path, 5, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000005"]
    with pytest.raises(ValueError, match="keep=0"):
        save(tmp_path, 6, keep=0)


def test_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path / "absent") is None
    save(tmp_path, 1)
    save(tmp_path, 2)
    save(tmp_path, 3, keep=3)
    # a write killed before its rename, and a step dir without its state file: both ignored
    (tmp_path / ".tmp-step-000009-123").mkdir()
    (tmp_path / ".tmp-step-000009-123" / "trainer_state.json").write_text("{}")
    (tmp_path / "step-000008").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000003"
    (tmp_path / "latest").write_text("step-000001\n")  # killed after the rename of 2 and 3
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000001"
    (tmp_path / "latest").write_text("step-000004\n")  # names a removed dir
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000003"
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000003"
    # a resumed run that writes a step again replaces it and cleans the leftovers
    save(tmp_path, 2, keep=3)
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000002"
    assert not list(tmp_path.glob(".*"))
    with pytest.raises(FileNotFoundError, match="step-000008: not a complete checkpoint"):
        load_checkpoint(tmp_path / "step-000008")


def test_a_damaged_checkpoint_is_named_and_resume_falls_back(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step, keep=3)
    newest = tmp_path / "step-000003"
    assert resumable_checkpoint(tmp_path) == (newest, [])
    size = (newest / "learner.pt").stat().st_size
    with open(newest / "learner.pt", "r+b") as f:  # a copy cut short
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match=rf"step-000003/learner.pt: {size - 100} bytes, "
                                              rf"the manifest says {size} \(truncated"):
        check_checkpoint(newest)
    path, skipped = resumable_checkpoint(tmp_path)
    assert path == tmp_path / "step-000002"
    assert skipped == [f"skipping a damaged checkpoint: {newest}/learner.pt: {size - 100} bytes, "
                       f"the manifest says {size} (truncated or overwritten); resuming from "
                       "step-000002"]
    # the same size, other bytes: the checksum tells
    state = tmp_path / "step-000002" / "trainer_state.json"
    state.write_text(state.read_text().replace('"step": 2', '"step": 9'))
    with pytest.raises(CheckpointError, match="trainer_state.json: its SHA-256 differs"):
        check_checkpoint(tmp_path / "step-000002")
    assert resumable_checkpoint(tmp_path)[0] == tmp_path / "step-000001"
    (tmp_path / "step-000001" / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be resumed: .*"
                       r"step-000003/learner.pt: .*step-000002/trainer_state.json: .*"
                       r"step-000001/adapter/adapter_model.safetensors: missing"):
        resumable_checkpoint(tmp_path)
    (newest / "manifest.json").write_text('{"files": ')  # cut mid-write
    with pytest.raises(CheckpointError, match="step-000003/manifest.json: not a valid manifest"):
        check_checkpoint(newest)
    # written before manifests existed: read and loaded instead
    legacy = save(tmp_path / "old", 4)
    (legacy / "manifest.json").unlink()
    check_checkpoint(legacy)
    (legacy / "learner.pt").write_bytes((legacy / "learner.pt").read_bytes()[:50])
    with pytest.raises(CheckpointError, match="step-000004: .*without a manifest"):
        check_checkpoint(legacy)


def test_cli_names_the_damaged_file_before_ray_starts(tmp_path, capsys):
    from grpo_ray.cli import main

    out = tmp_path / "run"
    path = save(out / "checkpoints", 2)
    (path / "trainer_state.json").write_text("{")
    assert main(["train", "--config", "configs/tiny-cpu.yaml", f"output.dir={out}",
                 "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    size = json.loads((path / "manifest.json").read_text())["files"]["trainer_state.json"]["bytes"]
    assert err == (f"checkpoint error: no checkpoint in {out / 'checkpoints'} can be resumed: "
                   f"{path / 'trainer_state.json'}: 1 bytes, the manifest says {size} "
                   "(truncated or overwritten)")
    assert [p.name for p in out.iterdir()] == ["checkpoints"]  # not even the model was built


def test_truncate_jsonl_in_place_for_an_append_mode_writer(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = open(path, "a")
    for step in (1, 2, 3, 4):
        writer.write(json.dumps({"step": step, "x": step * 10}) + "\n")
    writer.flush()
    assert truncate_jsonl(path, 2) == 2
    writer.write(json.dumps({"step": 3, "x": -1}) + "\n")
    writer.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"step": 1, "x": 10}, {"step": 2, "x": 20}, {"step": 3, "x": -1}]
    assert truncate_jsonl(path, 5) == 0 and truncate_jsonl(tmp_path / "none.jsonl", 0) == 0


def test_truncate_jsonl_drops_a_last_row_cut_by_a_stop(tmp_path):
    """The driver killed while it wrote a row (the final evaluation's, say): the resumed run
    cuts that row and writes it again, whatever its step."""
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"step": 0, "tag": "before"}) + "\n" + '{"step": 2, "tag": "aft')
    assert truncate_jsonl(path, 2) == 1
    assert path.read_text() == json.dumps({"step": 0, "tag": "before"}) + "\n"


def test_cli_refuses_to_overwrite_or_to_resume_nothing(tmp_path, capsys):
    from grpo_ray.cli import main

    out = tmp_path / "run"
    assert main(["train", "--config", "configs/tiny-cpu.yaml", "--resume",
                 f"output.dir={out}"]) == 2
    assert f"--resume: no checkpoint in {out / 'checkpoints'}" in capsys.readouterr().err
    save(out / "checkpoints", 2)
    assert main(["train", "--config", "configs/tiny-cpu.yaml", f"output.dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "holds checkpoints of another config (step-000002; (the checkpoint records no " \
        "config))" in err and "--resume" in err
    assert main(["train", "--config", "configs/tiny-cpu.yaml",
                 "output.keep_checkpoints=0"]) == 2
    assert "output.keep_checkpoints: must be >= 1" in capsys.readouterr().err


# ---- the learner's state -----------------------------------------------------------------------
def make_learner(path: str, total_steps: int = 5, learning_rate: float = 1e-2):
    from grpo_ray.learner.worker import LearnerWorker

    learner = LearnerConfig(learning_rate=learning_rate, warmup_ratio=0.3,
                            lr_scheduler_type="cosine", micro_batch_size=4,
                            gradient_checkpointing=False, num_gpus=0)
    return LearnerWorker(path, ModelConfig(), LoraConfig(r=4, alpha=8), learner,
                         AlgorithmConfig(total_steps=total_steps, beta=0.04),
                         max_completion_length=8)


def small_batch() -> TrainBatch:
    g = torch.Generator().manual_seed(0)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    completions = [torch.randint(20, 200, (n,), generator=g).tolist() for n in (3, 6, 2, 8)]
    return TrainBatch([prompts[i // 2] for i in range(4)], completions, [1.0, -1.0, 0.5, -0.5],
                      [[-3.0] * len(c) for c in completions])


def test_a_longer_resumed_run_continues_on_the_schedule_of_its_new_total(tiny_model_path):
    """3 steps of a 3-step cosine schedule end at lr 0; resumed with total_steps=6, step 4 runs
    at the lr of a 6-step plan at step 3 (and a changed learning_rate is honoured)."""
    short = make_learner(tiny_model_path, total_steps=3)
    for _ in range(3):
        short.train_step(small_batch())
    assert short.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    state = short.state_dict()

    fresh = make_learner(tiny_model_path, total_steps=6, learning_rate=2e-2)
    for _ in range(3):
        fresh.scheduler.step()  # where a 6-step plan stands after 3 steps
    resumed = make_learner(tiny_model_path, total_steps=6, learning_rate=2e-2)
    resumed.load_state_dict(state)
    planned = fresh.optimizer.param_groups[0]["lr"]
    assert planned > 0 and resumed.optimizer.param_groups[0]["lr"] == pytest.approx(planned)
    assert resumed.scheduler.get_last_lr() == [pytest.approx(planned)]  # not the old plan's 0
    assert resumed.train_step(small_batch())["learning_rate"] == pytest.approx(planned)
    assert resumed.scheduler.last_epoch == 4


def lora_of(worker) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in worker.model.named_parameters() if p.requires_grad}


def test_learner_state_round_trip(tiny_model_path, tmp_path):
    import random

    import numpy as np

    g = torch.Generator().manual_seed(0)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    completions = [torch.randint(20, 200, (n,), generator=g).tolist() for n in (3, 6, 2, 8)]
    batch = TrainBatch([prompts[i // 2] for i in range(4)], completions, [1.0, -1.0, 0.5, -0.5],
                       [[-3.0] * len(c) for c in completions])

    a = make_learner(tiny_model_path)
    for _ in range(2):  # past the warmup, so lr, Adam's moments and step count are all non-trivial
        a.train_step(batch)
    path = tmp_path / "learner.pt"
    torch.save(a.state_dict(), path)
    b = make_learner(tiny_model_path)  # a fresh learner: B = 0, no optimizer state, lr 0
    assert not all(torch.equal(lora_of(a)[n], p) for n, p in lora_of(b).items())
    b.load_state_dict(torch.load(path, weights_only=True))

    for n, p in lora_of(a).items():
        assert torch.equal(p, lora_of(b)[n]), n
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i, s in sa["state"].items():
        assert float(s["step"]) == float(sb["state"][i]["step"]) == 2.0
        assert torch.equal(s["exp_avg"], sb["state"][i]["exp_avg"])
        assert torch.equal(s["exp_avg_sq"], sb["state"][i]["exp_avg_sq"])
    # warmup of ceil(0.3 * 5) = 2 steps, then cosine over 3: step 2 is the peak, 1e-2
    assert a.scheduler.get_last_lr() == b.scheduler.get_last_lr() == [pytest.approx(1e-2)]
    # both RNGs stand at the same place (restored into the same process, so draw after each load)
    b.load_state_dict(torch.load(path, weights_only=True))
    draws_b = (torch.rand(3), random.random(), np.random.rand())
    a.load_state_dict(torch.load(path, weights_only=True))
    assert (torch.equal(torch.rand(3), draws_b[0]) and random.random() == draws_b[1]
            and np.random.rand() == draws_b[2])

    stats_a, stats_b = a.train_step(batch), b.train_step(batch)
    assert stats_a["learning_rate"] == stats_b["learning_rate"] == pytest.approx(1e-2)
    for n, p in lora_of(a).items():
        assert torch.equal(p, lora_of(b)[n]), n

    bad = a.state_dict()
    bad["lora"]["renamed"] = bad["lora"].pop(next(iter(bad["lora"])))
    with pytest.raises(ValueError, match=r"do not match .* 1 missing .* 1 unexpected \['ren"):
        b.load_state_dict(bad)


# ---- the test: resume after 2 steps, compare with 3 uninterrupted steps ---------------
def build(out, model_path, print_fn):
    from grpo_ray.driver.trainer import Trainer

    cfg = load_config("configs/tiny-cpu.yaml", [
        f"output.dir={out}", f"model.path={model_path}", "algorithm.total_steps=3",
        "output.save_every=1", "learner.learning_rate=5e-3", "learner.warmup_ratio=0.4",
        "logging.tensorboard=false", "logging.samples_per_step=8", "eval.num_samples=2"])
    return Trainer(cfg, print_fn=print_fn).setup()


def record_prompts(trainer) -> list[list[str]]:
    """The questions of each step the trainer runs from now on."""
    questions: list[list[str]] = []
    next_batch = trainer.prompts.next_batch

    def recorded():
        batch = next_batch()
        questions.append(batch.questions)
        return batch
    trainer.prompts.next_batch = recorded
    return questions


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def steps_figures(out) -> list[dict]:
    """Rewards and learner figures of each training step (not timings, which always differ)."""
    timing = ("time/", "sync/", "rollout/tokens_per_s", "learner/time_", "learner/peak_memory")
    return [{k: v for k, v in r.items() if not k.startswith(timing)}
            for r in jsonl(out / "metrics.jsonl")]


def test_resumed_run_equals_uninterrupted_run(ray_local, tiny_model_path, tmp_path):
    """Run A trains 3 steps uninterrupted, checkpointing each. Run B is what a run killed during
    step 3 leaves: A's step-2 checkpoint and A's logs of all 3 steps (step 3 logged, not yet
    checkpointed). B resumes from its latest checkpoint and trains step 3: same prompts, same
    completions, same figures, same adapter as A, and its logs read like A's."""
    a_out, b_out, lines = tmp_path / "a", tmp_path / "b", []
    a = build(a_out, tiny_model_path, lines.append)
    try:
        a_questions = record_prompts(a)
        a.fit()
    finally:
        a.close()
    assert len(a_questions) == 3 and len(set(map(tuple, a_questions))) == 3
    a_root = a_out / "checkpoints"
    assert sorted(p.name for p in a_root.iterdir()) == ["latest", "step-000002", "step-000003"]

    (b_out / "checkpoints").mkdir(parents=True)
    shutil.copytree(a_root / "step-000002", b_out / "checkpoints" / "step-000002")
    for name in ("metrics.jsonl", "completions.jsonl"):
        shutil.copy(a_out / name, b_out / name)
    b = build(b_out, tiny_model_path, lines.append)
    try:
        b.restore(latest_checkpoint(b_out / "checkpoints"))
        assert (b.step, b.version) == (2, 2)
        # A's checkpoint, B's output dir: the one difference is said
        assert lines[-1].startswith("config differs from the checkpoint's: "
                                    f"output.dir: {str(a_out)!r} -> {str(b_out)!r}; ")
        b_questions = record_prompts(b)
        b.fit()
    finally:
        b.close()

    assert b_questions == a_questions[2:]
    # completions (with their rewards) and figures of every step, the resumed one included
    b_rows = jsonl(b_out / "completions.jsonl")
    assert [r["step"] for r in b_rows] == [1] * 8 + [2] * 8 + [3] * 8
    assert b_rows == jsonl(a_out / "completions.jsonl")
    assert [r["step"] for r in jsonl(b_out / "metrics.jsonl")] == [1, 2, 3]
    assert steps_figures(b_out) == steps_figures(a_out)

    lora_a = load_checkpoint(latest_checkpoint(a_root))[0]["lora"]
    lora_b = load_checkpoint(latest_checkpoint(b_out / "checkpoints"))[0]["lora"]
    assert latest_checkpoint(b_out / "checkpoints").name == "step-000003"
    # the adapter moved: B is not PEFT's zero init any more
    assert any("lora_B" in n and t.abs().max() > 0 for n, t in lora_a.items())
    for n, t in lora_a.items():
        torch.testing.assert_close(lora_b[n], t, rtol=0, atol=1e-6, msg=n)

    # a checkpoint's adapter directory is a PEFT adapter that loads on its own
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path),
                                      str(latest_checkpoint(b_out / "checkpoints") / "adapter"))
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert sorted(loaded) == sorted(lora_b)
    for n, p in loaded.items():
        assert torch.equal(p.detach(), lora_b[n]), n
