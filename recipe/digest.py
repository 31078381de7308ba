"""Exact content digests of weight tensors: what the trainer streams vs what the engine holds.

    d = digest(tensor)                      # one tensor (one host sync)
    ds = digests([t1, t2, ...])             # many tensors, one host sync
    fused = Digest.concat([dq, dk, dv])     # == digest(torch.cat([q, k, v]))

A tensor is read as its raw bytes (no float arithmetic, so the result does not depend on
summation order, device or kernel). Row r is `tensor[r]` (dim 0; a 0-d tensor is one row):
- when a row is a whole number of 8-byte words (a bf16 row of 4k elements, an fp32 row of 2k),
  the row is those words read as int64 (lanes: a bf16 element adds bits * 2^(16 * (i mod 4)));
- otherwise (1-D tensors: each element is a row) each element's bits, sign-extended to int64.
Then, with all arithmetic mod 2^64 (integer addition is associative, so wrap-around is exact):
    total    = sum over rows of rowsum_r
    weighted = sum over rows of (r + 1) * rowsum_r
One pass over the bytes per tensor (a row-sum), so it costs about one read of the tensor.

What it catches: any change of any bit that changes a row's sum (one element off by one unit
in the last place changes `total` by +-2^(16k)); any tensor with other values, shape or dtype;
rows moved (a transposed square matrix has its column sums as row sums). What it cannot tell
apart: two tensors whose rows hold the same multiset of (lane, value) pairs, e.g. two words
swapped inside one row. Tensors concatenated along dim 0 (vLLM's fused qkv_proj, gate_up_proj,
or dim-0 shards of a tensor split across ranks) compose exactly: `Digest.concat`.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence, Tuple

import torch

MASK = 2**64 - 1
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class Digest:
    """numel, dtype and rows of a tensor, plus its two sums (unsigned, mod 2^64)."""

    numel: int
    rows: int
    total: int
    weighted: int
    dtype: str = ""

    @staticmethod
    def concat(parts: Sequence["Digest"]) -> "Digest":
        """Digest of the dim-0 concatenation of tensors with these digests (same row layout)."""
        numel = rows = total = weighted = 0
        for p in parts:
            weighted = (weighted + p.weighted + rows * p.total) & MASK
            total = (total + p.total) & MASK
            rows += p.rows
            numel += p.numel
        dtypes = {p.dtype for p in parts}
        return Digest(numel, rows, total, weighted, dtypes.pop() if len(dtypes) == 1 else "mixed")

    def short(self) -> str:
        return f"{self.dtype}[{self.numel}] {self.total:016x}/{self.weighted:016x}"


SMALL_BYTES = 256 * 1024  # tensors up to this size are digested in batches of one shape (fewer ops)


def _bits(t: torch.Tensor, batch: int = 0) -> torch.Tensor:
    """The tensor (after `batch` leading batch dims) as one row per dim-0 slice of int64 words,
    or of sign-extended elements when a row is not a whole number of 8-byte words."""
    t = t.detach()
    lead = tuple(t.shape[:batch])
    rows = t.shape[batch] if t.dim() > batch else 1
    if t.numel() == 0:
        return torch.zeros(*lead, rows, 0, dtype=torch.int64, device=t.device)
    flat = t.reshape(*lead, rows, -1)
    if flat.shape[-1] * t.element_size() % 8 == 0:
        try:
            return flat.view(torch.int64)
        except RuntimeError:  # a view at an unaligned offset or with strides: read a copy
            return flat.contiguous().clone().view(torch.int64)
    return flat.view(_INT_OF_SIZE[t.element_size()]).to(torch.int64)


_WEIGHTS: Dict[Tuple[int, str], torch.Tensor] = {}  # (rows, device) -> [[1, ...], [1, 2, ..., rows]]


def _row_weights(rows: int, device: torch.device) -> torch.Tensor:
    key = (rows, str(device))
    if key not in _WEIGHTS:
        ramp = torch.arange(1, rows + 1, dtype=torch.int64, device=device)
        _WEIGHTS[key] = torch.stack([torch.ones_like(ramp), ramp])
    return _WEIGHTS[key]


def _sums(t: torch.Tensor, batch: int = 0) -> torch.Tensor:
    """[..., 2] int64: (total, weighted) of the tensor, or of each tensor of a stacked batch."""
    rowsum = _bits(t, batch).sum(-1)
    return (rowsum.unsqueeze(-2) * _row_weights(rowsum.shape[-1], rowsum.device)).sum(-1)


def digest_sums(t: torch.Tensor) -> torch.Tensor:
    """int64 tensor [total, weighted] on the tensor's device (no host sync)."""
    return _sums(t)


def shape_info(t: torch.Tensor) -> Tuple[int, int, str]:
    """(numel, rows, dtype name): what `finish` needs besides the sums."""
    return t.numel(), (t.shape[0] if t.dim() > 0 else 1), str(t.dtype).replace("torch.", "")


def to_host(sums: Sequence[torch.Tensor]) -> List[List[int]]:
    """The rows of many small device tensors as Python ints: one copy per device, not one per tensor
    (each copy to the host waits for the device, and at a few hundred tensors those waits added up)."""
    by_device: Dict[str, List[int]] = {}
    for i, t in enumerate(sums):
        by_device.setdefault(str(t.device), []).append(i)
    flat = [t.reshape(-1, t.shape[-1]) for t in sums]
    rows: List[List[int]] = [[] for _ in sums]
    for idx in by_device.values():
        stacked = torch.cat([flat[i] for i in idx]).cpu().tolist()
        for i, at in zip(idx, itertools.accumulate([flat[i].shape[0] for i in idx], initial=0)):
            rows[i] = stacked[at:at + flat[i].shape[0]]
    return rows


def finish(info: Iterable[Tuple[int, int, str]], sums: List[torch.Tensor]) -> List[Digest]:
    """Digests from shape info and `digest_sums` results: one host sync for all of them."""
    info = list(info)
    if not info:
        return []
    values = [r[0] for r in to_host(sums)]
    return [Digest(n, r, s & MASK, w & MASK, dt) for (n, r, dt), (s, w) in zip(info, values)]


def digests(tensors: Sequence[torch.Tensor]) -> List[Digest]:
    """Digests of many tensors, one host sync; small tensors of one shape are stacked and digested
    together (the same numbers as one by one, in fewer operations)."""
    groups: Dict[tuple, List[int]] = {}
    for i, t in enumerate(tensors):
        small = t.numel() * t.element_size() <= SMALL_BYTES
        groups.setdefault((tuple(t.shape), t.dtype, str(t.device)) if small else ("single", i), []).append(i)
    order, parts = [], []
    for idx in groups.values():
        batch = [tensors[i] for i in idx]
        parts.append(_sums(torch.stack(batch), 1) if len(batch) > 1 else _sums(batch[0])[None])
        order += idx
    if not parts:
        return []
    values = [v for rows in to_host(parts) for v in rows]
    by_index = dict(zip(order, values))
    out = []
    for i, t in enumerate(tensors):
        (n, r, dt), (s, w) = shape_info(t), by_index[i]
        out.append(Digest(n, r, s & MASK, w & MASK, dt))
    return out


def digest(t: torch.Tensor) -> Digest:
    return digests([t])[0]


def combined_hex(named: dict) -> str:
    """One 16-hex-digit fingerprint of {name: Digest} (name order does not matter)."""
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(named):
        d = named[name]
        h.update(f"{name}:{d.dtype}:{d.numel}:{d.rows}:{d.total}:{d.weighted};".encode())
    return h.hexdigest()
