"""The adapter's identity: a digest of exact bits, the same on any device, different for any
one changed element."""
from __future__ import annotations

import pytest
import torch

from grpo_ray.sync import digest as digest_module
from grpo_ray.sync.digest import tensor_digest


def adapter(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight":
            torch.randn(shape, generator=g).to(dtype)
            for i in range(2) for ab, shape in (("A", (4, 16)), ("B", (16, 4)))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_tensors_same_digest_any_one_element_changed_differs(dtype):
    tensors = adapter(dtype)
    digest = tensor_digest(tensors)
    assert len(digest) == 64 and tensor_digest(adapter(dtype)) == digest
    # copies, another dict order, non-contiguous views of the same values: the same
    assert tensor_digest({k: v.clone() for k, v in reversed(tensors.items())}) == digest
    assert tensor_digest({k: v.t().contiguous().t() for k, v in tensors.items()}) == digest
    seen = {digest}
    for name, t in tensors.items():
        for index in [(0, 0), (t.shape[0] - 1, t.shape[1] - 1), (1, 2)]:
            for change in ("zero", "double", "next"):
                changed = {k: v.clone() for k, v in tensors.items()}
                x = changed[name]
                if change == "zero":
                    x[index] = 0
                elif change == "double":
                    x[index] *= 2
                else:  # the smallest change: one bit of the mantissa
                    x.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)[index] += 1
                d = tensor_digest(changed)
                assert d not in seen, (name, index, change)
                seen.add(d)
    # a whole tensor zeroed or scaled by 2 (the damage the sync must catch)
    name = next(iter(tensors))
    assert tensor_digest({**tensors, name: torch.zeros_like(tensors[name])}) not in seen
    assert tensor_digest({**tensors, name: tensors[name] * 2}) not in seen


def test_names_shapes_and_dtypes_are_part_of_the_identity():
    tensors = adapter(torch.float32)
    digest = tensor_digest(tensors)
    a, b = list(tensors)[:2]
    assert tensor_digest({**tensors, a: tensors[b].reshape(tensors[a].shape),
                          b: tensors[a].reshape(tensors[b].shape)}) != digest  # swapped
    assert tensor_digest({k: v.reshape(-1) for k, v in tensors.items()}) != digest
    assert tensor_digest({k: v.view(torch.int32) for k, v in tensors.items()}) != digest
    assert tensor_digest({k.replace("q_proj", "k_proj"): v for k, v in tensors.items()}) != digest
    assert tensor_digest(adapter(torch.bfloat16)) != tensor_digest(adapter(torch.float16))
    assert tensor_digest({}) != tensor_digest({"x": torch.zeros(0)})


def test_chunks_and_one_byte_dtypes(monkeypatch):
    # three rows of words and a partial fourth, one byte-typed tensor
    tensors = {"a": torch.arange(3 * digest_module._ROW + 1000, dtype=torch.int32).to(torch.int16),
               "b": torch.arange(7, dtype=torch.uint8)}
    digest = tensor_digest(tensors)
    monkeypatch.setattr(digest_module, "_CHUNK_ROWS", 1)  # a row a step: the same sums
    assert tensor_digest(tensors) == digest
    tensors["b"][3] += 1
    assert tensor_digest(tensors) != digest


def test_the_sums_are_the_exact_weighted_sums_mod_p():
    """float64 row sums are exact: the same as Python's integers, word by word."""
    from grpo_ray.sync.digest import _COLUMN_WEIGHTS, _P, _ROW, _ROW_WEIGHTS, _sums

    g = torch.Generator().manual_seed(0)
    # extreme words (the row sums' largest magnitudes) and random ones, over 2.5 rows
    words = torch.cat([torch.full((_ROW,), -32768, dtype=torch.int16),
                       torch.full((_ROW,), 32767, dtype=torch.int16),
                       torch.randint(-32768, 32768, (_ROW // 2,), generator=g).to(torch.int16)])
    odd = [lambda k, a=a, b=b, bits=bits: ((a * k + b) % 2**bits) | 1
           for weights, bits in ((_COLUMN_WEIGHTS, 22), (_ROW_WEIGHTS, 30)) for a, b in weights]
    want = [0, 0]
    for k, w in enumerate(words.tolist()):
        r, c = divmod(k, _ROW)
        for j in range(2):
            want[j] = (want[j] + w * odd[j](c) * odd[2 + j](r)) % _P
    assert _sums(words) == want
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_same_digest_on_cuda_and_fast_for_a_3b_rank_64_adapter():
    import time

    for dtype in (torch.float32, torch.bfloat16):
        tensors = adapter(dtype)
        assert tensor_digest({k: v.cuda() for k, v in tensors.items()}) == tensor_digest(tensors)
    # Qwen2.5-3B's rank-64 adapter on all 7 projections: 36 layers, ~120M bf16 values (240 MB)
    shapes = {"q": (2048, 2048), "k": (256, 2048), "v": (256, 2048), "o": (2048, 2048),
              "gate": (11008, 2048), "up": (11008, 2048), "down": (2048, 11008)}
    big = {f"base_model.model.model.layers.{i}.{m}.lora_{ab}.weight":
           torch.randn(*((64, n_in) if ab == "A" else (n_out, 64)), device="cuda",
                       dtype=torch.bfloat16)
           for i in range(36) for m, (n_out, n_in) in shapes.items() for ab in "AB"}
    tensor_digest(big)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    digest = tensor_digest(big)
    seconds = time.perf_counter() - start
    print(f"\ntensor_digest of a 3B rank-64 bf16 adapter on {torch.cuda.get_device_name()}: "
          f"{seconds * 1e3:.1f} ms")
    assert seconds < 0.1
    name = next(iter(big))
    big[name][0, 0] += 1
    assert tensor_digest(big) != digest
