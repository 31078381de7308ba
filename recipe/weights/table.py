"""The table: (fsdp, offload, lora) -> the gather of (fsdp, offload) composed with the transform of lora,
built on lookup; the reference strategies; the stream the sync and the export take (see `recipe.weights`)."""

from __future__ import annotations

import itertools
from typing import Callable, Dict, Iterable, Iterator, List, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from recipe.config import FSDP_CHOICES, LORA_CHOICES, OFFLOAD_CHOICES, ConfigError
from recipe.weights.fsdp1 import fsdp1_manual_groups, fsdp1_summon_groups
from recipe.weights.fsdp2 import fsdp2_pipelined_groups
from recipe.weights.transforms import TRANSFORMS, Transform, full_weights
from recipe.weights.units import Group, Named, StreamSpec, Wire

Key = Tuple[str, str, str]
Strategy = Callable[[nn.Module, StreamSpec, torch.device], Iterator[Named]]


class StrategyNotFound(KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


# ----------------------------------------------------------------------------- keys and lookup


def all_keys() -> List[Key]:
    """Every (fsdp, offload, lora) combination of the Hydra options."""
    return list(itertools.product(FSDP_CHOICES, OFFLOAD_CHOICES, LORA_CHOICES))


def get_strategy(key: Iterable[str]) -> Strategy:
    """The strategy of (fsdp, offload, lora): the gather of (fsdp, offload) composed with the transform of lora."""
    key = tuple(key)
    if key not in all_keys():
        valid = ", ".join("/".join(k) for k in all_keys())
        raise StrategyNotFound(f"no weight-sync strategy for {key}; valid (fsdp/offload/lora): {valid}")
    return compose(GATHERS[key[:2]], TRANSFORMS[key[2]])


# ----------------------------------------------------------------------------- the table
# Entry (fsdp, offload, lora) = the gather of (fsdp, offload) + the transform of lora, so each behaviour
# is written once. FSDP2 gathers alike under every offload mode (the pipelined gather reads device,
# pinned host and pageable host shards the same way); FSDP1 none and cpu are the same summon (with
# CPUOffload, FSDP copies the host shard in itself); FSDP1 manual brings each unit's shard to the
# device for its summon. A transform names the dtype each tensor travels in and the tensors it needs:
# FSDP2 adapter syncs gather only the LoRA shards; FSDP1 cannot gather part of a flat parameter, so it
# summons the whole unit and the transform drops the rest.

Gather = Callable[[nn.Module, StreamSpec, torch.device, Wire, Callable[[str], bool], bool], Iterator[Group]]


def _fsdp2_gather(model, spec, device, wire, select, merge):
    scale = spec.lora_scale if merge else None
    return fsdp2_pipelined_groups(model, device, spec.bucket_bytes, wire, select, scale)


def _fsdp1_summon_gather(model, spec, device, wire, select, merge):
    return fsdp1_summon_groups(model, device, wire)


def _fsdp1_manual_gather(model, spec, device, wire, select, merge):
    return fsdp1_manual_groups(model, device, wire)


GATHERS: Dict[Tuple[str, str], Gather] = {
    ("fsdp2", "none"): _fsdp2_gather,
    ("fsdp2", "cpu"): _fsdp2_gather,
    ("fsdp2", "manual"): _fsdp2_gather,
    ("fsdp1", "none"): _fsdp1_summon_gather,
    ("fsdp1", "cpu"): _fsdp1_summon_gather,
    ("fsdp1", "manual"): _fsdp1_manual_gather,
}


def compose(gather: Gather, transform: Transform) -> Strategy:
    """The strategy that runs `gather` with the transform's dtypes and selection, then the transform."""

    def strategy(model: nn.Module, spec: StreamSpec, device: torch.device) -> Iterator[Named]:
        groups = gather(model, spec, device, transform.wire(spec), transform.select, transform.merges)
        return transform.apply(groups, model, spec, device)

    strategy.__name__ = f"{gather.__name__.lstrip('_')}+{transform.apply.__name__.lstrip('_')}"
    return strategy


# ----------------------------------------------------------------------------- references
# For benchmarks and regression tests only; selected by sync.strategy, never as a fallback.


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _naive(model, spec, device):
    """`model.to(device)` then `module.state_dict()`: crashes under FSDP2 + CPUOffloadPolicy (verl #5995)."""
    model.to(device)
    state = model.state_dict()
    groups = ({name: _full_tensor(state.pop(name))} for name in list(state))
    return full_weights(groups, model, spec, device)


def _broadcast_from_rank0(state: Dict[str, torch.Tensor], device: torch.device) -> Iterator[Group]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        yield from ({name: t} for name, t in state.items())
        return
    meta = [[(name, t.shape, t.dtype) for name, t in state.items()]]
    dist.broadcast_object_list(meta, src=0)
    for name, shape, dtype in meta[0]:
        t = state[name].to(device) if dist.get_rank() == 0 else torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(t, src=0)
        yield {name: t}


def _dcp_full_cpu(model, spec, device):
    """DCP full state dict on rank 0's CPU (what the first upstream fix used), then broadcast."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return full_weights(_broadcast_from_rank0(state, device), model, spec, device)


def _dtensor_stream(model, spec, device):
    """Per-parameter `.to(device).full_tensor()` (FSDP2 only): one all-gather per tensor."""
    from torch.distributed.tensor import DTensor

    params = list(model.named_parameters())
    if not all(isinstance(p, DTensor) for _, p in params):
        raise ConfigError("sync.strategy=dtensor_stream needs DTensor parameters (fsdp=fsdp2)")
    groups = ({name: p.detach().to(device).full_tensor()} for name, p in params)
    return full_weights(groups, model, spec, device)


REFERENCES: Dict[str, Strategy] = {"naive": _naive, "dcp_full_cpu": _dcp_full_cpu, "dtensor_stream": _dtensor_stream}


def get_reference(name: str) -> Strategy:
    if name not in REFERENCES:
        raise StrategyNotFound(
            f"sync.strategy={name!r} is not a reference strategy; choose one of: auto, {', '.join(sorted(REFERENCES))}"
        )
    return REFERENCES[name]


# ----------------------------------------------------------------------------- streams


def stream_weights(model: nn.Module, spec: StreamSpec, device: torch.device | str) -> Iterator[Named]:
    """The weights the engine needs after an update (full, merged, or adapter tensors; see module doc)."""
    strategy = get_strategy(spec.combo) if spec.strategy == "auto" else get_reference(spec.strategy)
    return strategy(model, spec, torch.device(device))


def stream_transform(model: nn.Module, spec: StreamSpec, device: torch.device | str, transform: str) -> Iterator[Named]:
    """The table's gather of (fsdp, offload) with the transform of lora mode `transform` ("none": full
    weights, "merged", "adapter"), whatever `spec.lora` and `spec.strategy` say: the export takes the
    merged policy and the adapter of one LoRA model."""
    spec = spec.with_transform(transform)
    return get_strategy(spec.combo)(model, spec, torch.device(device))


def stream_base_weights(model: nn.Module, spec: StreamSpec, device: torch.device | str) -> Iterator[Named]:
    """Base weights under HF names, LoRA excluded and unmerged: the engine's first load."""
    return stream_transform(model, spec, device, "none")
