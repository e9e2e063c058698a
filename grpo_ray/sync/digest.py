"""The identity of an adapter: a digest of its tensors' exact bits, computed where they live.

The learner attaches the digest of what it exports (in the engines' dtype) to the payload; each
engine computes it again from the tensors it materialized, right before vLLM gets them, and
reports (version, digest). Equal means bit-identical tensors (up to a 2^-60 chance), whatever
the transport; an engine that missed a load, kept an older version or received damaged tensors
differs exactly at that sync, with no tolerance to tune.

The sums run on the tensors' device (no copy of the adapter to the host) in exact arithmetic:
each tensor's bytes are read as signed 16-bit words w (a 1-byte dtype: bytes), in name order,
laid out in rows of 2^15. Word c of row r is weighted by u_r * v_c with fixed odd weightings
v_c < 2^22 and u_r < 2^30, and the sum of w * u_r * v_c is taken mod p = 2^31 - 1, twice, with
two independent weightings. Each row's sum of w * v_c is one float64 matrix product (the rows
against both v's at once): every product and partial sum is an integer below 2^53, so float64
holds it exactly, in any summation order, on CPU and CUDA alike. That is one read of the words
after their conversion, where elementwise integer weighting took about ten passes (12 ms for a
3B rank-64 adapter on an H200). The row sums are then reduced mod p with u_r in int64. Changing
any one word changes each sum (0 < u_r * v_c mod p, |w' - w| < p, p prime). sha256 over names,
shapes, dtypes and the two sums.
"""
from __future__ import annotations

import hashlib
from typing import Any

_P = 2**31 - 1
_ROW = 1 << 15  # words per row: |w * v| < 2^37, so a row's sum stays below 2^52
_CHUNK_ROWS = 512  # rows per step: bounds the float64 temporary (128 MB)
_COLUMN_WEIGHTS = ((48271, 11), (69621, 7))  # (a, b): v_c = ((a * c + b) mod 2^22) | 1
_ROW_WEIGHTS = ((40692, 5), (40014, 3))  # (a, b): u_r = ((a * r + b) mod 2^30) | 1
_columns: dict[str, Any] = {}  # device -> the (_ROW, 2) float64 v's


def _odd(k: Any, a: int, b: int, bits: int) -> Any:
    return ((k * a + b) & (2**bits - 1)) | 1


def _column_weights(device: Any) -> Any:
    import torch

    key = str(device)
    if key not in _columns:
        c = torch.arange(_ROW, dtype=torch.int64, device=device)
        _columns[key] = torch.stack([_odd(c, a, b, 22) for a, b in _COLUMN_WEIGHTS], 1).double()
    return _columns[key]


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
    sums = _sums(torch.cat(words) if len(words) > 1 else words[0]) if words else [0, 0]
    header.update(",".join(str(s) for s in sums).encode())
    return header.hexdigest()


def _sums(words: Any) -> list[int]:
    """The two weighted sums mod p of `words` (a flat int16 tensor; module docstring)."""
    import torch

    columns = _column_weights(words.device)
    acc = torch.zeros(len(_ROW_WEIGHTS), dtype=torch.int64, device=words.device)
    step = _CHUNK_ROWS * _ROW
    for start in range(0, words.numel(), step):
        w = words[start:start + step].to(torch.float64)
        if w.numel() % _ROW:
            w = torch.nn.functional.pad(w, (0, -w.numel() % _ROW))  # zeros add nothing
        rows = (w.view(-1, _ROW) @ columns).to(torch.int64)  # exact: below 2^53
        r = torch.arange(start // _ROW, start // _ROW + rows.shape[0], device=words.device)
        u = torch.stack([_odd(r, a, b, 30) for a, b in _ROW_WEIGHTS], 1)
        acc = (acc + ((rows % _P) * u % _P).sum(0)) % _P
    return acc.tolist()
