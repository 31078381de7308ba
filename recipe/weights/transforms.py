"""Transforms: what the engine gets from the gathered groups (full weights, merged LoRA, adapter
tensors), and the dtype each tensor is gathered in (see `recipe.weights`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator

import torch
import torch.nn as nn

from recipe.model import torch_dtype
from recipe.names import ADAPTER, hf_name, is_lora_param, peft_name
from recipe.weights.lora import merge_lora
from recipe.weights.units import Group, Named, StreamSpec, Wire, skipped_names


# ----------------------------------------------------------------------------- wire dtypes
# What each tensor is gathered in. The engine's dtype (`model.dtype`) wherever the value is
# final, so float32 masters are cast once, on the rank that holds them, before any copy or
# collective; merged LoRA's inputs in their own (master) dtype, because the merge is computed
# in float32 from them and rounds once at the end.


def engine_wire(spec: StreamSpec) -> Wire:
    dtype = torch_dtype(spec.dtype)
    return lambda name, param: dtype


def merge_wire(spec: StreamSpec) -> Wire:
    dtype = torch_dtype(spec.dtype)
    return lambda name, param: param.dtype if _merge_input(name) else dtype


def _merge_input(name: str) -> bool:
    return is_lora_param(name) or name.endswith(".base_layer.weight")


# ----------------------------------------------------------------------------- transforms


@torch.no_grad()  # gathers write into fresh buffers; the trained params keep no history
def full_weights(groups: Iterable[Group], model: nn.Module, spec: StreamSpec, device: torch.device) -> Iterator[Named]:
    """Base weights under HF names (LoRA tensors of a peft model are skipped)."""
    skipped, dtype = skipped_names(model), torch_dtype(spec.dtype)
    for group in groups:
        for raw in list(group):
            tensor = group.pop(raw)  # pop: the stream keeps no reference to what it yielded
            if is_lora_param(raw) or hf_name(raw) in skipped:
                continue
            yield hf_name(raw), tensor.to(device=device, dtype=dtype)


@torch.no_grad()  # gathers write into fresh buffers; the trained params keep no history
def merged_weights(
    groups: Iterable[Group], model: nn.Module, spec: StreamSpec, device: torch.device
) -> Iterator[Named]:
    skipped, dtype = skipped_names(model), torch_dtype(spec.dtype)
    scale = spec.lora_scale
    for group in groups:
        for raw in list(group):
            if raw not in group or is_lora_param(raw):
                continue  # LoRA tensors are consumed by their base weight's merge
            tensor = group.pop(raw)
            if raw.endswith(".base_layer.weight"):
                stem = raw[: -len("base_layer.weight")]
                lora_a = group.pop(f"{stem}lora_A.{ADAPTER}.weight")
                lora_b = group.pop(f"{stem}lora_B.{ADAPTER}.weight")
                tensor = merge_lora(tensor, lora_a, lora_b, scale, dtype)
            if hf_name(raw) not in skipped:
                yield hf_name(raw), tensor.to(device=device, dtype=dtype)
        if any(is_lora_param(raw) for raw in group):
            raise ValueError(f"LoRA tensors without a base weight in one unit: {sorted(group)}")


@torch.no_grad()  # gathers write into fresh buffers; the trained params keep no history
def adapter_weights(
    groups: Iterable[Group], model: nn.Module, spec: StreamSpec, device: torch.device
) -> Iterator[Named]:
    dtype = torch_dtype(spec.dtype)
    for group in groups:
        for raw in list(group):
            tensor = group.pop(raw)
            if is_lora_param(raw):
                yield peft_name(raw), tensor.to(device=device, dtype=dtype)


@dataclass(frozen=True)
class Transform:
    wire: Callable[[StreamSpec], Wire]  # the dtype each tensor is gathered in
    select: Callable[[str], bool]  # the raw names it needs (a gather may hand it more)
    apply: Callable[[Iterable[Group], nn.Module, StreamSpec, torch.device], Iterator[Named]]
    # Merged LoRA: a gather that can merge on the shards does (FSDP2: the base weight then comes as
    # a plain weight, already merged, and its LoRA tensors do not come); others hand over W, A, B.
    merges: bool = False


def _everything(name: str) -> bool:
    return True


TRANSFORMS: Dict[str, Transform] = {
    "none": Transform(engine_wire, _everything, full_weights),
    "merged": Transform(merge_wire, _everything, merged_weights, merges=True),
    "adapter": Transform(engine_wire, is_lora_param, adapter_weights),
}
