"""How the weight stream crosses from a trainer rank to its engine process (`rollout.transport`).

Both transports carry the same buckets (recipe/remote.py): a bucket is one uint8 buffer holding a few
tensors, each at a 64-byte aligned offset, with its names, shapes and dtypes ("metas") sent over the
pipe. What differs is how the bytes cross:

- `group`: over a torch process group of two (trainer = 0, engine = 1) made from the pair's TCPStore:
  gloo on CPU, NCCL on CUDA. NCCL cannot pair two processes on one device.
- `ipc`: the buffer itself goes over the pipe with torch.multiprocessing's reductions (registered into
  multiprocessing's ForkingPickler, which `Connection.send` uses): on CPU its storage is moved to shared
  memory (/dev/shm) and a file descriptor is sent; on CUDA a CUDA IPC handle. The engine copies the
  bucket into a fresh buffer, drops the shared one and acknowledges; the trainer refills its staging
  buffer only after that acknowledgement. The form for two processes on ONE GPU.

`auto` is `ipc` where the engine's CUDA device is one of the trainer's, else `group` (on CPU: `group`).

Either way the engine's side yields views of a fresh buffer per bucket: an engine may keep earlier
views until its load ends (a fused qkv parameter stacks three of them).
"""

from __future__ import annotations

import datetime
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.multiprocessing import reductions  # importing torch.multiprocessing registers them into ForkingPickler

ALIGN = 64  # bytes: each tensor of a bucket starts at a multiple (a view of any dtype is then aligned)


def engine_index(devices: Sequence[int], world: int, rank: int) -> int:
    """The CUDA device index of rank `rank`'s engine: `rollout.devices`[rank], else world + rank (the devices
    after the trainer's cuda:0 .. world - 1)."""
    return list(devices)[rank] if len(devices) else world + rank


def choose_transport(transport: str, device: torch.device, index: int, world: int) -> str:
    """`group` or `ipc` for an engine on CUDA device `index` (`engine_index`): `transport` unless "auto";
    auto is ipc where that device is one of the trainer's (cuda:0 .. world - 1)."""
    if transport != "auto":
        return transport
    if device.type != "cuda":
        return "group"
    return "ipc" if index < world else "group"


def pair_group(store, rank: int, device: torch.device, timeout: datetime.timedelta):
    """A process group of two (trainer = 0, engine = 1) outside torch's default group."""
    prefix = dist.PrefixStore("weights", store)
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefix, rank, 2, options)
    return dist.ProcessGroupGloo(prefix, rank, 2, timeout)


def aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def share(data: torch.Tensor) -> Any:
    """What goes over the pipe for `data` with transport ipc. CPU: the tensor (ForkingPickler moves its
    storage to shared memory; only buffers of the stream's own go here). CUDA: the arguments of torch's
    `rebuild_cuda_tensor` once the device has finished writing `data`, with the engine's device index (it
    sees its one device as cuda:0, where torch would name the trainer's index)."""
    if data.device.type != "cuda":
        return data
    torch.cuda.current_stream(data.device).synchronize()
    rebuild, args = reductions.reduce_tensor(data)
    if rebuild is not reductions.rebuild_cuda_tensor or args[6] != data.device.index:
        raise RuntimeError(f"torch's CUDA tensor reduction changed form ({rebuild.__name__}); rollout.transport=ipc")
    return ("cuda", (*args[:6], 0, *args[7:]))


def rebuilt(shared: Any) -> torch.Tensor:
    """The engine's view of what `share` sent (shared memory or CUDA IPC: the trainer's bytes, not a copy)."""
    if isinstance(shared, torch.Tensor):
        return shared
    return reductions.rebuild_cuda_tensor(*shared[1])


def fresh_copy(shared: Any) -> torch.Tensor:
    """A buffer of the engine's own holding what `share` sent, complete when this returns; the shared view
    is dropped on return, so the trainer may refill its buffer once told."""
    view = rebuilt(shared)
    data = view.clone()
    if data.is_cuda:
        torch.cuda.current_stream(data.device).synchronize()
    return data


class Receiver:
    """The weight stream on the engine's side: (name, tensor) views of one bucket at a time, received
    when the engine's load asks for the next tensor (not a generator: it can be drained after a load
    that stopped early or was closed). With `group` None the bytes come over the pipe (ipc) and each
    bucket is acknowledged with `ack(key)` once copied."""

    def __init__(self, conn, group, device: torch.device, ack: Optional[Callable[[Any], None]] = None):
        self.conn, self.group, self.device, self.ack = conn, group, device, ack
        self.pending: Iterator[Tuple[str, torch.Tensor]] = iter(())
        self.ended = False
        self.aborted = False

    def __iter__(self) -> "Receiver":
        return self

    def __next__(self) -> Tuple[str, torch.Tensor]:
        while True:
            item = next(self.pending, None)
            if item is not None:
                return item
            if self.ended:
                raise StopIteration
            self.pending = self.next_bucket()

    def next_bucket(self) -> Iterator[Tuple[str, torch.Tensor]]:
        try:
            return self._bucket()
        except Exception:
            if self.group is None and not self.ended:
                # ipc: a bucket not rebuilt or not copied is never acknowledged, so the trainer sends nothing
                # more; it stops at the load's failed reply (its traceback), which a drain must not delay
                self.ended = True
            raise

    def _bucket(self) -> Iterator[Tuple[str, torch.Tensor]]:
        kind, metas, payload = self.conn.recv()
        if kind == "end":
            self.ended = True
            if metas == "abort":
                self.aborted = True
                raise RuntimeError("the trainer's weight stream failed before its end")
            return iter(())
        if self.group is not None:
            data = torch.empty(payload, dtype=torch.uint8, device=self.device)  # fresh: earlier views stay valid
            self.group.recv([data], 0, 0).wait()
        else:
            key, shared = payload
            del payload
            data = fresh_copy(shared)
            del shared  # the last reference to the trainer's buffer: dropped before the trainer may refill it
            self.ack(key)
        return iter(_views(data, metas))

    def drain(self) -> None:
        while not self.ended:
            self.pending = iter(())
            try:
                self.next_bucket()
            except RuntimeError:
                if not self.aborted:
                    raise


def _views(data: torch.Tensor, metas) -> list:
    out = []
    for name, shape, dtype, offset in metas:
        dt = getattr(torch, dtype)
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dt).element_size()
        out.append((name, data[offset : offset + nbytes].view(dt).reshape(shape)))
    return out
