"""The engines' half of the sync (LoRA engines): tmpfs adapter directories of dead engine
processes are cleaned by the next engine on the node (an engine killed with `kill -9` cannot clean
its own); an engine's identity counts the LoRA modules vLLM bound, read back from vLLM: the
learner's count for every version, 0 for an adapter whose names match none of the model's modules
(whose digest and version agree with the learner's)."""
import os
import subprocess
import sys
import time

import pytest

from grpo_ray.sync.receiver import _DIR_PREFIX, _remove_dead_workers_dirs
from grpo_ray.sync.sender import lora_modules, pack_tensors


def test_adapter_dirs_of_dead_workers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / f"{_DIR_PREFIX}{dead}-engine0-x" / "v3").mkdir(parents=True)
    (tmp_path / f"{_DIR_PREFIX}{os.getpid()}-engine1-y" / "v3").mkdir(parents=True)
    (tmp_path / "unrelated").mkdir()
    _remove_dead_workers_dirs(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [f"{_DIR_PREFIX}{os.getpid()}-engine1-y", "unrelated"]


def test_lora_module_count_is_of_complete_pairs():
    names = [f"base_model.model.model.layers.0.self_attn.{m}.lora_{ab}.weight"
             for m in ("q_proj", "k_proj") for ab in "AB"]
    assert lora_modules(names) == 2 and lora_modules(names[:3]) == 1 and lora_modules([]) == 0


@pytest.fixture(scope="module")
def learner(tiny_model_path):
    from helpers import make_worker

    return make_worker(tiny_model_path)


def test_a_lora_engine_reports_the_learners_identity_at_every_version(served_engine, learner):
    import torch

    w = served_engine.worker
    for form in ("packed", "tensors", "packed"):
        with torch.no_grad():  # each version another adapter
            for p in learner.params:
                p.add_(0.01 * torch.randn_like(p))
        version = served_engine.next_version
        served_engine.load(learner.export_adapter(version, form, w.lora_dtype()), learner.model)
        assert w.adapter_identity() == learner.exported_identity()
        assert learner.exported_identity()[2] == 14  # 2 layers x 7 projections
    start = time.perf_counter()
    for _ in range(10):
        w.adapter_identity()
    print(f"\nLoRA engine: adapter_identity {100 * (time.perf_counter() - start):.2f} ms "
          "on the tiny model")


def test_an_adapter_whose_names_match_nothing_binds_no_module(served_engine, learner):
    """The learner's names under another path than the engine's model (`model.blocks.N` for
    `model.layers.N`): vLLM takes the adapter (its module kinds are known) and binds it to
    nothing. Version and digest agree with what the learner exported; the count does not."""
    w = served_engine.worker
    version = served_engine.next_version
    exported = learner.export_adapter(version, "tensors", w.lora_dtype())
    renamed = {k.replace(".layers.", ".blocks."): v for k, v in exported.tensors.items()}
    packed = pack_tensors(renamed, version, exported.peft_config)
    learners = (version, packed.digest, lora_modules(packed.names))
    w.load_adapter(packed)
    assert learners[2] == 14 and w.adapter_identity() == (version, packed.digest, 0)
    assert w.adapter_identity() != learners
    served_engine.load(learner.export_adapter(version + 1, "packed", w.lora_dtype()),
                       learner.model)  # healthy again
    assert w.adapter_identity() == learner.exported_identity()
