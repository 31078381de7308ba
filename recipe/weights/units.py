"""What the gathers share: the types of a stream, the FSDP units of a model and their members (walked
once per model), the names a full load skips, and `StreamSpec`, the few settings a stream reads
(see `recipe.weights`)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Tuple

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from recipe.settings import Settings

Named = Tuple[str, torch.Tensor]
Group = Dict[str, torch.Tensor]  # raw module name -> full tensor, one FSDP unit
Wire = Callable[[str, torch.Tensor], torch.dtype]  # (raw name, parameter) -> dtype it is gathered in
Member = Tuple[str, nn.Module, str]  # (raw name, owning module, attribute)


@dataclass(frozen=True)
class StreamSpec:
    """What the table's gathers and transforms read, taken once from the settings (`StreamSpec.of`), so a
    strategy's signature says it reads these and nothing else of the run's config."""

    fsdp: str  # fsdp.name
    offload: str  # offload.name
    lora: str  # lora.name: the transform ("none", "merged", "adapter")
    strategy: str  # sync.strategy: "auto" (the table's entry) or a reference strategy's name
    dtype: str  # model.dtype: what the engine holds and every final tensor travels in
    lora_scale: float  # lora.alpha / lora.rank: the merge's scale
    bucket_bytes: float  # sync.bucket_mb * 2**20: the FSDP2 gather's bucket

    @classmethod
    def of(cls, settings: "Settings") -> "StreamSpec":
        """The spec of a run's settings (or of anything with their groups, e.g. a composed config)."""
        lora = settings.lora
        return cls(
            fsdp=settings.fsdp.name,
            offload=settings.offload.name,
            lora=lora.name,
            strategy=settings.sync.strategy,
            dtype=settings.model.dtype,
            lora_scale=lora.alpha / lora.rank if lora.rank else 0.0,
            bucket_bytes=settings.sync.bucket_mb * 2**20,
        )

    @property
    def combo(self) -> Tuple[str, str, str]:
        """The dispatch-table key (fsdp, offload, lora)."""
        return (self.fsdp, self.offload, self.lora)

    @property
    def name(self) -> str:
        """The table entry's name ("fsdp2/cpu/merged"), or the reference strategy's name."""
        return "/".join(self.combo) if self.strategy == "auto" else self.strategy

    def with_transform(self, lora: str) -> "StreamSpec":
        """The same gather with the transform of lora mode `lora`, as the table's entry."""
        return replace(self, lora=lora, strategy="auto")


def hf_config(model: nn.Module):
    for module in model.modules():
        config = getattr(module, "config", None)
        if hasattr(config, "tie_word_embeddings"):
            return config
    raise ValueError(f"no HF config found in {type(model).__name__}")


def skipped_names(model: nn.Module) -> set:
    # A tied head has no key of its own in the HF checkpoint; the engine ties it itself.
    return {"lm_head.weight"} if hf_config(model).tie_word_embeddings else set()


def fsdp_units(model: nn.Module, is_unit: Callable[[nn.Module], bool]) -> List[Tuple[nn.Module, List[Member]]]:
    """FSDP units (root first) with the parameters each one owns (not those of nested units)."""
    units: List[Tuple[nn.Module, List[Member]]] = []

    def walk(module: nn.Module, prefix: str, members: List[Member]) -> None:
        for attr, param in module._parameters.items():
            if param is not None:
                members.append((prefix + attr, module, attr))
        for child_name, child in module._modules.items():
            if child is None:
                continue
            if is_unit(child):
                units.append((child, []))
                walk(child, f"{prefix}{child_name}.", units[-1][1])
            else:
                walk(child, f"{prefix}{child_name}.", members)

    units.append((model, []))
    walk(model, "", units[0][1])
    return [(unit, members) for unit, members in units if members]


_LAYOUTS: "weakref.WeakKeyDictionary[nn.Module, Dict[str, Any]]" = weakref.WeakKeyDictionary()


def cached_layout(model: nn.Module, kind: str, compute: Callable[[], Any]) -> Any:
    """`compute()` once per model: the module tree (FSDP units, their members, the largest unit's
    bytes) does not change after sharding, and walking it costs milliseconds a sync on a 1.5B model."""
    per_model = _LAYOUTS.setdefault(model, {})
    if kind not in per_model:
        per_model[kind] = compute()
    return per_model[kind]


def unique_tensors(members: List[Member]) -> List[Tuple[str, torch.Tensor]]:
    """Current tensor of each member, once per tensor (tied weights appear under one name)."""
    seen, out = set(), []
    for name, module, attr in members:
        tensor = getattr(module, attr)
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out.append((name, tensor))
    return out


def is_fsdp2(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def is_fsdp1(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)


def copy_as(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A fresh copy of `tensor` in `dtype` on `device`, cast where it lies (a narrower cast moves fewer bytes)."""
    out = tensor.detach().to(dtype).to(device)
    return out.clone() if out.data_ptr() == tensor.data_ptr() else out
