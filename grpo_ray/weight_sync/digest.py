"""The identity of an adapter: a digest of its tensors' exact bits, computed where they live.

The learner attaches the digest of what it exports (in the engines' dtype) to the payload; each
engine computes it again from the tensors it materialized, right before vLLM gets them, and
reports (version, digest). Equal means bit-identical tensors (up to a 2^-60 chance), whatever
the transport; an engine that missed a load, kept an older version or received damaged tensors
differs exactly at that sync, with no tolerance to tune.

The sums run on the tensors' device (no copy of the adapter to the host) in exact integer
arithmetic: each tensor's bytes are read as 16-bit words w_k (a 1-byte dtype: bytes), k their
position in name order, and for two fixed weightings m_k = ((a * k + b) mod 2^30) | 1 the sum of
w_k * m_k is taken mod p = 2^31 - 1. Products stay below 2^46 and are summed in rows of 2^16
before any reduction mod p, so int64 never overflows and CPU and CUDA, any reduction order, give
the same number; no integer division per element (cheap on a GPU). Changing any one word changes
each sum (0 < m < p, |w' - w| < p, p prime). sha256 over names, shapes, dtypes and the two sums.
"""
from __future__ import annotations

import hashlib
from typing import Any

_P = 2**31 - 1
_MULTIPLIERS = ((48271, 11), (69621, 7))  # (a, b) of two independent position weightings
_ROW = 1 << 16  # products summed exactly before reducing mod p: 2^16 * 2^46 < 2^63
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
            w = torch.nn.functional.pad(w, (0, -w.numel() % _ROW))  # zeros add nothing
            k = torch.arange(start, start + w.numel(), device=w.device, dtype=torch.int64)
            for j, (a, b) in enumerate(_MULTIPLIERS):
                m = ((k * a + b) & (2**30 - 1)) | 1
                rows = (w * m).view(-1, _ROW).sum(1) % _P
                sums[j] = (sums[j] + int(rows.sum().item())) % _P
    header.update(",".join(str(s) for s in sums).encode())
    return header.hexdigest()
