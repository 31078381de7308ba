"""FSDP1 gathers: `summon_full_params` per unit (see `recipe.weights`)."""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Tuple

import torch
import torch.nn as nn

from recipe.model import move_fsdp1_unit
from recipe.names import is_lora_param, strip_wrappers
from recipe.weights.units import Group, Member, Wire, cached_layout, copy_as, fsdp_units, is_fsdp1, unique_tensors


def _fsdp1_families(model: nn.Module) -> List[Tuple[List[nn.Module], List[Member]]]:
    """FSDP1 units with their members, a LoRA adapter's unit (its own unit: an FSDP1 flat parameter
    holds one dtype, recipe/model.py) joined to the nearest unit above it, which holds its base
    weight: a transform gets a LoRA layer's W, A and B in one group."""
    units = fsdp_units(model, is_fsdp1)
    members_of = {id(unit): members for unit, members in units}
    names = {id(module): name for name, module in model.named_modules()}
    families: Dict[int, Tuple[List[nn.Module], List[Member]]] = {}
    for unit, members in units:
        owner = unit
        if all(is_lora_param(name) for name, _, _ in members):
            above = [
                u
                for u, _ in units
                if u is not unit
                and not all(is_lora_param(n) for n, _, _ in members_of[id(u)])
                and _inside(names[id(unit)], names[id(u)])
            ]
            owner = max(above, key=lambda u: len(names[id(u)]), default=unit)
        family = families.setdefault(id(owner), ([], []))
        family[0].append(unit)
        family[1].extend(members)
    return list(families.values())


def _inside(name: str, outer: str) -> bool:
    """Module `name` lies inside module `outer` (the root's name is "")."""
    return outer == "" or name.startswith(outer + ".")


def _fsdp1_summon(family: List[nn.Module], members: List[Member], device: torch.device, wire: Wire) -> Group:
    """The family's full parameters (FSDP1 summons them in the dtype they are kept in, mixed
    precision or not), each cast to its `wire` dtype right away, before it is copied anywhere."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with contextlib.ExitStack() as stack:
        for unit in family:
            stack.enter_context(FSDP.summon_full_params(unit, recurse=False, writeback=False))
        # Without wrapper segments: an adapter's name then extends its base weight's stem.
        return {strip_wrappers(name): copy_as(t, wire(name, t), device) for name, t in unique_tensors(members)}


def fsdp1_summon_groups(model: nn.Module, device: torch.device, wire: Wire) -> Iterator[Group]:
    """FSDP1 per-unit summon (with CPUOffload, FSDP copies the host shard in for the all-gather)."""
    for family, members in cached_layout(model, "fsdp1 units", lambda: _fsdp1_families(model)):
        yield _fsdp1_summon(family, members, device, wire)


def fsdp1_manual_groups(model: nn.Module, device: torch.device, wire: Wire) -> Iterator[Group]:
    """FSDP1 with manually offloaded shards: one unit's shard at a time visits the device."""
    for family, members in cached_layout(model, "fsdp1 units", lambda: _fsdp1_families(model)):
        homes = [move_fsdp1_unit(unit, device) for unit in family]
        try:
            group = _fsdp1_summon(family, members, device, wire)
        finally:
            for unit, home in zip(family, homes):
                move_fsdp1_unit(unit, home)
        yield group
