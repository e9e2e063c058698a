"""The identity of an adapter: a digest of its tensors' exact bits, computed where they live.

The learner attaches the digest of what it exports (in the engines' dtype) to the payload; each
engine computes it again from the tensors it materialized, right before vLLM gets them, and
reports (version, digest). Equal means bit-identical tensors (up to a 2^-60 chance), whatever
the transport; an engine that missed a load, kept an older version or received damaged tensors
differs exactly at that sync, with no tolerance to tune.

The sum runs on the tensors' device (no copy of the adapter to the host): each tensor's bytes
are read as 16-bit words w_k (a 1-byte dtype: bytes), and for two fixed multipliers
m_k = (a * (k + 1) + b) mod p, p = 2^31 - 1, the sum over all words of w_k * m_k mod p is taken
in int64, which never overflows (w < 2^16, m < 2^31; at most 2^24 products summed at once),
so CPU and CUDA, any reduction order, give the same number. Changing any one word changes each
sum (w and m are below p, p is prime). sha256 over names, shapes, dtypes and the two sums.
"""
from __future__ import annotations

import hashlib
from typing import Any

_P = 2**31 - 1
_MULTIPLIERS = ((48271, 11), (69621, 7))  # (a, b) of two independent position weights
_CHUNK = 1 << 24  # words per step: bounds the int64 temporaries (128 MB each)


def tensor_digest(tensors: dict[str, Any]) -> str:
    """A hex sha256 that identifies `tensors` (name -> torch tensor, any device, any dtype) by
    their names, shapes, dtypes and exact bits; the same for the same tensors on CPU and CUDA."""
    import torch

    header = hashlib.sha256()
    words = []
    for name in sorted(tensors):
        t = tensors[name].detach()
        header.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        flat = t.contiguous().reshape(-1)
        if flat.numel() == 0:
            continue
        if flat.element_size() % 2:
            words.append(flat.view(torch.uint8).to(torch.int16))
        else:
            words.append(flat.view(torch.int16))
    sums = [0] * len(_MULTIPLIERS)
    if words:
        flat = torch.cat(words) if len(words) > 1 else words[0]
        for start in range(0, flat.numel(), _CHUNK):
            w = flat[start:start + _CHUNK].to(torch.int64) & 0xFFFF
            k = torch.arange(start + 1, start + 1 + w.numel(), device=w.device, dtype=torch.int64)
            for j, (a, b) in enumerate(_MULTIPLIERS):
                m = (k * a + b) % _P
                sums[j] = (sums[j] + int(((w * m) % _P).sum().item())) % _P
    header.update(",".join(str(s) for s in sums).encode())
    return header.hexdigest()
