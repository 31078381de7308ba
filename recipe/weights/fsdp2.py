"""The pipelined FSDP2 gather, and merged LoRA on the shards (see `recipe.weights`)."""

from __future__ import annotations

import collections
import contextlib
import itertools
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from recipe.model import largest_unit_bytes
from recipe.names import ADAPTER, is_lora_param
from recipe.weights.lora import merge_lora_rows
from recipe.weights.units import Group, Wire, cached_layout, fsdp_units, is_fsdp2, unique_tensors


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


def _plan_pieces(
    params: List[torch.Tensor], dtypes: List[torch.dtype], world: int, piece_bytes: int
) -> List[List[int]]:
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

    def __init__(
        self,
        named: List[Tuple[str, torch.Tensor]],
        device: torch.device,
        piece_bytes: int,
        budget_bytes: int,
        wire: Wire,
        sources: Optional[Dict[str, "ShardSource"]] = None,
    ):
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
                    send[offset : offset + local.numel()].copy_(local)
                elif local.numel():
                    dsts.append(send[offset : offset + local.numel()])
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
            torch.split_with_sizes_copy(
                piece.recv, sizes, dim=1, out=[part.view(self.world, size) for part, size in zip(parts, sizes)]
            )
        # Padding rows (uneven shards) sit at the end of each tensor's rank-major rows: drop them.
        return {i: part[: self.params[i].numel()].view(self.params[i].shape) for i, part in zip(piece.idx, parts)}

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


def fsdp2_pipelined_groups(
    model: nn.Module,
    device: torch.device,
    bucket_bytes: int,
    wire: Wire,
    select: Callable[[str], bool],
    merge_scale: Optional[float] = None,
) -> Iterator[Group]:
    """FSDP2, any offload: the local shards (device, pinned host or pageable host) are gathered
    in pieces of one bucket, in their `wire` dtype, overlapping copy-in, all-gather and the
    caller's use (see above). With `merge_scale`, LoRA layers are merged on the shards before the
    gather (`_merge_on_shards` below) and travel as plain weights in the engine dtype."""
    units = cached_layout(model, "fsdp2 units", lambda: fsdp_units(model, is_fsdp2))
    named = [(n, p) for _, members in units for n, p in unique_tensors(members) if select(n)]
    if not named:
        return
    budget = cached_layout(model, "largest unit bytes", lambda: largest_unit_bytes(model)) + bucket_bytes
    sources: Dict[str, ShardSource] = {}
    if merge_scale is not None:
        named, sources = _merge_on_shards(named, device, bucket_bytes, budget, wire, merge_scale)
    if _local_is_full(named, device):
        # One rank, shards already on the engine device: the local shards are the full tensors,
        # cast to the wire dtype unit by unit (a copy where it differs from the master dtype).
        unit_of = {id(p): k for k, (_, members) in enumerate(units) for _, p in unique_tensors(members)}
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


def _merge_on_shards(
    named: List[Tuple[str, torch.Tensor]],
    device: torch.device,
    bucket_bytes: int,
    budget: int,
    wire: Wire,
    scale: float,
) -> Tuple[List[Tuple[str, torch.Tensor]], Dict[str, ShardSource]]:
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
                raise ValueError(
                    f"{name}: base weight and LoRA B shards hold different rows "
                    f"({param.to_local().shape[0]} vs {lora_b.to_local().shape[0]})"
                )
            name = stem + "weight"
            sources[name] = _merged_source(
                param, full_a.pop(f"{stem}lora_A.{ADAPTER}.weight"), lora_b, scale, wire(name, param), device
            )
        out.append((name, param))
    return out, sources


def _fsdp2_pipelined_groups_of(named, device, bucket_bytes, budget, wire) -> Iterator[Group]:
    """Full tensors of some FSDP2 parameters (the local shards where one rank holds them all)."""
    if _local_is_full(named, device):
        return iter([{n: p.to_local().detach().to(wire(n, p)) for n, p in named}])
    return iter(_ShardGather(named, device, bucket_bytes, budget, wire))


def _merged_source(
    weight, lora_a: torch.Tensor, lora_b, scale: float, dtype: torch.dtype, device: torch.device
) -> ShardSource:
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
        raise ValueError(
            f"merged LoRA on the shards expects Shard(0) on a 1-D mesh, got {weight.placements} "
            f"with {weight.to_local().shape[0]} local rows of {weight.shape[0]}"
        )

    return rows
