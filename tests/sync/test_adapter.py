"""Only the LoRA adapter travels: its payload, its PEFT-format files, and the sync through Ray
from a learner actor to a real vLLM CPU engine actor (one engine for the module)."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from helpers import hf_model, naive_logprobs
from helpers import peft_model as make_peft

from grpo_ray.cluster.learner import LearnerHandle
from grpo_ray.config import ALL_PROJECTIONS, ClusterConfig, RolloutConfig
from grpo_ray.contracts import Sampling
from grpo_ray.sync.broadcast import AdapterSync, CudaIpc
from grpo_ray.sync.files import vllm_lora_name, write_adapter
from grpo_ray.sync.sender import adapter_payload, lora_parameters

MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
           "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@pytest.fixture(scope="module")
def peft_model(tiny_model_path):
    return make_peft(tiny_model_path, seed=0)


def test_payload_holds_only_the_lora_tensors_of_the_target_modules(peft_model):
    payload = adapter_payload(peft_model, version=3)
    expected = {f"base_model.model.model.layers.{layer}.{MODULES[m]}.{m}.lora_{ab}.weight"
                for layer in range(2) for m in ALL_PROJECTIONS for ab in "AB"}
    assert payload.version == 3 and set(payload.tensors) == expected
    t = payload.tensors
    # hidden 128, intermediate 256, one KV head of 64: A is (r, in), B is (out, r)
    assert t["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"].shape == (8, 128)
    assert t["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (64, 8)
    assert t["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (8, 256)
    # per layer: q 2048 + k 1536 + v 1536 + o 2048 + gate/up/down 3 x 3072 = 16384 floats
    assert payload.num_bytes == 2 * 16384 * 4
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 and v.is_contiguous()
               for v in t.values())
    # A snapshot: training the live adapter afterwards does not change the payload.
    live = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    before = t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].clone()
    with torch.no_grad():
        live.add_(1.0)
    try:
        assert torch.equal(t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"],
                           before)
    finally:
        with torch.no_grad():
            live.sub_(1.0)
    config = payload.peft_config
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["peft_type"] == "LORA"
    assert sorted(config["target_modules"]) == sorted(ALL_PROJECTIONS)
    assert json.loads(json.dumps(config)) == config


def test_lora_parameters_are_what_the_state_dict_reads_after_training_and_restore(
        tiny_model_path):
    """The CUDA IPC export finds the adapter's parameters once: after optimizer steps and a
    checkpoint restore (PEFT's `set_peft_model_state_dict`) they still hold exactly what
    `get_peft_model_state_dict` gives."""
    from peft import set_peft_model_state_dict

    model = make_peft(tiny_model_path, seed=1)
    params = lora_parameters(model)
    start = adapter_payload(model, version=1).tensors
    assert params is not None and set(params) == set(start)
    assert all(p.requires_grad for p in params.values())

    def same_as_state_dict() -> bool:
        return all(torch.equal(params[k].detach(), v)
                   for k, v in adapter_payload(model, version=2).tensors.items())

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=torch.tensor([[1, 5, 9, 42]])).logits.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not all(torch.equal(params[k].detach(), v) for k, v in start.items())  # it trained
    assert same_as_state_dict()
    set_peft_model_state_dict(model, start)
    assert all(torch.equal(params[k].detach(), v) for k, v in start.items())  # restored
    assert same_as_state_dict()


def test_payload_refuses_non_lora_tensors(tiny_model_path):
    # bias="lora_only" also exports the q/k/v biases of the wrapped Qwen2 layers: not LoRA.
    with pytest.raises(ValueError, match=r"self_attn\.q_proj\.base_layer\.bias: not a LoRA"):
        adapter_payload(make_peft(tiny_model_path, seed=0, bias="lora_only"), version=1)


def test_vllm_lora_name_is_peft_name_and_vllm_parses_it():
    from vllm.lora.utils import parse_fine_tuned_lora_name

    for name, module, is_a in [
            ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
             "model.layers.0.self_attn.q_proj", True),
            ("base_model.model.model.layers.11.mlp.down_proj.lora_B.weight",
             "model.layers.11.mlp.down_proj", False)]:
        assert vllm_lora_name(name) == name
        assert parse_fine_tuned_lora_name(vllm_lora_name(name)) == (module, is_a)
    for bad in ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
                "base_model.model.model.layers.0.self_attn.q_proj.bias",
                "model.layers.0.self_attn.q_proj.lora_A.weight",
                "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
                "base_model.model.lm_head.modules_to_save.default.weight"]:
        with pytest.raises(ValueError, match="not a LoRA tensor name"):
            vllm_lora_name(bad)


def test_written_adapter_loads_in_peft_with_identical_logits(peft_model, tiny_model_path,
                                                              tmp_path):
    from peft import PeftModel

    path = write_adapter(adapter_payload(peft_model, version=1), tmp_path / "adapter")
    assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(hf_model(tiny_model_path), str(path)).eval()
    ids = torch.tensor([[1, 5, 9, 42, 7, 300, 12]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, peft_model(input_ids=ids).logits)
        # ... and the adapter matters: the base model's logits are different.
        with peft_model.disable_adapter():
            assert not torch.allclose(peft_model(input_ids=ids).logits,
                                      loaded(input_ids=ids).logits, atol=1e-3)


def test_failed_write_leaves_the_previous_adapter_and_no_temporaries(peft_model, tmp_path):
    good = adapter_payload(peft_model, version=1)
    target = write_adapter(good, tmp_path / "adapter")
    first = (target / "adapter_model.safetensors").read_bytes()
    bad = adapter_payload(peft_model, version=2)
    name = next(iter(bad.tensors))
    bad.tensors[name] = bad.tensors[name].t()  # safetensors refuses non-contiguous tensors
    with pytest.raises(ValueError):
        write_adapter(bad, target)
    assert os.listdir(tmp_path) == ["adapter"]
    assert (target / "adapter_model.safetensors").read_bytes() == first
    # A good write replaces the previous adapter and leaves nothing else behind.
    newer = adapter_payload(peft_model, version=3)
    newer.tensors[name] = newer.tensors[name] * 2
    write_adapter(newer, target)
    assert os.listdir(tmp_path) == ["adapter"]
    assert (target / "adapter_model.safetensors").read_bytes() != first


class TinyLearner:
    """Learner-like actor: owns a PEFT model, exports its adapter as LearnerWorker does, can
    'train' (perturb) it."""

    def __init__(self, model_path: str) -> None:
        self.model = make_peft(model_path, seed=1)
        self.exported = (0, None, 0)

    def export_adapter(self, version: int, transport: str = "tensors", dtype: str | None = None):
        from grpo_ray.sync.sender import lora_modules, packed_adapter

        assert transport in ("tensors", "packed"), transport
        payload = (adapter_payload(self.model, version) if transport == "tensors"
                   else packed_adapter(self.model, version, dtype))
        names = payload.tensors if transport == "tensors" else payload.names
        self.exported = (version, payload.digest, lora_modules(names))
        return payload

    def exported_identity(self):
        return self.exported

    def perturb(self, seed: int) -> None:
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if "lora_B" in name:
                    p.add_(torch.randn_like(p) * 0.1)

    def logprobs(self, prompt_ids, completion_ids):
        return [naive_logprobs(self.model, p, c) for p, c in zip(prompt_ids, completion_ids)]


# Ray's workers cannot import this test module: ship TinyLearner (and its helpers) by value.
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_sync_through_ray_moves_the_adapter_to_the_engine(ray_local, tiny_model_path):
    from helpers import max_gap

    from grpo_ray.cluster.engines import EngineGroup
    from grpo_ray.contracts import PromptBatch
    from grpo_ray.rollout.worker import RolloutWorker

    ray = ray_local
    rollout = RolloutConfig(num_generations=2, max_completion_length=8, max_model_len=256,
                            enforce_eager=True)
    engine = ray.remote(RolloutWorker).options(num_cpus=1).remote(
        tiny_model_path, rollout, 8, seed=0)
    engines = EngineGroup([engine])
    learner = ray.remote(TinyLearner).options(num_cpus=1).remote(tiny_model_path)
    batch = PromptBatch([[1, 5, 9, 42, 7], [1, 300, 12]], [[], []], ["", ""], ["", ""])
    sampling = Sampling.training(rollout, seed=4)
    base = engines.generate(batch, sampling, expect_version=0)

    handle = LearnerHandle(learner, None, ClusterConfig())
    sync = AdapterSync(handle, engines)  # the identity check alone: no probe sequences
    sync.start()
    for version in (1, 2):
        if version == 2:
            ray.get(learner.perturb.remote(seed=version))
        stats = sync.send(version)
        assert sync.transport.name == "object-store"
        assert set(stats) == {"export_s", "load_s", "total_s", "bytes", "fallback_object_store",
                              "probe_s", "probe_learner_s", "probe_engines_s"}
        assert stats["fallback_object_store"] == 0
        assert 0 < stats["load_s"] <= stats["total_s"] and stats["bytes"] >= 2 * 16384 * 4
        assert engines.adapter_versions() == [version]
        out = engines.generate(batch, sampling, expect_version=version)
        assert out.sampling_logprobs != base.sampling_logprobs
        expected = ray.get(learner.logprobs.remote(out.prompt_ids, out.completion_ids))
        assert max_gap(out.sampling_logprobs, expected) < 1e-3  # the learner's adapter
    with pytest.raises(RuntimeError, match=r"adapter versions \[2\], the learner is at 3"):
        engines.generate(batch, sampling, expect_version=3)
    assert ray.get(engine.__ray_call__.remote(lambda w: os.listdir(w.adapter._root))) == ["v2"]

    with pytest.raises(ValueError, match="version 1 is not newer .* current version 2"):
        ray.get(engine.load_adapter.remote(learner.export_adapter.remote(1)))

    # CUDA IPC that fails (here: a learner that cannot export it) falls back to the object store
    # for good, and says so once on the console and from then on in the metrics
    lines: list[str] = []
    sync = AdapterSync(handle, engines, notify=lines.append)
    sync.start()
    sync.transport = CudaIpc()  # as chosen for a shared GPU
    for version in (3, 4):
        stats = sync.send(version)
        assert stats["fallback_object_store"] == 1 and sync.transport.name == "object-store"
        assert engines.adapter_versions() == [version]
    assert len(lines) == 1 and lines[0].startswith(
        "CUDA IPC adapter sync failed, using Ray's object store from now on (slower; metric "
        "sync/fallback_object_store): ")
    root = ray.get(engine.__ray_call__.remote(lambda w: w.adapter._root))
    ray.get(engine.__ray_call__.remote(lambda w: w.close()))
    assert not os.path.exists(root)
    engines.shutdown()
    ray.kill(learner)
