"""The packed adapter (one buffer, the engines' dtype) that AdapterBroadcast ships, and the
engine's in-memory load of it against vLLM's own load from files."""
from __future__ import annotations

import os
import pickle

import pytest
import torch
from helpers import peft_model as make_peft

from grpo_ray.sync.digest import tensor_digest
from grpo_ray.sync.files import CONFIG_NAME
from grpo_ray.sync.sender import adapter_payload, pack_tensors, packed_adapter


@pytest.fixture(scope="module")
def peft_model(tiny_model_path):
    return make_peft(tiny_model_path, seed=1)


def test_packed_holds_the_payloads_tensors_in_one_out_of_band_buffer(peft_model):
    payload = adapter_payload(peft_model, version=3)
    packed = packed_adapter(peft_model, version=3)
    assert packed.version == 3 and packed.peft_config == payload.peft_config
    assert packed.dtype == "float32" and packed.num_bytes == payload.num_bytes
    unpacked = packed.materialize()
    assert list(unpacked) == list(payload.tensors)
    # both forms carry the learner's digest of the same tensors, and so does the round trip
    assert packed.digest == payload.digest == tensor_digest(unpacked) == packed.payload().digest
    for name, t in payload.tensors.items():
        assert torch.equal(unpacked[name], t)
    # Ray pickles with protocol 5: the whole buffer travels out of band, as one piece.
    buffers = []
    pickle.dumps(packed, protocol=5, buffer_callback=buffers.append)
    assert [b.raw().nbytes for b in buffers] == [payload.num_bytes]
    # The buffer is a copy: training the model afterwards does not change it.
    with torch.no_grad():
        next(p for n, p in peft_model.named_parameters() if "lora_B" in n).add_(1.0)
    assert torch.equal(packed.payload().tensors[packed.names[0]], payload.tensors[packed.names[0]])


def test_cast_to_the_engines_dtype_halves_the_bytes_and_rounds_like_a_cast():
    tensors = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 8),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(8, 4)}
    packed = pack_tensors(tensors, 1, {}, dtype="bfloat16")
    assert packed.dtype == "bfloat16" and packed.num_bytes == 2 * 64
    for name, t in packed.materialize().items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, tensors[name].to(torch.bfloat16))
    # the digest is of what is sent, in the engines' dtype
    assert packed.digest == tensor_digest({k: v.to(torch.bfloat16) for k, v in tensors.items()})
    assert packed.digest != pack_tensors(tensors, 1, {}).digest
    with pytest.raises(ValueError, match="not a LoRA tensor name"):
        pack_tensors({"model.embed_tokens.weight": torch.zeros(2)}, 1, {})


def test_in_memory_load_equals_vllms_load_from_files(served_engine, peft_model):
    w = served_engine.worker
    assert w.lora_dtype() == "float32" and w.adapter.in_memory
    prompt, completion = [[1, 5, 9, 42, 7]], [[11, 12, 13, 14, 15, 16]]
    before = w.score(prompt, completion)
    packed = packed_adapter(peft_model, served_engine.next_version, dtype=w.lora_dtype())
    v = served_engine.load(packed, peft_model)
    # computed by the engine, on its side: 2 layers x 7 projections bound
    assert w.adapter_identity() == (v, packed.digest, 14)
    assert os.listdir(os.path.join(w.adapter._root, f"v{v}")) == [CONFIG_NAME]  # no weights
    in_memory = w.score(prompt, completion)
    from_payload = adapter_payload(peft_model, v + 1)
    served_engine.load(from_payload, peft_model, from_file=True)
    assert w.adapter_identity() == (v + 1, packed.digest, 14) == (v + 1, from_payload.digest, 14)
    from_file = w.score(prompt, completion)
    assert w.llm.llm_engine.list_loras() == {v + 1}
    gap = max(abs(a - b) for a, b in zip(in_memory[0], from_file[0]))
    moved = max(abs(a - b) for a, b in zip(in_memory[0], before[0]))
    assert gap < 1e-5 and moved > 1e-2
