"""The dispatch table of weight-sync strategies: (fsdp, offload, lora) -> gather strategy.

    from recipe.state_dict import stream_weights, stream_base_weights
    for name, tensor in stream_weights(model, cfg, device):   # HF names, engine dtype, on `device`
        engine_weights[name].copy_(tensor)

The key is built from the Hydra option names (`conf/fsdp`, `conf/offload`, `conf/lora`), the
same tuples `recipe.config` validates against, so config and code cannot drift: every one of the
2 x 3 x 3 = 18 combinations has exactly one entry, a duplicate registration is refused, and a
missing key lists the registered ones. `sync.strategy` other than "auto" picks a reference
strategy (`naive`, `dcp_full_cpu`, `dtensor_stream`) for comparison; they are never a fallback.

Each strategy is two steps, composed in the table (`GATHERS` per (fsdp, offload) x `TRANSFORMS` per lora):
1. a *gather* yields full tensors as fresh tensors on the engine device (or, on one rank whose
   shards are already there, the local shards themselves), keyed by raw module names:
   - FSDP2, every offload mode and LoRA mode: `_fsdp2_pipelined_groups` -- each local shard
     (device, pinned host or pageable host) is packed into pieces of about `sync.bucket_mb`,
     all-gathered, and cut into full tensors, on three CUDA streams so that copy-in, all-gather
     and the caller's use of the previous piece overlap (adapter syncs gather the LoRA shards only);
   - FSDP1: `summon_full_params(unit, recurse=False, writeback=False)` per unit; for manual
     offload the unit's flat shard is brought to the device for the summon and sent back after.
   Nothing calls `module.state_dict()` or `model.to(device)`, and no rank builds a full copy.
   A group holds whole "atoms": a LoRA layer's base weight comes with its A and B -- except
   FSDP2 merged LoRA, which merges each rank's rows before the gather (`_merge_on_shards`) and
   hands over the merged weight alone.
2. a *transform* maps names and values: full weights (`hf_name`), merged LoRA
   (W + alpha/r * B @ A under the base name) or adapter tensors only (peft's saved names).

Every rank gets every tensor (each rank owns an engine). Peak extra memory: FSDP1, one unit's
tensors (twice for a moment: the summon buffer and the clone); FSDP2, what is launched and not yet
consumed, bounded by the largest FSDP unit + one bucket. Never the whole model: tensors are popped
as they are yielded.

dtypes: the trained parameters are in `model.master_dtype` (float32 by default), the engine
takes `model.dtype`. Each tensor is cast to the engine dtype on the rank that holds it, before
it moves: FSDP2 casts each local shard as it packs the send buffer, so the all-gather and the
engine get bf16 bytes; FSDP1 summons the unit's full parameters in the master dtype (its
all-gather is float32, which FSDP1 does not let us change) and casts each one on the spot,
before the copy. The stream therefore equals `master.to(model.dtype)`, bit for bit.

LoRA merge dtype: the merge is computed in float32 (W.float() + (B.float() @ A.float()) * scale)
from the master tensors into a new tensor and then cast to `model.dtype`, once (`merge_lora`).
FSDP2 computes it on each rank's rows before the all-gather (only the A's travel in the master
dtype; the merged rows travel in the engine dtype, like full weights), bit for bit the rows of the
full merge (`merge_lora_rows`); FSDP1 merges the summoned full tensors. For float32 models that
is bit-identical to peft's `merge_and_unload`; for bf16 masters it rounds once instead of after
each op. The trained weights are never modified (merge -> unmerge in bf16 drifts).

Base weights for the engine's first load (LoRA adapter mode) come from `stream_base_weights`:
the lora=none entry of the same (fsdp, offload), which streams the base layers of a peft model
under HF names and skips the LoRA tensors.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from omegaconf import DictConfig

from recipe import digest as digest_mod
from recipe.config import FSDP_CHOICES, LORA_CHOICES, OFFLOAD_CHOICES, ConfigError, combo_key
from recipe.model import largest_unit_bytes, move_fsdp1_unit, torch_dtype
from recipe.names import ADAPTER, hf_name, is_lora_param, peft_name, strip_wrappers

Key = Tuple[str, str, str]
Named = Tuple[str, torch.Tensor]
Strategy = Callable[[nn.Module, DictConfig, torch.device], Iterator[Named]]
Group = Dict[str, torch.Tensor]  # raw module name -> full tensor, one FSDP unit
Wire = Callable[[str, torch.Tensor], torch.dtype]  # (raw name, parameter) -> dtype it is gathered in
Member = Tuple[str, nn.Module, str]  # (raw name, owning module, attribute)

_TABLE: Dict[Key, Strategy] = {}
_REFERENCES: Dict[str, Strategy] = {}


class StrategyNotFound(KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


# ----------------------------------------------------------------------------- registry

def all_keys() -> List[Key]:
    """Every (fsdp, offload, lora) combination of the Hydra options."""
    return list(itertools.product(FSDP_CHOICES, OFFLOAD_CHOICES, LORA_CHOICES))


def register(fsdp: str, offload: str, lora: str) -> Callable[[Strategy], Strategy]:
    """Decorator: make the function the strategy of (fsdp, offload, lora); refuses duplicates."""
    key = (fsdp, offload, lora)
    if key not in all_keys():
        raise ConfigError(f"invalid strategy key {key}: fsdp in {FSDP_CHOICES}, offload in "
                          f"{OFFLOAD_CHOICES}, lora in {LORA_CHOICES}")

    def decorate(fn: Strategy) -> Strategy:
        if key in _TABLE:
            raise ValueError(f"duplicate strategy for {key}: {_TABLE[key].__name__} is registered, "
                             f"refusing {fn.__name__}")
        _TABLE[key] = fn
        return fn

    return decorate


def get_strategy(key: Iterable[str]) -> Strategy:
    key = tuple(key)
    if key not in _TABLE:
        valid = ", ".join("/".join(k) for k in sorted(_TABLE))
        raise StrategyNotFound(f"no weight-sync strategy for {key}; registered (fsdp/offload/lora): {valid}")
    return _TABLE[key]


def registered_keys() -> List[Key]:
    return sorted(_TABLE)


def _register_reference(name: str) -> Callable[[Strategy], Strategy]:
    def decorate(fn: Strategy) -> Strategy:
        if name in _REFERENCES:
            raise ValueError(f"duplicate reference strategy {name!r}")
        _REFERENCES[name] = fn
        return fn

    return decorate


def get_reference(name: str) -> Strategy:
    if name not in _REFERENCES:
        raise StrategyNotFound(f"sync.strategy={name!r} is not a reference strategy; choose one of: "
                               f"auto, {', '.join(sorted(_REFERENCES))}")
    return _REFERENCES[name]


# ----------------------------------------------------------------------------- names and configs

def _hf_config(model: nn.Module):
    for module in model.modules():
        config = getattr(module, "config", None)
        if hasattr(config, "tie_word_embeddings"):
            return config
    raise ValueError(f"no HF config found in {type(model).__name__}")


def _skipped_names(model: nn.Module) -> set:
    # A tied head has no key of its own in the HF checkpoint; the engine ties it itself.
    return {"lm_head.weight"} if _hf_config(model).tie_word_embeddings else set()


# ----------------------------------------------------------------------------- gathers

def _units(model: nn.Module, is_unit: Callable[[nn.Module], bool]) -> List[Tuple[nn.Module, List[Member]]]:
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


def _layout(model: nn.Module, kind: str, compute: Callable[[], Any]) -> Any:
    """`compute()` once per model: the module tree (FSDP units, their members, the largest unit's
    bytes) does not change after sharding, and walking it costs milliseconds a sync on a 1.5B model."""
    per_model = _LAYOUTS.setdefault(model, {})
    if kind not in per_model:
        per_model[kind] = compute()
    return per_model[kind]


def _unique(members: List[Member]) -> List[Tuple[str, torch.Tensor]]:
    """Current tensor of each member, once per tensor (tied weights appear under one name)."""
    seen, out = set(), []
    for name, module, attr in members:
        tensor = getattr(module, attr)
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out.append((name, tensor))
    return out


def _is_fsdp2(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _is_fsdp1(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)


def _copy_as(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A fresh copy of `tensor` in `dtype` on `device`, cast where it lies (a narrower cast moves fewer bytes)."""
    out = tensor.detach().to(dtype).to(device)
    return out.clone() if out.data_ptr() == tensor.data_ptr() else out


def _fsdp1_families(model: nn.Module) -> List[Tuple[List[nn.Module], List[Member]]]:
    """FSDP1 units with their members, a LoRA adapter's unit (its own unit: an FSDP1 flat parameter
    holds one dtype, recipe/model.py) joined to the nearest unit above it, which holds its base
    weight: a transform gets a LoRA layer's W, A and B in one group."""
    units = _units(model, _is_fsdp1)
    members_of = {id(unit): members for unit, members in units}
    names = {id(module): name for name, module in model.named_modules()}
    families: Dict[int, Tuple[List[nn.Module], List[Member]]] = {}
    for unit, members in units:
        owner = unit
        if all(is_lora_param(name) for name, _, _ in members):
            above = [u for u, _ in units if u is not unit and not all(is_lora_param(n) for n, _, _ in members_of[id(u)])
                     and _inside(names[id(unit)], names[id(u)])]
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
        return {strip_wrappers(name): _copy_as(t, wire(name, t), device) for name, t in _unique(members)}


def _fsdp1_summon_groups(model: nn.Module, device: torch.device, wire: Wire) -> Iterator[Group]:
    """FSDP1 per-unit summon (with CPUOffload, FSDP copies the host shard in for the all-gather)."""
    for family, members in _layout(model, "fsdp1 units", lambda: _fsdp1_families(model)):
        yield _fsdp1_summon(family, members, device, wire)


def _fsdp1_manual_groups(model: nn.Module, device: torch.device, wire: Wire) -> Iterator[Group]:
    """FSDP1 with manually offloaded shards: one unit's shard at a time visits the device."""
    for family, members in _layout(model, "fsdp1 units", lambda: _fsdp1_families(model)):
        homes = [move_fsdp1_unit(unit, device) for unit in family]
        try:
            group = _fsdp1_summon(family, members, device, wire)
        finally:
            for unit, home in zip(family, homes):
                move_fsdp1_unit(unit, home)
        yield group


# ----------------------------------------------------------------------------- pipelined FSDP2 gather
# One all-gather per unit, done one after the other, leaves the copy engine idle while NCCL runs and
# NCCL idle while the host shards are copied in (measured on H200 at world 2: 0.55-0.7 of the copy
# limit with CPU offload, 0.15-0.5 without). Here the shards travel in pieces of about one bucket
# (`sync.bucket_mb`), each piece on three CUDA streams: a copy stream packs the local shards (host
# or device) into a send buffer, a gather stream all-gathers it, and the caller's stream cuts the
# full tensors out while the next pieces are packed and gathered. What is launched but not yet
# consumed is bounded by the largest FSDP unit + one bucket, so that is also the peak extra memory.

def _atom(name: str) -> str:
    """Tensors a transform needs together (a LoRA layer's base weight and its A and B) share a key."""
    for marker in (".base_layer.", ".lora_A.", ".lora_B."):
        if marker in name:
            return name.split(marker)[0]
    return name


def _row_numel(p: torch.Tensor) -> int:
    return p.numel() // p.shape[0]


def _plan_pieces(params: List[torch.Tensor], dtypes: List[torch.dtype], world: int,
                 piece_bytes: int) -> List[List[int]]:
    """Greedy packing of whole parameters (never split) into all-gather pieces of at most
    `piece_bytes` gathered bytes, one (wire) dtype per piece; a larger parameter is a piece of its own."""
    pieces: List[List[int]] = []
    size = 0
    for i, p in enumerate(params):
        nbytes = -(-p.shape[0] // world) * world * _row_numel(p) * dtypes[i].itemsize
        if not pieces or size + nbytes > piece_bytes or dtypes[i] != dtypes[pieces[-1][0]]:
            pieces.append([])
            size = 0
        pieces[-1].append(i)
        size += nbytes
    return pieces


class _Piece:
    """One all-gather in flight: its parameters, receive buffer and completion event."""

    def __init__(self, idx: List[int], recv: torch.Tensor, done, cost: int):
        self.idx, self.recv, self.done, self.cost = idx, recv, done, cost


class _ShardGather:
    """Gathers Shard(0) DTensor parameters piece by piece; `__iter__` yields Groups of whole atoms.

    Each local shard is cast to its `wire` dtype as it is packed into the send buffer, so with
    float32 masters and a bf16 engine the all-gather and everything after it move bf16 bytes."""

    def __init__(self, named: List[Tuple[str, torch.Tensor]], device: torch.device, piece_bytes: int,
                 budget_bytes: int, wire: Wire, sources: Optional[Dict[str, "ShardSource"]] = None):
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.dtypes = [wire(n, p) for n, p in named]
        self.locals = [p.to_local() for p in self.params]
        # Names whose local rows are computed at packing time (merged LoRA), on the copy stream.
        self.sources = dict(sources or {})
        self.group = self.params[0].device_mesh.get_group()
        self.world = dist.get_world_size(self.group)
        self.atoms = [_atom(n) for n in self.names]
        self.rows = [-(-p.shape[0] // self.world) for p in self.params]  # per rank, padded
        self.sizes = [rows * _row_numel(p) for rows, p in zip(self.rows, self.params)]  # per rank, padded
        self.device, self.budget = device, budget_bytes
        self.pieces = _plan_pieces(self.params, self.dtypes, self.world, piece_bytes)
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.caller = torch.cuda.current_stream(device)
            self.copy_stream, self.gather_stream = torch.cuda.Stream(device), torch.cuda.Stream(device)
            self.copy_stream.wait_stream(self.caller)  # the shards were last written on the caller's stream

    def _whole(self, idx: List[int]) -> bool:
        """A lone, evenly sharded parameter: the receive buffer already is the full tensor."""
        return self.world == 1 or (len(idx) == 1 and self.rows[idx[0]] * self.world == self.params[idx[0]].shape[0])

    def _stream(self, stream):
        return torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()

    def _launch(self, idx: List[int]) -> _Piece:
        sizes = [self.sizes[i] for i in idx]
        numel, dtype = sum(sizes), self.dtypes[idx[0]]
        with self._stream(self.copy_stream if self.cuda else None):
            send = torch.empty(numel, dtype=dtype, device=self.device)
            dsts, srcs = [], []
            for i, offset in zip(idx, itertools.accumulate([0] + sizes)):
                source = self.sources.pop(self.names[i], None)
                # this rank's rows; fewer (or none) on the last ranks
                local = (self.locals[i] if source is None else source()).reshape(-1)
                if source is not None:  # computed now: copied now, so its memory goes back at once
                    send[offset:offset + local.numel()].copy_(local)
                elif local.numel():
                    dsts.append(send[offset:offset + local.numel()])
                    srcs.append(local)
            # One foreach copy for the piece (one kernel per dtype pair on CUDA rather than one per
            # tensor); it casts (master -> wire dtype) as copy_ does; from the host it moves the
            # master bytes, then casts.
            if dsts:  # none when this rank holds no rows of the piece (uneven shards)
                torch._foreach_copy_(dsts, srcs, non_blocking=True)
        if self.world == 1:
            recv = send
        else:
            if self.cuda:
                self.gather_stream.wait_stream(self.copy_stream)
            with self._stream(self.gather_stream if self.cuda else None):
                recv = torch.empty(self.world * numel, dtype=dtype, device=self.device)  # 1-D: gloo
                dist.all_gather_into_tensor(recv, send, group=self.group)
        done = None
        if self.cuda:
            send.record_stream(self.gather_stream)
            done = torch.cuda.Event()
            done.record(self.gather_stream if self.world > 1 else self.copy_stream)
        return _Piece(idx, recv.view(self.world, numel), done, self._launch_cost(idx))

    def _cut(self, piece: _Piece) -> Dict[int, torch.Tensor]:
        """Full tensors of a gathered piece: views of the buffer when it is one whole tensor,
        else one `split_with_sizes_copy` (FSDP2's own copy-out op) from the rank-major buffer into
        a param-major one, and views of that. Per-tensor copies cost a kernel launch each, which
        made a 1.5B model at world 2 host-bound (measured on H200)."""
        if self.cuda:
            self.caller.wait_event(piece.done)
            piece.recv.record_stream(self.caller)
        sizes = [self.sizes[i] for i in piece.idx]
        if self._whole(piece.idx):  # one rank, or one evenly sharded tensor: already param-major
            bounds = list(itertools.accumulate([0] + sizes))
            parts = [piece.recv[:, a:b].reshape(-1) for a, b in zip(bounds, bounds[1:])]
        else:
            flat = torch.empty(self.world * sum(sizes), dtype=piece.recv.dtype, device=self.device)
            parts = list(torch.split(flat, [self.world * size for size in sizes]))
            torch.split_with_sizes_copy(piece.recv, sizes, dim=1,
                                        out=[part.view(self.world, size) for part, size in zip(parts, sizes)])
        # Padding rows (uneven shards) sit at the end of each tensor's rank-major rows: drop them.
        return {i: part[:self.params[i].numel()].view(self.params[i].shape) for i, part in zip(piece.idx, parts)}

    def __iter__(self) -> Iterator[Group]:
        left = collections.Counter(self.atoms)
        ready: Dict[str, Group] = collections.defaultdict(dict)
        inflight: collections.deque = collections.deque()  # launched, not yet consumed by the caller
        consumed: collections.deque = collections.deque()  # (event on the caller's stream, cost)
        used, nxt = 0, 0
        while nxt < len(self.pieces) or inflight:
            # Launch ahead while the budget allows (always at least one piece).
            while nxt < len(self.pieces):
                cost = self._launch_cost(self.pieces[nxt])
                while consumed and used + cost > self.budget:
                    event, freed = consumed.popleft()
                    event.synchronize()  # the caller's stream is done with that piece
                    used -= freed
                if inflight and used + cost > self.budget:
                    break
                inflight.append(self._launch(self.pieces[nxt]))
                used += cost
                nxt += 1
            piece = inflight.popleft()
            group: Group = {}
            for i, tensor in self._cut(piece).items():
                atom = self.atoms[i]
                ready[atom][self.names[i]] = tensor
                left[atom] -= 1
                if left[atom] == 0:
                    group.update(ready.pop(atom))
            piece.recv = None
            if group:
                yield group
            if self.cuda:  # recorded after the caller used the group (the generator resumed)
                event = torch.cuda.Event()
                event.record(self.caller)
                consumed.append((event, piece.cost))
            else:
                used -= piece.cost

    def _launch_cost(self, idx: List[int]) -> int:
        numel = sum(self.sizes[i] for i in idx)
        return numel * (self.world + 1) * self.dtypes[idx[0]].itemsize * (1 if self._whole(idx) else 2)


def _local_is_full(named: List[Tuple[str, torch.Tensor]], device: torch.device) -> bool:
    """One rank, and every local shard already on the engine device: the shards are the full tensors."""
    return named[0][1].device_mesh.size() == 1 and all(p.to_local().device == device for _, p in named)


def _fsdp2_pipelined_groups(model: nn.Module, device: torch.device, bucket_bytes: int, wire: Wire,
                            select: Callable[[str], bool], merge_scale: Optional[float] = None) -> Iterator[Group]:
    """FSDP2, any offload: the local shards (device, pinned host or pageable host) are gathered
    in pieces of one bucket, in their `wire` dtype, overlapping copy-in, all-gather and the
    caller's use (see above). With `merge_scale`, LoRA layers are merged on the shards before the
    gather (`_merge_on_shards`) and travel as plain weights in the engine dtype."""
    units = _layout(model, "fsdp2 units", lambda: _units(model, _is_fsdp2))
    named = [(n, p) for _, members in units for n, p in _unique(members) if select(n)]
    if not named:
        return
    budget = _layout(model, "largest unit bytes", lambda: largest_unit_bytes(model)) + bucket_bytes
    sources: Dict[str, ShardSource] = {}
    if merge_scale is not None:
        named, sources = _merge_on_shards(named, device, bucket_bytes, budget, wire, merge_scale)
    if _local_is_full(named, device):
        # One rank, shards already on the engine device: the local shards are the full tensors,
        # cast to the wire dtype unit by unit (a copy where it differs from the master dtype).
        unit_of = {id(p): k for k, (_, members) in enumerate(units) for _, p in _unique(members)}
        for _, pairs in itertools.groupby(named, key=lambda np: unit_of[id(np[1])]):
            yield {n: sources.pop(n)() if n in sources else p.to_local().detach().to(wire(n, p)) for n, p in pairs}
        return
    yield from _ShardGather(named, device, bucket_bytes, budget, wire, sources)


# ----------------------------------------------------------------------------- merged LoRA on the shards
# FSDP2 shards dim 0, which a LoRA layer's base weight W (out x in) and its B (out x r) share: each
# rank holds the same rows of both. Rows of W + (B @ A) * scale need only those rows and the whole
# (small, r x in) A, so each rank merges its own rows in float32, casts them to the engine dtype and
# the gather moves only engine-dtype bytes, as for full weights. The A's are all-gathered first (in
# the master dtype; r x in x 4 bytes per LoRA layer). Bit for bit the rows of `merge_lora` on the
# full tensors: the elementwise steps do not see the row count, and the product is taken at the
# full shape, so the BLAS picks the same kernel as for the full merge (`merge_lora_rows`).

ShardSource = Callable[[], torch.Tensor]  # this rank's rows of a tensor, computed when packed


def _merge_on_shards(named: List[Tuple[str, torch.Tensor]], device: torch.device, bucket_bytes: int,
                     budget: int, wire: Wire, scale: float) -> Tuple[List[Tuple[str, torch.Tensor]],
                                                                    Dict[str, ShardSource]]:
    """(what to gather, sources): LoRA tensors dropped, each base weight renamed to its merged
    name (`stem.weight`, a plain weight to the transform) with a source computing its merged rows."""
    params = dict(named)
    lora_a = [(n, p) for n, p in named if f".lora_A.{ADAPTER}." in n]
    full_a: Dict[str, torch.Tensor] = {}
    if lora_a:
        for group in _fsdp2_pipelined_groups_of(lora_a, device, bucket_bytes, budget, wire):
            full_a.update(group)
    out: List[Tuple[str, torch.Tensor]] = []
    sources: Dict[str, ShardSource] = {}
    for name, param in named:
        if is_lora_param(name):
            continue
        if name.endswith(".base_layer.weight"):
            stem = name[: -len("base_layer.weight")]
            lora_b = params[f"{stem}lora_B.{ADAPTER}.weight"]
            if lora_b.to_local().shape[0] != param.to_local().shape[0]:
                raise ValueError(f"{name}: base weight and LoRA B shards hold different rows "
                                 f"({param.to_local().shape[0]} vs {lora_b.to_local().shape[0]})")
            name = stem + "weight"
            sources[name] = _merged_source(param, full_a.pop(f"{stem}lora_A.{ADAPTER}.weight"), lora_b, scale,
                                           wire(name, param), device)
        out.append((name, param))
    return out, sources


def _fsdp2_pipelined_groups_of(named, device, bucket_bytes, budget, wire) -> Iterator[Group]:
    """Full tensors of some FSDP2 parameters (the local shards where one rank holds them all)."""
    if _local_is_full(named, device):
        return iter([{n: p.to_local().detach().to(wire(n, p)) for n, p in named}])
    return iter(_ShardGather(named, device, bucket_bytes, budget, wire))


def _merged_source(weight, lora_a: torch.Tensor, lora_b, scale: float, dtype: torch.dtype,
                   device: torch.device) -> ShardSource:
    from torch.distributed.tensor import Shard

    def rows() -> torch.Tensor:
        if device.type == "cuda":  # made on the caller's stream, used on the current (copy) stream
            lora_a.record_stream(torch.cuda.current_stream(device))
        w = weight.to_local().detach().to(device, non_blocking=True)
        b = lora_b.to_local().detach().to(device, non_blocking=True)
        return merge_lora_rows(w, lora_a, b, scale, dtype, first, weight.shape[0])

    # Shard(0) cuts rows as torch.chunk does: ceil(out / world) per rank, the last ones fewer or none.
    per_rank = -(-weight.shape[0] // weight.device_mesh.size())
    first = min(weight.shape[0], weight.device_mesh.get_coordinate()[0] * per_rank)
    if tuple(weight.placements) != (Shard(0),) or weight.to_local().shape[0] != min(per_rank, weight.shape[0] - first):
        raise ValueError(f"merged LoRA on the shards expects Shard(0) on a 1-D mesh, got {weight.placements} "
                         f"with {weight.to_local().shape[0]} local rows of {weight.shape[0]}")

    return rows


def _bucket_bytes(cfg: DictConfig) -> int:
    return cfg.sync.bucket_mb * 2**20


# ----------------------------------------------------------------------------- wire dtypes
# What each tensor is gathered in. The engine's dtype (`model.dtype`) wherever the value is
# final, so float32 masters are cast once, on the rank that holds them, before any copy or
# collective; merged LoRA's inputs in their own (master) dtype, because the merge is computed
# in float32 from them and rounds once at the end.

def _engine_wire(cfg: DictConfig) -> Wire:
    dtype = torch_dtype(cfg.model.dtype)
    return lambda name, param: dtype


def _merge_wire(cfg: DictConfig) -> Wire:
    dtype = torch_dtype(cfg.model.dtype)
    return lambda name, param: param.dtype if _merge_input(name) else dtype


def _merge_input(name: str) -> bool:
    return is_lora_param(name) or name.endswith(".base_layer.weight")


# ----------------------------------------------------------------------------- transforms

def _full_weights(groups: Iterable[Group], model: nn.Module, cfg: DictConfig,
                  device: torch.device) -> Iterator[Named]:
    """Base weights under HF names (LoRA tensors of a peft model are skipped)."""
    skipped, dtype = _skipped_names(model), torch_dtype(cfg.model.dtype)
    for group in groups:
        for raw in list(group):
            tensor = group.pop(raw)  # pop: the stream keeps no reference to what it yielded
            if is_lora_param(raw) or hf_name(raw) in skipped:
                continue
            yield hf_name(raw), tensor.to(device=device, dtype=dtype)


def merge_lora(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
               dtype: torch.dtype) -> torch.Tensor:
    """W + (B @ A) * scale in float32, into a new tensor, cast to `dtype` (peft's op order).

    Kept as written although it costs float32 temporaries of W's size: a bf16 `addmm` (W as the
    addend) is faster but rounds differently (fused epilogue, other summation order), and the
    tests pin this formula bit for bit (docs/PERFORMANCE.md)."""
    return merge_lora_rows(weight, lora_a, lora_b, scale, dtype, 0, weight.shape[0])


def merge_lora_rows(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                    dtype: torch.dtype, first: int, full_rows: int) -> torch.Tensor:
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
        b[first:first + rows] = lora_b
    update = (b @ lora_a.float())[first:first + rows].mul_(scale)
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
        sums = torch.stack([rounding.sum(), update.abs().sum(), torch.tensor(float(rounding.numel()),
                                                                             device=rounding.device)]).double()
        worst = rounding.max().double() if rounding.numel() else torch.zeros((), dtype=torch.float64,
                                                                            device=rounding.device)
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


def _merged_weights(groups: Iterable[Group], model: nn.Module, cfg: DictConfig,
                    device: torch.device) -> Iterator[Named]:
    skipped, dtype = _skipped_names(model), torch_dtype(cfg.model.dtype)
    scale = cfg.lora.alpha / cfg.lora.rank
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


def _adapter_weights(groups: Iterable[Group], model: nn.Module, cfg: DictConfig,
                     device: torch.device) -> Iterator[Named]:
    dtype = torch_dtype(cfg.model.dtype)
    for group in groups:
        for raw in list(group):
            tensor = group.pop(raw)
            if is_lora_param(raw):
                yield peft_name(raw), tensor.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- the table
# Entry (fsdp, offload, lora) = the gather of (fsdp, offload) + the transform of lora, so each behaviour
# is written once. FSDP2 gathers alike under every offload mode (the pipelined gather reads device,
# pinned host and pageable host shards the same way); FSDP1 none and cpu are the same summon (with
# CPUOffload, FSDP copies the host shard in itself); FSDP1 manual brings each unit's shard to the
# device for its summon. A transform names the dtype each tensor travels in and the tensors it needs:
# FSDP2 adapter syncs gather only the LoRA shards; FSDP1 cannot gather part of a flat parameter, so it
# summons the whole unit and the transform drops the rest.

Gather = Callable[[nn.Module, DictConfig, torch.device, Wire, Callable[[str], bool], bool], Iterator[Group]]


@dataclass(frozen=True)
class Transform:
    wire: Callable[[DictConfig], Wire]  # the dtype each tensor is gathered in
    select: Callable[[str], bool]  # the raw names it needs (a gather may hand it more)
    apply: Callable[[Iterable[Group], nn.Module, DictConfig, torch.device], Iterator[Named]]
    # Merged LoRA: a gather that can merge on the shards does (FSDP2: the base weight then comes as
    # a plain weight, already merged, and its LoRA tensors do not come); others hand over W, A, B.
    merges: bool = False


def _fsdp2_gather(model, cfg, device, wire, select, merge):
    scale = cfg.lora.alpha / cfg.lora.rank if merge else None
    return _fsdp2_pipelined_groups(model, device, _bucket_bytes(cfg), wire, select, scale)


def _fsdp1_summon_gather(model, cfg, device, wire, select, merge):
    return _fsdp1_summon_groups(model, device, wire)


def _fsdp1_manual_gather(model, cfg, device, wire, select, merge):
    return _fsdp1_manual_groups(model, device, wire)


def _everything(name: str) -> bool:
    return True


GATHERS: Dict[Tuple[str, str], Gather] = {
    ("fsdp2", "none"): _fsdp2_gather,
    ("fsdp2", "cpu"): _fsdp2_gather,
    ("fsdp2", "manual"): _fsdp2_gather,
    ("fsdp1", "none"): _fsdp1_summon_gather,
    ("fsdp1", "cpu"): _fsdp1_summon_gather,
    ("fsdp1", "manual"): _fsdp1_manual_gather,
}
TRANSFORMS: Dict[str, Transform] = {
    "none": Transform(_engine_wire, _everything, _full_weights),
    "merged": Transform(_merge_wire, _everything, _merged_weights, merges=True),
    "adapter": Transform(_engine_wire, is_lora_param, _adapter_weights),
}


def compose(gather: Gather, transform: Transform) -> Strategy:
    """The strategy that runs `gather` with the transform's dtypes and selection, then the transform."""
    def strategy(model: nn.Module, cfg: DictConfig, device: torch.device) -> Iterator[Named]:
        groups = gather(model, cfg, device, transform.wire(cfg), transform.select, transform.merges)
        return transform.apply(groups, model, cfg, device)

    strategy.__name__ = f"{gather.__name__.lstrip('_')}+{transform.apply.__name__.lstrip('_')}"
    return strategy


def _register_table() -> None:
    for (fsdp, offload), gather in GATHERS.items():
        for lora, transform in TRANSFORMS.items():
            register(fsdp, offload, lora)(compose(gather, transform))


_register_table()


# ----------------------------------------------------------------------------- references
# For benchmarks and regression tests only; selected by sync.strategy, never as a fallback.

def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@_register_reference("naive")
def _naive(model, cfg, device):
    """`model.to(device)` then `module.state_dict()`: crashes under FSDP2 + CPUOffloadPolicy (verl #5995)."""
    model.to(device)
    state = model.state_dict()
    groups = ({name: _full_tensor(state.pop(name))} for name in list(state))
    return _full_weights(groups, model, cfg, device)


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


@_register_reference("dcp_full_cpu")
def _dcp_full_cpu(model, cfg, device):
    """DCP full state dict on rank 0's CPU (what the first upstream fix used), then broadcast."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return _full_weights(_broadcast_from_rank0(state, device), model, cfg, device)


@_register_reference("dtensor_stream")
def _dtensor_stream(model, cfg, device):
    """Per-parameter `.to(device).full_tensor()` (FSDP2 only): one all-gather per tensor."""
    from torch.distributed.tensor import DTensor

    params = list(model.named_parameters())
    if not all(isinstance(p, DTensor) for _, p in params):
        raise ConfigError("sync.strategy=dtensor_stream needs DTensor parameters (fsdp=fsdp2)")
    groups = ({name: p.detach().to(device).full_tensor()} for name, p in params)
    return _full_weights(groups, model, cfg, device)


# ----------------------------------------------------------------------------- public API

class WeightStream:
    """Iterator of (hf_name, tensor) that counts, times and (optionally) digests what it yields.

    Counts: `num_tensors`, `num_bytes`, `max_tensor_bytes`, `names`. Time: `seconds` spent
    producing tensors (inside `next()`: the FSDP all-gather, a LoRA merge, a host->device copy;
    everything else inside the consumer's loop is the consumer's). `peak_live_bytes`: the most
    bytes of yielded tensors alive at once (tracked with weakrefs), i.e. what the stream plus
    the consumer's buffering hold beyond the model. With `digest=True` each tensor is digested
    on its device as it is yielded (`recipe.digest`; `held_form(name, tensor)` maps it to the
    form the consumer will hold, e.g. a scaled LoRA B); `digest_seconds` is that time and
    `digests()` returns {name: Digest} after one host sync.
    """

    def __init__(self, pairs: Iterable[Named], strategy: str = "", digest: bool = False,
                 held_form: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None):
        self._pairs, self.strategy = iter(pairs), strategy
        self.num_tensors = self.num_bytes = self.max_tensor_bytes = 0
        self.names: List[str] = []
        self.seconds = self.digest_seconds = 0.0
        self._live = self.peak_live_bytes = 0
        self._digest, self._held_form = digest, held_form
        self._info: List[Tuple[int, int, str]] = []
        self._sums: List[Optional[torch.Tensor]] = []  # None: a small tensor, digested in a batch later
        self._small: List[Tuple[int, torch.Tensor]] = []

    def __iter__(self) -> "WeightStream":
        return self

    def __next__(self) -> Named:
        t0 = time.perf_counter()
        try:
            with torch.no_grad():  # gathers write into fresh buffers; the trained params keep no history
                name, tensor = next(self._pairs)
        finally:
            self.seconds += time.perf_counter() - t0
        size = tensor.numel() * tensor.element_size()
        self.num_tensors += 1
        self.num_bytes += size
        self.max_tensor_bytes = max(self.max_tensor_bytes, size)
        self.names.append(name)
        self._live += size
        self.peak_live_bytes = max(self.peak_live_bytes, self._live)
        weakref.finalize(tensor, self._release, size)
        if self._digest:
            self._add_digest(name, tensor)
        return name, tensor

    def _release(self, size: int) -> None:
        self._live -= size

    @torch.no_grad()
    def _add_digest(self, name: str, tensor: torch.Tensor) -> None:
        """Large tensors are digested now (sums stay on the device); small ones are copied and
        digested in batches at `digests()` (a copy costs less than a handful of small ops)."""
        t0 = time.perf_counter()
        held = self._held_form(name, tensor) if self._held_form is not None else tensor
        if held.numel() * held.element_size() <= digest_mod.SMALL_BYTES:
            self._small.append((len(self._info), held.detach().clone() if held is tensor else held))
            self._info.append(digest_mod.shape_info(held))
            self._sums.append(None)
        else:
            self._info.append(digest_mod.shape_info(held))
            self._sums.append(digest_mod.digest_sums(held))
        self.digest_seconds += time.perf_counter() - t0

    def digests(self) -> Dict[str, "digest_mod.Digest"]:
        """{name: Digest} of everything yielded so far (one host sync; timed in `digest_seconds`)."""
        t0 = time.perf_counter()
        large = [i for i, s in enumerate(self._sums) if s is not None]
        done = dict(zip(large, digest_mod.finish([self._info[i] for i in large], [self._sums[i] for i in large])))
        done.update(zip([i for i, _ in self._small], digest_mod.digests([t for _, t in self._small])))
        out = {name: done[i] for i, name in enumerate(self.names) if i in done}
        self.digest_seconds += time.perf_counter() - t0
        return out


def strategy_name(cfg: DictConfig) -> str:
    """What `stream_weights` runs for `cfg`: "fsdp2/cpu/merged" or a reference name."""
    return "/".join(combo_key(cfg)) if cfg.sync.strategy == "auto" else cfg.sync.strategy


def stream_weights(model: nn.Module, cfg: DictConfig, device: torch.device | str) -> WeightStream:
    """The weights the engine needs after an update (full, merged, or adapter tensors; see module doc)."""
    if cfg.sync.strategy == "auto":
        strategy = get_strategy(combo_key(cfg))
    else:
        strategy = get_reference(cfg.sync.strategy)
    return WeightStream(strategy(model, cfg, torch.device(device)), strategy_name(cfg))


def stream_transform(model: nn.Module, cfg: DictConfig, device: torch.device | str, transform: str) -> WeightStream:
    """The table's gather of (fsdp, offload) with the transform of lora mode `transform` ("none": full
    weights, "merged", "adapter"), whatever `lora.name` and `sync.strategy` say: the export takes the
    merged policy and the adapter of one LoRA model."""
    key = (cfg.fsdp.name, cfg.offload.name, transform)
    return WeightStream(get_strategy(key)(model, cfg, torch.device(device)), "/".join(key))


def stream_base_weights(model: nn.Module, cfg: DictConfig, device: torch.device | str) -> WeightStream:
    """Base weights under HF names, LoRA excluded and unmerged: the engine's first load."""
    key = (cfg.fsdp.name, cfg.offload.name, "none")
    return WeightStream(get_strategy(key)(model, cfg, torch.device(device)), "/".join(key) + "/base")
