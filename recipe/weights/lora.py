"""The LoRA merge math: W + (B @ A) * scale, in float32, rounded once; and its rounding, measured
(see `recipe.weights`)."""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional

import torch


def merge_lora(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, dtype: torch.dtype
) -> torch.Tensor:
    """W + (B @ A) * scale in float32, into a new tensor, cast to `dtype` (peft's op order).

    Kept as written although it costs float32 temporaries of W's size: a bf16 `addmm` (W as the
    addend) is faster but rounds differently (fused epilogue, other summation order), and the
    tests pin this formula bit for bit (docs/PERFORMANCE.md)."""
    return merge_lora_rows(weight, lora_a, lora_b, scale, dtype, 0, weight.shape[0])


def merge_lora_rows(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    dtype: torch.dtype,
    first: int,
    full_rows: int,
) -> torch.Tensor:
    """Rows first..first+len(weight) of `merge_lora` on the full tensors, bit for bit, from those
    rows of W and B and all of A. The product is taken at the full shape (B's other rows zero) and
    its rows cut out: a BLAS picks its kernel by shape, and a row block of another height can sum in
    another order (measured on the CPU: one-row blocks, and layers with one input feature). The
    rest is elementwise, on the rows only; in-place ops round as out-of-place ones, x + y == y + x."""
    b, rows = lora_b.float(), weight.shape[0]
    if rows == 0:
        return torch.empty(weight.shape, dtype=dtype, device=weight.device)
    if rows != full_rows:
        b = b.new_zeros(full_rows, b.shape[1])
        b[first : first + rows] = lora_b
    update = (b @ lora_a.float())[first : first + rows].mul_(scale)
    observed = update.clone() if _ROUNDING and dtype != torch.float32 else None
    merged = update.add_(weight.float())
    if observed is not None:
        _ROUNDING[-1].add(merged, observed, dtype)
    return merged.to(dtype) if merged.dtype != dtype or rows == full_rows else merged.clone()


class MergeRounding:
    """How far the cast of W + s*B@A to the engine dtype moves the merged weight, against the LoRA
    update s*B@A itself, summed over the merges of one stream (device tensors: no host sync here).
    In bfloat16 the rounding of W can exceed the update: the engine then samples from weights the
    trainer's ratio does not describe (lora=adapter keeps W and B@A apart and is exact)."""

    def __init__(self):
        self.sums: Optional[torch.Tensor] = None  # [sum |rounding|, sum |update|, elements]
        self.worst: Optional[torch.Tensor] = None  # max |rounding|

    def add(self, merged: torch.Tensor, update: torch.Tensor, dtype: torch.dtype) -> None:
        rounding = (merged.to(dtype).float() - merged).abs_()
        sums = torch.stack(
            [rounding.sum(), update.abs().sum(), torch.tensor(float(rounding.numel()), device=rounding.device)]
        ).double()
        worst = (
            rounding.max().double()
            if rounding.numel()
            else torch.zeros((), dtype=torch.float64, device=rounding.device)
        )
        self.sums = sums if self.sums is None else self.sums + sums.to(self.sums.device)
        self.worst = worst if self.worst is None else torch.maximum(self.worst, worst.to(self.worst.device))


_ROUNDING: List[MergeRounding] = []  # the accumulator of the stream being measured, if any


@contextlib.contextmanager
def measure_merge_rounding() -> Iterator[MergeRounding]:
    """Within the block, every LoRA merge to a narrower dtype adds its rounding to the yielded accumulator."""
    acc = MergeRounding()
    _ROUNDING.append(acc)
    try:
        yield acc
    finally:
        _ROUNDING.remove(acc)
