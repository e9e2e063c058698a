"""Merged-weights rollout: the engine folds each adapter into its own weights (no LoRA at
generation) and serves exactly what the PEFT model computes; versions never drift, the prefix
cache never serves keys of older weights, and the base comes back exactly. Its identity counts
the LoRA modules whose merge it serves, read from the weights its layers compute with: the
learner's count when healthy, fewer once a served weight changes."""
from __future__ import annotations

import sys

import pytest
import ray.cloudpickle
import torch
from helpers import chat_prompts, hf_model, max_gap, naive_logprobs, peft_model

from grpo_ray.contracts import Sampling
from grpo_ray.sync.merged import lora_scale, merge_plan
from grpo_ray.sync.sender import adapter_payload

# Ray's workers cannot import this test module: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def test_merge_plan_maps_peft_names_onto_vllms_packed_weights():
    names = [f"base_model.model.model.layers.{layer}.{part}.{m}.lora_{ab}.weight"
             for layer in (0, 1) for part, m in [("self_attn", "k_proj"), ("self_attn", "q_proj"),
                                                 ("self_attn", "o_proj"), ("mlp", "up_proj")]
             for ab in "AB"]
    plan = merge_plan(names, PACKED)
    assert plan["model.layers.1.self_attn.qkv_proj.weight"] == [
        (1, "base_model.model.model.layers.1.self_attn.k_proj"),
        (0, "base_model.model.model.layers.1.self_attn.q_proj")]
    assert plan["model.layers.0.self_attn.o_proj.weight"] == [
        (0, "base_model.model.model.layers.0.self_attn.o_proj")]
    assert plan["model.layers.0.mlp.gate_up_proj.weight"] == [
        (1, "base_model.model.model.layers.0.mlp.up_proj")]
    assert len(plan) == 6
    with pytest.raises(ValueError, match="lora_A and lora_B must both be present"):
        merge_plan(names[:1], PACKED)
    with pytest.raises(ValueError, match="not a PEFT LoRA tensor name"):
        merge_plan(["model.layers.0.self_attn.q_proj.weight"], PACKED)


def test_lora_scale_is_alpha_over_r_or_over_its_root_with_rslora():
    assert lora_scale({"lora_alpha": 16, "r": 4}) == 4.0
    assert lora_scale({"lora_alpha": 16, "r": 4, "use_rslora": True}) == 8.0


@pytest.fixture(scope="module")
def merged_engine(ray_local, tiny_model_path):
    """A merged-rollout engine as a Ray actor (its own process: a second vLLM engine in the
    test process would share vLLM's global parallel state with the session's one)."""
    from grpo_ray.config import RolloutConfig
    from grpo_ray.rollout.worker import RolloutWorker

    rollout = RolloutConfig(num_generations=2, max_completion_length=10, max_model_len=512,
                            enforce_eager=True, merge_adapter=True)
    engine = ray_local.remote(RolloutWorker).options(num_cpus=1).remote(
        tiny_model_path, rollout, 8, seed=0)
    yield engine
    ray_local.kill(engine)


def expected(model, out):
    return [naive_logprobs(model, p, c) for p, c in zip(out.prompt_ids, out.completion_ids)]


def test_merged_engine_serves_each_version_and_restores_the_base(ray_local, merged_engine,
                                                                 tokenizer, tiny_model_path):
    ray, w = ray_local, merged_engine
    assert ray.get(w.__ray_call__.remote(lambda self: self.adapter.request)) is None  # no LoRA
    prompts = chat_prompts(tokenizer)
    sampling = Sampling(n=2, max_tokens=10, seed=9)
    base_model = hf_model(tiny_model_path)
    base = ray.get(w.generate.remote(prompts, sampling))  # fills the prefix cache
    assert max_gap(base.sampling_logprobs, expected(base_model, base)) < 1e-4
    first = ray.get(w.adapter_version.remote())
    for seed in (1, 2):  # two versions: each merged from the base, not on the previous one
        model = peft_model(tiny_model_path, seed=seed)
        version = ray.get(w.adapter_version.remote()) + 1
        payload = adapter_payload(model, version)
        assert ray.get(w.load_adapter.remote(payload)) > 0
        assert ray.get(w.adapter_identity.remote()) == (version, payload.digest, 14)
        out = ray.get(w.generate.remote(prompts, sampling))
        assert out.adapter_version == version
        # the same prompts as before: a stale prefix cache would give the old weights' values
        assert max_gap(out.sampling_logprobs, expected(model, out)) < 1e-4
        assert max_gap(out.sampling_logprobs, expected(base_model, out)) > 0.1
    assert ray.get(w.adapter_version.remote()) == first + 2
    with pytest.raises(ValueError, match="is not newer"):
        ray.get(w.load_adapter.remote(adapter_payload(model, first + 1)))
    ray.get(w.__ray_call__.remote(lambda self: self.adapter.restore_base()))
    assert ray.get(w.adapter_identity.remote()) == (0, None, 0)
    again = ray.get(w.generate.remote(prompts, sampling))
    assert again.completion_ids == base.completion_ids
    assert again.sampling_logprobs == base.sampling_logprobs  # exactly the base again


def _change_served_weight(engine, name: str, how: str) -> None:
    """Run through `__ray_call__` in a merged engine: weight `name` of its vLLM model set back to
    the pristine base (`base`), or one word of its first element moved by one (`one-word`),
    behind the merge's back."""
    def on_worker(worker):
        import torch

        from grpo_ray.sync.merged import _served_weight, _set_weight

        layer = dict(worker.get_model().named_modules())[name.removesuffix(".weight")]
        weight = _served_weight(layer, worker._grpo_base[name]).clone()
        if how == "base":
            weight = worker._grpo_base[name].clone()
        else:
            words = weight.view(torch.int16 if weight.element_size() == 2 else torch.int32)
            words[0, 0] += 1
        _set_weight(layer, weight.contiguous())

    engine.llm.collective_rpc(on_worker)


def test_the_identity_counts_the_modules_whose_merge_the_engine_serves(ray_local, merged_engine,
                                                                       tiny_model_path):
    """Healthy: the learner's (version, digest, modules) at every version, whatever the
    transport's form. A served weight changed after the merge counts fewer: q/k/v of layer 0 set
    back to the base (3 modules), one word of layer 1's down_proj (1 module); the next version's
    merge serves all again."""
    from helpers import make_worker

    ray, w = ray_local, merged_engine
    learner = make_worker(tiny_model_path)
    version = ray.get(w.adapter_version.remote())
    for form in ("packed", "tensors", "packed"):
        version += 1
        payload = learner.export_adapter(version, form, "float32")
        ray.get(w.load_adapter.remote(payload))
        assert ray.get(w.adapter_identity.remote()) == learner.exported_identity()
        assert learner.exported_identity()[2] == 14  # 2 layers x 7 projections
        for p in learner.params:  # the next version is another adapter
            p.data.add_(0.01 * torch.randn_like(p))
    ray.get(w.__ray_call__.remote(_change_served_weight,
                                  "model.layers.0.self_attn.qkv_proj.weight", "base"))
    assert ray.get(w.adapter_identity.remote()) == (version, payload.digest, 14 - 3)
    ray.get(w.__ray_call__.remote(_change_served_weight, "model.layers.1.mlp.down_proj.weight",
                                  "one-word"))
    assert ray.get(w.adapter_identity.remote()) == (version, payload.digest, 14 - 3 - 1)
    payload = learner.export_adapter(version + 1, "packed", "float32")
    ray.get(w.load_adapter.remote(payload))
    assert ray.get(w.adapter_identity.remote()) == learner.exported_identity()
    seconds = ray.get(w.__ray_call__.remote(_time_identity))
    print(f"\nmerged engine: adapter_identity {1000 * seconds:.1f} ms on the tiny model")


def _time_identity(worker) -> float:
    import time

    start = time.perf_counter()
    for _ in range(10):
        worker.adapter_identity()
    return (time.perf_counter() - start) / 10
